"""Benchmark the fused two-tier MoE kernel against the physical limit, next to transformers' experts implementations.

    python -m eval.bench_kernel check               # bf16/fp16 correctness on the GPU vs runtime.reference
    python -m eval.bench_kernel tune [DIR [LOG]]    # pick tile configs per (shape, T bucket) by measurement
    python -m eval.bench_kernel bench OUTDIR        # the table: kernel_bench.json / .md / .png
    python -m eval.bench_kernel ab A.json B.json --out OUT.json   # two tile tables on the same calls (+ .md)
    python -m eval.bench_kernel variants --set tma=1 --out OUT.json   # the table's entries with one option or tile
                                                    # field changed (--set dn_warps=4), on the tuner's
                                                    # routings (+ .md)
    python -m eval.bench_kernel profile OUT.json    # kernel breakdown of a call (profiler) and PDL off / on, each GEMM
                                                    # against its share of the limit, the vendor grouped GEMM
                                                    # (torch._grouped_mm) on the same rows (+ .md); --points
    python -m eval.bench_kernel ncu-target          # one call a point inside a profiler range, for Nsight Compute
                                                    # (the ncu command line is in `ncu_target`'s docstring)
    python -m eval.bench_kernel ncu-md RAW.csv LOG  # its table (+ .md) from the report's raw CSV and the run's stdout

`tune` writes the table of the GPU it runs on as DIR/<device name, spaces as underscores>.json, by default into
runtime/kernels/configs/ where the kernel looks it up (`runtime.kernels.configs`).

Limit of a call = max(bytes of the distinct slabs read / copy bandwidth, FLOPs / bf16 matmul rate), both ceilings
measured in the same run (as ../shared/bench/anchor_moe_layer.py). Distinct slabs are counted from the remapped ids;
FLOPs = 2 * 3 * H * I * (live slots).

Timing. CUDA graph: the call (remap + kernels, as the runtime makes it) is captured once and replayed; before each
replay one pass over a 256 MiB buffer leaves no weights in the 50 MB L2 (cold weights, as in a real forward where
the other layers evict them): by default a read, which leaves clean lines as the other layers' weight reads do;
`--flush write` overwrites the buffer instead (the benches before December 2026), which leaves dirty lines the
call's own reads must first write back. Per-replay CUDA events, median of the repeats, after 25 ms of untimed
flushed replays (BENCH_WARMUP_MS). Eager: back-to-back calls between two events (as the anchor does), so CPU launch
overhead counts; weights may then be partly L2-resident for small shapes.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from runtime import policy
from runtime.kernels import configs, pdl
from runtime.kernels import fused_moe as fm
from runtime.kernels.remap import remap as fused_remap
from runtime.reference import slab_forward

SHAPES = {  # name: (experts, top_k, hidden, intermediate)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen1.5-moe-a2.7b": (60, 4, 2048, 1408),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
TOKENS = [1, 8, 32, 128, 512, 4096]
RATIOS = [0.0, 0.5, 1.0]
WAYS = [2, 4]
dev = "cuda"


class _Gate(torch.nn.Module):
    is_transposed = False

    def _apply_gate(self, h):
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u


def slab_reference(gu, dn, x, ids, weights):
    """runtime.reference.slab_forward with the SiLU gate on stacked slabs gu [S, 2I, H], dn [S, H, I]: the output
    every kernel here is checked against."""
    return slab_forward(_Gate(), {"gate_up_proj": gu, "down_proj": dn}, x, ids, weights)


# ------------------------------------------------------------------------------------------------------------------
# timing


_FLUSH = None
# How the L2 is emptied before each timed replay (`--flush`). "read": a 256 MiB buffer is read, and the L2 then holds
# clean lines of other data, as in a forward, where the layers before read their weights and write only small
# activations. "write" (what the benches did up to December 2026): the buffer is overwritten, which leaves the L2
# full of dirty lines that the call's own reads must first write back: up to the L2's size of write traffic the limit
# does not count, a large share of a decode call that reads 20-80 MB.
FLUSH_MODES = ("read", "write")
FLUSH = "read"  # set from BENCH_FLUSH below, through set_flush's check
FLUSH_KERNEL_US = 30  # a flush of 256 MiB takes longer than this; a call's own zero fills and casts are shorter


def _flush():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(256 * 1024**2 // 4, dtype=torch.float32, device=dev)
    if FLUSH == "write":
        _FLUSH.fill_(1)
    else:
        _FLUSH.sum()


def set_flush(mode):
    """Set how `_flush` empties the L2 ("read" or "write") for the rest of the process."""
    global FLUSH
    if mode not in FLUSH_MODES:
        raise ValueError(f"flush mode {mode!r}; one of {FLUSH_MODES}")
    FLUSH = mode


set_flush(os.environ.get("BENCH_FLUSH", FLUSH))


def _is_flush_kernel(name, dur_us):
    """Whether a profiler kernel event is `_flush`'s (a fill or a reduction over 256 MiB), by name and length."""
    n = name.lower()
    return dur_us > FLUSH_KERNEL_US and ("fill" in n or "reduce" in n)


