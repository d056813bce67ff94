"""`unify sensitivity`: how much each united layer costs in held-out loss, and saves in weight reads, per brownout ratio.

For every united layer L and every ratio r of a grid (0, 0.25, 0.5, 0.75, 1 by default), with every other layer at
ratio 0 (docs/design.md §4):

- `nll_increase[r]`: mean token NLL on held-out calibration text at (L at r) minus at ratio 0;
- `saved_bytes[r]`: the expert-weight bytes per forward batch that r saves in L, from the routing L saw: distinct
  slabs read at ratio 0 minus at r (`runtime.policy.remap` + `runtime.policy.slabs_read`), times the bytes of a slab.
  The same is counted on a finer grid (`read_ratios`, `read_saved_bytes`), since slabs read are not linear in r
  between the coarse points and a schedule must hit a byte budget.

The result (S.json) is what `runtime.schedule.RatioSchedule` allocates a brownout budget over.

**Held-out text.** The calibration source is resolved as `unify build` resolves it (the checkpoint's own calibration
source, else the recipe's, else the bundled sample) and tokenised by `unify.calibration`; when it is the source the
checkpoint was built from, the tokens the build read (its `calib_tokens`) are skipped, so the loss is measured on
text the merge never saw.

**Cost.** One forward at ratio 0 over the held-out tokens, then one per (united layer, ratio > 0). Each of those
starts at layer L: the inputs of every united layer are kept from the ratio-0 pass (tokens x hidden x united layers
floats) and replayed, so the decoder layers before L are not run again. Work is therefore about
tokens x (ratios - 1) x sum over L of (layers from L to the end + the LM head), i.e. quadratic in depth for a fixed
head, and linear in tokens. Routing statistics come from the same ratio-0 pass and cost no forwards.

**Joint anchors** (`joint`, docs/design.md §4). Single-layer curves do not add up, so at each level of
`joint_levels` (0.25, 0.5, 0.75) the allocation is also searched with the *joint* held-out loss, every layer browned
out at once, on the same held-out tokens:

1. the reference is the uniform ratio `level`: its joint NLL and its measured weight reads (counted on the routing
   of that joint pass, which shifts as earlier layers brown out);
2. start candidates: the single-layer greedy (`RatioSchedule.allocate`) with every layer held within d of the level,
   d in 0.25, 0.5, 1 (1: the plain greedy), each at the uniform ratio's predicted bytes; the one with the lowest
   joint NLL whose measured reads are within `reads_tolerance` (1%) of the uniform ratio's is kept, unless the
   uniform ratio itself is lower still (a tie goes to the candidate: what the joint loss cannot tell apart, the
   single-layer curves decide);
3. exchange rounds: around the kept point, each layer's joint NLL change when it alone saves `step` bytes more and
   `step` bytes less (a finite difference with the other layers where they are, the context the single-layer
   curves lack); the pairs (one layer down, one up: bytes unchanged in prediction) with the most negative sum are
   measured jointly, best first, and the first that lowers the joint NLL with reads still within tolerance is taken; if
   none is, the step halves.

Levels are searched from the highest down, each held at or below the anchor above it, so the anchors are ordered
layer by layer and the schedule stays monotone. Cost per level: 1 + 3 joint passes for the start, then per round
up to 2 x layers probes (replayed from the probed layer, so about half a pass each) and up to 3 joint passes. On
the reference model (8 layers, 16,384 tokens) one round came to 28 full passes for the three levels, two rounds to
about 50, against about 18 pass-equivalents for the single-layer curves: the joint stage is the larger part, and
like the single-layer stage it grows linearly in tokens and as layers x depth (the probes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.errors import BrownoutError
from runtime.policy import check_policy, remap, slabs_read

from .calibration import DEFAULT_CALIB, LayerStandIn, decoder_layers, load_texts, tokenize
from .loading import resolve

RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
READ_STEPS = 40  # bytes saved are also counted on this finer grid: it costs no forwards, only remaps of the routing
FORMAT = "brownout-sensitivity"
VERSION = 2  # 2: adds the joint anchors ("joint"); runtime.schedule reads 1 and 2
JOINT_LEVELS = (0.25, 0.5, 0.75)
DEVIATIONS = (0.25, 0.5, 1.0)  # start candidates: the greedy with every layer within this of the level (and uniform)
JOINT_ROUNDS = 2  # exchange rounds per anchor level
JOINT_STEP = 0.25  # first exchange step, as a share of a mean layer's bytes saved at ratio 1
JOINT_TRIES = 3  # exchanges measured per round, best predicted first
READS_TOLERANCE = 0.01  # an anchor's measured reads stay this close to the uniform ratio's (the target allows 2%)


def check_ratio_grid(ratios) -> list[float]:
    """Ascending, distinct ratios in [0, 1] that include 0 and 1 (a schedule interpolates between them)."""
    try:
        grid = sorted({float(r) for r in ratios})
    except (TypeError, ValueError):
        raise BrownoutError(f"ratios must be numbers in [0, 1], got {ratios!r}") from None
    if not grid or grid[0] != 0.0 or grid[-1] != 1.0 or any(math.isnan(r) or not 0 <= r <= 1 for r in grid):
        raise BrownoutError(f"ratios must lie in [0, 1] and include both 0 and 1, got {ratios!r}")
    return grid


class _Shortcut(LayerStandIn):
    """Stands in for a decoder layer before the one measured: returns the recorded input of the next layer (or passes
    the hidden states through), so the prefix is not recomputed."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        self.output: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


