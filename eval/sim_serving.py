"""A simulated continuous-batching engine: SLO controllers on many trace seeds in seconds, on the CPU.

The robustness matrix on a GPU (eval/robustness.py --engine gpu) costs about 9 minutes of device time per trace
seed, and its single runs near capacity differ by up to ~18 points of late first tokens (eval/results/README.md).
A controller change cannot be judged from one or two of them. `SimServer` runs the same traces through the same
controller hooks in simulated time, with step times from a measured profile, so a change can be scored over many
seeds before it costs device time. Its figures are a model's, not a GPU's: use them to choose what to measure.

What it models (transformers' continuous batching as the GPU engine is configured, `ServeConfig`):
  - `max_batch` slots; a request holds one from admission to its last token;
  - per step, every decoding request adds one token; free slots admit waiting requests in arrival order, whose
    prompts are prefilled in chunks of the step's remaining token budget (`max_batch_tokens`); a request's first
    token comes out of the step that finishes its prompt;
  - step time = profile(tokens in the step, ratio) + `in_step_s` (attention over the paged cache, sampling,
    copy-out: what the graph-replayed forward profile leaves out), times a log-normal jitter; then `gap_s` of host
    work before the next step; optionally (`run_jitter`) both times one factor per run, drawn at its start: the
    engine's speed moving between runs, as the GPU's does;
  - the driver's bounded queue (`max_queue`, the excess rejected, or held in order with `full_queue="hold"`) and
    the drain deadline (`drain_timeout_s` after the last arrival, what is left cancelled);
  - with `cfg.async_batching` (transformers' async batching), the host's work overlapped with the GPU's: no gap
    between steps, a step lasting the longer of its own time and the host's `gap_s`, and each step's `observe`
    reaching the controller one step late, after the next step's ratio is chosen (the server hears of a step at
    the first hook after its end, runtime/serving/server.py).
The controller sees what `BrownoutServer` gives it, in the same order: `observe_arrival` at each admission,
`observe_queue` and `step_ratio` before each step, `observe` after it.

    python -m eval.robustness --engine sim --seeds 0-9       # the matrix over ten trace seeds, simulated
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.serving import FixedRatio, LatencyProfile, ServeConfig
from runtime.serving.server import OK, REJECTED, TIMEOUT, RequestRecord, ServeResult, StepRecord

ROOT = Path(__file__).resolve().parents[1]
# a graph-replayed step profile and saturated step figures measured on an H200 (eval/results/README.md)
H200_PROFILE = ROOT / "eval" / "results" / "serving_capacity_sweep_h200.json"


@dataclass
class StepModel:
    """Seconds per engine step from a forward profile: profile(tokens, ratio) + in_step_s, jittered; gap_s after."""

    profile: LatencyProfile
    in_step_s: float = 0.0
    gap_s: float = 0.0
    jitter: float = 0.0  # sigma of the log-normal factor on each step
    run_jitter: float = 0.0  # sigma of a log-normal factor on every step and gap of one run (the engine's speed
    # moving between runs: one saturation run of the H200 engine moves by about +-5%, eval/results/README.md)
    scale: tuple[float, float] = (1.0, 1.0)  # time multipliers at ratios 0 and 1 (linear between): another engine's
    # speed, e.g. one GPU run's measured saturated rates (`eval.robustness --sim-like`)

    def time_scale(self, ratio: float) -> float:
        return self.scale[0] + (self.scale[1] - self.scale[0]) * ratio

    def step_s(self, tokens: int, ratio: float, rng: np.random.Generator) -> float:
        t = (self.profile.predict(tokens, ratio) + self.in_step_s) * self.time_scale(ratio)
        return t * float(np.exp(rng.normal(0.0, self.jitter))) if self.jitter > 0 else t

    def scaled_profile(self) -> LatencyProfile:
        """The forward profile with `scale` applied at its grid's ratios: what a controller measuring this engine on
        that grid would read."""
        lat = [[x * self.time_scale(r) for x, r in zip(row, self.profile.ratios)] for row in self.profile.lat]
        return LatencyProfile(list(self.profile.tokens), list(self.profile.ratios), lat)


def h200_step_model(path: Path = H200_PROFILE, jitter: float = 0.05) -> StepModel:
    """The step model of the H200 serving engine (Qwen1.5-MoE shape, 4-way tier, fused kernel in CUDA graphs):
    the graph-replayed forward profile of one GPU run, plus the in-step and host time that run's saturation
    measured at ratios 0 and 1 (step p50 less the forward at a full batch of 64 decode tokens plus one prompt chunk;
    wall per step less step, from the share of wall time spent in steps), averaged over the two.
    `path`: a bench_serving JSON, or an eval.robustness GPU JSON (its first engine) from a version that saves the
    engine's profile; ValueError for one without."""
    doc = json.loads(Path(path).read_text())
    if "engines" in doc:  # eval.robustness: the engine's profile and its calibration's saturated runs
        doc = doc["engines"][0]
        if "profile" not in doc:
            raise ValueError(f"{path} holds no step profile (a robustness run from before profiles were saved, or "
                             f"not a GPU engine's)")
        sats = {0.0: doc["calibration"]["saturation"]["0.0"], 1.0: doc["calibration"]["saturation"]["1.0"]}
    else:
        sats = {0.0: doc["calibration"]["sat_r0"], 1.0: doc["calibration"]["sat_r1"]}
    p = doc["profile"]
    prof = LatencyProfile(p["tokens"], p["ratios"], p["lat"])
    in_step, gap = [], []
    for r, sat in sats.items():
        tokens = sat["batch_mean"] + 64  # a full decode batch plus about one prompt chunk a step
        in_step.append(sat["step_p50"] - prof.predict(int(tokens), r))
        gap.append(sat["step_p50"] * (1.0 / sat["step_share"] - 1.0))
    return StepModel(prof, max(0.0, float(np.mean(in_step))), max(0.0, float(np.mean(gap))), jitter)


