"""`unify build`: load -> calibrate -> group -> merge -> write, one decoder layer at a time.

`build(model, BuildOptions(...))` is the whole command; the CLI only forwards its flags, so one request gives the same
checkpoint from Python and from the shell. What a request leaves open comes from the model's recipe
(`resolve_options`, `choose_skipped_layers`), and the resolved request is recorded in united.json.
A request is checked in two steps before any work: what it says on its own (`check_request`: ranges, methods and
their parameters, device, calibration source, output path) before the model is fetched or loaded, then what needs the
model's config (sequence length, skipped layers) before the model is built.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import recipes
from runtime.checkpoint import CheckpointWriter, all_finite, check_output, config_hash, weight_probe
from runtime.discover import find_moe_layers
from runtime.errors import BrownoutError
from runtime.layout import glu_of, native_of

from .calibration import (MIN_CALIB_TOKENS, MoEProbe, capture_layer_inputs, check_calib_source, decoder_layers,
                          iter_texts, tokenize)
from .grouping import GROUPINGS, check_partition
from .loading import InMemorySource, ShardSource, load_config, recipe_for_model_type, resolve
from .merge import MERGES, MergeContext
from .registry import Method


DEFAULT_SEQ_LEN = 512


@dataclass
class BuildOptions:
    out: str
    way: int | None = None  # experts per group; with neither way nor groups, the recipe's default way
    groups: int | None = None  # groups per layer, instead of way
    grouping: str | None = None  # None = the recipe's, else consecutive
    merge: str | None = None  # None = the recipe's, else average
    grouping_params: Any = None  # the grouping's parameters: {field: value or its text}, or its dataclass
    merge_params: Any = None  # the merge's, e.g. {"steps": 300, "init": "average"} for distill
    calib: str | None = None  # text file, local dataset or dataset name; None = the recipe's, else the bundled sample
    calib_split: str = "train"
    calib_column: str = "text"
    calib_tokens: int = 16384  # at least MIN_CALIB_TOKENS
    seq_len: int | None = None  # tokens per calibration sequence; None = DEFAULT_SEQ_LEN or the model's maximum if fewer
    batch_size: int = 8
    samples_per_layer: int = 4096  # tokens kept per MoE layer for activation-guided methods
    device: str = "cpu"
    seed: int = 0
    overwrite: bool = False
    skip_layers: list[int] | None = None  # None = the recipe's, by the outside-in rule; a list is applied as given
    progress: bool = True


def resolve_options(opts: BuildOptions, recipe: recipes.Recipe | None) -> BuildOptions:
    """`opts` with what it leaves open filled from the recipe's defaults (else consecutive / average), the method
    names checked, and the methods' parameters as their typed dataclasses."""
    defaults = recipe.defaults if recipe is not None else recipes.BuildDefaults()
    grouping = GROUPINGS.get(opts.grouping or defaults.grouping or "consecutive")
    merge = MERGES.get(opts.merge or defaults.merge or "average")
    way = opts.way
    if way is None and opts.groups is None:
        way = defaults.way
        if way is None:
            raise BrownoutError("give exactly one of --way K (experts per group) and --groups N (groups per layer); "
                                "this model's recipe has no default way")
    calib = opts.calib
    if calib is None and recipe is not None and recipe.calib is not None:
        calib = str(recipe.calib)  # the recipe's own calibration sample
    grouping_params, merge_params = grouping.make_params(opts.grouping_params), merge.make_params(opts.merge_params)
    return replace(opts, way=way, grouping=grouping.name, merge=merge.name, calib=calib,
                   grouping_params=grouping_params, merge_params=merge_params)