def bench_eager(fn, iters=20, warmup=3):
    """Mean ms per call of `iters` back-to-back calls of `fn` between two events, after `warmup` unmeasured."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


@contextlib.contextmanager
def align_one_max(slots):
    """Within the block, the fused kernel aligns in one program up to `slots` top-k slots (0: always the memset and
    two kernels); `fm.ALIGN_ONE_MAX_SLOTS` is put back after."""
    saved = fm.ALIGN_ONE_MAX_SLOTS
    fm.ALIGN_ONE_MAX_SLOTS = slots
    try:
        yield
    finally:
        fm.ALIGN_ONE_MAX_SLOTS = saved


def capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


# Replays (flushed, untimed) before the timed ones, for at least this long, as triton.testing.do_bench does: the tuner
# and `ab` time a graph right after capturing it. On an H200 the same two Mixtral T = 1 configs compared 1.131x
# without it and 1.059x with it; `bench`, which runs each call eagerly before capturing it, moved by 0.2-0.3% over
# all points (eval/results/README.md). BENCH_WARMUP_MS=0: none (the benches before December 2).
WARMUP_MS = float(os.environ.get("BENCH_WARMUP_MS", "25"))


def warm_up(g, ms=None):
    """Replay `g` (each after a flush) for at least `ms` (default WARMUP_MS) of GPU time, at most 1000 times."""
    ms = WARMUP_MS if ms is None else ms
    if ms <= 0:
        return
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    _flush()
    g.replay()
    e.record()
    e.synchronize()
    for _ in range(min(1000, int(ms / max(s.elapsed_time(e), 1e-3)))):
        _flush()
        g.replay()


def time_graph(g, reps=25):
    """Median ms of `reps` replays of `g`, each after an L2 flush and timed alone, after `warm_up`."""
    warm_up(g)
    evs = []
    for _ in range(reps):
        _flush()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        evs.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in evs)


def measure_limits():
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=dev)
    y = torch.empty_like(x)
    ms = bench_eager(lambda: y.copy_(x), 10)
    bw = 2 * x.numel() * 2 / (ms / 1e3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn_like(a)
    ms = bench_eager(lambda: a @ b, 10)
    flops = 2 * 8192**3 / (ms / 1e3)
    del x, y, a, b
    torch.cuda.empty_cache()
    return bw, flops


_READ = None

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_read_kernel(x_ptr, out_ptr, n, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """Each program sums its CHUNK of x (fp32) into out[pid]: a pure streaming read, the bandwidth probe."""
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        start = pid.to(tl.int64) * CHUNK
        for off in range(0, CHUNK, BLOCK):
            o = start + off + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + o, mask=o < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, 0))
except ImportError:  # pragma: no cover
    _stream_read_kernel = None

READ_CONFIGS = [(8192, 2048, 4), (32768, 2048, 4), (32768, 4096, 8), (131072, 4096, 8)]  # (CHUNK, BLOCK, warps)


def stream_read(buf, chunk, block, warps):
    """The per-chunk sums of a 1-D buffer by _stream_read_kernel (the torch twin: buf split in chunks, summed)."""
    n = buf.numel()
    out = torch.empty(triton.cdiv(n, chunk), dtype=torch.float32, device=buf.device)
    _stream_read_kernel[(out.numel(),)](buf, out, n, CHUNK=chunk, BLOCK=block, num_warps=warps)
    return out


def plain_read_ms(nbytes):
    """The best plain read of `nbytes` (a contiguous bf16 buffer): torch.sum, and a Triton streaming read over a few
    chunk sizes, timed as our calls are (graph-replayed after an L2 flush). What one kernel reading that many bytes
    gets from the memory system: for the few-MB reads of decode, short of the copy bandwidth measured on 2 GiB.
    -> (best ms, {name: ms})."""
    global _READ
    n = int(nbytes) // 2
    if _READ is None or _READ.numel() < n:
        _READ = torch.randn(max(n, 1 << 20), dtype=torch.bfloat16, device=dev)
    buf = _READ[:n]
    fns = {"torch.sum": lambda: buf.sum(dtype=torch.float32)}
    if _stream_read_kernel is not None:
        for c, b, w in READ_CONFIGS:
            fns[f"triton {c}/{b}/{w}"] = lambda c=c, b=b, w=w: stream_read(buf, c, b, w)
    times = {}
    for name, fn in fns.items():
        g, _ = capture(fn)
        times[name] = time_graph(g)
        del g
    return min(times.values()), times


def routing(T, E, k, gen):  # as anchor_moe_layer.py
    bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32, device=dev)) * 1.0
    logits = torch.randn(T, E, device=dev, generator=gen) + bias[torch.randperm(E, device=dev, generator=gen)]
    p = logits.softmax(-1)
    w, idx = p.topk(k, -1)
    return idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def make_slabs(E, H, I, way, orig_gu, orig_dn, dtype=torch.bfloat16):
    G = -(-E // way)
    ugu = torch.randn(G, 2 * I, H, device=dev, dtype=dtype) * 0.02
    udn = torch.randn(G, H, I, device=dev, dtype=dtype) * 0.02
    gu = torch.cat([orig_gu, ugu])
    dn = torch.cat([orig_dn, udn])
    del ugu, udn
    return gu, dn, G, torch.arange(E, device=dev) // way


def limit_terms_ms(slabs, live_slots, H, I, bw, flops):
    """The physical limit's two terms in ms: the distinct slabs' bytes at copy bandwidth, the FLOPs at the matmul
    rate. The limit of a call is their max."""
    return slabs * 3 * H * I * 2 / bw * 1e3, 2 * 3 * H * I * live_slots / flops * 1e3


def remapper(idx, w, e2g, G, ratio):
    """The fused remap as the runtime calls it, ready for graph capture: the ratio sits in a device tensor made here,
    outside the capture (at ratio 0 none: the remap is then the identity and launches nothing)."""
    keep = policy.keep_tensor(ratio, idx.device) if ratio else None
    return lambda: fused_remap(idx, w, e2g, G, ratio, keep=keep)


def relerr(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------------------------
# check


def table_configs(table: dict) -> dict:
    """{"table <shape key> T=<bucket>": config} for each distinct config of a tile table (the first bucket that has
    it names it), so `check` runs what the tuner ships, in both dtypes, not only the families it lists."""
    out, seen = {}, []
    for key, buckets in table.get("shapes", {}).items():
        for T, cfg in buckets.items():
            if cfg not in seen:
                seen.append(cfg)
                out[f"table {key} T={T}"] = cfg
    return out


def check():
    """bf16 and fp16 on the GPU vs the reference; every config family and every distinct config of this GPU's tile
    table (on small shapes); poisoned outputs would show as NaN."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(1)
    rows = []
    cfgs = {
        "default": None,
        "decode": {"mode": "decode", "gu": [16, 32, 128, 1, 4, 4], "dn": [16, 32, 128, 1, 4, 4], "sum": "store"},
        "decode-tma": {"mode": "decode", "gu": [16, 64, 128, 1, 4, 4], "dn": [16, 32, 128, 1, 4, 4], "sum": "store",
                       "tma": True},
        "prefill64-tma": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4], "sum": "store",
                          "tma": True},
        "prefill16": {"mode": "prefill", "gu": [16, 64, 128, 1, 4, 4], "dn": [16, 64, 128, 1, 4, 4], "sum": "store"},
        "prefill64": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4], "sum": "store"},
        "large-atomic": {"mode": "prefill", "gu": [128, 64, 64, 8, 8, 3], "dn": [128, 128, 64, 8, 8, 3],
                         "sum": "atomic"},
        # the activation rows copied in slab order and read through TMA, inter kept in that order
        "prefill64-tma-sorted": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4],
                                 "sum": "store", "tma": True, "sorted_rows": True},
        "large-tma-sorted-atomic": {"mode": "prefill", "gu": [128, 64, 64, 8, 8, 3], "dn": [128, 128, 64, 8, 8, 3],
                                    "sum": "atomic", "tma": True, "sorted_rows": True},
        # blocks with at most half their rows live as half-height tiles
        "prefill64-half": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4], "sum": "store",
                           "half_tail": True},
        "large-tma-half-atomic": {"mode": "prefill", "gu": [128, 64, 64, 8, 8, 3], "dn": [128, 128, 64, 8, 8, 3],
                                  "sum": "atomic", "tma": True, "half_tail": True},
        # the same tiles with the alignment's memset and two kernels instead of the one-program sort
        "prefill64-align2": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4],
                             "sum": "store"},
    }
    cfgs.update(table_configs(configs.load(fm.device_name())))
    for dtype in (torch.bfloat16, torch.float16):
        for (E, k, H, I) in [(60, 4, 512, 352), (13, 8, 256, 200), (8, 2, 384, 448)]:
            for T in (1, 7, 33, 300):
                gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.05
                dn0 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.05
                gu, dn, G, e2g = make_slabs(E, H, I, 2, gu0, dn0, dtype)
                x = torch.randn(T, H, device=dev, dtype=dtype)
                idx, w = routing(T, E, k, gen)
                w = w.to(dtype)
                for ratio in (0.0, 1.0):
                    ids, ww = fused_remap(idx, w, e2g, G, ratio)
                    a = policy.remap(idx, w, e2g, G, ratio)
                    same_ids = bool(torch.equal(ids, a.ids))
                    ref = slab_reference(gu.float(), dn.float(), x.float(), a.ids, a.weights.float())
                    for name, cfg in cfgs.items():
                        if cfg is not None and cfg["mode"] == "decode" and T * k > fm.DECODE_MAX_SLOTS:
                            continue
                        row = {"dtype": str(dtype)[6:], "E": E, "k": k, "H": H, "I": I, "T": T, "ratio": ratio,
                               "cfg": name, "pdl": pdl.use_pdl(x.device), "ids_match": same_ids}
                        try:  # a config that does not compile or fit is a failed case, not the end of the check
                            with align_one_max(0 if name.endswith("-align2") else fm.ALIGN_ONE_MAX_SLOTS):
                                out = fm.fused_moe(x, gu, dn, ids, ww, config=cfg)
                        except Exception as exc:
                            rows.append(dict(row, relerr=float("inf"), ok=False,
                                             error=f"{type(exc).__name__}: {str(exc)[:160]}"))
                            continue
                        row["relerr"] = relerr(out, ref)
                        ok = same_ids and row["relerr"] < 1.5e-2 and bool(torch.isfinite(out).all())
                        if name == "default":  # remap + kernels replayed from a graph, as serving runs them
                            rm = remapper(idx, w, e2g, G, ratio)
                            g, gout = capture(lambda: fm.fused_moe(x, gu, dn, *rm(), config=cfg))
                            gout.fill_(float("nan"))
                            g.replay()
                            torch.cuda.synchronize()
                            row["graph_relerr"] = relerr(gout, ref)
                            ok = ok and row["graph_relerr"] < 1.5e-2 and bool(torch.isfinite(gout).all())
                            del g
                        row["ok"] = ok
                        rows.append(row)
    bad = [r for r in rows if not r["ok"]]
    worst = max(r["relerr"] for r in rows)
    print(f"CHECK {len(rows)} cases, {len(bad)} failed, worst relerr {worst:.2e}", flush=True)
    for r in bad[:10]:
        print("FAIL", r, flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# profile: where the time of one call goes, and what PDL changes

PROFILE_POINTS = [(name, T, way, ratio) for name in SHAPES for T in (1, 8, 128, 512) for way, ratio in
                  ((2, 0.0), (4, 1.0))] + [("qwen3-30b-a3b", 4096, 2, 0.0), ("qwen3-30b-a3b", 4096, 4, 1.0)]


def kernel_spans(call, reps=10):
    """Kernel durations inside CUDA-graph replays of `call`, from the profiler's trace: per replay, the kernels
    between two L2 flushes -> [(name, us)], plus the span (first kernel start to last kernel end) in us."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    g, _ = capture(call)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            _flush()
            g.replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    ks = sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    replays, cur = [], []
    for e in ks:
        if _is_flush_kernel(e["name"], e["dur"]):
            if cur:
                replays.append(cur)
            cur = []
        else:
            cur.append(e)
    if cur:
        replays.append(cur)
    replays = replays[1:] if len(replays) > 2 else replays  # the first replay may carry first-touch costs
    if not replays:
        return None
    names = [e["name"] for e in replays[0]]
    same = [r for r in replays if len(r) == len(names)]
    per = [statistics.median(r[i]["dur"] for r in same) for i in range(len(names))]  # by position: names repeat
    span = statistics.median(r[-1]["ts"] + r[-1]["dur"] - r[0]["ts"] for r in replays)
    return {"kernels": [[n[:48], d] for n, d in zip(names, per)], "span_us": span,
            "kernel_sum_us": sum(per), "replays": len(replays)}


def vendor_grouped_gemms(x, gu, dn, ids, S):
    """The same call's two GEMMs by the vendor grouped GEMM (torch._grouped_mm: CUTLASS on Hopper), as a yardstick
    for ours: the live slots' rows gathered and sorted by slab outside the graph (no routing, alignment or top-k sum
    timed), then gate/up GEMM, silu * up, down GEMM, graph-replayed after an L2 flush as ours. -> {"ms", "kernels"}
    (the profiler's per-kernel durations), or {"error"} where this torch has no grouped GEMM for the GPU."""
    k = ids.shape[1]
    flat = ids.reshape(-1)
    live_slots = torch.nonzero(flat < S).squeeze(1)
    slot = live_slots[torch.argsort(flat[live_slots], stable=True)]
    a = x[slot // k].contiguous()
    offs = torch.bincount(flat[live_slots], minlength=S).cumsum(0).to(torch.int32)
    I = dn.shape[2]
    wgu, wdn = gu.transpose(1, 2), dn.transpose(1, 2)  # [S, H, 2I], [S, I, H]

    def call():
        h = torch._grouped_mm(a, wgu, offs=offs)
        return torch._grouped_mm(torch.nn.functional.silu(h[:, :I]) * h[:, I:], wdn, offs=offs)

    try:
        g, _ = capture(call)
        ms = time_graph(g)
        del g
        return {"ms": ms, "kernels": (kernel_spans(call) or {}).get("kernels", [])}
    except Exception as exc:  # no grouped GEMM on this GPU / torch build
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}


def kernel_pct(name, us, slabs, live_slots, H, I, bw, flops):
    """% of its own limit for one GEMM kernel of a call (gate/up: 2/3 of the bytes and FLOPs, down: 1/3), else None."""
    n = name.lower()
    share = 2 / 3 if "gate_up" in n else 1 / 3 if "down" in n else None
    if share is None or not us:
        return None
    return 100 * share * max(limit_terms_ms(slabs, live_slots, H, I, bw, flops)) * 1e3 / us


def variant_times(call, cfg, slots):
    """Graph times (PDL as the runtime has it) of the same call with the alignment in one program and as the memset
    and two kernels (`fm.ALIGN_ONE_MAX_SLOTS`), on the same routing and in the same run. -> {name: ms}; {} in decode
    mode (no alignment). Each is a time in ms, or the error's text."""
    if cfg["mode"] != "prefill":
        return {}

    def timed(one_max):
        try:
            with align_one_max(one_max):
                g, _ = capture(call)
            return time_graph(g)
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc)[:160]}"

    out = {}
    if slots <= 8192:  # one program sorts every slot: not tried past that
        out["align_one"] = timed(slots)
    out["align_two"] = timed(0)
    return out


