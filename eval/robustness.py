"""Robustness matrix: does a controller hold the SLO, with no constant retuned, on traces it was not shaped on?

One engine, one calibration, then a matrix of seeded traces whose rates are set from the engine's measured service
rates (mu0 at ratio 0, mu1 at ratio 1, requests/s):

    burst1.5 / burst2 / burst3   the paper's burst shape (the rate rises at 30% of the stream) from 0.6 mu0 to
                                 1.5x, 2x and 3x that
    ramp                         Poisson whose rate moves linearly from 0.5 mu0 to (mu0 + mu1) / 2 + 0.5 (mu1 - mu0)
                                 (the load change: the moment it passes mu0)
    spike                        Poisson at 0.6 mu0 with 3x that for 8% of the stream from 40%
    poisson                      Poisson at (mu0 + mu1) / 2: between ratio 0's and ratio 1's capacity (the "load
                                 change" is the first 20%: a cold start)

each served by the fixed ratios 0, 0.25, 0.5, 0.75 and 1 (the hindsight baselines), the paper's rule (SALC, its
5 s / 2 s clock scaled by the stream's compression, as the burst benchmark does) and ours (`mpc`, the library's
defaults). Per trace and config: first-token and later-token SLO violations before and after the load change,
mean ratio, goodput, p50/p90/p99 TTFT and TPOT, and the verdict of issue 18's target:

    where some fixed ratio keeps both violation rates <= 5% over the trace, ours must too, with a mean ratio no more
    than 0.1 above the smallest such ratio; where none can, ours must be no worse than ratio 1 (its larger
    violation share, of first or of later tokens, at most 1 point above ratio 1's).

Engines:
    --engine throttled   CPU, no GPU: transformers' continuous batching serving a tiny Qwen2-MoE whose every step
                         sleeps step_ms x (1 - gain x ratio) (eval/throttled_serving.py). `--laws 30:0.6,12:0.3`
                         runs the whole matrix once per law: stand-ins for machines whose brownout buys more or less,
                         with nothing retuned between them. About 10 minutes per law.
    --engine gpu         the serving benchmark's setup (eval/bench_serving.py): Qwen1.5-MoE-A2.7B shape, random bf16
                         weights, a 4-way united tier, the fused kernel in CUDA graphs on every side.

    --engine sim         the GPU engine simulated (eval/sim_serving.py: 64 slots, step times from an H200 step
                         profile, seeded jitter) in simulated time, a matrix in seconds: `--seeds 0-19` runs it once
                         per trace seed and sums up how often each trace's target was met; `--sim-laws` simulates
                         the throttled engine's laws instead. A model's figures, for choosing what to run on a GPU.
                         `--mpc-kw '{"occ_arm": null}'` runs ours with other keywords (a variant to compare).
                         `--sim-like GPU_JSON` replays one GPU matrix on the model (its calibration, the model's
                         speed scaled to it) and reports the two side by side; `--sim-run-jitter` adds the GPU's
                         run-to-run spread.
    --engine gpu --compile-outside-experts   the same, with the norms and the rotary embedding compiled
                         (`runtime.compile_outside_experts`: the launch-bound work outside the experts; experts,
                         routers and attention matmuls as before), before the step profile and every run.
    --engine gpu --compile   the same, with the engine's forward compiled through transformers' own path
                         (`ServeConfig(compile=True)`). On transformers 5.17 / H200 the compiled engine did not
                         finish its warm-up; on 5.24 it serves after a 66-72 s warm-up, which counts against
                         --time-budget (eval/results/README.md); `--tiny --compile` runs on the CPU.
    --eager-saturation   with either compile: first measure the same handle's saturated rates without it, in the
                         same process (the same as `--compare eager`; see --help for the other variants).
    --attention varlen   the engine's attention packs the sequences through torch's FlashAttention (each query reads
                         only its own KV) instead of SDPA over the whole batch's KV with a mask
                         (runtime/serving/varlen_attention.py); `--compare attention` measures the other one too.

The SLOs are calibrated the same way on every engine: `--slo-factor` x the p90 TTFT and TPOT of a ratio-0 run at
half mu0. mpc gets the capacity measured here (the library's `measure_capacity`) and, on the GPU, the graph-replayed
step profile; no controller constant is set here.

    python -m eval.robustness --engine throttled --laws 30:0.6,12:0.3        # eval/results/robustness_cpu.*
    python -m eval.robustness --engine gpu --duration 8 --drain-seconds 3 --time-budget 545   # one device call
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from eval.bench_serving import fmt, log
from runtime import compile_outside_experts
from runtime.compile_outside import compiled_outside
from runtime.serving import (BrownoutServer, FixedRatio, LatencyProfile, ServeConfig, burst_test, make_controller,
                             median_saturation, poisson, ramp, saturation_trace, spike, summarize, timeline)
from runtime.serving.calibration import REPEATS, measure_saturation, median_run, saturation_runs
from runtime.serving.server import ATTENTIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "eval" / "results"
FIXED = [0.0, 0.25, 0.5, 0.75, 1.0]
CONFIGS = [f"fixed:{r:g}" for r in FIXED] + ["salc", "mpc"]  # what the matrix serves on each trace, in order
TRACES = ["burst1.5", "burst2", "burst3", "ramp", "spike", "poisson"]
OK_SHARE = 0.05  # the target's violation bound
RATIO_SLACK = 0.1  # ours may spend this much more mean ratio than the smallest fixed ratio that holds
NO_WORSE = 0.01  # "no worse than ratio 1": at most this much more late, in the larger of the two shares (`worst`)


# ------------------------------------------------------------------------------------------------------ traces
def make_traces(names, mu0: float, mu1: float, duration: float, seed: int, lengths: str, max_prompt: int,
                max_output: int) -> dict:
    """{name: (trace, change_at)} with rates set from the measured service rates (module docstring)."""
    kw = dict(lengths=lengths, max_prompt=max_prompt, max_output=max_output)
    base, mid = 0.6 * mu0, 0.5 * (mu0 + mu1)
    out = {}
    for i, name in enumerate(names):
        s = seed * 100 + i
        if name.startswith("burst"):
            f = float(name[len("burst"):])
            tr = burst_test(base, duration_scale=duration / 250.0, factor=f, seed=s, **kw)
            out[name] = (tr, tr.meta["burst_at"])
        elif name == "ramp":
            r0, r1 = 0.5 * mu0, mid + 0.5 * (mu1 - mu0)
            tr = ramp(r0, r1, duration, seed=s, **kw)
            out[name] = (tr, duration * (mu0 - r0) / (r1 - r0))
        elif name == "spike":
            tr = spike(base, 3.0, duration, 0.4 * duration, 0.08 * duration, seed=s, **kw)
            out[name] = (tr, 0.4 * duration)
        elif name == "poisson":
            tr = poisson(mid, duration, seed=s, **kw)
            out[name] = (tr, 0.2 * duration)
        else:
            raise SystemExit(f"unknown trace {name!r}: one of {TRACES}")
    return out


# ------------------------------------------------------------------------------------------------------ verdict
def worst(m: dict) -> float:
    """The larger of the first-token and later-token violation shares (1 where a kind has no token)."""
    return max(1.0 if v is None else v for v in (m["violation_prefill"], m["violation_decode"]))


def verdict(runs: dict) -> dict:
    """Issue 18's target on one trace. `runs`: {config: metrics dict with "all"}."""
    fixed = sorted((float(c.split(":")[1]), m) for c, m in runs.items() if c.startswith("fixed:"))
    holding = [r for r, m in fixed if worst(m["all"]) <= OK_SHARE]
    ours = runs.get("mpc")
    if ours is None:
        return {"status": "no run of ours"}
    mine = ours["all"]
    if holding:
        need = min(holding)
        ok = worst(mine) <= OK_SHARE and (mine["mean_ratio_time"] or 0.0) <= need + RATIO_SLACK
        return {"case": "a fixed ratio holds", "smallest_holding": need, "ours_worst": worst(mine),
                "ours_mean_ratio": mine["mean_ratio_time"], "met": bool(ok)}
    one = runs.get("fixed:1")
    if one is None:
        return {"status": "no ratio-1 run"}
    ok = worst(mine) <= worst(one["all"]) + NO_WORSE
    return {"case": "no fixed ratio holds", "ratio1_worst": worst(one["all"]), "ours_worst": worst(mine),
            "ours_mean_ratio": mine["mean_ratio_time"], "met": bool(ok)}