def choose_skipped_layers(requested, num_layers: int, moe_layers: list[int], from_recipe: bool) -> list[int]:
    """The decoder layers left alone. Negative entries count from the end, like Python indices.

    A recipe's list is written for full-size models (the paper leaves the first two and last two layers alone); on a
    model with few layers it would leave nothing to unite. So it is applied from the outside in (0, -1, 1, -2, ...)
    and stops before it would leave fewer than half of the MoE layers united (and at least one); entries beyond the
    model's depth are dropped. A list the user gives is applied as given: an entry out of range, or a list that
    leaves no MoE layer, is an error."""
    requested = [int(i) for i in requested]
    if not from_recipe:
        bad = [i for i in requested if not -num_layers <= i < num_layers]
        if bad:
            raise BrownoutError(f"--skip-layers {bad[0]} is out of range: the model has {num_layers} decoder layers "
                                f"(valid: {-num_layers}..{num_layers - 1})")
        skip = sorted({i % num_layers for i in requested})
        if set(moe_layers) <= set(skip):
            raise BrownoutError(f"--skip-layers {','.join(map(str, requested))} leaves every MoE layer alone "
                                f"(MoE layers: {', '.join(map(str, moe_layers))}); nothing to build")
        return skip
    resolved = {i % num_layers for i in requested if -num_layers <= i < num_layers}
    keep_at_least = max(1, math.ceil(len(moe_layers) / 2))
    skip: set[int] = set()
    for i in sorted(resolved, key=lambda i: (min(i, num_layers - 1 - i), i)):  # outside in, front first
        if len(set(moe_layers) - skip - {i}) < keep_at_least:
            break
        skip.add(i)
    return sorted(skip)


def _at_least(flag: str, value, low: int, why: str = "") -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise BrownoutError(f"{flag} {value} is out of range: it must be an integer >= {low}{why}")


def check_device(name: str) -> None:
    """Refuse a device string torch does not know, or one this machine (or this build of torch) does not have."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BrownoutError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is built without CUDA" if torch.version.cuda is None and torch.version.hip is None
                   else "no CUDA GPU is visible")
            raise BrownoutError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BrownoutError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return
    backend = getattr(torch, dev.type, None) if dev.type != "meta" else None
    available = getattr(backend, "is_available", None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise BrownoutError(f"--device {name}: no {dev.type} device is available here; use --device cpu")


def _check_writable(out: str) -> None:
    """Refuse an output whose nearest existing parent directory cannot be written (the build writes beside --out)."""
    parent = Path(os.path.abspath(out)).parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise BrownoutError(f"cannot write {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
        raise BrownoutError(f"cannot write {out}: {parent} is " + ("on a read-only file system" if read_only
                                                                    else "not writable (permission denied)"))


def check_request(opts: BuildOptions) -> None:
    """Everything about a request that can be judged without the model, refused in one line before any model is
    fetched or loaded and before any text is read: value ranges, method names and explicit method parameters, the
    device, the calibration source and the output path."""
    if opts.grouping is not None:
        GROUPINGS.get(opts.grouping)
    if opts.merge is not None:
        MERGES.get(opts.merge)
    for flag, value in (("--way", opts.way), ("--groups", opts.groups)):
        if value is not None:
            _at_least(flag, value, 1)
    _at_least("--calib-tokens", opts.calib_tokens, MIN_CALIB_TOKENS,
              " (with fewer, many experts of a layer with dozens of them get no routed token at all)")
    if opts.seq_len is not None:
        _at_least("--seq-len", opts.seq_len, 1)
    _at_least("--samples-per-layer", opts.samples_per_layer, 1)
    _at_least("batch_size", opts.batch_size, 1)
    for registry, name, params in ((GROUPINGS, opts.grouping, opts.grouping_params),
                                   (MERGES, opts.merge, opts.merge_params)):
        if name is not None:  # the recipe's method is known later, once the model is resolved
            registry.get(name).make_params(params)  # the parameter dataclass checks its own ranges
    check_device(opts.device)
    check_calib_source(opts.calib)
    check_output(opts.out, opts.overwrite)
    _check_writable(opts.out)


def _check_against_config(plan: BuildOptions, config) -> BuildOptions:
    """`plan` with its sequence length resolved against the model's context, and the layers it names checked
    against the model's depth; both known from the config alone, before the model is built."""
    limit = getattr(config, "max_position_embeddings", None)
    seq_len = plan.seq_len
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if isinstance(limit, int) and limit > 0 else DEFAULT_SEQ_LEN
    elif isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise BrownoutError(f"--seq-len {seq_len} is out of range: the model takes at most {limit} positions")
    n = getattr(config, "num_hidden_layers", None)
    if plan.skip_layers is not None and isinstance(n, int):
        bad = [i for i in plan.skip_layers if not -n <= int(i) < n]
        if bad:
            raise BrownoutError(f"--skip-layers {bad[0]} is out of range: the model has {n} decoder layers "
                                f"(valid: {-n}..{n - 1})")
    return replace(plan, seq_len=seq_len)