def profile_calls(out_path, points=None, vendor=True, seed=0):
    """Per point: graph time with PDL off and on (same routing, same tiles), the kernel breakdown with each, each of
    our two GEMM kernels against its own share of the limit, and (vendor) the vendor grouped GEMMs on the same rows."""
    bw, flops = measure_limits()
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    torch.set_grad_enabled(False)
    rows = []
    points = points or PROFILE_POINTS
    by_shape = {}
    for p in points:
        by_shape.setdefault(p[0], []).append(p[1:])
    for name, pts in by_shape.items():
        E, k, H, I = SHAPES[name]
        gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
        dn0 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
        sl = {way: make_slabs(E, H, I, way, gu0, dn0) for way in {w for _, w, _ in pts}}
        del gu0, dn0
        for T, way, ratio in pts:
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            idx, w = routing(T, E, k, gen)
            gu, dn, G, e2g = sl[way]
            a = policy.remap(idx, w, e2g, G, ratio)
            S = E + G
            nslabs = int(policy.slabs_read(a.ids, S))
            live = int((a.ids < S).sum())
            limit_ms = max(limit_terms_ms(nslabs, live, H, I, bw, flops))
            row = {"shape": name, "tokens": T, "way": way, "ratio": ratio, "slabs_read": nslabs, "limit_ms": limit_ms,
                   "config": fm.get_config(T, H, I, k)}

            rm = remapper(idx, w, e2g, G, ratio)

            def call(gu=gu, dn=dn, x=x, rm=rm):
                return fm.fused_moe(x, gu, dn, *rm(), num_slabs=gu.shape[0])

            try:
                for mode in ("off", "on"):
                    pdl.MODE = mode
                    g, _ = capture(call)
                    row[f"pdl_{mode}_ms"] = time_graph(g)
                    del g
                row["kernels_pdl_on"] = kernel_spans(call)
                pdl.MODE = "off"
                row["kernels_pdl_off"] = kernel_spans(call)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            pdl.MODE = "auto"
            row["variants"] = variant_times(call, row["config"], T * k)
            if vendor:
                row["vendor"] = vendor_grouped_gemms(x, gu, dn, a.ids, S)
            kk = (row.get("kernels_pdl_off") or {}).get("kernels", [])
            row["ours_gemm_us"] = [[n[:24], d, kernel_pct(n, d, nslabs, live, H, I, bw, flops)]
                                   for n, d in kk if "gate_up" in n or "down" in n]
            rows.append(row)
            kon = row.get("kernels_pdl_on") or {}
            v = row.get("vendor") or {}
            if v.get("ms"):
                print(f"  vendor grouped GEMMs {1e3 * v['ms']:.1f} us: " + ", ".join(
                    f"{n[:30]}={d:.1f}" for n, d in v["kernels"]), flush=True)
            print(f"PROFILE {name} T={T} w{way} r{ratio}: limit {1e3 * limit_ms:.1f} us, pdl off "
                  f"{1e3 * row.get('pdl_off_ms', float('nan')):.1f} on {1e3 * row.get('pdl_on_ms', float('nan')):.1f} us;"
                  f" kernels " + ", ".join(f"{n[:18]}={d:.1f}" for n, d in kon.get("kernels", []))
                  + f" span {kon.get('span_us', float('nan')):.1f}; variants "
                  + ", ".join(f"{n}={1e3 * v:.1f}" if isinstance(v, float) else f"{n}: {v}"
                              for n, v in row["variants"].items()), flush=True)
        del sl
        torch.cuda.empty_cache()
        res = {"device": torch.cuda.get_device_name(), "copy_bw_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12,
               "seed": seed, "flush": FLUSH, "rows": rows}
        Path(out_path).write_text(json.dumps(res, indent=1))  # after every shape: a cut-off run keeps its part
    return res


NCU_POINTS = [("olmoe-1b-7b", 512, 4, 1.0), ("olmoe-1b-7b", 512, 2, 0.0), ("qwen1.5-moe-a2.7b", 512, 4, 1.0),
              ("qwen1.5-moe-a2.7b", 1, 2, 0.0), ("qwen3-30b-a3b", 4096, 2, 0.0), ("qwen3-30b-a3b", 128, 4, 1.0)]