def _held_out_batches(calib: str | None, split: str, column: str, model_path: Path | None, vocab: int, tokens: int,
                      seq_len: int, skip_tokens: int) -> torch.Tensor:
    """[B, seq_len] token ids of the calibration source after its first `skip_tokens` tokens."""
    texts = load_texts(calib, split, column)
    stream = tokenize(texts, model_path, vocab, skip_tokens + tokens, 1).reshape(-1)  # seq_len 1: the id stream
    held = stream[skip_tokens:]
    seq_len = min(seq_len, tokens)
    n = held.numel() // seq_len
    if n == 0:
        raise BrownoutError(f"the calibration text has no held-out tokens left after the {skip_tokens} the build used; "
                            "give more text with --calib, or --skip-tokens 0")
    return held[: n * seq_len].view(n, seq_len)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of a batch, in float64."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1), reduction="sum").double()


def slab_bytes(experts: torch.nn.Module, keys) -> int:
    """Bytes of one expert's weights (one slab) in the layer's current dtype."""
    return sum(getattr(experts, k)[0].numel() * getattr(experts, k).element_size() for k in keys)


def _build_source(united_meta: dict) -> str | None:
    opts = united_meta.get("options") or {}
    return opts.get("calib")


def _same_source(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _load_model(model: str, device: str, dtype: str):
    from transformers import AutoModelForCausalLM

    ref = resolve(model)
    net = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype)).to(device).eval()
    if device == "cpu" or dtype == "float32":  # grouped_mm has only a slow loop on the CPU, as in unify eval
        net.config._experts_implementation = "eager"
    return net, ref