def law_step_model(step_ms: float, gain: float) -> StepModel:
    """The throttled CPU engine's law as a step model: step_ms x (1 - gain x ratio), whatever the batch."""
    s = 1e-3 * step_ms
    return StepModel(LatencyProfile([1, 1024], [0.0, 1.0], [[s, s * (1 - gain)], [s, s * (1 - gain)]]))


@dataclass
class _Req:
    rec: RequestRecord
    key: str
    prefill_left: int
    out_left: int
    last_tok: float | None = None


class SimServer:
    """What `eval.robustness` and `runtime.serving.measure_saturation` use of a `BrownoutServer` (`cfg`, `run`, a
    context manager, `model`), on a simulated engine (module docstring). Each run draws its jitter from `seed` and
    the run's count, so a matrix is reproducible."""

    model = None  # nothing compiled: eval.robustness asks

    def __init__(self, steps: StepModel, cfg: ServeConfig, controller=None, seed: int = 0):
        self.steps, self.cfg, self.controller, self.seed = steps, cfg, controller or FixedRatio(0.0), seed
        self._runs = 0

    def __enter__(self) -> "SimServer":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, trace, prompts=None, on_progress=None, controller=None) -> ServeResult:
        cfg = self.cfg
        ctl = controller or self.controller
        ctl.reset()
        ctl.bind(cfg.max_batch)
        self._runs += 1
        rng = np.random.default_rng([self.seed, self._runs])
        # this run's engine speed (drawn only when asked for: runs without it keep their jitter sequence)
        speed = float(np.exp(rng.normal(0.0, self.steps.run_jitter))) if self.steps.run_jitter > 0 else 1.0
        reqs = sorted(trace.requests, key=lambda q: q.t)
        recs = [RequestRecord(q.rid, q.t, q.prompt_len, q.output_len) for q in reqs]
        waiting: deque[_Req] = deque()
        running: list[_Req] = []
        steps: list[StepRecord] = []
        now, i, n = 0.0, 0, len(reqs)
        deadline = (reqs[-1].t if reqs else 0.0) + cfg.drain_timeout_s
        late: deque[list] = deque()  # async batching: each step's observations, held back one step

        def feed(obs: list) -> None:  # one step's observations, to the controller
            for args in obs:
                ctl.observe(*args)

        last_arrival = reqs[-1].t if reqs else 0.0
        hold = cfg.full_queue == "hold"

        def admit_until(t: float) -> None:
            nonlocal i
            while i < n and reqs[i].t <= t:
                q, rec = reqs[i], recs[i]
                if hold and len(waiting) >= cfg.max_queue and t <= last_arrival:
                    break  # held at the door in order until there is room (ServeConfig.full_queue)
                i += 1
                if len(waiting) >= cfg.max_queue:
                    rec.status = REJECTED
                    continue
                rec.submit = q.t
                waiting.append(_Req(rec, str(q.rid), max(1, q.prompt_len), max(1, q.output_len)))
                ctl.observe_arrival(q.t, q.prompt_len, q.output_len)

        while True:
            admit_until(now)
            if not running and not waiting:
                while late:  # async: idle, so every step's end has been seen
                    feed(late.popleft())
                if i >= n:
                    break
                now = reqs[i].t  # idle until the next arrival
                continue
            if now > deadline:
                break
            # schedule: decoders (one token each), then the prompts already admitted, in order, then new requests
            # into free slots while the step's token budget lasts (a prompt larger than it goes in chunks)
            budget = cfg.max_batch_tokens - sum(1 for r in running if r.prefill_left == 0)
            chunks = {}
            for r in running:
                if r.prefill_left > 0 and budget > 0:
                    chunks[r.key] = min(budget, r.prefill_left)
                    budget -= chunks[r.key]
            while waiting and len(running) < cfg.max_batch and budget > 0:
                r = waiting.popleft()
                running.append(r)
                chunks[r.key] = min(budget, r.prefill_left)
                budget -= chunks[r.key]
            dec = [r for r in running if r.prefill_left == 0]
            pre = [r for r in running if r.key in chunks]
            n_pre, n_dec = sum(chunks.values()), len(dec)
            while len(late) > 1:  # async: the steps before the last one are what the host has seen end by now
                feed(late.popleft())
            age = now - waiting[0].rec.arrival if waiting else 0.0
            ctl.observe_queue(age, len(waiting), now, len(pre) + len(dec))
            ratio = ctl.step_ratio(bool(pre), bool(dec), now, n_pre + n_dec)
            step = speed * self.steps.step_s(n_pre + n_dec, ratio, rng)
            host = speed * self.steps.gap_s * self.steps.time_scale(ratio)
            if cfg.async_batching:  # the host's work runs beside the GPU's: the longer of the two paces the step
                step = max(step, host)
            t0, now = now, now + step
            finished = []
            for r in dec:
                r.rec.token_times.append(now)
                r.out_left -= 1
            gaps = [now - r.last_tok for r in dec if r.last_tok is not None]
            first = []
            for r in pre:
                r.prefill_left -= chunks[r.key]
                if r.prefill_left == 0:  # the prompt is done: its first token comes out of this step
                    r.rec.token_times.append(now)
                    r.out_left -= 1
                    first.append(r)
            for r in dec + first:
                r.last_tok = now
                if r.out_left <= 0:
                    r.rec.status = OK
                    finished.append(r)
            obs = []
            if pre:
                obs.append(("prefill", now - min(r.rec.arrival for r in pre), now, n_pre + n_dec, ratio, step))
            if gaps:
                obs.append(("decode", max(gaps), now, n_pre + n_dec, ratio, step))
            if cfg.async_batching:
                late.append(obs)
            else:
                feed(obs)
            if cfg.record_steps:
                steps.append(StepRecord(t0, now, step, n_pre, n_dec, len(pre) + len(dec), ratio, len(waiting)))
            done = {r.key for r in finished}
            running = [r for r in running if r.key not in done]
            if not cfg.async_batching:
                now += host
            if on_progress is not None:
                on_progress(now)
        for r in list(waiting) + running:  # cut at the drain deadline
            r.rec.status = TIMEOUT
        for rec in recs[i:]:
            rec.status = REJECTED
        return ServeResult(recs, steps, now, asdict(cfg), getattr(ctl, "name", str(ctl)), [], 0)
