"""`unify build`: load -> calibrate -> group -> merge -> write, one decoder layer at a time."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import recipes

from . import grouping as grouping_mod
from . import merge as merge_mod
from .calibration import MoEProbe, capture_layer_inputs, decoder_layers, load_texts, tokenize
from runtime.checkpoint import CheckpointWriter, all_finite, config_hash, weight_probe
from runtime.discover import find_moe_layers
from runtime.errors import BrownoutError
from runtime.layout import glu_of, native_of
from .loading import InMemorySource, ShardSource, load_config, resolve


@dataclass
class BuildOptions:
    out: str
    way: int | None = None
    groups: int | None = None
    grouping: str = "consecutive"
    merge: str = "average"
    calib: str | None = None  # text file, local dataset or dataset name; None = the bundled sample
    calib_split: str = "train"
    calib_column: str = "text"
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 8
    samples_per_layer: int = 4096  # tokens kept per MoE layer for activation-guided methods
    steps: int = 200  # distillation steps
    lr: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    overwrite: bool = False
    skip_layers: list[int] | None = None  # None = the recipe's
    progress: bool = True


def _layer_prefix(layers_name: str, i: int) -> str:
    return f"{layers_name}.{i}"


def _needs_data(opts: BuildOptions) -> bool:
    return opts.merge in merge_mod.NEEDS_DATA or opts.grouping in grouping_mod.NEEDS_DATA


@torch.no_grad()
def build(model: str | torch.nn.Module, opts: BuildOptions) -> Path:
    """Build a united-expert checkpoint for `model` (recipe name, directory, hub id or an already loaded model)."""
    t0 = time.time()
    merge_fn = merge_mod.get(opts.merge)  # validate names before any heavy work
    group_fn = grouping_mod.get(opts.grouping)
    if isinstance(model, torch.nn.Module):
        source, model_path, recipe, base = InMemorySource(model), None, None, getattr(model, "name_or_path", "") or "<in-memory>"
        config = model.config
    else:
        ref = resolve(model)
        config = load_config(ref)
        # compute in float32 when layers run on calibration data; data-free builds keep the checkpoint's dtype
        dtype = torch.float32 if _needs_data(opts) else None
        source, model_path, recipe, base = ShardSource(ref, config, dtype), ref.path, ref.recipe, str(model)
    net = source.model
    moe = {l.index: l for l in find_moe_layers(net)}
    num_experts = {l.num_experts for l in moe.values()}
    if len(num_experts) != 1:
        raise BrownoutError(f"MoE layers have different expert counts {sorted(num_experts)}; not supported")
    E = num_experts.pop()
    num_groups = grouping_mod.check_partition(E, way=opts.way, groups=opts.groups)
    layers_name, layer_list = decoder_layers(net)
    skip_spec = opts.skip_layers if opts.skip_layers is not None else (recipe.skip_layers if recipe else [])
    skip = recipes.resolve_skip_layers(skip_spec, len(layer_list))
    todo = [i for i in sorted(moe) if i not in skip]
    if not todo:
        raise BrownoutError(f"every MoE layer is left alone (skip_layers={skip_spec}); nothing to build")

    writer = CheckpointWriter(opts.out, overwrite=opts.overwrite)
    try:
        meta_layers, probe = _walk(net, source, model_path, config, moe, todo, layers_name, layer_list,
                                            num_groups, group_fn, merge_fn, writer, opts)
        meta = {
            "base_model": {"name": base, "model_type": config.model_type, "config_hash": config_hash(config),
                           "weight_probe": probe, "num_experts": E,
                           "moe_layers": sorted(moe)},
            "way": E // num_groups, "num_groups": num_groups, "grouping": opts.grouping, "merge": opts.merge,
            "skip_layers": sorted(skip), "options": {k: v for k, v in asdict(opts).items() if k not in ("progress",)},
            "layers": meta_layers, "build_seconds": round(time.time() - t0, 2),
        }
        return writer.commit(meta)
    except BaseException:  # Ctrl-C and errors alike: leave nothing behind
        writer.abort()
        raise


def _walk(net, source, model_path, config, moe, todo, layers_name, layer_list, num_groups, group_fn, merge_fn, writer, opts):
    need_data = _needs_data(opts)
    calib_src = opts.calib
    if calib_src is None and getattr(source, "ref", None) is not None and source.ref.recipe and source.ref.recipe.calib:
        calib_src = str(source.ref.recipe.calib)  # the recipe's own calibration sample
    first, last = todo[0], todo[-1]
    probes: dict[int, list[float]] = {}  # fingerprint values, taken while the layer is in memory
    meta_layers: dict[str, dict] = {}
    # Non-layer modules (embeddings, rotary, final norm) are small: materialise them for the whole build.
    _materialize_outside(source, net, layers_name)

    if need_data:
        texts = load_texts(calib_src, opts.calib_split, opts.calib_column)
        batches = tokenize(texts, model_path, config.vocab_size, opts.calib_tokens, opts.seq_len)
        hidden, layer_args = capture_layer_inputs(net, batches, opts.batch_size, "cpu")
        total_tokens = batches.numel()
    bar = tqdm(range(len(layer_list)), desc="layers", disable=not opts.progress)
    for i in bar:
        if not need_data and i not in todo:
            continue
        prefix = _layer_prefix(layers_name, i)
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
                probe = MoEProbe(moe[i].experts, moe[i].num_experts, opts.samples_per_layer, total_tokens, opts.seed + i)
        if need_data:
            with torch.no_grad():
                for b, (args, kwargs) in enumerate(layer_args[i]):
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
        calib = probe.result() if probe is not None else None
        if i in todo:
            bar.set_postfix_str(f"merging layer {i}")
            meta_layers[str(i)] = _merge_layer(moe[i], calib, num_groups, group_fn, opts.grouping, merge_fn, writer, i, opts)
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


def _merge_layer(layer, calib, num_groups, group_fn, grouping, merge_fn, writer, i, opts) -> dict:
    """Group and merge one layer. Weights stay in the model's dtype; only what a step needs is upcast to float32
    (the whole layer for data-driven grouping, one group at a time for merging), to keep peak memory near a layer."""
    layout, E = layer.layout, layer.num_experts
    native = native_of(layer.experts, layout)
    glu = glu_of(layer.experts, layout)
    if grouping in grouping_mod.NEEDS_DATA:
        canon_all = layout.to_canonical(native)  # views in the layer's dtype; grouping upcasts one expert at a time
    else:  # data-free groupings only need the expert count
        canon_all = {"gate": torch.empty(E, 0, 0)}
    groups = group_fn(canon_all, calib, glu, num_groups, opts.seed)
    del canon_all
    dtype = getattr(layer.experts, "_disk_dtype", layer.experts.gate_up_proj.dtype)  # the checkpoint's own dtype
    # The united tier is filled group by group straight into its final dtype and layout: no float32 copy of it
    out = {k: torch.empty((len(groups),) + tuple(v.shape[1:]), dtype=dtype) for k, v in native.items()}
    canon_out = layout.to_canonical(out)  # writable views into `out`
    params = []
    for g, members in enumerate(tqdm(groups, desc=f"layer {i} groups", leave=False, disable=not opts.progress)):
        w = {k: v.contiguous() for k, v in layout.to_canonical({k: v[members].float() for k, v in native.items()}).items()}
        ctx = merge_mod.MergeContext(members=list(members), glu=glu, calib=calib, steps=opts.steps, lr=opts.lr,
                                     device=opts.device, seed=opts.seed + 1000 * i + g)
        with torch.enable_grad():  # training-based merges need autograd; the rest of the build runs without it
            united = merge_fn(w, ctx)
        for k, v in united.items():
            canon_out[k][g].copy_(v)
        params.append(ctx.params)
    e2g = torch.empty(E, dtype=torch.int64)
    for g, members in enumerate(groups):
        e2g[list(members)] = g
    out["expert_to_group"] = e2g
    writer.add_layer(i, out)
    info = {"groups": [list(map(int, m)) for m in groups], "merge_params": [_jsonable(p) for p in params]}
    if calib is not None:
        info["calibration"] = calib.to_json()
    return info


def _jsonable(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, int, torch.Tensor)) and not isinstance(v, bool) else v) for k, v in d.items()}