@torch.no_grad()
def sensitivity(model, united_dir, calib: str | None = None, calib_split: str = "train", calib_column: str = "text",
                tokens: int = 8192, seq_len: int = 512, skip_tokens: int | None = None, ratios=RATIOS,
                policy: str = "hot-cold", batch_size: int = 4, device: str = "cpu", dtype: str = "float32",
                reuse_prefix: bool = True, joint_levels=JOINT_LEVELS, joint_rounds: int = JOINT_ROUNDS,
                reads_tolerance: float = READS_TOLERANCE, progress: bool = True) -> dict:
    """Per united layer and ratio: held-out NLL increase with only that layer browned out, and bytes saved per forward
    batch (see the module docstring). `model`: recipe name, model directory, or a loaded model (left as it was).
    `skip_tokens`: tokens of the calibration source to skip (None: the build's calib_tokens when the source is the
    build's own, else 0). `reuse_prefix=False` runs every forward from the embeddings (for checking the replay).
    `joint_levels`: levels in (0, 1) at which to search the joint anchors (empty: none, a version-1-like file);
    `joint_rounds`, `reads_tolerance`: see `joint_anchors`."""
    from runtime import BrownoutMoE
    from runtime.checkpoint import UnitedCheckpoint

    t0 = time.time()
    grid = check_ratio_grid(ratios)
    joint_levels = _check_joint_levels(joint_levels)
    read_grid = sorted(set(grid) | {i / READ_STEPS for i in range(READ_STEPS + 1)})
    policy = check_policy(policy)
    if tokens < 2 or seq_len < 2 or batch_size < 1 or joint_rounds < 0 or not reads_tolerance >= 0:
        raise BrownoutError("tokens and seq_len must be at least 2, batch_size at least 1, joint_rounds and "
                            "reads_tolerance at least 0")
    meta = UnitedCheckpoint(united_dir, verify=False).meta
    if isinstance(model, torch.nn.Module):
        net, model_path, name = model, None, getattr(model, "name_or_path", "") or "<in-memory>"
        recipe_calib = None
        device = str(next(net.parameters()).device)
    else:
        net, ref = _load_model(model, device, dtype)
        model_path, name = ref.path, str(model)
        recipe_calib = str(ref.recipe.calib) if ref.recipe is not None and ref.recipe.calib is not None else None
    built_from = _build_source(meta)
    source = calib or built_from or recipe_calib or str(DEFAULT_CALIB)
    if skip_tokens is None:
        skip_tokens = int((meta.get("options") or {}).get("calib_tokens") or 0) if _same_source(source, built_from) else 0
    vocab = net.config.get_text_config().vocab_size
    batches = _held_out_batches(source, calib_split, calib_column, model_path, vocab, tokens, seq_len, skip_tokens)
    chunks = list(torch.split(batches, batch_size))

    bm = BrownoutMoE.attach(net, united_dir, policy=policy)
    layers_name, layer_list = decoder_layers(net)
    united = sorted(bm.layers)
    originals = list(layer_list)
    try:
        # -- ratio 0: NLL per batch, each united layer's input and routing ------------------------------------------
        inputs: dict[int, list[torch.Tensor]] = {i: [] for i in united}
        routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in united}
        handles = []
        for i in united:
            if reuse_prefix:
                handles.append(layer_list[i].register_forward_pre_hook(
                    lambda m, a, kw, i=i: inputs[i].append((a[0] if a else kw["hidden_states"]).detach().clone()),
                    with_kwargs=True))
            handles.append(bm.moe[i].experts.register_forward_pre_hook(
                lambda m, a, kw, i=i: routing[i].append(tuple(v.detach() for v in (list(a) + list(kw.values()))[1:3])),
                with_kwargs=True))
        todo = len(chunks) * (1 + len(united) * (len(grid) - 1))
        bar = tqdm(total=todo, desc="sensitivity forwards", unit="batch", disable=not progress)
        bar.set_postfix_str("ratio 0")
        base = []
        try:
            for ids in chunks:
                ids = ids.to(device)
                base.append(token_nll(net(input_ids=ids, use_cache=False).logits, ids))
                bar.update()
        finally:
            for h in handles:
                h.remove()
        n_pred = sum(c.shape[0] * (c.shape[1] - 1) for c in chunks)
        base_total = float(sum(base))

        # -- each united layer alone at each ratio > 0 ------------------------------------------------------------
        out_layers: dict[str, dict] = {}
        for i in united:
            st, experts = bm.layers[i], bm.moe[i].experts
            shortcuts = []
            if reuse_prefix and i > 0:
                shortcuts = [_Shortcut(originals[j]) for j in range(i)]
                for j, s in enumerate(shortcuts):
                    layer_list[j] = s
            try:
                increase = [0.0]
                for r in grid[1:]:
                    bar.set_postfix_str(f"layer {i} ratio {r:g}")
                    bm.set_ratio({i: r})
                    total = 0.0
                    for b, ids in enumerate(chunks):
                        if shortcuts:
                            shortcuts[-1].output = inputs[i][b]
                        ids = ids.to(device)
                        total += float(token_nll(net(input_ids=ids, use_cache=False).logits, ids))
                        bar.update()
                    increase.append((total - base_total) / n_pred)
            finally:
                bm.set_ratio({i: 0.0})
                for j in range(len(shortcuts)):
                    layer_list[j] = originals[j]
            num_slabs = st.num_experts + st.num_groups
            reads = {}
            for r in read_grid:
                n = [float(slabs_read(remap(idx, w, st.expert_to_group, st.num_groups, r, policy).ids, num_slabs))
                     for idx, w in routing[i]]
                reads[r] = sum(n) / len(n)
            per_slab = slab_bytes(experts, bm.moe[i].layout.native_keys())
            out_layers[str(i)] = {
                "nll_increase": [round(v, 7) for v in increase],
                "saved_bytes": [round((reads[0.0] - reads[r]) * per_slab, 1) for r in grid],
                "slabs_read": [round(reads[r], 4) for r in grid],
                "read_saved_bytes": [round((reads[0.0] - reads[r]) * per_slab, 1) for r in read_grid],
                "slab_bytes": per_slab, "num_experts": st.num_experts, "num_groups": st.num_groups,
            }
            inputs[i].clear()  # this layer's replay inputs are no longer needed
        bar.close()
        joint = None
        if joint_levels:
            from runtime.schedule import RatioSchedule

            single = RatioSchedule(grid, {int(k): v for k, v in out_layers.items()}, read_grid)
            probe = _JointProbe(net, bm, chunks, device, layer_list, united, n_pred)
            try:
                joint = joint_anchors(probe, single, joint_levels, base_total / n_pred, joint_rounds, reads_tolerance,
                                      progress)
            finally:
                probe.close()
    finally:
        for j in range(len(originals)):
            layer_list[j] = originals[j]
        bm.detach()
    return {
        "format": FORMAT, "version": VERSION, "model": name, "united": str(united_dir),
        "way": meta.get("way"), "grouping": meta.get("grouping"), "merge": meta.get("merge"), "policy": policy,
        "ratios": grid, "read_ratios": read_grid, "layers": out_layers, **({"joint": joint} if joint else {}),
        "held_out": {"source": str(source), "split": calib_split, "column": calib_column, "skip_tokens": skip_tokens,
                     "sequences": int(batches.shape[0]), "seq_len": int(batches.shape[1]),
                     "predicted_tokens": n_pred, "batch_size": batch_size},
        "base_nll": round(base_total / n_pred, 7),
        "read_unit": f"one forward batch of {batch_size} x {int(batches.shape[1])} tokens",
        "seconds": round(time.time() - t0, 1),
    }


