"""SLO-aware brownout controllers (docs/design.md §7).

A controller reads per-step latencies from the serving loop and says which brownout ratio the next step should run
at. The model has one ratio knob per forward; like the paper we keep separate state for prefill (judged against the
time-to-first-token SLO) and decode (judged against the time-per-output-token SLO) and the serving hook applies the
prefill ratio on steps that carry prompt tokens and the decode ratio on pure decode steps (a mixed step, which
transformers' continuous batching does produce, runs at the larger of the two, since both kinds of token wait on it).

Common interface (all controllers):

    c.observe(kind, latency_s, now, batch_tokens=0, ratio=None, step_s=None)
        kind        "prefill" | "decode"
        latency_s   the SLO-relevant latency the step's tokens saw: for prefill the (worst) time since arrival of the
                    requests whose prompt ran in this step, for decode the (worst) inter-token gap; what the SLO
                    is judged on. Non-finite or negative values are ignored (NaN-safe).
        now         a monotonic clock in seconds (the serving loop's perf_counter, or a simulated clock in tests)
        batch_tokens query tokens the step ran; ratio: the ratio it ran at; step_s: the forward's own time, if known
    c.observe_queue(age_s, waiting, now)      the admission queue before a step (see the method)
    c.observe_arrival(now, prompt_tokens, output_tokens)   a request admitted (driver thread; see the method)
    c.ratio(kind, now=None, batch_tokens=None) -> float in [0, 1]
        the ratio to run the next step of this kind at (batch_tokens: the tokens it will run, if known)
    c.reset(); c.snapshot() -> dict (for logs)

Every controller keeps bounded deques, does O(window) work at most once per check period and O(1) otherwise, and
clamps its output to [0, 1].
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from dataclasses import dataclass, field

from ..errors import BrownoutError

KINDS = ("prefill", "decode")

__all__ = ["KINDS", "Controller", "FixedRatio", "SALC", "PIController", "ModelPredictive", "LatencyProfile", "erlang_c",
           "make_controller"]


def _clamp01(x: float) -> float:
    if not isinstance(x, (int, float)) or math.isnan(x):
        return 0.0
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else float(x)


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0.0


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise BrownoutError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def quantile(values, q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence (numpy's default method), NaN for an empty one."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = q * (len(v) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _bracket(grid: list[float], x: float) -> tuple[int, int, float]:
    """(i, j, a) with x ~ (1 - a) * grid[i] + a * grid[j] on an ascending grid, clamped to its ends."""
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    i = bisect.bisect_right(grid, x) - 1
    return i, i + 1, (x - grid[i]) / (grid[i + 1] - grid[i])


def erlang_c(c: int, a: float) -> float:
    """Erlang's C formula: the probability that an arrival waits in an M/M/c queue offered `a` erlangs (1 if a >= c).
    Through the Erlang B recursion, O(c) and stable for any c."""
    if a <= 0:
        return 0.0
    if a >= c:
        return 1.0
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return c * b / (c - a * (1.0 - b))


class Window:
    """Latency samples of the last `window_s` seconds, at most `maxlen` of them (oldest dropped first)."""

    def __init__(self, window_s: float, maxlen: int = 1024):
        self.window_s = float(window_s)
        self.buf: deque[tuple[float, float]] = deque(maxlen=maxlen)

    def add(self, now: float, value: float) -> None:
        self.buf.append((now, value))

    def prune(self, now: float) -> None:
        lim = now - self.window_s
        while self.buf and self.buf[0][0] < lim:
            self.buf.popleft()

    def quantile(self, now: float, q: float = 0.9) -> float:
        self.prune(now)
        return quantile([v for _, v in self.buf], q)

    def __len__(self) -> int:
        return len(self.buf)

    def clear(self) -> None:
        self.buf.clear()


class Controller:
    """Base class. Subclasses set `name` and implement `_observe` / `_ratio`."""

    name = "base"

    def __init__(self, slo_prefill: float = 0.25, slo_decode: float = 0.15):
        if not (slo_prefill > 0 and slo_decode > 0):
            raise BrownoutError("SLOs must be positive")
        self.slo = {"prefill": float(slo_prefill), "decode": float(slo_decode)}

    def observe(self, kind: str, latency_s: float, now: float, batch_tokens: int = 0, ratio: float | None = None,
                step_s: float | None = None) -> None:
        _check_kind(kind)
        if not _ok(latency_s) or not (isinstance(now, (int, float)) and math.isfinite(now)):
            return
        self._observe(kind, float(latency_s), float(now), int(batch_tokens or 0),
                      None if ratio is None or not _ok(ratio) else _clamp01(ratio),
                      float(step_s) if _ok(step_s) else None)

    def observe_queue(self, age_s: float, waiting: int, now: float, running: int | None = None) -> None:
        """The admission queue before a step: `waiting` requests not yet scheduled, the oldest of them waiting for
        `age_s` seconds (0 when none waits), and `running` requests in the step about to run (None: not known). A
        leading signal for the time to first token: a TTFT is observed only once the request's first token is out,
        i.e. one queueing delay late. The paper's rule ignores it."""
        if _ok(age_s) and isinstance(now, (int, float)) and math.isfinite(now):
            self._observe_queue(float(age_s), max(0, int(waiting or 0)), float(now),
                                None if running is None else max(0, int(running)))

    def _observe_queue(self, age, waiting, now, running=None) -> None:
        pass

    def observe_arrival(self, now: float, prompt_tokens: int, output_tokens: int) -> None:
        """A request was admitted at `now` asking for `output_tokens` new tokens after a prompt of `prompt_tokens`.
        Called from the serving driver's thread (steps run on the engine's): implementations must be thread-safe.
        The offered load is known at admission, before any step runs it; the paper's rule ignores it."""
        if isinstance(now, (int, float)) and math.isfinite(now):
            self._observe_arrival(float(now), max(0, int(prompt_tokens or 0)), max(0, int(output_tokens or 0)))

    def _observe_arrival(self, now, prompt_tokens, output_tokens) -> None:
        pass

    def ratio(self, kind: str, now: float | None = None, batch_tokens: int | None = None) -> float:
        _check_kind(kind)
        return _clamp01(self._ratio(kind, now, batch_tokens))

    def step_ratio(self, has_prefill: bool, has_decode: bool, now: float | None = None,
                   batch_tokens: int | None = None) -> float:
        """The ratio for a step carrying prompt tokens and/or decode tokens: the larger of the kinds it carries."""
        kinds = [k for k, on in (("prefill", has_prefill), ("decode", has_decode)) if on] or ["decode"]
        return max(self.ratio(k, now, batch_tokens) for k in kinds)

    def _observe(self, kind, latency, now, tokens, ratio, step_s) -> None:
        pass

    def _ratio(self, kind, now, tokens) -> float:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def bind(self, max_batch: int) -> None:
        """Told by the server before a run: the engine's batch size (requests per step). Default: unused."""

    def snapshot(self) -> dict:
        return {"name": self.name, "ratio": {k: self.ratio(k) for k in KINDS}}