# ------------------------------------------------------------------------------------------------------ engines
def throttled_engine(step_ms: float, gain: float, args):
    from eval.throttled_serving import Throttled, tiny_model

    handle = Throttled(tiny_model(), step_ms, gain)
    cfg = ServeConfig(max_batch=8, max_batch_tokens=128, num_blocks=64, page_size=32, max_memory_percent=None,
                      drain_timeout_s=args.drain_seconds, max_queue=args.max_queue)
    return BrownoutServer(handle, None, cfg), None, f"CPU, each step sleeps {step_ms:g} ms x (1 - {gain:g} x ratio)"


def gpu_engine(args):
    """The serving benchmark's model and tier; `--tiny` builds its tiny CPU twin instead (a smoke test of this
    path with eager forwards, numbers meaningless)."""
    from eval import bench_serving as bs
    from runtime import BrownoutMoE

    tiny = args.tiny
    model = bs.build_model(tiny, args.seed)
    bs.uniform_routing(model)
    udir = bs.united_tier(model, Path(args.cache), tiny, [0, -1] if tiny else [0, 1, -2, -1])
    bm = BrownoutMoE.attach(model, udir)
    if args.compile_outside_experts:  # before the profile, so the step model is the step served
        log(f"compiled outside the experts: {compile_outside_experts(model, args.compile_backend).summary()}")
    vocab = model.config.vocab_size
    ratios = [0.0, 0.25, 0.5, 0.75, 1.0]
    t = time.time()
    if tiny:
        tokens = [1, 8, 32, 64]
        pts, _ = bs.profile(model, bm, tokens, ratios, 2, "cpu", vocab)
    else:
        bm.set_backend("triton")  # the fused kernel at every ratio; the server puts it in graph-safe mode
        tokens = [1, 8, 16, 32, 64, 128, 256, 512, 1024]
        pts = bs.profile_graphed(model, bm, tokens, ratios, 5, vocab)
    log(f"profiled {len(pts)} forwards in {time.time() - t:.1f} s")
    prof = LatencyProfile.from_points(pts, tokens=tokens, ratios=ratios)
    cfg = ServeConfig(max_batch=8 if tiny else 64, max_batch_tokens=128 if tiny else 1024, max_queue=args.max_queue,
                      queue_timeout_s=30.0, request_timeout_s=60.0, drain_timeout_s=args.drain_seconds,
                      num_blocks=64 if tiny else None, page_size=32 if tiny else 256,
                      max_memory_percent=None if tiny else 0.4, seed=args.seed, use_cuda_graph=not tiny,
                      kv_padding_tokens=0 if tiny else 4096, compile=args.compile,
                      async_batching=args.async_batching, attention=args.attention)
    name = "CPU (tiny smoke test)" if tiny else torch.cuda.get_device_name(0)
    shape = "tiny Qwen2-MoE" if tiny else "Qwen1.5-MoE-A2.7B shape (random bf16), CUDA graphs"
    shape += ", torch.compile (transformers' default_compile_level=1)" if args.compile else ""
    shape += ", async batching" if args.async_batching else ""
    shape += ", varlen attention (torch's FlashAttention)" if args.attention == "varlen" else ""
    shape += (f", norms and rotary embedding compiled ({args.compile_backend})" if args.compile_outside_experts
              else "")
    return BrownoutServer(bm, None, cfg), prof, f"{name}, {shape}, way 4"


def sim_engine(args, seed: int, law: tuple[float, float] | None = None):
    """The simulated engine of eval.sim_serving. Without `law`: the GPU engine's batching (64 slots, 1024 tokens a
    step) and the step model of `--sim-profile`; mpc gets that step profile, as on the GPU it gets the measured one.
    With `law` (step_ms, gain): the throttled CPU engine's batching (8 slots, 128 tokens) and speed law, and, as
    there, no step profile."""
    from eval import sim_serving

    if law is not None:
        steps = sim_serving.law_step_model(*law)
        steps.jitter = args.sim_jitter
        steps.run_jitter = args.sim_run_jitter
        cfg = ServeConfig(max_batch=8, max_batch_tokens=128, max_queue=args.max_queue,
                          drain_timeout_s=args.drain_seconds, seed=seed, async_batching=args.async_batching)
        what, prof = f"each step {law[0]:g} ms x (1 - {law[1]:g} x ratio)", None
    else:
        path = Path(args.sim_profile or sim_serving.H200_PROFILE)
        try:
            steps = sim_serving.h200_step_model(path, args.sim_jitter)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--sim-profile: {path} gives no step model ({type(e).__name__}: {e})")
        steps.run_jitter = args.sim_run_jitter
        cfg = ServeConfig(max_batch=64, max_batch_tokens=1024, max_queue=args.max_queue, queue_timeout_s=30.0,
                          request_timeout_s=60.0, drain_timeout_s=args.drain_seconds, seed=seed,
                          async_batching=args.async_batching)
        what = (f"step profile of {path.name}, +{1e3 * steps.in_step_s:.1f} ms in step, +{1e3 * steps.gap_s:.1f} ms "
                + ("of host work beside each step, async batching" if args.async_batching else "between steps"))
        prof = steps.profile  # `controller` gives each run its own copy to learn on
    run_j = f", run speed jitter {args.sim_run_jitter:g}" if args.sim_run_jitter else ""
    device = f"simulated engine (eval.sim_serving: {what}, jitter {args.sim_jitter:g}{run_j}), trace seed {seed}"
    return sim_serving.SimServer(steps, cfg, seed=seed), prof, device