def _check_joint_levels(levels) -> list[float]:
    try:
        out = sorted({float(v) for v in levels})
    except (TypeError, ValueError):
        raise BrownoutError(f"joint levels must be numbers in (0, 1), got {levels!r}") from None
    if any(not 0 < v < 1 for v in out):
        raise BrownoutError(f"joint levels must lie strictly between 0 and 1, got {levels!r}")
    return out


class _JointProbe:
    """Joint held-out NLL and measured expert-weight reads of one ratio per united layer. A measurement may record
    every united layer's input (`record`), and a later one that changes only layers from position `start` on replays
    from there: the layers before are skipped and their reads taken from the recorded one."""

    def __init__(self, net, bm, chunks, device: str, layer_list, united: list[int], n_pred: int):
        self.net, self.bm, self.chunks, self.device, self.n_pred = net, bm, chunks, device, n_pred
        self.layer_list, self.originals, self.united = layer_list, list(layer_list), united
        self.passes = 0.0  # work done, in full passes over the held-out tokens
        self._reads: dict[int, list[float]] | None = None
        self._inputs: dict[int, list[torch.Tensor]] | None = None
        self.handles = []
        for i in united:
            st, experts = bm.layers[i], bm.moe[i].experts
            per_slab = slab_bytes(experts, bm.moe[i].layout.native_keys())
            self.handles.append(experts.register_forward_pre_hook(
                lambda m, a, kw, i=i, st=st, per_slab=per_slab: self._count(i, st, per_slab, list(a) + list(kw.values())),
                with_kwargs=True))
            self.handles.append(layer_list[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: self._record(i, a[0] if a else kw["hidden_states"]), with_kwargs=True))

    def _record(self, i: int, hidden: torch.Tensor) -> None:
        if self._inputs is not None:
            self._inputs[i].append(hidden.detach().clone())

    def _count(self, i: int, st, per_slab: int, vals) -> None:
        if self._reads is not None:
            ids = remap(vals[1], vals[2], st.expert_to_group, st.num_groups, st.ratio.value, st.policy).ids
            self._reads[i].append(float(slabs_read(ids, st.num_experts + st.num_groups)) * per_slab)

    @torch.no_grad()
    def measure(self, ratios: list[float], base: dict | None = None, start: int = 0, record: bool = False) -> dict:
        """{"ratios", "nll" (mean token NLL), "reads" (bytes per forward batch), per-layer "layer_reads", and with
        `record` the united layers' "inputs"}. `base`: a recorded measurement agreeing with `ratios` before position
        `start` of the united layers."""
        if base is None or "inputs" not in base:
            start = 0
        first = self.united[start]
        self._reads = {i: [] for i in self.united[start:]}
        self._inputs = {i: [] for i in self.united[start:]} if record else None
        shortcuts = [_Shortcut(self.originals[j]) for j in range(first)] if start > 0 else []
        for j, sc in enumerate(shortcuts):
            self.layer_list[j] = sc
        self.bm.set_ratio(list(ratios))
        total = 0.0
        try:
            for b, ids in enumerate(self.chunks):
                if shortcuts:
                    shortcuts[-1].output = base["inputs"][first][b]
                ids = ids.to(self.device)
                total += float(token_nll(self.net(input_ids=ids, use_cache=False).logits, ids))
        finally:
            for j in range(len(shortcuts)):
                self.layer_list[j] = self.originals[j]
            reads, inputs = self._reads, self._inputs
            self._reads = self._inputs = None
        self.passes += (len(self.originals) - first + 1) / (len(self.originals) + 1)
        layer_reads = {i: (sum(v) / len(v) if v else 0.0) for i, v in reads.items()}
        for i in self.united[:start]:
            layer_reads[i] = base["layer_reads"][i]
        out = {"ratios": list(ratios), "nll": total / self.n_pred, "layer_reads": layer_reads,
               "reads": sum(layer_reads.values())}
        if record:
            for i in self.united[:start]:
                inputs[i] = base["inputs"][i]
            out["inputs"] = inputs
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.bm.set_ratio(0.0)