class FixedRatio(Controller):
    """A constant ratio (r = 0 is plain serving, no brownout)."""

    def __init__(self, r: float = 0.0, **kw):
        super().__init__(**kw)
        self.r = _clamp01(r)
        self.name = f"fixed-{self.r:g}"

    def _ratio(self, kind, now, tokens) -> float:
        return self.r


class SALC(Controller):
    """The paper's SLO-aware latency controller (Algorithm 2), the baseline.

    Keeps a threshold t per kind (the share of assignments kept on original experts; our ratio is r = 1 - t). Every
    `interval` seconds (5 s in the paper's code) it takes the p90 of the latencies observed over the last `window`
    seconds (2 s): p90 > SLO -> t *= 0.8 (ratio rises); p90 < warn * SLO (warning line 0.8 SLO) -> t = min(1, t + 0.1)
    (ratio falls); otherwise hold. A kind with no sample in the window holds. Checks run inside `observe`, so the
    reaction time to a burst is between one interval and interval + window.
    """

    name = "salc"

    def __init__(self, slo_prefill: float = 0.25, slo_decode: float = 0.15, interval: float = 5.0,
                 window: float = 2.0, warn: float = 0.8, decrease: float = 0.8, increase: float = 0.1,
                 t0: float = 1.0, maxlen: int = 4096):
        super().__init__(slo_prefill, slo_decode)
        self.interval, self.warn, self.decrease, self.increase, self.t0 = interval, warn, decrease, increase, t0
        self.win = {k: Window(window, maxlen) for k in KINDS}
        self.t = {k: _clamp01(t0) for k in KINDS}
        self.last_check: dict[str, float | None] = {k: None for k in KINDS}
        self.last_p90 = {k: float("nan") for k in KINDS}

    def reset(self) -> None:
        for k in KINDS:
            self.win[k].clear()
            self.t[k] = _clamp01(self.t0)
            self.last_check[k] = None
            self.last_p90[k] = float("nan")

    def _observe(self, kind, latency, now, tokens, ratio, step_s) -> None:
        self.win[kind].add(now, latency)
        for k in KINDS:
            if self.last_check[k] is None:
                self.last_check[k] = now
            elif now - self.last_check[k] >= self.interval:
                self.last_check[k] = now
                self._check(k, now)

    def _check(self, k: str, now: float) -> None:
        p90 = self.win[k].quantile(now, 0.9)
        self.last_p90[k] = p90
        if math.isnan(p90):
            return
        if p90 > self.slo[k]:
            self.t[k] = _clamp01(self.t[k] * self.decrease)
        elif p90 < self.warn * self.slo[k]:
            self.t[k] = min(1.0, self.t[k] + self.increase)

    def _ratio(self, kind, now, tokens) -> float:
        return 1.0 - self.t[kind]

    def snapshot(self) -> dict:
        return {"name": self.name, "ratio": {k: 1.0 - self.t[k] for k in KINDS}, "p90": dict(self.last_p90)}