def parse_seeds(spec: str) -> list[int]:
    """'0-9' | '0,3,5' | '2' -> seeds."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


# ------------------------------------------------------------------------------------------------------ runs
def saturation_kw(args) -> dict:
    """The keywords of `measure_saturation` that the command line sets: window, queue, rate and request lengths."""
    return dict(seconds=args.sat_seconds, queue=args.sat_queue, rate=args.sat_rate, lengths=args.lengths,
                max_prompt=args.max_prompt, max_output=args.max_output)


def saturation_pair(srv, args, full_queue: str = "hold") -> dict:
    """Saturated service rates at ratios 0 and 1 on `srv`'s engine (the calibration's measurement): the median of
    `--sat-repeats` runs each, as the library's `measure_capacity` (`full_queue`: its admission, see
    `measure_saturation`)."""
    return median_saturation(srv, (0.0, 1.0), args.sat_repeats, full_queue=full_queue, **saturation_kw(args))


def calibration_repeats(srv, args) -> list[dict]:
    """How far the calibration's saturated rates move between runs on one engine: `measure_saturation` at ratios 0
    and 1, `--calibration-repeats` times per window length of `--repeat-sat-seconds`, each repeat on another
    saturation trace (`saturation_runs`, as the calibration's median takes them). -> one row per run."""
    lens = dict(lengths=args.lengths, max_prompt=args.max_prompt, max_output=args.max_output)
    rows = []
    for secs in args.repeat_windows:
        runs = saturation_runs(srv, (0.0, 1.0), args.calibration_repeats, seconds=secs, queue=args.sat_queue,
                               rate=args.sat_rate, **lens)
        for i in range(args.calibration_repeats):
            for r, rs in runs.items():
                m = rs[i]
                rows.append({"seconds": secs, "repeat": i, "ratio": r, **m})
                log(f"saturation {secs:g} s, repeat {i}, ratio {r:g}: {m['req_s']:.2f} req/s, step p50 "
                    f"{1e3 * m['step_p50']:.1f} ms, batch {m['batch_mean']:.1f}, dry {m.get('dry_steps', 0):.2f}")
    return rows


def repeats_markdown(rows: list[dict]) -> list[str]:
    """The calibration repeats as a table: per window length and ratio, the spread of the saturated rate."""
    import statistics
    L = ["", "### Calibration repeated (`--calibration-repeats`)", "",
         "| window s | ratio | runs | req/s mean | min | max | (max - min) / mean | step p50 ms | dry steps max |",
         "|---|---|---|---|---|---|---|---|---|"]
    for secs in sorted({r["seconds"] for r in rows}):
        for ratio in (0.0, 1.0):
            rs = [r for r in rows if r["seconds"] == secs and r["ratio"] == ratio]
            v = [r["req_s"] for r in rs]
            if not v:
                continue
            m = statistics.mean(v)
            L.append(f"| {secs:g} | {ratio:g} | {len(v)} | {m:.2f} | {min(v):.2f} | {max(v):.2f} "
                     f"| {100 * (max(v) - min(v)) / m:.0f}% | {1e3 * statistics.median(r['step_p50'] for r in rs):.1f} "
                     f"| {max(r.get('dry_steps', 0) for r in rs):.2f} |")
    return L


def warm_up(srv, args) -> float:
    """First steps: allocation, kernel compilation, one CUDA graph per padded batch, served to the end, as the
    serving benchmark does (a warm-up cut short leaves the captures to the first timed run). Returns seconds."""
    warm = saturation_trace(3 * srv.cfg.max_batch, args.lengths, 7, args.max_prompt, args.max_output)
    t, cfg = time.time(), srv.cfg
    srv.cfg = replace(cfg, max_queue=len(warm), drain_timeout_s=120.0, request_timeout_s=150.0)
    try:
        srv.run(warm, controller=FixedRatio(0.0))
    finally:
        srv.cfg = cfg  # only the driver's settings changed
    return time.time() - t


# same-process engine variants whose saturated rates `--compare` sets beside the main engine's (kv:N for any N)
COMPARE = ("eager", "batching", "attention", "null", "leftalone", "reject", "kv:N")
OTHER_ATTENTION = {"sdpa": "varlen", "varlen": "sdpa"}


def compare_label(what: str, main_cfg) -> str:
    """The report's row label of a `--compare` variant of the engine configured by `main_cfg` (a ServeConfig)."""
    if what == "eager":
        return "same engine without torch.compile"
    if what == "batching":
        return f"same engine with {'synchronous' if main_cfg.async_batching else 'async'} batching"
    if what == "attention":
        return f"same engine with {OTHER_ATTENTION[main_cfg.attention]} attention"
    if what == "null":
        return "same engine with null experts (zeros: the step brownout cannot shorten)"
    if what == "leftalone":
        return "same engine with the left-alone layers on the model's own experts implementation"
    if what == "reject":
        return "same engine, saturation runs rejecting the excess (serving's full queue) instead of holding it"
    return f"same engine with KV padding {int(what[3:])}"


def compare_ok(what: str) -> bool:
    if what.startswith("kv:"):
        return what[3:].isdigit() and int(what[3:]) > 0
    return what in COMPARE and what != "kv:N"


class OwnLeftAlone:
    """A BrownoutMoE handle whose graph-safe mode keeps the left-alone layers on the model's own implementation
    (`set_graph_safe(on, left_alone="own")`): the `--compare leftalone` variant."""

    def __init__(self, bm):
        self._bm = bm

    def set_graph_safe(self, on: bool) -> None:
        self._bm.set_graph_safe(on, left_alone="own")

    def __getattr__(self, name):
        return getattr(self._bm, name)


def compare_saturation(srv, args, what: str) -> dict:
    """The handle served by a variant of `srv`'s engine (`what`, one of COMPARE; everything else equal), saturated
    at ratios 0 and 1 in the same process as the main engine. For "eager", compiled norms and rope
    (`--compile-outside-experts`) are undone for it and compiled again after; "null" swaps the model's experts
    implementation for zeros (the ratio is still set, nothing reads it); "reject" changes only the driver's
    admission, so it runs on `srv`'s engine itself (`interleaved_admissions`), started once for it, with the holding
    runs it was interleaved with under "hold_interleaved"."""
    if what == "reject":
        with torch.no_grad(), srv:  # one engine for all the runs (outside `with`, each run would start its own)
            w = warm_up(srv, args)
            both = interleaved_admissions(srv, args)
        hold = {"label": "same engine, holding a full queue, in the runs interleaved with the rejecting ones",
                **{str(r): v for r, v in both["hold"].items()}}
        sat = {**both["reject"], "hold_interleaved": hold}
    else:
        w, sat = _variant_saturation(srv, args, what)
    log(f"{compare_label(what, srv.cfg)} (warm-up {w:.0f} s): mu0 {sat[0.0]['req_s']:.2f} req/s, "
        f"mu1 {sat[1.0]['req_s']:.2f} req/s ({sat[1.0]['req_s'] / sat[0.0]['req_s']:.2f}x); step p50 "
        f"{1e3 * sat[0.0]['step_p50']:.1f} / {1e3 * sat[1.0]['step_p50']:.1f} ms")
    return {"label": compare_label(what, srv.cfg), "warmup_s": w,
            **{str(r): v for r, v in sat.items()}}


def interleaved_admissions(srv, args) -> dict:
    """{"hold": {0.0: run, 1.0: run}, "reject": ...}: saturated rates of one engine under both admissions of a full
    queue, `--sat-repeats` runs each per ratio after one warm run, the admissions in ABBA order (hold, reject, reject,
    hold, ...), repeat i on saturation trace seed 11 + i for both: a drift of the engine (a compiled one still
    settling) reaches both alike. Call it inside `with srv:`."""
    kw = saturation_kw(args)
    nan = float("nan")  # a run with no step in its window has rates only
    measure_saturation(srv, 0.0, seed=10, full_queue="hold", **kw)  # warm run, not kept
    runs = {fq: {0.0: [], 1.0: []} for fq in ("hold", "reject")}
    order = ("hold", "reject")
    for i in range(args.sat_repeats):
        for fq in order:
            for r in (0.0, 1.0):
                m = measure_saturation(srv, r, seed=11 + i, full_queue=fq, **kw)
                runs[fq][r].append(m)
                log(f"saturation run {i + 1} of {args.sat_repeats}, {fq}, ratio {r:g}: {m['req_s']:.2f} req/s, "
                    f"step p50 / mean {1e3 * m.get('step_p50', nan):.1f} / {1e3 * m.get('step_mean', nan):.1f} ms, "
                    f"decode share {m.get('decode_share', nan):.2f}")
        order = order[::-1]
    return {fq: {r: median_run(rs) for r, rs in by_r.items()} for fq, by_r in runs.items()}


def _variant_saturation(srv, args, what: str) -> tuple[float, dict]:
    """(warm-up s, `saturation_pair`) of a second server on `srv`'s handle, configured as the variant `what`."""
    from eval.compile_check import null_experts_impl  # importing it registers the null implementation

    cfg = srv.cfg
    if what == "eager":
        cfg = replace(cfg, compile=False)
    elif what == "batching":
        cfg = replace(cfg, async_batching=not cfg.async_batching)
    elif what == "attention":
        cfg = replace(cfg, attention=OTHER_ATTENTION[cfg.attention])
    elif what.startswith("kv:"):
        cfg = replace(cfg, kv_padding_tokens=int(what[3:]))
    other = BrownoutServer(OwnLeftAlone(srv.bm) if what == "leftalone" else srv.bm, None, cfg)
    outside = compiled_outside(srv.model) if what == "eager" else None
    if outside is not None:
        outside.undo()
    try:
        with torch.no_grad(), (null_experts_impl(srv.model) if what == "null" else contextlib.nullcontext()), other:
            return warm_up(other, args), saturation_pair(other, args)
    finally:
        if outside is not None:
            compile_outside_experts(srv.model, outside.backend)


def calibrate(srv, args) -> dict:
    """Service rates at ratios 0 and 1 and SLOs from a ratio-0 run at half mu0: the same code on every engine."""
    lens = dict(lengths=args.lengths, max_prompt=args.max_prompt, max_output=args.max_output)
    sat = saturation_pair(srv, args)
    mu0, mu1 = sat[0.0]["req_s"], sat[1.0]["req_s"]
    res = srv.run(poisson(0.5 * mu0, args.base_seconds, seed=12, **lens), controller=FixedRatio(0.0))
    m = summarize(res, 1e9, 1e9, t0=min(2.0, args.base_seconds / 4))
    slo_d = args.slo_factor * m["tpot"]["p90"]
    slo_p = max(args.slo_factor * m["ttft"]["p90"], slo_d)
    cal = {"mu0": mu0, "mu1": mu1, "capacity_tok_s": {0.0: sat[0.0]["tok_s"], 1.0: sat[1.0]["tok_s"]},
           "saturation": {str(r): v for r, v in sat.items()}, "slo_prefill": slo_p, "slo_decode": slo_d,
           "base_run": {"ttft": m["ttft"], "tpot": m["tpot"]}}
    log(f"calibration: mu0 {mu0:.2f} req/s, mu1 {mu1:.2f} req/s ({mu1 / mu0:.2f}x); SLO TTFT {1e3 * slo_p:.0f} ms, "
        f"TPOT {1e3 * slo_d:.0f} ms")
    return cal


def sim_like(srv, args, gpu_doc: dict):
    """`--sim-like`: the simulated engine made as fast as one GPU run measured (its median saturated rates at ratios
    0 and 1: the model's step times scaled by the ratio of rates, linearly in between), then that run's calibration
    as is (trace rates, SLOs, the capacity ours gets), so the same seeds give the same traces. -> (calibration, the
    scaled step profile for ours: the GPU run gave ours its own engine's profile too)."""
    g = gpu_doc["calibration"]
    own = saturation_pair(srv, args)
    srv.steps.scale = (own[0.0]["req_s"] / g["mu0"], own[1.0]["req_s"] / g["mu1"])
    cal = {**g, "capacity_tok_s": {float(r): v for r, v in g["capacity_tok_s"].items()}}
    log(f"like {args.sim_like}: mu0 {g['mu0']:.2f} / mu1 {g['mu1']:.2f} req/s against the model's "
        f"{own[0.0]['req_s']:.2f} / {own[1.0]['req_s']:.2f}: step times x {srv.steps.scale[0]:.3f} at ratio 0, "
        f"x {srv.steps.scale[1]:.3f} at ratio 1")
    return cal, srv.steps.scaled_profile()


def like_markdown(doc: dict) -> list[str]:
    """`--sim-like`: per trace and config, the GPU run's figures next to the model's on the same traces."""
    like = doc.get("sim_like")
    if not like:
        return []
    L = ["", f"### The model against the GPU run it replays (`{like['file']}`)", "",
         f"Step times x {like['scale'][0]:.3f} at ratio 0 and x {like['scale'][1]:.3f} at ratio 1, the GPU run's "
         "calibration as is.", "",
         "| trace | config | late first after, GPU / model | worst late share, GPU / model | mean ratio, GPU / model |",
         "|---|---|---|---|---|"]
    for name, t in doc["traces"].items():
        gt = like["gpu"].get(name)
        if gt is None:
            continue
        for c, r in t["runs"].items():
            gr = gt["runs"].get(c)
            if gr is None:
                continue
            L.append(f"| {name} | {c} | {pct(gr['after']['violation_prefill'])} / "
                     f"{pct(r['after']['violation_prefill'])} | {pct(worst(gr['all']))} / {pct(worst(r['all']))} | "
                     f"{gr['all']['mean_ratio_time'] or 0:.2f} / {r['all']['mean_ratio_time'] or 0:.2f} |")
        L.append(f"| {name} | **target met** | GPU {'yes' if gt['verdict'].get('met') else 'no'} / model "
                 f"{'yes' if t['verdict'].get('met') else 'no'} | | |")
    return L


PLOT_ENGINES = 4  # the PNG draws the first few engines (or simulated seeds); the tables have them all
MPC_KW: dict = {}  # keywords for ours (`--mpc-kw`): a variant of the library's defaults, to compare


def controller(spec: str, cal: dict, prof, duration: float):
    p = LatencyProfile(prof.tokens, prof.ratios, [row[:] for row in prof.lat]) if prof is not None else None
    if spec == "salc":  # the paper's 5 s interval on the stream's compression (250 s -> duration), as bench_serving
        spec = f"salc:{max(0.25, 5.0 * duration / 250.0):g}"
    return make_controller(spec, cal["slo_prefill"], cal["slo_decode"], profile=p, capacity=cal["capacity_tok_s"],
                           **(MPC_KW if spec.startswith("mpc") else {}))


def run_one(srv, spec, trace, change_at, cal, prof) -> dict:
    sp, sd = cal["slo_prefill"], cal["slo_decode"]
    t = time.time()
    ctl = controller(spec, cal, prof, trace.duration)
    res = srv.run(trace, controller=ctl)
    out = {"config": spec, "wall_s": time.time() - t, "errors": res.errors,
           "all": summarize(res, sp, sd), "before": summarize(res, sp, sd, 0.0, change_at),
           "after": summarize(res, sp, sd, change_at, math.inf),
           "timeline": timeline(res, max(0.25, trace.duration / 40))}
    if getattr(ctl, "arm_events", None) is not None:  # when mpc's load floor armed (s from the start)
        out["arm_events"] = list(ctl.arm_events)
    a = out["all"]
    log(f"    {spec:10s} late first/later {pct(a['violation_prefill'])}/{pct(a['violation_decode'])} "
        f"(after the change {pct(out['after']['violation_prefill'])}/{pct(out['after']['violation_decode'])}), "
        f"mean ratio {a['mean_ratio_time'] or 0:.2f}, goodput {a['goodput_req_s']:.2f} req/s, {a['status']}"
        + (f" errors {res.errors}" if res.errors else ""))
    return out


def pct(v) -> str:
    """A share as the serving benchmark prints it ("-" for none)."""
    return fmt(v, pct=True)


def ms(d: dict) -> str:
    """p50/p90/p99 of a percentile dict, in ms."""
    return "/".join("-" if d[q] is None else f"{1e3 * d[q]:.0f}" for q in ("p50", "p90", "p99"))


def run_matrix(srv, prof, device: str, args, save=lambda doc: None, t_start: float | None = None,
               compared: dict | None = None) -> dict:
    """The whole matrix on one engine; `save(doc)` after each trace (a killed run keeps what it finished). A trace
    that would end past `args.time_budget` s from `t_start` is skipped and listed."""
    with torch.no_grad():
        log(f"engine warm-up: {warm_up(srv, args):.1f} s")
        repeats = calibration_repeats(srv, args) if args.calibration_repeats else None
        like = getattr(args, "sim_like_doc", None)
        if like is not None:  # a GPU run replayed on the model: its calibration, the model's speed set to match it
            cal, prof = sim_like(srv, args, like)
        else:
            cal = calibrate(srv, args)
        names = [n for n in args.traces.split(",") if n]
        traces = make_traces(names, cal["mu0"], cal["mu1"], args.duration, args.seed,
                             args.lengths, args.max_prompt, args.max_output)
        doc = {"device": device, "calibration": cal, "duration": args.duration, "traces": {}, "skipped": []}
        if prof is not None and like is None:  # the engine's step profile: what a simulated twin of it starts from
            doc["profile"] = {"tokens": list(prof.tokens), "ratios": list(prof.ratios), "lat": prof.lat}
        if compared:
            doc["compare_saturation"] = compared
        if repeats is not None:
            doc["calibration_repeats"] = repeats
        if like is not None:
            doc["sim_like"] = {"file": args.sim_like, "scale": list(srv.steps.scale),
                               "gpu": {n: {"runs": {c: {k: r[k] for k in ("all", "after")} for c, r in t["runs"].items()},
                                           "verdict": t["verdict"]} for n, t in like["traces"].items()}}
        t_start = time.time() if t_start is None else t_start
        save(doc)  # the calibration alone (an empty --traces measures only that)
        again = [c for c in args.repeat_configs.split(",") if c] if args.trace_repeats > 1 else []
        for name, (tr, change_at) in traces.items():
            need = (len(CONFIGS) + args.rehearse + (args.trace_repeats - 1) * len(again)) * (tr.duration + 1.0)
            if time.time() - t_start + need > args.time_budget:
                log(f"  trace {name}: skipped (about {need:.0f} s would end past --time-budget)")
                doc["skipped"].append(name)
                continue
            log(f"  trace {name}: {len(tr)} requests over {tr.duration:.1f} s, load change at {change_at:.1f} s")
            if args.rehearse:  # untimed: the engine captures the graphs of this trace's shapes
                srv.run(tr, controller=FixedRatio(0.0))
            runs = {c: run_one(srv, c, tr, change_at, cal, prof) for c in CONFIGS}
            v = verdict(runs)
            log(f"  -> {name}: {v}")
            doc["traces"][name] = {"meta": tr.meta, "change_at": change_at, "runs": runs, "verdict": v}
            if again:
                doc["traces"][name]["repeats"] = trace_repeats(srv, again, args.trace_repeats, runs, tr, change_at,
                                                               cal, prof)
            save(doc)
    return doc


def trace_repeats(srv, configs: list[str], n: int, first: dict, tr, change_at, cal, prof) -> dict:
    """{config: [run, ...]}: `configs` served on the same trace `n` times in all, the matrix's run first, then
    rounds in alternating order (a drift of the engine reaches each config alike). How far one trace's late shares
    move between runs of the same config: the noise under a verdict that compares two configs' single runs."""
    out = {c: [first[c]] for c in configs}
    order = list(configs)
    for _ in range(n - 1):
        order.reverse()
        for c in order:
            out[c].append(run_one(srv, c, tr, change_at, cal, prof))
    return out


def repeats_lines(doc: dict) -> list[str]:
    """The traces served more than once (`--trace-repeats`): each config's worst late share per run, and ours
    against ratio 1 run by run where both ran."""
    rows = []
    for name, t in doc["traces"].items():
        reps = t.get("repeats")
        if not reps:
            continue
        for c, runs in reps.items():
            w = [worst(r["all"]) for r in runs]
            rows.append(f"| {name} | {c} | {len(w)} | {', '.join(pct(x) for x in w)} | {pct(min(w))} - {pct(max(w))} "
                        f"| {fmt(statistics.median(r['all']['mean_ratio_time'] or 0.0 for r in runs))} |")
        if "mpc" in reps and "fixed:1" in reps:
            d = [worst(a["all"]) - worst(b["all"]) for a, b in zip(reps["mpc"], reps["fixed:1"])]
            rows.append(f"| {name} | ours - ratio 1, run by run | {len(d)} | "
                        f"{', '.join(f'{100 * x:+.1f}' for x in d)} points | median {100 * statistics.median(d):+.1f} "
                        f"| |")
    if not rows:
        return []
    return ["### The same trace served again (`--trace-repeats`)", "",
            "| trace | config | runs | worst late share of each run (the matrix's first) | range | median mean ratio |",
            "|---|---|---|---|---|---|", *rows, ""]


# ------------------------------------------------------------------------------------------------------ report
def markdown(docs: list[dict], command: str) -> str:
    lines = ["# Robustness matrix (issue 18)", "",
             f"Command: `{command}`. Target: where a fixed ratio keeps first- and later-token violations <= "
             f"{100 * OK_SHARE:.0f}%, ours does too with a mean ratio <= the smallest such + {RATIO_SLACK:g}; where "
             f"none can, ours has at most {100 * NO_WORSE:.0f} point more late first or later tokens (the larger "
             f"share) than ratio 1.", ""]
    for doc in docs:
        cal = doc["calibration"]
        met = [t["verdict"].get("met") for t in doc["traces"].values()]
        lines += [f"## {doc['device']}", "",
                  f"mu0 {cal['mu0']:.2f} req/s, mu1 {cal['mu1']:.2f} req/s ({cal['mu1'] / cal['mu0']:.2f}x); SLOs "
                  f"TTFT {1e3 * cal['slo_prefill']:.0f} ms, TPOT {1e3 * cal['slo_decode']:.0f} ms; streams of "
                  f"{doc['duration']:g} s. Target met on {sum(bool(m) for m in met)} of {len(met)} traces."
                  + (f" Skipped for the time budget: {', '.join(doc['skipped'])}." if doc.get("skipped") else ""), ""]
        lines += sat_lines(doc)
        if doc.get("calibration_repeats"):
            lines += repeats_markdown(doc["calibration_repeats"]) + [""]
        if doc.get("sim_like"):
            lines += like_markdown(doc) + [""]
        lines += ["| trace | config | late first (before / after) | late later (before / after) | mean ratio | "
                  "goodput req/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms |", "|---|---|---|---|---|---|---|---|"]
        for name, t in doc["traces"].items():
            for c, r in t["runs"].items():
                a, b, f = r["all"], r["before"], r["after"]
                lines.append(f"| {name} | {c} | {pct(b['violation_prefill'])} / {pct(f['violation_prefill'])} | "
                             f"{pct(b['violation_decode'])} / {pct(f['violation_decode'])} | "
                             f"{a['mean_ratio_time'] or 0:.2f} | {a['goodput_req_s']:.2f} | {ms(a['ttft'])} | "
                             f"{ms(a['tpot'])} |")
        lines += ["", "| trace | case | smallest fixed ratio that holds | ours: worst late share | ours: mean ratio "
                  "| met |", "|---|---|---|---|---|---|"]
        for name, t in doc["traces"].items():
            v = t["verdict"]
            lines.append(f"| {name} | {v.get('case', v.get('status'))} | {v.get('smallest_holding', '-')} | "
                         f"{pct(v.get('ours_worst'))} | {fmt(v.get('ours_mean_ratio'))} | "
                         f"{'yes' if v.get('met') else 'no'} |")
        lines.append("")
        lines += repeats_lines(doc)
    if len(docs) > 1:  # several engines or trace seeds: how often each trace's target was met
        names = list(dict.fromkeys(n for d in docs for n in d["traces"]))
        lines += ["## Over all runs above", "", "| trace | met | of | misses by under-reaction (late) | "
                  "by over-spending (mean ratio) |", "|---|---|---|---|---|"]
        for name in names:
            vs = [d["traces"][name]["verdict"] for d in docs if name in d["traces"]]
            late = sum(1 for v in vs if not v.get("met") and v.get("ours_worst", 0) > OK_SHARE)
            lines.append(f"| {name} | {sum(bool(v.get('met')) for v in vs)} | {len(vs)} | {late} | "
                         f"{sum(1 for v in vs if not v.get('met')) - late} |")
        lines.append("")
    return "\n".join(lines)


def sat_lines(doc: dict) -> list[str]:
    """The saturated rates at ratios 0 and 1 (and, when measured, those of the same engine without compile)."""
    rows = [("this engine", doc["calibration"].get("saturation"))]
    if doc.get("eager_saturation"):  # results written before --compare
        rows.insert(0, (compare_label("eager", None), doc["eager_saturation"]))
    rows[:0] = [(x["label"], x) for sat in (doc.get("compare_saturation") or {}).values()
                for x in (sat, sat.get("hold_interleaved")) if x]
    rows = [(label, sat) for label, sat in rows if sat]
    if not rows:
        return []
    out = ["| engine | req/s ratio 0 | req/s ratio 1 | ratio 1 / ratio 0 | step p50 ms ratio 0 / 1 | "
           "tokens/s ratio 0 / 1 | wall time in steps ratio 0 / 1 | every run's req/s ratio 0 / 1 (median kept) |",
           "|---|---|---|---|---|---|---|---|"]
    for label, sat in rows:
        a, b = sat["0.0"], sat["1.0"]
        runs = " / ".join(", ".join(f"{v:.1f}" for v in x.get("runs", [x["req_s"]])) for x in (a, b))
        out.append(f"| {label} | {a['req_s']:.2f} | {b['req_s']:.2f} | {b['req_s'] / a['req_s']:.2f}x | "
                   f"{1e3 * a['step_p50']:.1f} / {1e3 * b['step_p50']:.1f} | {a['tok_s']:.0f} / {b['tok_s']:.0f} | "
                   f"{pct(a.get('step_share'))} / {pct(b.get('step_share'))} | {runs} |")
    main = doc["calibration"].get("saturation") or {}
    held = (main.get("0.0") or {}).get("full_queue", "reject")  # files from before full_queue turned it away
    how = "held a full queue in trace order" if held == "hold" else "turned a full queue away"
    out += ["", f'This engine\'s saturation runs {how} (`full_queue="{held}"`).']
    return out + [""]


def plot(docs: list[dict], path: Path) -> None:
    """One panel per (engine, trace): worst late share against mean ratio; the fixed ratios as a line (the
    hindsight frontier), SALC and ours as markers, the 5% bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(docs[0]["traces"])
    fig, axes = plt.subplots(len(docs), len(names), figsize=(3.2 * len(names), 3.0 * len(docs)), squeeze=False)
    for i, doc in enumerate(docs):
        for j, name in enumerate(names):
            ax = axes[i][j]
            t = doc["traces"].get(name)
            if t is None:
                ax.axis("off")
                continue
            fx = sorted((r["all"]["mean_ratio_time"] or 0, worst(r["all"])) for c, r in t["runs"].items()
                        if c.startswith("fixed:"))
            ax.plot([x for x, _ in fx], [100 * y for _, y in fx], "o-", color="grey", label="fixed ratios")
            for c, mk, col in (("salc", "s", "tab:orange"), ("mpc", "*", "tab:blue")):
                if c in t["runs"]:
                    a = t["runs"][c]["all"]
                    ax.plot([a["mean_ratio_time"] or 0], [100 * worst(a)], mk, color=col, ms=11,
                            label="SALC" if c == "salc" else "ours (mpc)")
            ax.axhline(100 * OK_SHARE, color="r", ls="--", lw=0.8)
            ax.set_ylim(-3, 103)
            ax.set_title(f"{name}: {'met' if t['verdict'].get('met') else 'missed'}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{doc['device'][:38]}\nworst late share (%)", fontsize=8)
            if i == len(docs) - 1:
                ax.set_xlabel("mean ratio")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["throttled", "gpu", "sim"], default="throttled")
    ap.add_argument("--laws", default="30:0.6,12:0.3",
                    help="throttled engine: step_ms:gain per machine stand-in (the matrix runs once per law)")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--duration", type=float, default=None, help="s per trace (default 10 on the CPU, 8 on the GPU)")
    ap.add_argument("--seed", type=int, default=0, help="trace seeds derive from this")
    ap.add_argument("--seeds", default=None,
                    help="--engine sim: the matrix once per trace seed, e.g. 0-9 or 0,3,5 (default: --seed)")
    ap.add_argument("--sim-profile", default=None,
                    help="--engine sim: a bench_serving JSON, or a robustness GPU JSON from this version on, whose "
                         "step profile and saturation set the step model (default: the H200 one in eval/results, "
                         "eval.sim_serving.H200_PROFILE)")
    ap.add_argument("--sim-jitter", type=float, default=0.05, help="--engine sim: sigma of each step's log-normal "
                    "time factor")
    ap.add_argument("--sim-run-jitter", type=float, default=0.0,
                    help="--engine sim: sigma of one log-normal speed factor per run (every step and gap of it): "
                         "the engine's run-to-run spread, which the calibration and every verdict see (default 0)")
    ap.add_argument("--sim-like", default=None, metavar="GPU_JSON",
                    help="--engine sim: replay a GPU matrix on the model: that run's calibration (trace rates, SLOs, "
                         "capacity) and the model's speed scaled to its saturated rates; give the same --seed, "
                         "--traces (same order) and --duration. The report sets GPU and model side by side")
    ap.add_argument("--sim-laws", default=None,
                    help="--engine sim: simulate the throttled CPU engine's laws (step_ms:gain,...) instead of the "
                         "GPU profile")
    ap.add_argument("--mpc-kw", default="{}",
                    help='keywords for ours, as JSON (a variant of the library\'s defaults), e.g. '
                         '\'{"occ_arm": null}\'')
    ap.add_argument("--lengths", default="alpaca")
    ap.add_argument("--max-prompt", type=int, default=None, help="default 16 on the CPU, 512 on the GPU")
    ap.add_argument("--max-output", type=int, default=None, help="default 32 on the CPU, 256 on the GPU")
    ap.add_argument("--slo-factor", type=float, default=2.0)
    ap.add_argument("--sat-seconds", type=float, default=3.0)
    ap.add_argument("--sat-queue", type=int, default=16)
    ap.add_argument("--sat-repeats", type=int, default=REPEATS,
                    help=f"saturation runs per ratio, the median kept (default {REPEATS}, as measure_capacity)")
    ap.add_argument("--calibration-repeats", type=int, default=0,
                    help="first measure the saturated rates this many times per --repeat-sat-seconds window (each "
                         "on another saturation trace): how much the calibration moves between runs")
    ap.add_argument("--repeat-sat-seconds", default="3,8", help="window lengths (s) of --calibration-repeats")
    ap.add_argument("--sat-rate", type=float, default=None,
                    help="req/s far above capacity (default 60 CPU, 120 GPU; doubled, up to twice, while the "
                         "saturation queue runs dry)")
    ap.add_argument("--base-seconds", type=float, default=4.0)
    ap.add_argument("--drain-seconds", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--time-budget", type=float, default=math.inf, help="s: skip traces that would end past this")
    ap.add_argument("--trace-repeats", type=int, default=1,
                    help="serve each trace this many times in all with --repeat-configs (the matrix's run first, then "
                         "rounds in alternating order): how far a trace's late shares move between runs")
    ap.add_argument("--repeat-configs", default="fixed:1,mpc", help="the configs --trace-repeats serves again")
    ap.add_argument("--rehearse", action="store_true", help="serve each trace once untimed first (graph captures)")
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default=None, help="file stem (default robustness_cpu / robustness_gpu)")
    ap.add_argument("--tiny", action="store_true", help="--engine gpu: a tiny model on the CPU (smoke test)")
    ap.add_argument("--compile", action="store_true",
                    help="--engine gpu: torch.compile the engine's forward (transformers' varlen_compile_config)")
    ap.add_argument("--compile-outside-experts", action="store_true",
                    help="--engine gpu: torch.compile the norms and rotary embedding (runtime.compile_outside_experts)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of --compile-outside-experts (aot_eager: the CPU smoke test)")
    ap.add_argument("--async-batching", action="store_true",
                    help="--engine gpu: transformers' async batching (the host prepares the next step while the GPU "
                         "runs this one; steps timed by CUDA events). --engine sim: its model (no host gap between "
                         "steps, each step's feedback a step late)")
    ap.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                    help="--engine gpu: the engine's attention (ServeConfig.attention): sdpa, masked over the whole "
                         "batch's KV, or varlen, packed sequences through torch's FlashAttention")
    ap.add_argument("--compare", default="",
                    help="first measure the saturated rates of same-process variants of the engine, comma-separated: "
                         "eager (without --compile / --compile-outside-experts), batching (the other batching mode), "
                         "attention (the other --attention), "
                         "null (null experts: the floor brownout cannot shorten), leftalone (the layers without a "
                         "united tier on the model's own experts implementation instead of the fused kernel), "
                         "reject (the saturation runs turn a full queue's excess away, as serving does, instead of "
                         "holding it in order), kv:N (the KV length padded to "
                         "multiples of N tokens for the graphs; the main engine pads to 4096)")
    ap.add_argument("--eager-saturation", action="store_true", help="the same as --compare eager")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="only rewrite the .md and .png of a results JSON (from a machine with no matplotlib)")
    args = ap.parse_args(argv)
    if args.sat_repeats < 1 or args.calibration_repeats < 0:
        ap.error("--sat-repeats must be >= 1 and --calibration-repeats >= 0")
    bad = [c for c in args.repeat_configs.split(",") if c and c not in CONFIGS]
    if args.trace_repeats < 1 or bad or not any(args.repeat_configs.split(",")):
        ap.error(f"--trace-repeats wants >= 1 and --repeat-configs configs of the matrix ({', '.join(CONFIGS)})"
                 + (f"; got {', '.join(bad)}" if bad else ""))
    try:
        args.repeat_windows = [float(x) for x in args.repeat_sat_seconds.split(",") if x]
    except ValueError:
        args.repeat_windows = []
    windows = args.repeat_windows
    if args.calibration_repeats and (not windows or min(windows) <= 0):
        ap.error(f"--repeat-sat-seconds wants positive seconds, e.g. 3,8; got {args.repeat_sat_seconds!r}")
    if args.report:
        full = json.loads(Path(args.report).read_text())
        for doc in full["engines"]:  # the verdict as this version of the target reads it
            for t in doc["traces"].values():
                t["verdict"] = verdict(t["runs"])
        stem = Path(args.report).with_suffix("")
        Path(f"{stem}.md").write_text(markdown(full["engines"], full["command"]))
        plot(full["engines"], Path(f"{stem}.png"))
        log(f"wrote {stem}.md/.png")
        return
    gpu = args.engine == "gpu"
    compiled = args.compile or args.compile_outside_experts
    args.compare = [w for w in args.compare.split(",") if w] + (["eager"] if args.eager_saturation else [])
    bad = [w for w in args.compare if not compare_ok(w)]
    if bad:
        raise SystemExit(f"--compare: unknown {bad}; choose from {', '.join(COMPARE)}")
    if (compiled or args.compare) and not gpu:
        raise SystemExit("--compile, --compile-outside-experts and --compare are for --engine gpu")
    if args.async_batching and args.engine not in ("gpu", "sim"):
        raise SystemExit("--async-batching is for --engine gpu (transformers' own) or sim (its model)")
    if "eager" in args.compare and not compiled:
        raise SystemExit("--compare eager compares against --compile or --compile-outside-experts: give one")
    if args.async_batching and args.tiny:
        raise SystemExit("--async-batching needs CUDA (transformers overlaps steps on CUDA streams), not --tiny")
    if gpu and not args.tiny and not torch.cuda.is_available():
        raise SystemExit("--engine gpu needs CUDA (or --tiny); --engine throttled runs on the CPU")
    sim = args.engine == "sim"
    if gpu:  # each saturation run's rate, the thrown-away warm run's included, in the log
        logging.basicConfig(format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("runtime.serving.calibration").setLevel(logging.INFO)
    if args.sim_like:
        if not sim or args.sim_laws or args.seeds:
            raise SystemExit("--sim-like replays one GPU run on the H200 model: --engine sim, one --seed, no --sim-laws")
        try:
            args.sim_like_doc = json.loads(Path(args.sim_like).read_text())["engines"][0]
            args.sim_like_doc["calibration"]["mu0"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise SystemExit(f"--sim-like: {args.sim_like} is not a robustness results JSON ({type(e).__name__}: {e})")
    if args.seeds and not sim:
        raise SystemExit("--seeds is for --engine sim (a GPU or CPU matrix takes one --seed per call)")
    big = gpu and not args.tiny or sim and not args.sim_laws
    global MPC_KW
    MPC_KW = json.loads(args.mpc_kw)
    args.duration = args.duration or (6.0 if big else 10.0)
    args.max_prompt = args.max_prompt or (512 if big else 16)
    args.max_output = args.max_output or (256 if big else 32)
    args.sat_rate = args.sat_rate or (120.0 if big else 60.0)
    tag = args.tag or ("robustness_cpu" if not gpu else "robustness_tiny" if args.tiny else "robustness_gpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m eval.robustness " + " ".join(sys.argv[1:] if argv is None else argv)
    docs = []
    if sim:
        laws = [tuple(float(x) for x in law.split(":")) for law in args.sim_laws.split(",")] if args.sim_laws \
            else [None]
        engines = [("sim", (seed, law)) for law in laws for seed in parse_seeds(args.seeds or str(args.seed))]
    else:
        engines = [("gpu", None)] if gpu else [("law", tuple(float(x) for x in law.split(":")))
                                              for law in args.laws.split(",")]
    t_start = time.time()

    def save(done: list[dict], final: bool = False) -> None:  # after every trace: a killed run keeps what it did
        if not done:
            return
        if sim:  # many seeds: the per-run timelines would make tens of MB; the metrics and verdicts stay
            bare = lambda r: {k: v for k, v in r.items() if k != "timeline"}  # noqa: E731
            done = [{**d, "traces": {n: {**t, "runs": {c: bare(r) for c, r in t["runs"].items()},
                                         **({"repeats": {c: [bare(r) for r in rs] for c, rs in t["repeats"].items()}}
                                            if "repeats" in t else {})}
                                     for n, t in d["traces"].items()}} for d in done]
        full = {"command": command, "torch": torch.__version__, "mpc_kw": MPC_KW, "engines": done}
        (out / f"{tag}.json").write_text(json.dumps(full, indent=1 if not sim else None))
        (out / f"{tag}.md").write_text(markdown(done, command))
        if sim and not final:  # a simulated trace takes a second: draw once, at the end
            return
        try:
            if any(d["traces"] for d in done):  # nothing to draw before the first trace
                plot(done[:PLOT_ENGINES], out / f"{tag}.png")
        except Exception as e:  # a plot must never lose the numbers
            log(f"plot failed: {e!r}")

    for kind, law in engines:
        if kind == "sim":
            args.seed = law[0]  # the trace seed of this matrix
        srv, prof, device = (gpu_engine(args) if kind == "gpu" else sim_engine(args, *law) if kind == "sim"
                             else throttled_engine(*law, args))
        log(f"engine: {device}")
        compared = {w: compare_saturation(srv, args, w) for w in dict.fromkeys(args.compare)}
        try:
            with srv:
                docs.append(run_matrix(srv, prof, device, args, lambda d: save(docs + [d]), t_start, compared))
        finally:
            outside = compiled_outside(srv.model)
            if outside is not None:  # the modeling module's rope is shared by every model of its class: restore it
                outside.undo()
        save(docs)
    save(docs, final=True)
    log(f"wrote {out / tag}.json/.md/.png ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