def _needs_data(plan: BuildOptions) -> bool:
    return GROUPINGS.get(plan.grouping).needs_data or MERGES.get(plan.merge).needs_data


@torch.no_grad()
def build(model: str | torch.nn.Module, opts: BuildOptions) -> Path:
    """Build a united-expert checkpoint for `model` (recipe name, directory, hub id or an already loaded model).
    A directory, hub id or loaded model gets the recipe of its model_type, when there is one."""
    t0 = time.time()
    check_request(opts)
    if isinstance(model, torch.nn.Module):
        config = model.config
        recipe = recipe_for_model_type(getattr(config, "model_type", None))
        plan = _check_against_config(resolve_options(opts, recipe), config)
        source, model_path = InMemorySource(model), None
        base = getattr(model, "name_or_path", "") or "<in-memory>"
    else:
        ref = resolve(model)
        config, recipe = load_config(ref), ref.recipe
        plan = _check_against_config(resolve_options(opts, recipe), config)
        # compute in float32 when layers run on calibration data; data-free builds keep the checkpoint's dtype
        dtype = torch.float32 if _needs_data(plan) else None
        source, model_path, base = ShardSource(ref, config, dtype), ref.path, str(model)
    net = source.model
    moe = {l.index: l for l in find_moe_layers(net)}
    num_experts = {l.num_experts for l in moe.values()}
    if len(num_experts) != 1:
        raise BrownoutError(f"MoE layers have different expert counts {sorted(num_experts)}; not supported")
    E = num_experts.pop()
    num_groups = check_partition(E, way=plan.way, groups=plan.groups)
    layers_name, layer_list = decoder_layers(net)
    from_recipe = plan.skip_layers is None
    requested = list(recipe.skip_layers if recipe is not None else ()) if from_recipe else list(plan.skip_layers)
    skip = choose_skipped_layers(requested, len(layer_list), sorted(moe), from_recipe)
    todo = [i for i in sorted(moe) if i not in skip]  # never empty: choose_skipped_layers keeps one at least

    writer = CheckpointWriter(plan.out, overwrite=plan.overwrite)
    try:
        meta_layers, probe = _walk(source, model_path, config, moe, todo, layers_name, layer_list, num_groups,
                                   writer, plan)
        meta = {
            "base_model": {"name": base, "model_type": config.model_type, "config_hash": config_hash(config),
                           "weight_probe": probe, "num_experts": E,
                           "moe_layers": sorted(moe)},
            "recipe": recipe.name if recipe is not None else None,
            "way": E // num_groups, "num_groups": num_groups, "grouping": plan.grouping, "merge": plan.merge,
            "skip_layers": skip,
            "skip_layers_requested": requested, "skip_layers_from": "recipe" if from_recipe else "options",
            "options": {k: v for k, v in asdict(plan).items() if k not in ("progress",)},
            "layers": meta_layers, "build_seconds": round(time.time() - t0, 2),
        }
        return writer.commit(meta)
    except BaseException:  # Ctrl-C and errors alike: leave nothing behind
        writer.abort()
        raise


def _walk(source, model_path, config, moe, todo, layers_name, layer_list, num_groups, writer, plan: BuildOptions):
    grouping, merge = GROUPINGS.get(plan.grouping), MERGES.get(plan.merge)
    need_data = grouping.needs_data or merge.needs_data
    net = source.model
    first, last = todo[0], todo[-1]
    probes: dict[int, list[float]] = {}  # fingerprint values, taken while the layer is in memory
    meta_layers: dict[str, dict] = {}
    # Non-layer modules (embeddings, rotary, final norm) are small: materialise them for the whole build.
    _materialize_outside(source, net, layers_name)

    if need_data:
        texts = iter_texts(plan.calib, plan.calib_split, plan.calib_column)  # read only as far as the budget needs
        batches = tokenize(texts, model_path, config.vocab_size, plan.calib_tokens, plan.seq_len, plan.calib)
        hidden, layer_args = capture_layer_inputs(net, batches, plan.batch_size, "cpu")
        total_tokens = batches.numel()
    bar = tqdm(range(len(layer_list)), desc="layers", disable=not plan.progress)
    for i in bar:
        if not need_data and i not in todo:
            continue
        prefix = f"{layers_name}.{i}"
        source.materialize(prefix)
        layer = layer_list[i]
        probe = None
        if i in moe:
            _check_finite(moe[i], i)
            if i in (first, last):
                gu = moe[i].experts.gate_up_proj
                probes[i] = weight_probe([gu[0], gu[-1]])
                del gu  # a name left bound here would keep this layer's experts alive through the next layers
            if i in todo and need_data:
                probe = MoEProbe(moe[i].experts, moe[i].num_experts, plan.samples_per_layer, total_tokens,
                                 plan.seed + i)
        if need_data:
            with torch.no_grad():
                for b, (args, kwargs) in enumerate(layer_args[i]):
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
        calib = probe.result() if probe is not None else None
        if i in todo:
            bar.set_postfix_str(f"merging layer {i}")
            meta_layers[str(i)] = _merge_layer(moe[i], source, calib, num_groups, grouping, merge, writer, i, plan)
        source.release(prefix)
        if need_data and i + 1 < len(layer_list) and not all(torch.isfinite(h).all() for h in hidden):
            raise BrownoutError(f"NaN or inf in the activations after layer {i}")
    return meta_layers, probes[first] + probes[last]  # = weight_probe(fingerprint_tensors(first, last))


