"""Service rates of a running engine: the `capacity` that `make_controller("mpc", ..., capacity=...)` needs.

    with BrownoutServer(bm, config=ServeConfig(...)) as srv:
        cap = measure_capacity(srv)        # {0.0: tok/s, 1.0: tok/s}, measured on this engine
        srv.controller = make_controller("mpc", 0.25, 0.15, capacity=cap)

A ratio's saturated service rate is the decode-token rate the engine sustains with its batch kept full. It is
measured on the server's own engine (same batching, cache and CUDA graphs as the runs it will control), at a fixed
ratio, by one of two loads:

  queue > 0 (default)  Poisson arrivals at `rate` req/s for `seconds`, far above any service rate; the driver
                       keeps at most `queue` requests waiting and holds the rest at the door in arrival order
                       (`full_queue="hold"`, see `ServeConfig`): every run of a trace then serves the same
                       requests in the same order, at either ratio, so runs differ only in the engine's speed.
                       ("reject", what serving does with a full queue, turns the excess away instead, and which
                       requests get in then depends on when slots happened to free.) The rate is taken over the steps
                       from min(1, seconds / 4) s to `seconds` (start-up and drain left out). transformers' scheduler
                       spends host time per waiting request on every step, so a deep queue understates the rate the
                       engine serves in operation; a shallow one keeps the batch full at the operating cost. The
                       measurement holds only while requests wait on (nearly) every step: when the queue ran dry on
                       more than `DRY_SHARE` of the steps, the run is repeated at twice the rate (at most
                       `MAX_DOUBLINGS` times; a faster engine empties the same queue sooner), and if it still ran
                       dry a warning says so.
  queue = 0            4 x max_batch requests queued at t = 0 (0.5 ms apart), served to the end (at most `seconds`
                       after the last arrival), the rate taken from min(1, seconds / 4) s on.

`measure_capacity` takes the median of `REPEATS` such runs per ratio (`median_saturation`): on the H200 engine one
run's rate moved by up to 10-12% (max - min over mean) between runs of the same process. Before them it makes
`WARM_RUNS` run(s) it does not keep: one of a fresh engine's first saturated runs is often slow.

Everything here is a real-time run of `BrownoutServer.run`; it takes about `seconds` + 1 s per ratio and run.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np

from ..errors import BrownoutError
from .controller import FixedRatio
from .trace import Request, Trace, poisson

log = logging.getLogger(__name__)

DRY_SHARE = 0.1  # share of saturation steps with nobody waiting above which the rate is likely understated
MAX_DOUBLINGS = 2  # re-runs at twice the arrival rate when the queue ran dry (120 -> 480 req/s at most by default)
REPEATS = 3  # saturation runs per ratio in `measure_capacity`: the median of three
# Saturation runs made and thrown away before the kept ones. On the compiled H200 engines one of the first three
# saturated runs served 27-39% less than the others, with the same step time, in each of seven processes: the first
# run in the three without a warm run, then the warm run twice and a kept run twice (eval/results/README.md,
# "Left-alone layers on the fused kernel"). A warm run removes it at times; the median removes one more outlier.
WARM_RUNS = 1

__all__ = ["DRY_SHARE", "MAX_DOUBLINGS", "REPEATS", "WARM_RUNS", "measure_capacity", "measure_saturation",
           "median_run", "median_saturation", "mean_output_len", "saturation_runs", "saturation_trace", "service_rate"]


def saturation_trace(n: int, lengths: str = "alpaca", seed: int = 0, max_prompt: int = 512,
                     max_output: int = 256) -> Trace:
    """`n` requests arriving 0.5 ms apart from t = 0 (lengths from the `lengths` preset): a queue at once."""
    tr = poisson(1e4, 1.0, lengths=lengths, seed=seed, max_requests=n, max_prompt=max_prompt, max_output=max_output)
    return Trace([Request(i, 0.0005 * i, r.prompt_len, r.output_len) for i, r in enumerate(tr.requests)], tr.meta)


def mean_output_len(lengths: str = "alpaca", max_prompt: int = 512, max_output: int = 256) -> float:
    """Mean output length of the `lengths` preset after capping (5000 draws, fixed seed): tokens per request."""
    sample = poisson(1e4, 1.0, lengths=lengths, seed=99, max_requests=5000, max_prompt=max_prompt,
                     max_output=max_output)
    return float(np.mean([r.output_len for r in sample.requests]))


def service_rate(res, t_from: float, t_to: float = math.inf, mean_out: float = 1.0) -> dict:
    """Decode tokens per second over the steps of a `ServeResult` that start in [t_from, t_to), and requests per
    second at `mean_out` output tokens each: {"tok_s", "req_s", "step_p50" (s), "step_mean" (s), "batch_mean",
    "decode_share", "step_share"} (only NaN rates if no step started in the window).
    "step_mean" is far above the median when a few steps ran long (a compile, say). "decode_share" is decode tokens
    over the requests of the steps: below 1 when steps carry prefill work. "step_share" is the share of the window's
    wall time spent inside steps (forward, sampling, copy-out); the rest is the engine's host work between steps
    (scheduling, batch preparation, bookkeeping), which brownout cannot shorten."""
    steps = [s for s in res.steps if t_from <= s.t0 < t_to]
    if not steps:
        return {"tok_s": float("nan"), "req_s": float("nan")}
    span = steps[-1].t1 - steps[0].t0
    toks = sum(s.decode_tokens for s in steps)
    return {"tok_s": toks / span, "req_s": toks / span / mean_out,
            "step_p50": float(np.median([s.step_s for s in steps])),
            "step_mean": float(np.mean([s.step_s for s in steps])),
            "batch_mean": float(np.mean([s.requests for s in steps])),
            "decode_share": toks / max(1, sum(s.requests for s in steps)),
            "step_share": sum(s.step_s for s in steps) / span if span > 0 else float("nan")}


def measure_saturation(server, ratio: float, *, seconds: float = 6.0, queue: int = 16, rate: float = 120.0,
                       lengths: str = "alpaca", max_prompt: int = 512, max_output: int = 256,
                       mean_out: float | None = None, seed: int = 11, full_queue: str = "hold") -> dict:
    """The saturated service rate of `server`'s engine at a fixed `ratio` (see the module docstring for the loads):
    `service_rate`'s dict, plus "dry_steps" (share of the window's steps with nobody waiting) and "rate" (the
    arrival rate of the run it comes from, doubled while the queue ran dry) and "full_queue" (the admission) when
    `queue` > 0.
    `rate` must be well above the service rate (with `full_queue="reject"`, not so far that rejecting the excess
    competes with the engine for the host). `mean_out` (default: `mean_output_len` of the preset) converts tokens/s
    to requests/s.

    Only the driver's settings of `server.cfg` (queue bound, drain, step records) are changed for the run, then put
    back; inside `with server:` the running engine is measured, otherwise one is started for the run."""
    if not seconds > 0 or queue < 0 or not rate > 0:
        raise BrownoutError(f"saturation needs seconds > 0, queue >= 0 and rate > 0, got {seconds}, {queue}, {rate}")
    if mean_out is None:
        mean_out = mean_output_len(lengths, max_prompt, max_output)
    if queue == 0:
        n = 4 * server.cfg.max_batch
        tr = saturation_trace(n, lengths, seed, max_prompt, max_output)
        res = _run_fixed(server, tr, ratio, max_queue=n, drain_timeout_s=seconds)
        return service_rate(res, min(1.0, seconds / 4), math.inf, mean_out=mean_out)
    window = (min(1.0, seconds / 4), seconds)
    for attempt in range(MAX_DOUBLINGS + 1):
        tr = poisson(rate, seconds, lengths=lengths, seed=seed, max_requests=int(rate * seconds) + 100,
                     max_prompt=max_prompt, max_output=max_output)
        res = _run_fixed(server, tr, ratio, max_queue=queue, drain_timeout_s=1.0, full_queue=full_queue)
        out = service_rate(res, *window, mean_out=mean_out)
        st = [x for x in res.steps if window[0] <= x.t0 < window[1]]
        out["dry_steps"] = sum(x.waiting == 0 for x in st) / max(1, len(st))
        out["rate"], out["full_queue"] = rate, full_queue
        if out["dry_steps"] <= DRY_SHARE:
            break
        if attempt < MAX_DOUBLINGS:
            log.info("the queue ran dry on %.0f%% of the saturation steps at ratio %g and %g req/s: again at %g",
                     100 * out["dry_steps"], ratio, rate, 2 * rate)
            rate *= 2
    else:
        log.warning("the queue ran dry on %.0f%% of the saturation steps at ratio %g even at %g req/s: this "
                    "understates the service rate", 100 * out["dry_steps"], ratio, rate)
    return out


def _run_fixed(server, trace: Trace, ratio: float, **driver):
    """`server.run(trace)` at a fixed ratio under the driver settings `driver`, with step records; `server.cfg` is
    put back after."""
    cfg = server.cfg
    server.cfg = replace(cfg, record_steps=True, **driver)
    try:
        res = server.run(trace, controller=FixedRatio(ratio))
    finally:
        server.cfg = cfg
    if res.errors:
        log.warning("saturation run at ratio %g: %s", ratio, "; ".join(res.errors))
    return res


def saturation_runs(server, ratios=(0.0, 1.0), repeats: int = REPEATS, seed: int = 11, warm_runs: int = WARM_RUNS,
                    **kw) -> dict[float, list[dict]]:
    """{ratio: [`measure_saturation` dict per run]}: `repeats` runs per ratio, each on another saturation trace
    (seed, seed + 1, ...), the ratios interleaved (0, 1, 0, 1, ...: a drift of the engine reaches every ratio
    alike). First `warm_runs` runs at the first ratio (traces seed - 1, seed - 2, ...) whose rates are not kept."""
    if repeats < 1 or warm_runs < 0:
        raise BrownoutError(f"repeats must be >= 1 and warm_runs >= 0, got {repeats} and {warm_runs}")
    runs: dict[float, list[dict]] = {float(r): [] for r in ratios}
    for i in range(warm_runs):  # not kept: see WARM_RUNS
        m = measure_saturation(server, float(ratios[0]), seed=seed - 1 - i, **kw)
        log.info("saturation warm run %d of %d at ratio %g (not kept): %.2f req/s", i + 1, warm_runs,
                 float(ratios[0]), m["req_s"])
    for i in range(repeats):
        for r in runs:
            runs[r].append(measure_saturation(server, r, seed=seed + i, **kw))
            log.info("saturation run %d of %d at ratio %g: %.2f req/s", i + 1, repeats, r, runs[r][-1]["req_s"])
    return runs


def median_saturation(server, ratios=(0.0, 1.0), repeats: int = REPEATS, seed: int = 11, warm_runs: int = WARM_RUNS,
                      **kw) -> dict[float, dict]:
    """{ratio: the `measure_saturation` run of median rate} over the `saturation_runs` (`warm_runs` thrown away, then
    `repeats` per ratio, interleaved, each on another saturation trace). One run's rate moves by about +-5% between
    runs of the same engine (the GPU engine of eval/results/README.md, "Calibration repeated"); the median of three
    leaves out one outlier either way. Each dict gets "runs": every kept run's req/s, in order, and
    "step_p50_runs": their median step times."""
    return {r: median_run(rs) for r, rs in saturation_runs(server, ratios, repeats, seed, warm_runs, **kw).items()}


def median_run(runs: list[dict]) -> dict:
    """Of `measure_saturation` runs, the one of median decode rate (the lower median of an even count: no
    overstatement), with "runs" (every run's req/s, in order) and "step_p50_runs" (their median step times)."""
    ok = sorted((x for x in runs if math.isfinite(x["tok_s"])), key=lambda x: x["tok_s"])
    best = ok[(len(ok) - 1) // 2] if ok else runs[0]
    return {**best, "runs": [x["req_s"] for x in runs], "step_p50_runs": [x.get("step_p50") for x in runs]}


def measure_capacity(server, ratios=(0.0, 1.0), repeats: int = REPEATS, **kw) -> dict[float, float]:
    """{ratio: saturated decode tokens per second} of `server`'s engine, the median of `repeats`
    `measure_saturation` runs per ratio after `warm_runs` (default `WARM_RUNS`) thrown away (`median_saturation`;
    other keywords as in `measure_saturation`): the `capacity` of `make_controller("mpc", ...)`. Raises
    BrownoutError if a ratio served no decode step in its window (a load too short or an engine that failed)."""
    cap = {}
    for r, m in median_saturation(server, ratios, repeats, **kw).items():
        tok_s = m["tok_s"]
        if not (math.isfinite(tok_s) and tok_s > 0):
            raise BrownoutError(f"no decode tokens served in the saturation window at ratio {r:g}: lengthen "
                                f"`seconds` or check the engine")
        cap[r] = tok_s
    return cap