class PIController(Controller):
    """A PI controller on the windowed p90, per kind (velocity form, so clamping cannot wind up).

    Every `period` seconds: e = (p90 - target) / SLO with target = SLO * (1 - margin);
    r += kp * (e - e_prev) + ki * e * dt, clamped to [0, 1]. A dead band of +-`deadband` (relative) around the target
    holds the ratio still, which keeps it from dithering on a steady load. With period 0.25 s and window 1 s it
    reacts to a burst within one window.
    """

    name = "pi"

    def __init__(self, slo_prefill: float = 0.25, slo_decode: float = 0.15, window: float = 1.0,
                 period: float = 0.25, margin: float = 0.15, kp: float = 0.6, ki: float = 1.5,
                 deadband: float = 0.08, maxlen: int = 1024):
        super().__init__(slo_prefill, slo_decode)
        self.period, self.margin, self.kp, self.ki, self.deadband = period, margin, kp, ki, deadband
        self.win = {k: Window(window, maxlen) for k in KINDS}
        self.r = {k: 0.0 for k in KINDS}
        self.e_prev = {k: 0.0 for k in KINDS}
        self.last: dict[str, float | None] = {k: None for k in KINDS}

    def reset(self) -> None:
        for k in KINDS:
            self.win[k].clear()
            self.r[k], self.e_prev[k], self.last[k] = 0.0, 0.0, None

    def _observe(self, kind, latency, now, tokens, ratio, step_s) -> None:
        self.win[kind].add(now, latency)
        last = self.last[kind]
        if last is None:
            self.last[kind] = now
            return
        dt = now - last
        if dt < self.period:
            return
        self.last[kind] = now
        dt = min(dt, 4 * self.period)  # a long idle gap must not give one huge integral step
        slo = self.slo[kind]
        p90 = self.win[kind].quantile(now, 0.9)
        if math.isnan(p90):
            return
        e = (p90 - slo * (1 - self.margin)) / slo
        if abs(e) < self.deadband:
            e = 0.0
        self.r[kind] = _clamp01(self.r[kind] + self.kp * (e - self.e_prev[kind]) + self.ki * e * dt)
        self.e_prev[kind] = e

    def _ratio(self, kind, now, tokens) -> float:
        return self.r[kind]


@dataclass
class LatencyProfile:
    """Step latency (seconds) on a grid of batch tokens x ratios, for one step kind.

    `lat[i][j]` is the latency of a step of `tokens[i]` query tokens at ratio `ratios[j]`. Prediction interpolates
    linearly in tokens and in ratio, and extrapolates linearly in tokens beyond the last grid point. Cells can be
    refreshed online (`update`) with an exponential moving average, so the profile follows the machine.
    """

    tokens: list[int]
    ratios: list[float]
    lat: list[list[float]]
    alpha: float = 0.1
    _tg: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if len(self.tokens) < 1 or len(self.ratios) < 1:
            raise BrownoutError("profile needs at least one token count and one ratio")
        if sorted(self.tokens) != list(self.tokens) or sorted(self.ratios) != list(self.ratios):
            raise BrownoutError("profile grids must be ascending")
        if len(self.lat) != len(self.tokens) or any(len(row) != len(self.ratios) for row in self.lat):
            raise BrownoutError("profile table shape must be [len(tokens)][len(ratios)]")
        self.lat = [[float(x) for x in row] for row in self.lat]
        self._tg = [float(t) for t in self.tokens]

    @classmethod
    def from_points(cls, points, tokens=None, ratios=None, alpha: float = 0.1) -> "LatencyProfile":
        """Build from measured (tokens, ratio, latency) triples: the median per (tokens, ratio) cell of a full grid."""
        cells: dict[tuple[int, float], list[float]] = {}
        for t, r, lat in points:
            if _ok(lat):
                cells.setdefault((int(t), round(float(r), 6)), []).append(float(lat))
        tokens = sorted({t for t, _ in cells}) if tokens is None else list(tokens)
        ratios = sorted({r for _, r in cells}) if ratios is None else [round(float(r), 6) for r in ratios]
        lat = []
        for t in tokens:
            row = []
            for r in ratios:
                v = cells.get((t, r))
                if not v:
                    raise BrownoutError(f"profile point (tokens={t}, ratio={r}) is missing")
                row.append(quantile(v, 0.5))
            lat.append(row)
        return cls(tokens, ratios, lat, alpha)

    def _tpos(self, tokens: int) -> tuple[int, int, float]:
        return _bracket(self._tg, float(tokens))

    def _rpos(self, r: float) -> tuple[int, int, float]:
        return _bracket(self.ratios, _clamp01(r))

    def predict(self, tokens: int, r: float) -> float:
        i0, i1, a = self._tpos(tokens)
        j0, j1, b = self._rpos(r)
        L = self.lat
        v = ((1 - a) * ((1 - b) * L[i0][j0] + b * L[i0][j1]) + a * ((1 - b) * L[i1][j0] + b * L[i1][j1]))
        if tokens > self.tokens[-1] and self.tokens[-1] > 0:  # beyond the grid: linear in tokens
            v *= tokens / self.tokens[-1]
        return v

    def update(self, tokens: int, r: float, latency: float) -> None:
        """Nudge the nearest cell towards an observation (only inside the grid, where the cell stands for it)."""
        if not _ok(latency) or tokens > self.tokens[-1] * 1.5 or tokens < self.tokens[0] / 1.5:
            return
        lt = math.log(max(1, tokens))  # nearest cell on a log scale
        i = min(range(len(self.tokens)), key=lambda q: abs(math.log(max(1, self.tokens[q])) - lt))
        j = min(range(len(self.ratios)), key=lambda q: abs(self.ratios[q] - r))
        if abs(self.ratios[j] - r) > 0.05:
            return
        pred = self.predict(tokens, r)
        if pred <= 0:
            return
        # scale the cell by the observed/predicted ratio, so observations between grid points still teach the cell
        self.lat[i][j] *= (1 - self.alpha) + self.alpha * min(4.0, max(0.25, latency / pred))