def _materialize_outside(source, net, layers_name: str) -> None:
    """Materialise every top-level module that is not the decoder layer list (embeddings, norm, rotary, head)."""
    stack = [("", net)]
    while stack:
        name, mod = stack.pop()
        for cname, child in mod.named_children():
            full = f"{name}.{cname}" if name else cname
            if full == layers_name:
                continue
            if layers_name.startswith(full + "."):
                stack.append((full, child))
            else:
                source.materialize(full)
    net.tie_weights()


def _check_finite(layer, i: int) -> None:
    for k, t in native_of(layer.experts, layer.layout).items():
        if not all_finite(t):
            raise BrownoutError(f"layer {i}: NaN or inf in the expert weights ({k})")


def _merge_layer(layer, source, calib, num_groups, grouping: Method, merge: Method, writer, i, plan) -> dict:
    """Group and merge one layer. Weights stay in the model's dtype; only what a step needs is upcast to float32
    (the whole layer for data-driven grouping, one group at a time for merging), to keep peak memory near a layer."""
    layout, E = layer.layout, layer.num_experts
    native = native_of(layer.experts, layout)
    glu = glu_of(layer.experts, layout)
    if grouping.needs_data:
        canon_all = layout.to_canonical(native)  # views in the layer's dtype; grouping upcasts one expert at a time
    else:  # data-free groupings only need the expert count
        canon_all = {"gate": torch.empty(E, 0, 0)}
    groups = grouping.fn(canon_all, calib, glu, num_groups, plan.seed, plan.grouping_params)
    del canon_all
    dtype = source.stored_dtype(f"{layer.name}.gate_up_proj")  # the checkpoint's own dtype
    # The united tier is filled group by group straight into its final dtype and layout: no float32 copy of it
    out = {k: torch.empty((len(groups),) + tuple(v.shape[1:]), dtype=dtype) for k, v in native.items()}
    canon_out = layout.to_canonical(out)  # writable views into `out`
    reports = []
    for g, members in enumerate(tqdm(groups, desc=f"layer {i} groups", leave=False, disable=not plan.progress)):
        w = {k: v.contiguous() for k, v in layout.to_canonical({k: v[members].float() for k, v in native.items()}).items()}
        ctx = MergeContext(members=list(members), glu=glu, calib=calib, params=plan.merge_params, device=plan.device,
                           seed=plan.seed + 1000 * i + g)
        with torch.enable_grad():  # training-based merges need autograd; the rest of the build runs without it
            united = merge.fn(w, ctx)
        for k, v in united.items():
            canon_out[k][g].copy_(v)
        reports.append(ctx.report)
    e2g = torch.empty(E, dtype=torch.int64)
    for g, members in enumerate(groups):
        e2g[list(members)] = g
    out["expert_to_group"] = e2g
    writer.add_layer(i, out)
    info = {"groups": [list(map(int, m)) for m in groups], "merge_report": [_jsonable(r) for r in reports]}
    if calib is not None:
        info["calibration"] = calib.to_json()
    return info


def _jsonable(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, int, torch.Tensor)) and not isinstance(v, bool) else v) for k, v in d.items()}