def joint_anchors(probe: _JointProbe, single, levels: list[float], base_nll: float, rounds: int = JOINT_ROUNDS,
                  reads_tolerance: float = READS_TOLERANCE, progress: bool = True) -> dict:
    """Search one anchor per level with the joint held-out loss (module docstring, "Joint anchors"). `single`: the
    RatioSchedule of the single-layer curves (no anchors); `base_nll`: the mean token NLL at ratio 0;
    `reads_tolerance`: how far (a share) an anchor's measured reads may be from the uniform ratio's. Returns the
    file's "joint" entry."""
    n = len(single.layers)
    upper = [1.0] * n
    found = {}
    bar = tqdm(total=len(levels), desc="joint anchors", unit="level", disable=not progress)
    mean_full = sum(single.layer_saved(li, 1.0) for li in range(n)) / n
    for level in sorted(levels, reverse=True):
        budget = single.saved_bytes(level)
        uniform = probe.measure([level] * n, record=True)
        ok = lambda m: abs(m["reads"] / uniform["reads"] - 1) <= reads_tolerance if uniform["reads"] > 0 else True
        fits = lambda rs: abs(single.saved_bytes(rs) - budget) <= 1e-3 * max(budget, 1.0)
        best, tried = None, []
        for d in DEVIATIONS:
            lo = [min(max(0.0, level - d), u) for u in upper]
            hi = [min(u, level + d) for u in upper]
            rs = single.allocate(budget, lo, hi)
            if not fits(rs) or any(rs == t for t in tried) or rs == [level] * n:
                continue
            tried.append(rs)
            m = probe.measure(rs, record=True)
            if ok(m) and (best is None or m["nll"] < best["nll"]):
                best = m
        if all(level <= u for u in upper) and (best is None or uniform["nll"] < best["nll"]):
            best = uniform  # only when it is measurably better: on a tie the single-layer curves decide
        if best is None:  # nothing kept the reads: the plain greedy under the anchor above
            best = probe.measure(single.allocate(budget, None, upper), record=True)
        start_nll = best["nll"]
        step = JOINT_STEP * mean_full
        for _ in range(rounds):
            cur = best["ratios"]
            down, up = {}, {}
            for li in range(n):
                have = single.layer_saved(li, cur[li])
                for sign, sink, limit in ((-1, down, 0.0), (1, up, upper[li])):
                    want = have + sign * step
                    if (sign < 0 and want < 0) or (sign > 0 and want > single.layer_saved(li, limit)):
                        continue
                    r = min(upper[li], single.ratio_saving(li, want)) if sign > 0 else single.ratio_saving(li, want)
                    if r == cur[li]:
                        continue
                    rs = cur[:li] + [r] + cur[li + 1:]
                    sink[li] = (probe.measure(rs, best, li)["nll"] - best["nll"], r)
            pairs = sorted((down[i][0] + up[j][0], i, j) for i in down for j in up if i != j)
            moved = False
            for pred, i, j in pairs[:JOINT_TRIES]:
                if pred >= 0:
                    break
                rs = list(cur)
                rs[i], rs[j] = down[i][1], up[j][1]
                m = probe.measure(rs, best, min(i, j), record=True)
                if m["nll"] < best["nll"] and ok(m):
                    best, moved = m, True
                    break
            if not moved:
                step /= 2
        found[level] = {"ratios": [round(r, 6) for r in best["ratios"]], "nll_increase_joint": best["nll"],
                        "uniform_nll_increase_joint": uniform["nll"], "start_nll_joint": start_nll,
                        "reads": best["reads"], "uniform_reads": uniform["reads"]}
        upper = best["ratios"]
        bar.update()
    bar.close()
    lv = sorted(found)
    return {"levels": lv, "ratios": [found[v]["ratios"] for v in lv],
            "nll_increase": [round(found[v]["nll_increase_joint"] - base_nll, 7) for v in lv],
            "uniform_nll_increase": [round(found[v]["uniform_nll_increase_joint"] - base_nll, 7) for v in lv],
            "start_nll_increase": [round(found[v]["start_nll_joint"] - base_nll, 7) for v in lv],
            "reads_vs_uniform": [round(found[v]["reads"] / found[v]["uniform_reads"] - 1, 5)
                                 if found[v]["uniform_reads"] else 0.0 for v in lv],
            "rounds": rounds, "reads_tolerance": reads_tolerance, "passes": round(probe.passes, 1)}