def ncu_target(points=None, seed=0):
    """The process for Nsight Compute to profile: per point, one call of the fused kernel inside a
    cudaProfilerStart/Stop range, after two warm-up calls (Triton's compile stays outside the range). Run it as
        ncu --profile-from-start off --clock-control none -k regex:"_gate_up_kernel|_down_kernel" --set full \\
            -o REPORT python -m eval.bench_kernel ncu-target --points ...
    so the report holds a gate/up and a down kernel per point, in the printed order. ncu flushes the caches before
    each kernel it replays (cold weights, as in the bench)."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    torch.set_grad_enabled(False)
    for i, (name, T, way, ratio) in enumerate(points or NCU_POINTS):
        E, k, H, I = SHAPES[name]
        gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
        dn0 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
        gu, dn, G, e2g = make_slabs(E, H, I, way, gu0, dn0)
        del gu0, dn0
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
        idx, w = routing(T, E, k, gen)
        a = policy.remap(idx, w, e2g, G, ratio)
        S = E + G
        rm = remapper(idx, w, e2g, G, ratio)
        for _ in range(2):
            fm.fused_moe(x, gu, dn, *rm(), num_slabs=S)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fm.fused_moe(x, gu, dn, *rm(), num_slabs=S)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"NCU_POINT {i} {name} T={T} w{way} r{ratio}: slabs {int(policy.slabs_read(a.ids, S))}, live slots "
              f"{int((a.ids < S).sum())}, config {json.dumps(fm.get_config(T, H, I, k))}", flush=True)
        del gu, dn
        torch.cuda.empty_cache()


NCU_SCALE = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "hz": 1, "Khz": 1e3, "Mhz": 1e6, "Ghz": 1e9,
             "nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3}
NCU_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def ncu_md(raw_csv, log_path, out_path):
    """Markdown of an `ncu --import REPORT --csv --page raw` export of an `ncu-target` run: per kernel its launch
    (grid, registers, shared memory, blocks an SM, waves), time and clock, DRAM and SM throughput, the tensor pipe,
    occupancy and issue, and the three largest stall reasons (warps stalled per issued instruction). `log_path`: the
    run's stdout, whose NCU_POINT lines name the points (a gate/up and a down kernel each, in order)."""
    import csv

    rows = list(csv.reader(open(raw_csv)))
    hdr, units, data = rows[0], rows[1], [r for r in rows[2:] if r]
    col = {h: i for i, h in enumerate(hdr)}
    points = [ln.split(":")[0].split(" ", 2)[2] for ln in open(log_path) if ln.startswith("NCU_POINT")]

    def v(r, name, unit=None):
        """The metric in `unit` (byte, hz or second, scaled), else as ncu printed it."""
        x = float(r[col[name]].replace(",", ""))
        if unit is None:
            return x
        got = units[col[name]].split("/")[0]
        return x * NCU_SCALE[got] / NCU_SCALE[unit]

    dev_name = data[0][col["device__attribute_display_name"]] if data else "?"
    lines = [f"# Nsight Compute on the fused kernel's two GEMMs ({dev_name})", "",
             "Made by `python -m eval.bench_kernel ncu-md` from the raw CSV of a report of `ncu-target` (its "
             "docstring has the ncu command). One call a point, routing seed 0, the shipped tile table; ncu flushed "
             "the caches before each kernel and left the clocks alone (`--clock-control none`), so a kernel's time "
             "here is at the SM clock shown and runs longer than in the bench. `grid` counts every program, also "
             "those past the padded length that exit at once. `blocks/SM`: the tightest of the launch's occupancy "
             "limits. `DRAM %`: bytes read over the time, of the peak. `tensor pipe %`: cycles the tensor pipe was "
             "busy, of the active cycles. Stalls: warps stalled for that reason per issued instruction.", "",
             "| point | kernel | grid | regs | smem KB | blocks/SM | waves | us | SM GHz | DRAM MB | DRAM % | SM % "
             "| tensor pipe % | MMA | warps active % | eligible/cycle | issue % | top stalls (warps per issue) |",
             "|" + "---|" * 18]
    for j, r in enumerate(data):
        limits = [v(r, f"launch__occupancy_limit_{x}") for x in ("blocks", "registers", "shared_mem", "warps")]
        stalls = sorted(((v(r, h), m.group(1)) for h in hdr
                         if (m := NCU_STALL.match(h)) and m.group(1) != "selected"), reverse=True)[:3]
        wgmma = v(r, "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active") > 0
        lines.append("| " + " | ".join([
            points[j // 2] if j // 2 < len(points) else "?", r[col["Kernel Name"]].strip("_").replace("_kernel", ""),
            f"{v(r, 'launch__grid_size'):.0f}", f"{v(r, 'launch__registers_per_thread'):.0f}",
            f"{v(r, 'launch__shared_mem_per_block', 'Kbyte'):.0f}", f"{min(limits):.0f}",
            f"{v(r, 'launch__waves_per_multiprocessor'):.2f}", f"{v(r, 'gpu__time_duration.sum', 'us'):.1f}",
            f"{v(r, 'sm__cycles_elapsed.avg.per_second', 'Ghz'):.2f}", f"{v(r, 'dram__bytes_read.sum', 'Mbyte'):.0f}",
            f"{v(r, 'dram__bytes_read.sum.pct_of_peak_sustained_elapsed'):.0f}",
            f"{v(r, 'sm__throughput.avg.pct_of_peak_sustained_elapsed'):.0f}",
            f"{v(r, 'sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active'):.0f}",
            "wgmma" if wgmma else "mma.sync",
            f"{v(r, 'sm__warps_active.avg.pct_of_peak_sustained_active'):.0f}",
            f"{v(r, 'smsp__warps_eligible.avg.per_cycle_active'):.2f}",
            f"{v(r, 'smsp__issue_active.avg.pct_of_peak_sustained_active'):.0f}",
            ", ".join(f"{n} {x:.2f}" for x, n in stalls)]) + " |")
    Path(out_path).write_text("\n".join(lines) + "\n")
    return lines


def write_profile_md(res, path):
    """Markdown of a profile run: per point the graph time with PDL off / on and the kernels of the call (PDL off, so
    the durations do not overlap)."""
    L = [f"# Where the time of one call goes ({res['device']})", "",
         f"Measured ceilings: copy {res['copy_bw_TBps']:.2f} TB/s, bf16 matmul {res['bf16_TFLOPs']:.0f} TFLOP/s. "
         f"Routing and inputs from seed {res.get('seed', 0)}. Graph-replayed calls as in kernel_bench (L2 flushed "
         f"before each replay by a {res.get('flush', 'write')}); kernel durations from the PyTorch "
         "profiler's trace, median over the replays, with PDL off so they do not overlap. `gap` = graph time (PDL off) "
         "- the sum of the kernels: time inside the replay with no kernel of the call running.", "",
         "| shape | T | way | ratio | limit us | PDL off us | PDL on us | kernels (us, PDL off) | gap us |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        k = r.get("kernels_pdl_off") or {}
        ks = ", ".join(f"{n.strip('_').replace('void at::native::', '').split('<')[0][:16]} {d:.1f}"
                       for n, d in k.get("kernels", []))
        off, on = r.get("pdl_off_ms"), r.get("pdl_on_ms")
        gap = 1e3 * off - k["kernel_sum_us"] if off and k else None
        L.append(f"| {r['shape']} | {r['tokens']} | {r['way']} | {r['ratio']} | {1e3 * r['limit_ms']:.1f} "
                 f"| {_f(off and 1e3 * off, '{:.1f}')} | {_f(on and 1e3 * on, '{:.1f}')} | {ks or r.get('error', '-')} "
                 f"| {_f(gap, '{:.1f}')} |")
    if any("ours_gemm_us" in r for r in res["rows"]):
        L += ["", "## Each GEMM against its own limit, ours and the vendor's", "",
              "Gate/up holds 2/3 of a call's bytes and FLOPs, down 1/3; a kernel's % is its share of the limit over "
              "its duration (PDL off). `other` = our call (PDL on) - our two GEMMs: the remap, alignment and top-k "
              "sum, and launch gaps. Vendor: torch._grouped_mm (CUTLASS) on the same slabs and rows, sorted outside "
              "the timing; its two longest kernels are taken as its GEMMs (first gate/up, then down), and its call "
              "time includes silu * up.", "",
              "| shape | T | way | ratio | limit us | ours us | ours gate/up us (%) | ours down us (%) | other us "
              "| vendor us | vendor gate/up us (%) | vendor down us (%) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            ours = r.get("ours_gemm_us") or []
            on = r.get("pdl_on_ms")
            other = 1e3 * on - sum(d for _, d, _ in ours) if on and ours else None
            v = r.get("vendor") or {}
            vk = sorted(sorted(v.get("kernels", []), key=lambda nd: -nd[1])[:2], key=v["kernels"].index) \
                if v.get("kernels") else []
            lim = 1e3 * r["limit_ms"]
            vg = [(d, 100 * share * lim / d) for (_, d), share in zip(vk, (2 / 3, 1 / 3))]
            cell = lambda d_pct: f"{d_pct[0]:.1f} ({_f(d_pct[1], '{:.0f}')})"
            L.append(f"| {r['shape']} | {r['tokens']} | {r['way']} | {r['ratio']} | {lim:.1f} "
                     f"| {_f(on and 1e3 * on, '{:.1f}')} "
                     + "".join(f"| {cell(o[1:])} " for o in ours[:2]) + "| - " * (2 - len(ours[:2]))
                     + f"| {_f(other, '{:.1f}')} | {_f(v.get('ms') and 1e3 * v['ms'], '{:.1f}')} "
                     + "".join(f"| {cell(x)} " for x in vg) + "| - " * (2 - len(vg)) + "|")
    var = [r for r in res["rows"] if r.get("variants")]
    if var:
        L += ["", "## One thing changed, same routing, same run", "",
              "Graph time (us, PDL as the runtime has it) of the call with the alignment in one program (sort by "
              "slab, no atomics) against the counts memset and two kernels.",
              "", "| shape | T | way | ratio | limit us | variant A us | variant B us | B / A |",
              "|---|---|---|---|---|---|---|---|"]
        for r in var:
            a, b = r["variants"].get("align_two"), r["variants"].get("align_one")
            a, b = (v if isinstance(v, float) else None for v in (a, b))  # an error's text counts as no time
            L.append(f"| {r['shape']} | {r['tokens']} | {r['way']} | {r['ratio']} | {1e3 * r['limit_ms']:.1f} "
                     f"| align_two {_f(a and a * 1e3, '{:.1f}')} | align_one {_f(b and b * 1e3, '{:.1f}')} "
                     f"| {_f(b / a if a and b else None, '{:.3f}')} |")
    Path(path).write_text("\n".join(L) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# tune

DECODE_T = [(32, 128, 4, 4), (64, 128, 4, 4), (16, 256, 4, 4), (32, 256, 4, 3), (64, 64, 4, 5), (16, 128, 4, 6),
            (32, 64, 4, 6), (64, 128, 8, 4)]
# The last MID entries are vLLM's tuned H200 tiles at T = 512 for the Mixtral and Qwen3 shapes (its file's
# BLOCK_SIZE_N halved for our gate/up, which holds gate and up tiles of BLOCK_N each). Its kernel with them beat ours
# at Mixtral T = 512 ratio 0 by 3-6% and at Qwen3 T = 512 ratios 0.5-1 by 1-5% (eval/vllm_yardstick.py,
# eval/results/README.md); these stage and group counts were not among ours.
MID_GU = [(16, 64, 128, 1, 4, 4), (32, 64, 128, 4, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 3),
          (32, 128, 64, 4, 4, 4), (64, 128, 64, 8, 8, 4), (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3),
          (128, 128, 64, 16, 8, 4), (64, 64, 64, 1, 4, 3)]
MID_DN = [(64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4),
          (128, 64, 4, 3)]
LARGE_GU = [(64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 8, 3), (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3),
            (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 8, 4), (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 5)]
LARGE_DN = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (256, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 4)]


def _cfg(mode, gu, dn, sm="store"):
    return {"mode": mode, "gu": list(gu), "dn": list(dn), "sum": sm}


def _dec(t):
    """(BLOCK_N, BLOCK_K, warps, stages) -> the [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages] of a decode config
    (BLOCK_M is then set by the slot count)."""
    return (16,) + tuple(t[:2]) + (1,) + tuple(t[2:4])


def check_buckets(buckets):
    """ValueError unless every T in `buckets` is one of the tuned buckets (TOKENS)."""
    bad = sorted(set(buckets) - set(TOKENS))
    if bad:
        raise ValueError(f"{bad[0]} is not a bucket; buckets: {TOKENS}")


# (way, ratio) routings the tuner scores on, per seed: ratio 0 and ratio 1's few slabs of many rows. Scoring ratio
# 0.5 too (way 4, `tune --score-mid-ratio`) cost 1.5x the tuning time and changed nothing measurable on the H200
# (eval/results/README.md)
TUNE_WAYS_RATIOS = ((2, 0.0), (4, 1.0))
MID_RATIO = (4, 0.5)
TUNE_SEEDS = (1, 2)  # routing seeds the tuner scores on; `bench` draws its routings from seed 0's stream (held out)


def tune_routing(T, E, k, seed):
    """The tuner's routing of (T, E, k) under one seed: a generator of its own per point, so a point's routing does
    not depend on which other points ran before it (`--buckets`) and never is the bench's (seed 0, drawn in turn)."""
    gen = torch.Generator(device=dev)
    gen.manual_seed(100_003 * seed + 1_009 * T + E)
    return routing(T, E, k, gen)


def kept_buckets(old_table, buckets):
    """{T bucket: the L2 flush it was tuned under} for the buckets a re-tune of `buckets` keeps from `old_table`
    (tables from before the flush key were tuned under the write flush)."""
    kept = {T: f for T, f in old_table.get("kept_buckets", {}).items() if int(T) not in buckets}
    for T in map(str, TOKENS):
        if int(T) not in buckets and T not in kept:
            kept[T] = old_table.get("flush", "write")
    return {T: kept[T] for T in sorted(kept, key=int)}


def tune(out_dir=configs.CONFIG_DIR, budget_s=300.0, buckets=None, seeds=TUNE_SEEDS,
         ways_ratios=TUNE_WAYS_RATIOS):
    """Per shape and T bucket, one config for every ratio: each candidate is timed on the `ways_ratios` remaps of each
    routing seed in `seeds` (by default the ratio-0 routing at way 2 and the way-4 ratio-1 remap: few slabs, many
    rows each), and scored by the sum of its time / the best time on each. Several seeds, none of them the bench's:
    tiles picked on one routing can lose on another by 17% (Qwen1.5 T = 128, way 4 ratio 1, H200), and a bench on the
    tuner's own routing would not show it.
    One config per bucket because a CUDA graph freezes the config it captured while the ratio it reads keeps moving.
    Stages: gate/up tiles (with a default down), then down tiles, then the top-k sum mode, then TMA weight tiles,
    then (prefill with TMA) the activation rows in slab order through TMA as well, then (prefill, gathered rows)
    half-height tiles for half-empty blocks, on the best tiles and on blocks twice as tall. Where out_dir already
    holds this GPU's table, its entry for the point is a first-stage candidate too (the incumbent).
    Writes out_dir/<this GPU's table name> (`configs.file_name`) after every shape; -> (its path, the tuning log).
    `buckets` (T values): re-tune only those, keeping the other entries of the table already there."""
    t_start = time.time()
    device = torch.cuda.get_device_name()
    out_path = Path(out_dir) / configs.file_name(device)
    table = {"shapes": {}, "device": device, "pdl": pdl.MODE, "tune_seeds": list(seeds), "flush": FLUSH,
             "note": "chosen by python -m eval.bench_kernel tune: one config per T bucket for all ratios"}
    old = json.loads(out_path.read_text()) if out_path.is_file() else None
    if buckets:
        check_buckets(buckets)
        if old is not None:  # the other buckets stay as they were tuned, and the table says under which flush
            table["shapes"] = json.loads(json.dumps(old["shapes"]))
            table["kept_buckets"] = kept_buckets(old, buckets)
    log = []
    for name, (E, k, H, I) in SHAPES.items():
        gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02
        dn0 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) * 0.02
        sl = {way: make_slabs(E, H, I, way, gu0, dn0) for way in (2, 4)}
        del gu0, dn0
        entry = table["shapes"].setdefault(fm.shape_key(H, I, k), {})
        for T in (t for t in TOKENS if not buckets or t in buckets):
            if time.time() - t_start > budget_s:
                print(f"TUNE budget spent; {name} T={T} and later keep defaults", flush=True)
                break
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            routings, kinds = [], []
            for seed in seeds:
                idx, w = tune_routing(T, E, k, seed)
                for way, ratio in ways_ratios:
                    gu, dn, G, e2g = sl[way]
                    routings.append((gu, dn) + fused_remap(idx, w, e2g, G, ratio))
                    kinds.append(f"seed {seed} way {way} ratio {ratio:g}")
            incumbent = fm.config_in(old, T, H, I, k) if old is not None else None
            best, score, res = _tune_point(x, routings, T * k, incumbent)
            entry[str(T)] = best
            log.append({"shape": name, "T": T, "best": best, "score": score, "routings": kinds,
                        "incumbent": incumbent, "kept_incumbent": best == incumbent,
                        "tried": [{"ms": m, "cfg": c} for m, c in res]})
            print(f"TUNE {name} T={T}: score {score:.3f} ms {' / '.join(kinds)}: {res_of(res, best)} {best} "
                  f"({len(res)} tried{', the incumbent kept' if best == incumbent else ''}, "
                  f"{time.time() - t_start:.0f}s)", flush=True)
        del sl
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(table, indent=1))  # after every shape: a cut-off run keeps its part
    out_path.write_text(json.dumps(table, indent=1))
    configs.reload()
    print(f"TUNE wrote {out_path}", flush=True)
    return out_path, log


def res_of(res, cfg):
    return next(("/".join(f"{v:.4f}" for v in m) for m, c in res if c == cfg), "-")


TUNE_MAX_RELERR = 1.5e-2  # as `check`: a candidate whose output is further from the reference is never picked


def time_config(x, cfg, gu, dn, ids, w, ref, reps=12):
    """Graph time (ms) of one call with `cfg`, after checking its replayed output against `ref`; inf for a config
    that does not compile, does not fit, or computes something else (relative error over TUNE_MAX_RELERR)."""
    try:
        g, out = capture(lambda: fm.fused_moe(x, gu, dn, ids, w, config=cfg))
        out.fill_(float("nan"))  # what the check reads is the replay's
        g.replay()
        torch.cuda.synchronize()
        err = relerr(out, ref)
        if not err <= TUNE_MAX_RELERR:
            print(f"  skip {cfg}: relative error {err:.3g} against the reference", flush=True)
            return float("inf")
        ms = time_graph(g, reps=reps)
        del g
        return ms
    except Exception as exc:  # a config that does not compile / fit: skip it
        print(f"  skip {cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        return float("inf")


def _tune_point(x, routings, slots, incumbent=None):
    """-> (best config, its score, [(ms per routing, config)]) where score = sum over routings of ms / best ms.
    Each candidate's output on each routing is checked against the PyTorch reference first: one that does not
    compile, does not fit, or computes something else (relative error over TUNE_MAX_RELERR) is timed as inf.
    `incumbent`: the config the table holds now, a first-stage candidate. The stages search one part of a config at a
    time, so they can miss a combination an earlier tuning found: re-tunes on an H200 lost 4-6% at T = 1 on the
    bench's routings that way (eval/results/README.md)."""
    refs = [slab_reference(gu.float(), dn.float(), x.float(), ids, w.float()) for gu, dn, ids, w in routings]
    res = []

    def run(cands):
        for c in cands:
            res.append(([time_config(x, c, *r, ref) for r, ref in zip(routings, refs)], c))
        lows = [min(m[j] for m, _ in res) for j in range(len(routings))]
        scored = [(sum(mj / lj for mj, lj in zip(m, lows)), c) for m, c in res]
        return min(scored, key=lambda t: t[0])

    cands = []
    if slots <= fm.DECODE_MAX_SLOTS:
        cands = [_cfg("decode", _dec(c), _dec(DECODE_T[0])) for c in DECODE_T]
    if 16 < slots <= 4096:
        cands += [_cfg("prefill", c, (c[0],) + MID_DN[0][:2] + (c[3],) + MID_DN[0][2:]) for c in MID_GU]
    if slots > 4096:
        cands += [_cfg("prefill", c, (c[0],) + LARGE_DN[0][:2] + (c[3],) + LARGE_DN[0][2:]) for c in LARGE_GU]
    if incumbent is not None and incumbent not in cands:
        cands.append(dict(incumbent))
    score, best = run(cands)
    # down tiles with the chosen gate/up tiles
    if best["mode"] == "decode":
        dns = [_cfg("decode", best["gu"], _dec(c)) for c in DECODE_T]
    else:
        bm, gm = best["gu"][0], best["gu"][3]
        dns = [_cfg("prefill", best["gu"], (bm,) + c[:2] + (gm,) + c[2:])
               for c in (LARGE_DN if slots > 4096 else MID_DN)]
    score, best = run([c for c in dns if c != best])
    if best["mode"] == "prefill" and slots >= 512:
        score, best = run([dict(best, sum="atomic")])
    # weight tiles through TMA descriptors: the best so far, and the three best gate/up tiles of the first stage
    first = sorted(res[:len(cands)], key=lambda r: sum(r[0]))
    stage1 = first[:3]
    tma = [dict(best, tma=True)] + [dict(best, gu=c["gu"], tma=True) for _, c in stage1 if c["gu"] != best["gu"]]
    score, best = run(tma)
    if best["mode"] == "prefill" and best.get("tma"):  # the activation rows through TMA too, copied in slab order
        score, best = run([dict(best, sorted_rows=True)])
    if best["mode"] == "prefill" and not best.get("sorted_rows"):
        # half-empty blocks (a slab's last) as half-height tiles: on the best tiles, and on twice-as-tall blocks,
        # which read a slab's weights once where ratio 1's few slabs have many rows while ratio 0's half-empty
        # blocks still cost half a tall tile
        bm = best["gu"][0]
        half = [dict(best, half_tail=True)] if bm >= 32 else []
        if 2 * bm <= 128:
            tall = [c["gu"] for m, c in first if c["gu"][0] == 2 * bm and sum(m) < float("inf")][:2]
            best_tall = [2 * bm] + best["gu"][1:]
            tall += [best_tall] if best_tall not in tall else []
            half += [dict(best, gu=g, dn=[2 * bm] + best["dn"][1:3] + [g[3]] + best["dn"][4:], half_tail=True)
                     for g in tall]
        score, best = run(half)
    return best, score, res


# ------------------------------------------------------------------------------------------------------------------
# variants: one change to the table's configs, on the tuner's routings


OVERRIDE_FLAGS = ("tma", "sorted_rows", "half_tail")  # config options a variant sets (1) or clears (0)
# tile fields a variant sets: (GEMMs, index in a tile [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages]); both
# GEMMs walk one alignment, so BLOCK_M goes together
OVERRIDE_TILES = {"block_m": (("gu", "dn"), 0), "warps": (("gu", "dn"), 4), "stages": (("gu", "dn"), 5),
                  "gu_warps": (("gu",), 4), "gu_stages": (("gu",), 5), "dn_warps": (("dn",), 4),
                  "dn_stages": (("dn",), 5)}


def parse_overrides(texts):
    """["tma=1,sorted_rows=0", "sorted_rows=1,dn_warps=4", ...] -> [{"tma": True, "sorted_rows": False},
    {"sorted_rows": True, "dn_warps": 4}, ...]: what a variant changes in a table entry, flags 0 or 1, tile fields
    a positive integer (a power of two but for the stages); ValueError on anything else, so a typo never times the
    table's own config under another name."""
    out = []
    for text in texts:
        o = {}
        for item in text.split(","):
            key, _, val = item.partition("=")
            if key in OVERRIDE_FLAGS and val in ("0", "1"):
                o[key] = val == "1"
            elif key in OVERRIDE_TILES and val.isdigit() and int(val) > 0 and (key.endswith("stages") or
                                                                                int(val) & (int(val) - 1) == 0):
                o[key] = int(val)
            else:
                raise ValueError(f"{item!r}: want FLAG=0|1 with FLAG one of {', '.join(OVERRIDE_FLAGS)}, or "
                                 f"FIELD=N with FIELD one of {', '.join(OVERRIDE_TILES)} (a power of two but "
                                 "for the stages)")
        out.append(o)
    return out


def apply_override(cfg, o):
    """`cfg` with the variant `o` (from parse_overrides) applied; `cfg` itself is not changed."""
    out = dict(cfg, **{k: v for k, v in o.items() if k in OVERRIDE_FLAGS})
    for key, (gemms, j) in OVERRIDE_TILES.items():
        if key in o:
            for g in gemms:
                out[g] = list(out[g][:j]) + [o[key]] + list(out[g][j + 1:])
    return out


@torch.no_grad()
def variants(out_path, overrides, buckets=None, seeds=TUNE_SEEDS, ways_ratios=TUNE_WAYS_RATIOS,
             dtype=torch.bfloat16):
    """This GPU's table entry at each (shape, T bucket), and the same entry with each of `overrides` applied, timed
    on the tuner's routings (its seeds, ways and ratios; never the bench's) in the order base, variants..., base.
    Each output is checked against the reference first; a variant that fails to compile or computes something else
    is recorded as inf, and as inf on the point's other routings without being run again. -> the result (JSON at
    out_path, a table beside it as .md)."""
    table = configs.load(fm.device_name())
    bw, flops = measure_limits()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "flush": FLUSH, "copy_bw_TBps": bw / 1e12,
           "bf16_TFLOPs": flops / 1e12, "overrides": overrides, "seeds": list(seeds), "rows": []}
    for name, (E, k, H, I) in SHAPES.items():
        gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.02
        dn0 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.02
        sl = {way: make_slabs(E, H, I, way, gu0, dn0, dtype) for way in (2, 4)}
        del gu0, dn0
        for T in (t for t in TOKENS if not buckets or t in buckets):
            x = torch.randn(T, H, device=dev, dtype=dtype)
            base = fm.config_in(table, T, H, I, k)
            cands = [apply_override(base, o) for o in overrides]
            failed = set()  # variants already inf at this point: not compiled again for every routing (slow)
            for seed in seeds:
                idx, w = tune_routing(T, E, k, seed)
                for way, ratio in ways_ratios:
                    gu, dn, G, e2g = sl[way]
                    ids, ww = fused_remap(idx, w, e2g, G, ratio)
                    ref = slab_reference(gu.float(), dn.float(), x.float(), ids, ww.float())
                    S = E + G
                    limit_ms = max(limit_terms_ms(int(policy.slabs_read(ids, S)), int((ids < S).sum()), H, I, bw,
                                                  flops))
                    b0 = time_config(x, base, gu, dn, ids, ww, ref)
                    ms = [float("inf") if j in failed else time_config(x, c, gu, dn, ids, ww, ref)
                          for j, c in enumerate(cands)]
                    failed |= {j for j, m in enumerate(ms) if m == float("inf")}
                    b1 = time_config(x, base, gu, dn, ids, ww, ref)
                    row = {"shape": name, "tokens": T, "seed": seed, "way": way, "ratio": ratio, "base": base,
                           "limit_ms": limit_ms, "base_ms": [b0, b1], "variant_ms": ms,
                           "variant_over_base": [m / ((b0 + b1) / 2) for m in ms]}
                    res["rows"].append(row)
                    print(f"VARIANTS {name} T={T} seed {seed} w{way}r{ratio:g}: base {b0:.4f}/{b1:.4f} ms, "
                          + " ".join(f"{q:.3f}" for q in row["variant_over_base"]), flush=True)
        del sl
        torch.cuda.empty_cache()
    Path(out_path).write_text(json.dumps(res, indent=1))
    write_variants_md(res, Path(out_path).with_suffix(".md"))
    return res


def write_variants_md(res, path):
    """Per (shape, T): each variant's time over the base entry's, as the geometric mean over the routings and its
    range; inf where it did not compile or was wrong."""
    names = [",".join(f"{k}={int(v)}" for k, v in o.items()) for o in res["overrides"]]
    L = [f"# One change to the tile table's entries: {res['device']}, torch {res['torch']}, triton {res['triton']}",
         "", f"The tuner's routings (seeds {res['seeds']}), L2 flush {res['flush']}. Each cell: variant time / the "
         "table entry's time (mean of the base timed before and after), geometric mean over the routings [range]; "
         "inf: did not compile or fit, or its output was off the reference.", "",
         "| shape | T | base ratio 0 % of limit | " + " | ".join(names) + " |",
         "|---|---|---|" + "---|" * len(names)]
    keys = sorted({(r["shape"], r["tokens"]) for r in res["rows"]}, key=lambda t: (list(SHAPES).index(t[0]), t[1]))
    for shape, T in keys:
        pts = [r for r in res["rows"] if r["shape"] == shape and r["tokens"] == T]
        r0 = [100 * r["limit_ms"] / min(r["base_ms"]) for r in pts if r["ratio"] == 0.0]
        cells = []
        for j in range(len(names)):
            q = [r["variant_over_base"][j] for r in pts]
            cells.append("inf" if any(v == float("inf") for v in q) else
                         f"{statistics.geometric_mean(q):.3f} [{min(q):.3f}-{max(q):.3f}]")
        L.append(f"| {shape} | {T} | {'/'.join(f'{v:.0f}' for v in r0)} | " + " | ".join(cells) + " |")
    Path(path).write_text("\n".join(L) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# ab: two tables on the same calls


@torch.no_grad()  # not torch.set_grad_enabled(False): that would outlive the call
def ab(table_a, table_b, out_path, seed=0, tokens=None, reps=25, dtype=torch.bfloat16, copies=1):
    """Two tile config tables timed on the same calls in one process: the bench's routings (its `seed`, drawn in its
    order, so a point's routing is the bench's), every way and ratio at the `tokens` buckets. Per call both configs
    are captured and checked against the reference, then timed A, B, B, A (each a median of `reps` flushed replays);
    a table's time is the mean of its two. `copies` > 1: the same weights also cloned to other allocations (a spacer
    between), every call captured and timed on each copy in turn, a table's time the mean over them; the spread
    over copies is what the placement of the weights in memory moves a time by.
    -> the result dict, also written to out_path (+ .md: B / A per bucket). `dtype`: of the weights and activations
    (the routing weights are bf16, as the bench's)."""
    tabs = {n: json.loads(Path(p).read_text()) for n, p in (("a", table_a), ("b", table_b))}
    bw, flops = measure_limits()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_bw_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12,
           "table_a": str(table_a), "table_b": str(table_b), "routing_seed": seed, "flush": FLUSH, "copies": copies,
           "rows": []}
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    for name, (E, k, H, I) in SHAPES.items():
        gu0 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * 0.02
        dn0 = torch.randn(E, H, I, device=dev, dtype=dtype) * 0.02
        slabs, spacers = {}, []
        for way in WAYS:
            gu, dn, G, e2g = make_slabs(E, H, I, way, gu0, dn0, dtype)
            slabs[way] = [(gu, dn)]
            for c in range(1, copies):  # other addresses: a spacer of a few MiB, then the clones
                spacers.append(torch.empty((2 * c + 1) << 20, dtype=torch.uint8, device=dev))
                slabs[way].append((gu.clone(), dn.clone()))
            slabs[way] = (slabs[way], G, e2g)
        del gu0, dn0
        for T in TOKENS:
            x = torch.randn(T, H, device=dev, dtype=dtype)
            idx, w = routing(T, E, k, gen)  # drawn at every T, as the bench draws them
            if tokens and T not in tokens:
                continue
            cfgs = {n: fm.config_in(t, T, H, I, k) for n, t in tabs.items()}
            for way in WAYS:
                tensors, G, e2g = slabs[way]
                S = E + G
                for ratio in RATIOS:
                    a = policy.remap(idx, w, e2g, G, ratio)
                    gu, dn = tensors[0]
                    ref = slab_reference(gu, dn, x, a.ids, a.weights)
                    limit_ms = max(limit_terms_ms(int(policy.slabs_read(a.ids, S)), int((a.ids < S).sum()), H, I,
                                                  bw, flops))
                    row = {"shape": name, "tokens": T, "way": way, "ratio": ratio, "limit_ms": limit_ms,
                           "config_a": cfgs["a"], "config_b": cfgs["b"], "relerr_a": 0.0, "relerr_b": 0.0,
                           "ms_a_copies": [], "ms_b_copies": [], "ms_a_each": [], "ms_b_each": []}
                    rm = remapper(idx, w, e2g, G, ratio)
                    for gu, dn in tensors:
                        graphs = {}
                        for n, cfg in cfgs.items():
                            g, out = capture(lambda cfg=cfg, gu=gu, dn=dn: fm.fused_moe(x, gu, dn, *rm(), num_slabs=S,
                                                                                       config=cfg))
                            out.fill_(float("nan"))
                            g.replay()
                            torch.cuda.synchronize()
                            row[f"relerr_{n}"] = max(row[f"relerr_{n}"], relerr(out, ref))
                            if not row[f"relerr_{n}"] <= TUNE_MAX_RELERR:
                                print(f"AB WARNING {name} T={T} way {way} ratio {ratio:g}: table {n.upper()}'s "
                                      f"output is {row[f'relerr_{n}']:.3g} from the reference", flush=True)
                            graphs[n] = g
                        times = {"a": [], "b": []}
                        for n in ("a", "b", "b", "a"):
                            times[n].append(time_graph(graphs[n], reps))
                        del graphs
                        for n in ("a", "b"):
                            row[f"ms_{n}_each"] += times[n]
                            row[f"ms_{n}_copies"].append(statistics.mean(times[n]))
                    for n in ("a", "b"):
                        row[f"ms_{n}"] = statistics.mean(row[f"ms_{n}_copies"])
                        row[f"pct_{n}"] = 100 * limit_ms / row[f"ms_{n}"]
                    res["rows"].append(row)
            pts = [r for r in res["rows"] if r["shape"] == name and r["tokens"] == T]
            gm = statistics.geometric_mean(r["ms_b"] / r["ms_a"] for r in pts)
            print(f"AB {name} T={T}: B/A {gm:.3f} | " + " ".join(
                f"w{r['way']}r{r['ratio']:g}:{r['ms_a']:.4f}/{r['ms_b']:.4f}" for r in pts), flush=True)
        del slabs, spacers
        torch.cuda.empty_cache()
    Path(out_path).write_text(json.dumps(res, indent=1))
    write_ab_md(res, Path(out_path).with_suffix(".md"))
    return res


def write_ab_md(res, path):
    """Per (shape, T): B / A as the geometric mean over the ways and ratios, its range, and the ratio-0 way-2 % of
    the limit of each table; with copies, also B / A per copy (does the order hold at every placement?) and the
    largest max / min over copies of one table's time at one call."""
    copies = res.get("copies", 1)
    L = [f"# Tile tables A / B on the same calls: {res['device']}, torch {res['torch']}, triton {res['triton']}",
         "", f"A = `{res['table_a']}`, B = `{res['table_b']}`; bench routings of seed {res['routing_seed']}, L2 "
         f"flush {res['flush']}; ceilings copy {res['copy_bw_TBps']:.2f} TB/s, bf16 {res['bf16_TFLOPs']:.0f} "
         f"TFLOP/s. Each call timed A, B, B, A (medians of flushed graph replays) on each of {copies} copies of the "
         "weights; a table's time is the mean.", ""]
    head = "| shape | T | B / A (geomean over way x ratio) | range | ratio 0 way 2, % of limit A / B | worst relerr |"
    if copies > 1:
        head += " B / A per copy | max / min over copies |"
    L += [head, "|" + "---|" * (head.count("|") - 1)]
    keys = sorted({(r["shape"], r["tokens"]) for r in res["rows"]}, key=lambda t: (list(SHAPES).index(t[0]), t[1]))
    for shape, T in keys:
        pts = [r for r in res["rows"] if r["shape"] == shape and r["tokens"] == T]
        q = [r["ms_b"] / r["ms_a"] for r in pts]
        r0 = next((r for r in pts if r["way"] == 2 and r["ratio"] == 0.0), None)
        pct = f"{r0['pct_a']:.0f} / {r0['pct_b']:.0f}" if r0 else "-"
        err = max(max(r["relerr_a"], r["relerr_b"]) for r in pts)
        line = (f"| {shape} | {T} | {statistics.geometric_mean(q):.3f} | {min(q):.3f}-{max(q):.3f} | {pct} | "
                f"{err:.1e} |")
        if copies > 1:
            per = [statistics.geometric_mean(r["ms_b_copies"][c] / r["ms_a_copies"][c] for r in pts)
                   for c in range(copies)]
            spread = max(max(r[f"ms_{n}_copies"]) / min(r[f"ms_{n}_copies"]) for r in pts for n in "ab")
            line += f" {' / '.join(f'{v:.3f}' for v in per)} | {spread:.3f} |"
        L.append(line)
    q = [r["ms_b"] / r["ms_a"] for r in res["rows"]]
    L += ["", f"All {len(q)} calls: B / A geometric mean {statistics.geometric_mean(q):.3f}."]
    Path(path).write_text("\n".join(L) + "\n")


# ------------------------------------------------------------------------------------------------------------------
# bench


def bench(outdir, budget_s=420.0, seed=0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    import transformers

    t_start = time.time()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    bw, flops = measure_limits()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "triton": __import__("triton").__version__, "copy_bw_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12,
           "timing": __doc__.split("Timing.")[1].strip(), "flush": FLUSH, "routing_seed": seed, "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "timing")}), flush=True)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)  # drawn in turn over the points; the tuner never scores on seed 0's routings
    torch.set_grad_enabled(False)
    for name, (E, k, H, I) in SHAPES.items():
        cfg = MixtralConfig(num_local_experts=E, num_experts_per_tok=k, hidden_size=H, intermediate_size=I)
        ex = MixtralExperts(cfg).to(dev, torch.bfloat16)
        torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
        torch.nn.init.normal_(ex.down_proj, std=0.02)
        slabs = {way: make_slabs(E, H, I, way, ex.gate_up_proj.data, ex.down_proj.data) for way in WAYS}
        for T in TOKENS:
            if time.time() - t_start > budget_s:
                print(f"BENCH budget spent at {name} T={T}", flush=True)
                break
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
            idx, w = routing(T, E, k, gen)
            for way in WAYS:
                gu, dn, G, e2g = slabs[way]
                S = E + G
                for ratio in RATIOS:
                    ids, ww = fused_remap(idx, w, e2g, G, ratio)
                    a = policy.remap(idx, w, e2g, G, ratio)
                    nslabs = int(policy.slabs_read(a.ids, S))
                    live = int((a.ids < S).sum())
                    limit_ms = max(limit_terms_ms(nslabs, live, H, I, bw, flops))
                    row = {"shape": name, "E": E, "k": k, "H": H, "I": I, "tokens": T, "way": way, "ratio": ratio,
                           "slabs_read": nslabs, "live_slots": live, "limit_ms": limit_ms,
                           "config": fm.get_config(T, H, I, k), "remap_ids_match": bool(torch.equal(ids, a.ids))}

                    rm = remapper(idx, w, e2g, G, ratio)

                    def call(gu=gu, dn=dn, x=x, rm=rm):
                        return fm.fused_moe(x, gu, dn, *rm(), num_slabs=gu.shape[0])

                    try:
                        out = call()
                        ref = slab_reference(gu, dn, x, a.ids, a.weights)
                        row["relerr_vs_reference"] = relerr(out, ref)
                        row["ours_eager_ms"] = bench_eager(call)
                        g, gout = capture(call)
                        row["ours_graph_ms"] = time_graph(g)
                        _flush()
                        g.replay()
                        torch.cuda.synchronize()
                        row["graph_relerr"] = relerr(gout, ref)
                        del g
                        if way == 2 and ratio == 1.0:  # the runtime's PyTorch remap + our kernel, for comparison
                            def call_t(G=G, e2g=e2g, gu=gu, dn=dn):
                                aa = policy.remap(idx, w, e2g, G, 1.0)
                                return fm.fused_moe(x, gu, dn, aa.ids, aa.weights, num_slabs=gu.shape[0])
                            g, _ = capture(call_t)
                            row["ours_torchremap_graph_ms"] = time_graph(g)
                            del g
                            g, _ = capture(remapper(idx, w, e2g, G, 1.0))
                            row["remap_only_graph_ms"] = time_graph(g)
                            del g
                    except Exception as exc:
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    for m in ("eager", "graph"):
                        if f"ours_{m}_ms" in row:
                            row[f"ours_{m}_pct"] = 100 * limit_ms / row[f"ours_{m}_ms"]
                    res["rows"].append(row)
            # transformers at ratio 0 on the originals
            base = {"shape": name, "E": E, "k": k, "H": H, "I": I, "tokens": T, "way": 0, "ratio": 0.0,
                    "baseline": True}
            touched = int(idx.unique().numel())
            bytes_ms, flops_ms = limit_terms_ms(touched, T * k, H, I, bw, flops)
            limit_ms = max(bytes_ms, flops_ms)
            base.update(slabs_read=touched, limit_ms=limit_ms)
            base["bandwidth_bound"] = bytes_ms >= flops_ms
            try:
                base["plain_read_ms"], base["plain_read_by"] = plain_read_ms(touched * 3 * H * I * 2)
                base["plain_read_pct"] = 100 * limit_ms / base["plain_read_ms"]
            except Exception as exc:
                base["plain_read_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            ref = None
            for impl in ["eager", "grouped_mm", "batched_mm"]:
                if impl == "batched_mm" and T * k * 3 * H * I * 2 > 20e9:
                    base[impl] = "skipped: materialises T*k weight copies"
                    continue
                cfg._experts_implementation = impl
                try:
                    y = ex(x, idx, w)
                    if ref is None:
                        ref = y.float()
                    base[impl + "_relerr"] = relerr(y, ref)
                    base[impl + "_eager_ms"] = bench_eager(lambda: ex(x, idx, w))
                    base[impl + "_eager_pct"] = 100 * limit_ms / base[impl + "_eager_ms"]
                    if impl == "eager":
                        base[impl + "_graph"] = "not capturable: host sync (nonzero / .tolist)"
                        continue
                    g, _ = capture(lambda: ex(x, idx, w))
                    base[impl + "_graph_ms"] = time_graph(g)
                    base[impl + "_graph_pct"] = 100 * limit_ms / base[impl + "_graph_ms"]
                    del g
                except Exception as exc:
                    base[impl + "_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    torch.cuda.synchronize()
            # ours vs transformers' output at ratio 0
            try:
                ours0 = fm.fused_moe(x, ex.gate_up_proj, ex.down_proj, idx, w)
                base["ours_vs_eager_relerr"] = relerr(ours0, ref)
            except Exception as exc:
                base["ours_vs_eager_relerr"] = f"error {exc}"
            res["rows"].append(base)
            ours = [r for r in res["rows"] if not r.get("baseline") and r["shape"] == name and r["tokens"] == T]
            msg = " ".join(f"w{r['way']}r{r['ratio']}:{r.get('ours_graph_ms', float('nan')):.4f}ms"
                           f"({r.get('ours_graph_pct', 0):.0f}%)" for r in ours)
            bl = " ".join(f"{i}:{base.get(i + '_graph_pct', base.get(i + '_eager_pct', 0)):.0f}%"
                          for i in ["eager", "grouped_mm", "batched_mm"])
            print(f"{name} T={T} limit0={limit_ms:.4f}ms | {msg} | {bl} | {time.time() - t_start:.0f}s", flush=True)
        del ex, slabs
        torch.cuda.empty_cache()
        json.dump(res, open(outdir / "kernel_bench.json", "w"), indent=1)
    json.dump(res, open(outdir / "kernel_bench.json", "w"), indent=1)
    write_md(res, outdir / "kernel_bench.md")
    try:
        plot(res, outdir / "kernel_bench.png")
    except Exception as exc:
        print("plot failed:", exc)
    return res


def _f(v, fmt="{:.0f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def write_md(res, path):
    L = [f"# Kernel benchmark ({res['device']}, torch {res['torch']}, triton {res['triton']}, "
         f"transformers {res['transformers']})", "",
         f"Measured ceilings: copy {res['copy_bw_TBps']:.2f} TB/s, bf16 matmul {res['bf16_TFLOPs']:.0f} TFLOP/s. "
         "% = physical limit / time (higher is better).", "", res["timing"], "",
         f"This run's L2 flush: {res.get('flush', 'write')} (`--flush`; runs before December 2026 wrote).", "",
         f"Routings drawn from seed {res.get('routing_seed', 0)}; the tile tuner scores on seeds of its own "
         f"({', '.join(map(str, TUNE_SEEDS))}), so these points are held out from it.", ""]
    rows = res["rows"]
    L += ["The last column times the best plain read of the bytes the ratio-0 call reads (torch.sum, or a Triton "
          "streaming read over a few chunk sizes), the same way, where the limit is the bandwidth term: far below "
          "100%, one kernel streaming that many bytes does not reach the copy bandwidth of the limit either.", ""]
    L += ["## Ratio 0, CUDA graphs: ours vs transformers (best of grouped_mm / batched_mm)", "",
          "| shape | T | limit ms | ours ms | ours % | grouped_mm % | batched_mm % | ours eager % | tf best eager % "
          "| plain read of the same bytes % |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("baseline"):
            o = next((x for x in rows if not x.get("baseline") and x["shape"] == r["shape"]
                      and x["tokens"] == r["tokens"] and x["way"] == 2 and x["ratio"] == 0.0), {})
            tfe = max([r.get(i + "_eager_pct", 0) for i in ("eager", "grouped_mm", "batched_mm")])
            L.append(f"| {r['shape']} | {r['tokens']} | {r['limit_ms']:.4f} | {_f(o.get('ours_graph_ms'), '{:.4f}')} "
                     f"| {_f(o.get('ours_graph_pct'))} | {_f(r.get('grouped_mm_graph_pct'))} "
                     f"| {_f(r.get('batched_mm_graph_pct'))} | {_f(o.get('ours_eager_pct'))} | {_f(tfe)} "
                     f"| {_f(r.get('plain_read_pct')) if r.get('bandwidth_bound') else '- (matmul-bound)'} |")
    L += ["", "## Brownout: time / ratio-0 time vs ideal (limit / ratio-0 limit); target: ratio <= 1.1 x ideal", "",
          "| shape | T | way | ratio | slabs | ms (graph) | % limit | time/r0 | ideal | x ideal | eager ms |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("baseline"):
            continue
        r0 = next(x for x in rows if not x.get("baseline") and x["shape"] == r["shape"] and x["tokens"] == r["tokens"]
                  and x["way"] == r["way"] and x["ratio"] == 0.0)
        if "ours_graph_ms" in r and "ours_graph_ms" in r0:
            tr = r["ours_graph_ms"] / r0["ours_graph_ms"]
            ideal = r["limit_ms"] / r0["limit_ms"]
            r["time_over_r0"], r["ideal"], r["x_ideal"] = tr, ideal, tr / ideal
        L.append(f"| {r['shape']} | {r['tokens']} | {r['way']} | {r['ratio']} | {r['slabs_read']} "
                 f"| {_f(r.get('ours_graph_ms'), '{:.4f}')} | {_f(r.get('ours_graph_pct'))} "
                 f"| {_f(r.get('time_over_r0'), '{:.2f}')} | {_f(r.get('ideal'), '{:.2f}')} "
                 f"| {_f(r.get('x_ideal'), '{:.2f}')} | {_f(r.get('ours_eager_ms'), '{:.4f}')} |")
    errs = [r["relerr_vs_reference"] for r in rows if "relerr_vs_reference" in r]
    L += ["", f"bf16 relative error vs runtime.reference.slab_forward (bf16): max {max(errs) if errs else float('nan'):.2e}"
          f" over {len(errs)} points; remapped ids identical to runtime.policy.remap at "
          f"{sum(r.get('remap_ids_match', False) for r in rows)}/{len(errs)} points.", ""]
    rm = [r for r in rows if "remap_only_graph_ms" in r]
    if rm:
        L += ["Remap cost (way 2, ratio 1, graph): fused Triton remap alone "
              + ", ".join(f"{r['shape']} T={r['tokens']}: {1e3 * r['remap_only_graph_ms']:.0f} us" for r in rm[:6])
              + "; the whole call with runtime.policy.remap instead: "
              + ", ".join(f"{r['shape']} T={r['tokens']}: {r['ours_torchremap_graph_ms']:.4f} vs "
                          f"{r['ours_graph_ms']:.4f} ms" for r in rm if 'ours_graph_ms' in r)[:3000], ""]
    Path(path).write_text("\n".join(L))


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, SHAPES):
        rows = [r for r in res["rows"] if r["shape"] == name]
        for lab, sel, key in [("ours r0", lambda r: not r.get("baseline") and r["way"] == 2 and r["ratio"] == 0,
                               "ours_graph_pct"),
                              ("ours w2 r1", lambda r: not r.get("baseline") and r["way"] == 2 and r["ratio"] == 1,
                               "ours_graph_pct"),
                              ("ours w4 r1", lambda r: not r.get("baseline") and r["way"] == 4 and r["ratio"] == 1,
                               "ours_graph_pct"),
                              ("grouped_mm r0", lambda r: r.get("baseline"), "grouped_mm_graph_pct"),
                              ("batched_mm r0", lambda r: r.get("baseline"), "batched_mm_graph_pct"),
                              ("tf eager r0 (eager)", lambda r: r.get("baseline"), "eager_eager_pct")]:
            pts = [(r["tokens"], r[key]) for r in rows if sel(r) and isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("tokens T")
        ax.axhline(85, color="gray", lw=0.5, ls="--")
    axes[0].set_ylabel("% of physical limit (CUDA graph unless marked)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fused two-tier MoE kernel, {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eval.bench_kernel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", nargs="?", default="bench", choices=["check", "tune", "bench", "ab", "variants",
                                                                "profile", "profile-md", "ncu-target", "ncu-md"])
    ap.add_argument("path", nargs="?", help="check: JSON out; tune: config folder; bench: result folder; "
                    "ab: table A (JSON); profile: JSON out; profile-md: an earlier profile's JSON; ncu-md: the "
                    "report's raw CSV")
    ap.add_argument("log", nargs="?", help="tune: where to write the tuning log (JSON); ab: table B (JSON); "
                    "ncu-md: the ncu-target run's stdout")
    ap.add_argument("--out", help="ab, variants: the result JSON (+ .md beside it)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE,...", help="variants: one variant of "
                    "every table entry, e.g. --set tma=1 --set sorted_rows=1,dn_warps=4 (flags =0|1: "
                    f"{', '.join(OVERRIDE_FLAGS)}; tile fields =N: {', '.join(OVERRIDE_TILES)}, gu_ and dn_ for one "
                    "GEMM, the others for both, one GEMM's field winning)")
    ap.add_argument("--tokens", help=f"ab: only these T buckets of {TOKENS} (default: all)")
    ap.add_argument("--copies", type=int, default=1, help="ab: time every call on this many copies of the weights "
                    "at other addresses (the spread is what placement in memory moves a time by)")
    ap.add_argument("--points", help="profile, ncu-target: shape:T:way:ratio,... (default: a fixed set over all "
                    "four shapes)")
    ap.add_argument("--no-vendor", action="store_true", help="profile: skip the vendor grouped GEMM yardstick")
    ap.add_argument("--seed", type=int, default=0, help="profile, bench: seed of the random routings (the tuner "
                    f"scores on seeds {', '.join(map(str, TUNE_SEEDS))} of its own draws, never on the bench's)")
    ap.add_argument("--buckets", help=f"tune, variants: only these T buckets of {TOKENS} (e.g. 1,8); tune keeps "
                    "the other entries of the table already there")
    ap.add_argument("--score-mid-ratio", action="store_true", help="tune: score each candidate on way-4 ratio-0.5 "
                    "routings too (1.5x the time; no measurable gain on the H200)")
    ap.add_argument("--flush", choices=FLUSH_MODES, default=FLUSH,
                    help="tune, bench, profile, variants: how the L2 is emptied before each timed replay: read a "
                    "256 MiB buffer (clean lines, as in a forward; default) or overwrite it (dirty lines the call "
                    "must write back first, as the benches did up to December 2026); env BENCH_FLUSH")
    a = ap.parse_args(argv)
    set_flush(a.flush)  # the default is the environment's value, already checked at import
    if a.cmd == "ncu-md":  # the table of an ncu report's raw CSV export
        if not (a.path and a.log):
            ap.error("ncu-md needs the raw CSV (ncu --import REPORT --csv --page raw) and the ncu-target run's stdout")
        if Path(a.path).suffix.lower() != ".csv":  # the table goes beside it as .md: never over the input
            ap.error(f"ncu-md: {a.path} is not a .csv file")
        try:
            print("\n".join(ncu_md(a.path, a.log, Path(a.path).with_suffix(".md"))))
        except OSError as e:
            ap.error(f"ncu-md: {e}")
        except (KeyError, IndexError, ValueError) as e:
            ap.error(f"ncu-md: {a.path} is not a raw CSV export of an ncu-target report ({type(e).__name__}: {e})")
    elif a.cmd == "profile-md":  # the markdown of an earlier profile run's JSON
        if not a.path:
            ap.error("profile-md needs the JSON of a profile run")
        write_profile_md(json.load(open(a.path)), Path(a.path).with_suffix(".md"))
    elif a.cmd == "check":
        rows = check()
        if a.path:
            json.dump(rows, open(a.path, "w"), indent=1)
    elif a.cmd in ("profile", "ncu-target"):
        points = None
        if a.points:
            try:
                points = [(n, int(t), int(w), float(r)) for n, t, w, r in (p.split(":") for p in a.points.split(","))]
            except ValueError:
                ap.error("--points wants shape:T:way:ratio,... e.g. olmoe-1b-7b:512:4:1.0")
            bad = sorted({p[0] for p in points} - set(SHAPES))
            if bad:
                ap.error(f"unknown shape {bad[0]!r}; known: {', '.join(SHAPES)}")
        if a.cmd == "ncu-target":
            return ncu_target(points, seed=a.seed)
        out = a.path or "kernel_profile.json"
        write_profile_md(profile_calls(out, points, vendor=not a.no_vendor, seed=a.seed), Path(out).with_suffix(".md"))
    elif a.cmd == "ab":
        if not (a.path and a.log and a.out):
            ap.error("ab needs two tables and --out: ab TABLE_A.json TABLE_B.json --out OUT.json")
        for t in (a.path, a.log):
            if not Path(t).is_file():
                ap.error(f"ab: no table at {t}")
        if Path(a.out).suffix.lower() != ".json":
            ap.error(f"ab: --out {a.out} is not a .json path")
        try:
            tokens = [int(t) for t in a.tokens.split(",")] if a.tokens else None
            check_buckets(tokens or [])
        except ValueError as e:
            ap.error(f"--tokens: {e}")
        if a.copies < 1:
            ap.error(f"--copies {a.copies}: at least 1")
        ab(a.path, a.log, a.out, seed=a.seed, tokens=tokens, copies=a.copies)
    elif a.cmd == "variants":
        if not (a.out and a.set):
            ap.error("variants needs --out and at least one --set: variants --set tma=1 --out OUT.json")
        if Path(a.out).suffix.lower() != ".json":
            ap.error(f"variants: --out {a.out} is not a .json path")
        try:
            overrides = parse_overrides(a.set)
            buckets = [int(t) for t in a.buckets.split(",")] if a.buckets else None
            check_buckets(buckets or [])
        except ValueError as e:
            ap.error(f"variants: {e}")
        variants(a.out, overrides, buckets)
    elif a.cmd == "tune":
        try:
            buckets = [int(t) for t in a.buckets.split(",")] if a.buckets else None
        except ValueError:
            ap.error("--buckets wants T values, e.g. 1,8")
        try:
            check_buckets(buckets or [])
        except ValueError as e:
            ap.error(f"--buckets: {e}")
        _, log = tune(a.path or configs.CONFIG_DIR, float(os.environ.get("TUNE_BUDGET_S", "300")), buckets,
                      ways_ratios=TUNE_WAYS_RATIOS + ((MID_RATIO,) if a.score_mid_ratio else ()))
        if a.log:
            json.dump(log, open(a.log, "w"), indent=1)
    else:
        bench(a.path or "eval/results", float(os.environ.get("BENCH_BUDGET_S", "420")), seed=a.seed)


if __name__ == "__main__":
    main()