class ModelPredictive(Controller):
    """Ours: pick, per step, the smallest ratio whose predicted latency fits the SLO, with a slow feedback trim.

    Inner loop (each step, O(len(grid))): with a latency profile P_kind(tokens, ratio) (measured at start-up by timing
    forwards on a grid, then refreshed online from the steps' own forward times), the predicted SLO latency of the
    next step is kappa_kind * P_kind(tokens, r), where kappa is a moving average of observed latency / profiled
    forward time (loop overhead, attention on long contexts, ...), set by the first observation and then averaged,
    fast upwards (kappa_up) and slowly downwards (kappa_alpha). The controller takes the smallest r on `grid`
    with kappa * P(tokens, r) <= beta_kind * SLO * (1 - margin); if none fits, the smallest ratio within 2% of the
    fastest prediction (never r = 1 blindly: where the brownout path is slower than the original one, it stays
    at 0). So small batches run at r = 0 and the accuracy price is paid only on the steps where it buys time.

    Outer loop (every `period` s): beta_kind in [beta_min, 1] is trimmed by the p90 of the SLO latency over the last
    `window` s: above (1 - margin/2) SLO -> beta *= 0.85 (more brownout); below (1 - 2 margin) SLO -> beta += 0.05.
    This is what sees what no step model can: queueing delay in the time to first token.

    Queue term (each step): the step model cannot see queueing, and observed TTFTs arrive one queueing delay late.
    So the queue before each step (`observe_queue`: the age of the oldest waiting request and how many wait) sets a
    floor on the ratio. With `capacity` it is predictive (`_backlog_floor`): the smallest ratio at which the
    engine, freeing a slot every L x token_time(r) s on average, reaches the oldest and the last waiting request
    within the TTFT budget. Without, it is proportional to the oldest age, between `queue_lo` * TTFT SLO (floor 0) and
    `queue_hi` * TTFT SLO (floor 1). Either way the ratio rises on the step at which a queue forms, before any first
    token is late. The floor holds for decode steps as well: under continuous batching a full batch admits the queue
    only as decode steps finish requests (applied to prompt-carrying steps only, the queue grows behind full batches
    of decode steps at r = 0).

    Load term (optional, each step; needs `capacity`, the engine's saturated decode-token rate at two or more
    ratios, measured at start-up): the output tokens asked for by the last `load_count` requests admitted (at most
    `load_window` s back), over the time they took to come, are the offered load (`observe_arrival`). The floor is
    the smallest ratio whose capacity covers it with a `load_margin` (time per token interpolated linearly in r)
    and, once the batch size is known (`slots`, which the server passes through `bind`), at which an M/M/c queueing
    model (`late_share`: Erlang C with the Allen-Cunneen correction for the output lengths' spread) predicts at most
    `queue_eps` of first tokens waiting past the TTFT budget: carrying the load is not enough when the SLO is a few
    steps long, as at 0.9 utilisation the queue alone makes a fifth of first tokens late. It is refreshed with the
    queue floor, on each `observe_queue` (the server calls it before every step), and armed (see `_load_floor`): it
    spends nothing until a queue shows that ratio 0 falls short, or the batch about to run is nearly full
    (`occ_arm` x `slots` requests, `observe_queue`'s `running`) while the offered load reads over ratio 0's
    measured rate; then it holds while the load that armed it holds, or while the load is over ratio 0's measured
    rate (a queue arms it for at least `load_window` s, a full batch for no minimum). The batch's free slots absorb
    an overload for seconds before a queue shows (2.5-4 s on an H200 with 64 slots), and the backlog built
    meanwhile is what makes first tokens late: the batch filling up under such a load is the earlier sign.
    `occ_arm` = 0.9 was chosen on the simulated engine (eval/sim_serving.py) over 20 trace seeds of three engine
    models, none retuned for another; None leaves the queue as the only trigger. While a queue that ratio 0 would
    not reach in time stands, the load is also read over the last quarter of `load_count` arrivals, and the higher
    of the two taken: a burst's onset shows there `load_count` * 3/4 arrivals sooner, and only a queue makes the
    noisier read count. This is what the queue term alone lacks: after a burst the queue floor sends the ratio to
    1, the queue drains, the ratio falls back to 0 within a fraction of a second, and when ratio 0 cannot carry the
    after-burst rate the queue forms again (a relaxation cycle that leaves many first tokens late).
    `runtime.serving.calibration.measure_capacity` measures `capacity` on the running engine.

    Hysteresis: the ratio rises at once; it falls only when the lower ratio's prediction is under the budget by a
    further `hysteresis` fraction, and by at most `max_fall` per step.

    Without a profile (None) there is no step model: the ratio follows the outer loop alone,
    r = (1 - beta) / (1 - beta_min), i.e. a multiplicative-decrease / additive-increase feedback controller with a
    short (0.25 s) period and a 1 s window.
    """

    name = "mpc"

    def __init__(self, slo_prefill: float = 0.25, slo_decode: float = 0.15,
                 profile: dict[str, LatencyProfile] | LatencyProfile | None = None, margin: float = 0.15,
                 hysteresis: float = 0.08, max_fall: float = 0.1, window: float = 1.0, period: float = 0.25,
                 beta_min: float = 0.2, grid_steps: int = 20, kappa_alpha: float = 0.05, kappa_up: float = 0.3,
                 learn: bool = True, queue_lo: float = 0.25, queue_hi: float = 0.6, maxlen: int = 1024,
                 capacity: dict[float, float] | None = None, load_window: float = 2.0, load_margin: float = 0.05,
                 load_count: int = 32, slots: int | None = None, queue_eps: float = 0.05, arm_hold: float = 0.9,
                 occ_arm: float | None = 0.9):
        super().__init__(slo_prefill, slo_decode)
        self.capacity = sorted((float(r), float(c)) for r, c in (capacity or {}).items())
        if self.capacity and (len(self.capacity) < 2 or any(c <= 0 or not 0 <= r <= 1 for r, c in self.capacity)):
            raise BrownoutError("capacity needs positive token rates at two or more ratios in [0, 1]")
        # ratios and seconds per output token at saturation, for token_time (computed once, read every step)
        self._cap_r, self._cap_t = [r for r, _ in self.capacity], [1.0 / c for _, c in self.capacity]
        if not load_window > 0 or load_margin < 0:
            raise BrownoutError("need load_window > 0 and load_margin >= 0")
        if load_count < 2:
            raise BrownoutError("need load_count >= 2")
        self.load_window, self.load_margin, self.load_count = float(load_window), float(load_margin), int(load_count)
        if slots is not None and slots < 1 or not 0 < queue_eps < 1:
            raise BrownoutError("need slots >= 1 (or None) and 0 < queue_eps < 1")
        self.slots, self.queue_eps, self._slots_given = slots, float(queue_eps), slots is not None
        if not 0 < arm_hold <= 1:
            raise BrownoutError("need 0 < arm_hold <= 1")
        self.arm_hold = float(arm_hold)
        if occ_arm is not None and not 0 < occ_arm <= 1:
            raise BrownoutError("need 0 < occ_arm <= 1 (or None)")
        self.occ_arm = occ_arm
        self._arrivals = Window(load_window, maxlen=100_000)  # (time, output tokens), appended by the driver thread
        self._arr_lock = threading.Lock()
        if not 0 <= queue_lo < queue_hi:
            raise BrownoutError("need 0 <= queue_lo < queue_hi")
        self.queue_lo, self.queue_hi = queue_lo, queue_hi
        if isinstance(profile, LatencyProfile):
            profile = {k: profile for k in KINDS}
        self.profile = dict(profile) if profile else {}
        self.margin, self.hyst, self.max_fall, self.period = margin, hysteresis, max_fall, period
        self.beta_min, self.kappa_alpha, self.kappa_up, self.learn = beta_min, kappa_alpha, kappa_up, learn
        self.grid = [i / grid_steps for i in range(grid_steps + 1)]
        self.win = {k: Window(window, maxlen) for k in KINDS}
        self.reset()

    def reset(self) -> None:
        self.beta = {k: 1.0 for k in KINDS}
        self.kappa = {k: 1.0 for k in KINDS}
        self.n_obs = {k: 0 for k in KINDS}
        self.r = {k: 0.0 for k in KINDS}
        self.last: dict[str, float | None] = {k: None for k in KINDS}
        self.last_tokens = {k: 1 for k in KINDS}
        self.queue_floor = 0.0
        self.load_floor = 0.0
        self._armed_until = -math.inf
        self._arm_load = math.inf
        self.arm_events: deque[float] = deque(maxlen=256)  # when the load floor armed from unarmed (for logs)
        for w in self.win.values():
            w.clear()
        with self._arr_lock:
            self._arrivals.clear()
            self._first: float | None = None  # the first arrival since reset
            self._since_first = 0  # arrivals since reset

    def _observe_queue(self, age, waiting, now, running=None) -> None:
        slo = self.slo["prefill"]
        snap = self._snapshot(now) if self.capacity else None  # one snapshot of the arrivals for this step
        recent = self._read(snap, now) if snap is not None else None
        load = recent[0] / recent[3] if recent is not None else None  # offered output tokens/s
        if not waiting:
            self.queue_floor = 0.0
        elif recent is not None:
            self.queue_floor = self._backlog_floor(age, waiting, recent)
            if self.queue_floor > 0:  # a queue that ratio 0 would not reach in time arms the load floor
                self._arm(now, load)
        else:
            self.queue_floor = _clamp01((age / slo - self.queue_lo) / (self.queue_hi - self.queue_lo))
        if (recent is not None and self.occ_arm is not None and running is not None and self.slots
                and running >= self.occ_arm * self.slots and not math.isfinite(self._arm_load)
                and load * self._cap_t[0] > 1.0):
            # a nearly full batch under a load over ratio 0's rate: armed while that load lasts, with no minimum
            # hold (a full batch also comes from a noisy load read where ratio 0 holds; held 2 s there, it spent)
            self._arm(now, load, 0.0)
        if recent is not None:
            if self.queue_floor > 0:
                # a queue ratio 0 cannot reach in time: the rate has just risen, and `load_count` arrivals lag a
                # burst's onset by that many arrivals; the last quarter of them is read too, and the higher taken
                fast = self._read(snap, now, max(2, self.load_count // 4))
                if fast[2] and fast[0] / fast[3] > load:
                    recent = fast
            self.load_floor = self._load_floor(now, recent)

    def _observe_arrival(self, now, prompt_tokens, output_tokens) -> None:
        with self._arr_lock:
            self._arrivals.add(now, output_tokens)
            if self._first is None:
                self._first = now
            self._since_first += 1

    def _arm(self, now: float, load: float, hold_s: float | None = None) -> None:
        """Arm the load floor for `hold_s` (default `load_window`) s; `load` (output tokens/s) is what the hold
        compares against after."""
        if not math.isfinite(self._arm_load):
            self.arm_events.append(now)
        self._armed_until = max(self._armed_until, now + (self.load_window if hold_s is None else hold_s))
        self._arm_load = load

    def _recent(self, now: float, count: int | None = None) -> tuple[float, float, int, float]:
        """(output tokens, their sum of squares, requests, span in s) of the recent arrivals: the last `count`
        (default `load_count`) of those admitted in the last `load_window` s, over the time since the one before
        them, or, if that reads less, the whole window. The count follows a burst within `count` arrivals at any
        rate; the window keeps the estimate up for `load_window` s after the rate falls, so one quiet gap does not
        drop the ratio."""
        return self._read(self._snapshot(now), now, count)

    def _snapshot(self, now: float) -> list[tuple[float, float]]:
        """(time, output tokens) of the arrivals in the last `load_window` s, copied under the lock: the driver
        thread appends while the engine thread reads."""
        with self._arr_lock:
            self._arrivals.prune(now)
            return list(self._arrivals.buf)

    def _read(self, snap: list[tuple[float, float]], now: float, count: int | None = None) -> tuple:
        """`_recent` over a `_snapshot`: several reads of one step share one copy."""
        count = self.load_count if count is None else int(count)
        window = [t for _, t in snap]
        start = snap[-count - 1][0] if len(window) > count else None
        # once `count` arrivals have come since `reset`, the window reaches back no further than the first of them:
        # for `load_window` s after a start the load would read low by the share of the window before it (a run that
        # starts loaded read 72% of its Poisson rate 1.6 s in, under ratio 0's rate, and the floor let go). Over
        # that shorter span the first arrival only marks its start. With fewer arrivals the short span reads high
        # too often (on an 8-slot engine such reads armed the floor before a burst where ratio 0 held)
        recent, span = window, self.load_window
        if (self._first is not None and now - self._first < self.load_window and window
                and self._since_first >= count):
            recent, span = window[1:], max(now - self._first, 1e-3)
        if start is not None:
            last, last_span = window[-count:], max(now - start, 1e-3)
            if sum(last) / last_span >= sum(recent) / span:  # the count reads more: take it
                recent, span = last, last_span
        return float(sum(recent)), float(sum(t * t for t in recent)), len(recent), span

    def offered_load(self, now: float) -> float:
        """Output tokens per second asked for by the recently admitted requests (see `_recent`)."""
        tokens, _, _, span = self._recent(now)
        return tokens / span

    def mean_output(self, now: float) -> float:
        """Mean output tokens asked for by the recently admitted requests (1 if none came)."""
        tokens, _, n, _ = self._recent(now)
        return tokens / n if n else 1.0

    def _backlog_floor(self, age: float, waiting: int, recent: tuple) -> float:
        """The smallest ratio at which the queue is predicted to reach its first tokens within the TTFT budget.

        With the batch full, a slot frees as a running request ends, i.e. every s(r) = L x token_time(r) seconds on
        average for a mean output of L tokens. The oldest waiting request (age a) then starts after half such an
        interval on average (the residual of evenly spread departures), the k-th after k - 1/2 of them; the last,
        of `waiting`, has an age of about 0. Ages in between are spread between these, so the two ends bound the
        queue: max(a + s(r) / 2, (waiting - 1/2) x s(r)) <= SLO x (1 - margin)."""
        budget = self.slo["prefill"] * (1 - self.margin)
        tokens, _, n, _ = recent  # `_recent`'s snapshot
        per_req = tokens / n if n else 1.0
        for r in self.grid:
            s = per_req * self.token_time(r)
            if max(age + 0.5 * s, (waiting - 0.5) * s) <= budget:
                return r
        return 1.0

    def token_time(self, r: float) -> float:
        """Seconds per output token at saturation at ratio r (linear in r between the measured ratios)."""
        i, j, a = _bracket(self._cap_r, r)
        return (1 - a) * self._cap_t[i] + a * self._cap_t[j]

    def bind(self, max_batch: int) -> None:
        if not self._slots_given and max_batch and max_batch > 0:
            self.slots = int(max_batch)

    def late_share(self, r: float, lam: float, mean_out: float, cs2: float) -> float:
        """Predicted share of arrivals whose wait for a batch slot leaves too little of the TTFT budget, at ratio r.

        The batch is `slots` servers; a request holds one for L steps of a full batch, D = L x slots x
        token_time(r) s. An M/M/c queue (Erlang C) offered lam x D erlangs gives P(wait > x) =
        C x exp(-(c/D - lam) x); the exponent is divided by (1 + cs2) / 2 (Allen-Cunneen: Poisson arrivals, service
        times of squared variation cs2, the output lengths'), and x is the TTFT budget less one full step, the
        prompt's own. 1 where the queue is unstable or one step alone spends the budget."""
        t = self.token_time(r)
        if lam * mean_out * t * (1 + self.load_margin) >= 1.0:
            return 1.0
        c = self.slots
        step = c * t
        x = self.slo["prefill"] * (1 - self.margin) - step
        if x <= 0:
            return 1.0
        d = mean_out * step
        return erlang_c(c, lam * d) * math.exp(-(c / d - lam) * x * 2.0 / (1.0 + cs2))

    def _load_floor(self, now: float, recent: tuple) -> float:
        """While armed, the smallest grid ratio whose saturated token rate carries the offered load with
        `load_margin` and, once the batch size is known (`slots`, from the server's `bind`), whose predicted late
        share (`late_share`) is at most `queue_eps`; 0 while not armed.

        A queue that ratio 0 would not reach in time (a backlog floor above 0) arms the floor for `load_window` s,
        and for as long after as the offered load stays at or above `arm_hold` x the load at which that queue formed
        or ratio 0's saturated rate, whichever is lower (a noisy high read at arming must not disarm the floor while
        ratio 0 still cannot carry the load): the engine has shown where its ratio-0 capacity ends, so the floor
        holds while the load does, and the ratio does not fall back to 0 for the queue to form again. Unarmed it
        spends nothing, because both models are bounds that can overstate the need: the saturated rates are measured
        with a full batch and a queue (on an H200 they understated what ratio 0 served by over 20%), and M/M/c waits
        more often than a batch of similar-length requests does."""
        tokens, sq, n, span = recent  # `_recent`'s snapshot
        if n == 0 or tokens <= 0:
            return 0.0
        lam, mean_out = n / span, tokens / n
        # held while the load stays near the one that made the queue, or above what ratio 0 carries at all (its
        # measured saturated rate): a load over it keeps the floor armed however high the sample at arming read
        hold = (min(self.arm_hold * self._arm_load, 1.0 / self._cap_t[0]) if math.isfinite(self._arm_load)
                else math.inf)  # unarmed until a queue arms it
        if now >= self._armed_until and lam * mean_out < hold:
            self._arm_load = math.inf  # disarmed: only the next queue arms it again
            return 0.0
        cs2 = max(0.0, sq / n / (mean_out * mean_out) - 1.0)
        if not self.slots:
            need = lam * mean_out * (1 + self.load_margin)
            return next((r for r in self.grid if need * self.token_time(r) <= 1.0), 1.0)
        ok = lambda r: self.late_share(r, lam, mean_out, cs2) <= self.queue_eps  # noqa: E731
        if self._cap_t[-1] <= self._cap_t[0]:  # brownout is faster: the share falls with r, bisect the grid
            lo, hi = 0, len(self.grid) - 1
            if not ok(self.grid[hi]):
                return 1.0
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if ok(self.grid[mid]) else (mid + 1, hi)
            return self.grid[lo]
        return next((r for r in self.grid if ok(r)), 1.0)

    def _observe(self, kind, latency, now, tokens, ratio, step_s) -> None:
        self.win[kind].add(now, latency)
        prof = self.profile.get(kind)
        r_used = self.r[kind] if ratio is None else ratio
        if prof is not None and tokens > 0:
            if step_s is not None and self.learn:
                prof.update(tokens, r_used, step_s)
            pred = prof.predict(tokens, r_used)
            # kappa: SLO latency per profiled forward time. For prefill the SLO latency includes queueing, which is
            # the outer loop's business: only decode learns kappa from latency; prefill learns it from step time.
            obs = latency if kind == "decode" else step_s
            if pred > 0 and obs is not None:
                k_obs = min(10.0, max(0.1, obs / pred))
                if self.n_obs[kind] == 0:  # the first observation sets kappa; later ones average in
                    self.kappa[kind] = k_obs
                else:  # rise fast (a slow step is a miss in the making), fall slowly
                    a = self.kappa_up if k_obs > self.kappa[kind] else self.kappa_alpha
                    self.kappa[kind] += a * (k_obs - self.kappa[kind])
                self.n_obs[kind] += 1
        if tokens > 0:
            self.last_tokens[kind] = tokens
        last = self.last[kind]
        if last is None:
            self.last[kind] = now
        elif now - last >= self.period:
            self.last[kind] = now
            p90 = self.win[kind].quantile(now, 0.9)
            slo = self.slo[kind]
            if not math.isnan(p90):
                if p90 > slo * (1 - self.margin / 2):
                    self.beta[kind] = max(self.beta_min, self.beta[kind] * 0.85)
                elif p90 < slo * (1 - 2 * self.margin):
                    self.beta[kind] = min(1.0, self.beta[kind] + 0.05)

    def _ratio(self, kind, now, tokens) -> float:
        tokens = self.last_tokens[kind] if tokens is None or tokens <= 0 else int(tokens)
        prof = self.profile.get(kind)
        budget = self.beta[kind] * self.slo[kind] * (1 - self.margin)
        cur = self.r[kind]
        if prof is None:  # no model: the outer loop alone drives the ratio
            want = _clamp01((1.0 - self.beta[kind]) / max(1e-9, 1.0 - self.beta_min))
        else:
            k = self.kappa[kind]
            preds = [k * prof.predict(tokens, r) for r in self.grid]
            fits = [r for r, p in zip(self.grid, preds) if p <= budget]
            if fits:
                want = fits[0]
            else:  # nothing fits: the fastest ratio, never one that is predicted slower than a smaller one
                best = min(preds)
                want = next(r for r, p in zip(self.grid, preds) if p <= best * 1.02)
            if want < cur:  # falling: demand the extra hysteresis margin, and fall gradually
                lower = cur
                for r in self.grid:
                    if r >= cur:
                        break
                    if k * prof.predict(tokens, r) <= budget * (1 - self.hyst):
                        lower = r
                        break
                want = max(lower, cur - self.max_fall)
        # while requests queue, every step delays them: with continuous batching a full batch frees slots only as
        # decode steps finish requests, so the floor holds for decode steps too
        want = max(want, self.queue_floor, self.load_floor)
        self.r[kind] = _clamp01(want)
        return self.r[kind]

    def snapshot(self) -> dict:
        return {"name": self.name, "ratio": dict(self.r), "beta": dict(self.beta), "kappa": dict(self.kappa),
                "queue_floor": self.queue_floor, "load_floor": self.load_floor}


def make_controller(spec: str, slo_prefill: float, slo_decode: float, profile=None, capacity=None,
                    **kw) -> Controller:
    """'fixed:0.5' | 'salc' | 'salc:1.2' | 'pi' | 'mpc' -> a controller (profile and capacity only used by mpc;
    'mpc:noload' leaves the load term out even when a capacity is given)."""
    if spec.startswith("fixed"):
        _, _, v = spec.partition(":")
        return FixedRatio(float(v or 0), slo_prefill=slo_prefill, slo_decode=slo_decode)
    if spec == "salc" or spec.startswith("salc:"):  # salc:<interval s>: the paper's rule on a shorter clock
        _, _, v = spec.partition(":")
        if v:  # the window keeps the paper's 2 s : 5 s proportion to the interval
            kw = {"interval": float(v), "window": 0.4 * float(v), **kw}
        return SALC(slo_prefill, slo_decode, **kw)
    if spec == "pi":
        return PIController(slo_prefill, slo_decode, **kw)
    if spec in ("mpc", "mpc:noload"):
        c = ModelPredictive(slo_prefill, slo_decode, profile=profile,
                            capacity=capacity if spec == "mpc" else None, **kw)
        c.name = spec
        return c
    raise BrownoutError(f"unknown controller {spec!r}: fixed:<r> | salc[:<interval s>] | pi | mpc | mpc:noload")