def write_json(data: dict, path: str | Path) -> Path:
    """Write `data` as JSON atomically: a temporary file beside the target, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- evaluation with a schedule -----------------------------------------------------------------------------------

def evaluate_schedule(ev, united_dir, schedule, levels, policy: str = "hot-cold", base: dict | None = None) -> list[dict]:
    """`unify eval` rows for `schedule` (a RatioSchedule or the path of S.json) on checkpoint `united_dir`, one per
    level, in the report format of unify.report; the policy column reads "<policy>+schedule" so the rows plot as
    their own line beside the uniform ratio's. `ev`: a unify.evaluate.Evaluator; `base`: its result at ratio 0
    (evaluated here when None)."""
    from runtime import BrownoutMoE
    from runtime.checkpoint import UnitedCheckpoint
    from runtime.schedule import RatioSchedule

    from .report import row_stats

    sched = schedule if isinstance(schedule, RatioSchedule) else RatioSchedule.load(schedule)
    meta = UnitedCheckpoint(united_dir, verify=False).meta
    if base is None:
        base = ev.run()
    rows = []
    bm = BrownoutMoE.attach(ev.model, united_dir, policy=check_policy(policy))
    try:
        sched.check_layers(bm.layers)
        for level in levels:
            row = {"checkpoint": str(united_dir), "policy": f"{policy}+schedule", "ratio": float(level),
                   "way": meta.get("way"), "grouping": meta.get("grouping"), "merge": meta.get("merge"),
                   "layer_ratios": sched.at(level)}
            if level == 0:
                rows.append({**row, "tasks": base, "reuses_base": True, **row_stats(base, base, True)})
                continue
            bm.set_ratio(row["layer_ratios"])
            got = ev.run()
            rows.append({**row, "tasks": got, "reuses_base": False, **row_stats(base, got)})
    finally:
        bm.detach()
    return rows


# -- command line -------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="recipe name or local model directory (the checkpoint's base model)")
    p.add_argument("--united", required=True, help="united checkpoint directory")
    p.add_argument("--out", required=True, help="output JSON (written atomically)")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                   help="comma-separated ratio grid, including 0 and 1 (default %(default)s)")
    p.add_argument("--policy", default="hot-cold", help="brownout policy (hot-cold, mass, drop)")
    p.add_argument("--joint-levels", default=",".join(f"{v:g}" for v in JOINT_LEVELS),
                   help="levels at which to search allocations with the joint held-out loss, stored as the "
                   "schedule's anchors ('' for none; default %(default)s)")
    p.add_argument("--joint-rounds", type=int, default=JOINT_ROUNDS,
                   help="exchange rounds per joint level (default %(default)s; each about 2 x layers probes)")
    p.add_argument("--joint-reads-tolerance", type=float, default=READS_TOLERANCE,
                   help="an anchor's measured weight reads stay within this share of the uniform ratio's "
                   "(default %(default)s)")
    c = p.add_argument_group("held-out text (the calibration source of `unify build`, past what the build read)")
    c.add_argument("--calib", help="text file, local dataset or dataset name (default: the checkpoint's calibration "
                   "source, else the recipe's, else the bundled sample)")
    c.add_argument("--calib-split", default="train")
    c.add_argument("--calib-column", default="text")
    c.add_argument("--tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    c.add_argument("--skip-tokens", type=int, default=None,
                   help="tokens of the source to skip (default: the build's calib_tokens when it is the build's source)")
    c.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward; also the unit of weight reads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `sensitivity` to the `unify` command's subparsers."""
    p = subparsers.add_parser("sensitivity", help="per-layer loss and weight-read savings of each brownout ratio",
                              description="For each united layer alone and each ratio: the increase in held-out token "
                              "NLL and the weight bytes saved per forward batch. The output feeds "
                              "runtime.schedule.RatioSchedule.")
    add_arguments(p)
    return p


def _parse_ratios(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BrownoutError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def run_cli(args) -> int:
    data = sensitivity(args.model, args.united, calib=args.calib, calib_split=args.calib_split,
                       calib_column=args.calib_column, tokens=args.tokens, seq_len=args.seq_len,
                       skip_tokens=args.skip_tokens, ratios=_parse_ratios(args.ratios, "--ratios"), policy=args.policy,
                       batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                       joint_levels=_parse_ratios(args.joint_levels, "--joint-levels"), joint_rounds=args.joint_rounds,
                       reads_tolerance=args.joint_reads_tolerance, progress=not args.quiet)
    out = write_json(data, args.out)
    joint = f", joint anchors at {data['joint']['levels']}" if "joint" in data else ""
    print(f"wrote {out} ({len(data['layers'])} layers, {data['held_out']['predicted_tokens']} held-out tokens{joint}, "
          f"{data['seconds']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="unify sensitivity", description=add_parser.__doc__)
    add_arguments(p)
    try:
        return run_cli(p.parse_args(argv))
    except BrownoutError as e:
        print(f"unify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
