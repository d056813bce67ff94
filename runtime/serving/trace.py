"""Request traces for serving runs: bursty, the paper's burst test, Poisson, a ramp, a spike. Seeded, bounded, saved
as JSON.

A trace is a list of requests (arrival time in seconds from the start, prompt length, output length) plus the
parameters that made it. Lengths come from a lognormal per preset:

    alpaca    short instructions: prompts ~20 tokens, outputs ~60 tokens (means, before capping)
    sharegpt  chat: prompts ~4.3x and outputs ~13.7x Alpaca's (the ratios the paper quotes), ~86 / ~822 tokens
    mix       half of each

Lengths are capped (`max_prompt`, `max_output`) so one request cannot blow a batch or a cache.

CLI:  python -m runtime.serving.trace burst --base-rate 4 --duration-scale 0.24 --lengths alpaca --out burst.json
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BrownoutError

MAX_REQUESTS = 100_000
MAX_DURATION = 24 * 3600.0

# (mean, sigma of the underlying normal) for prompt and output lengths
_ALPACA = {"prompt": (20.0, 0.8), "output": (60.0, 0.9)}
LENGTH_PRESETS = {
    "alpaca": _ALPACA,
    "sharegpt": {"prompt": (_ALPACA["prompt"][0] * 4.3, 1.0), "output": (_ALPACA["output"][0] * 13.7, 1.0)},
}


@dataclass
class Request:
    rid: int
    t: float  # arrival, seconds from the trace's start
    prompt_len: int
    output_len: int


@dataclass
class Trace:
    requests: list[Request]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return float(self.meta.get("duration", self.requests[-1].t if self.requests else 0.0))

    def arrivals(self) -> np.ndarray:
        return np.array([r.t for r in self.requests], dtype=np.float64)

    def rate(self, t0: float, t1: float) -> float:
        """Mean arrival rate (req/s) over [t0, t1)."""
        a = self.arrivals()
        return float(((a >= t0) & (a < t1)).sum() / max(1e-9, t1 - t0))

    def interarrival_cv(self, t0: float = 0.0, t1: float = math.inf) -> float:
        a = self.arrivals()
        a = a[(a >= t0) & (a < t1)]
        g = np.diff(a)
        return float(g.std() / g.mean()) if len(g) > 1 and g.mean() > 0 else float("nan")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": "brownout-trace/1", "meta": self.meta,
               "columns": ["t", "prompt_len", "output_len"],
               "requests": [[round(r.t, 6), r.prompt_len, r.output_len] for r in self.requests]}
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "brownout-trace/1":
            raise BrownoutError(f"{path}: not a brownout trace (format {doc.get('format')!r})")
        reqs = [Request(i, float(t), int(p), int(o)) for i, (t, p, o) in enumerate(doc["requests"])]
        return cls(reqs, doc.get("meta", {}))

    def scaled_lengths(self, prompt: float = 1.0, output: float = 1.0, max_prompt: int | None = None,
                       max_output: int | None = None) -> "Trace":
        """A copy with lengths multiplied (and re-capped), arrivals unchanged."""
        mp = max_prompt or 1 << 30
        mo = max_output or 1 << 30
        reqs = [Request(r.rid, r.t, max(1, min(mp, round(r.prompt_len * prompt))),
                        max(1, min(mo, round(r.output_len * output)))) for r in self.requests]
        return Trace(reqs, {**self.meta, "length_scale": [prompt, output]})


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int, lo: int, hi: int) -> np.ndarray:
    mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def sample_lengths(rng: np.random.Generator, n: int, preset: str = "alpaca", max_prompt: int = 1024,
                   max_output: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    if preset == "mix":
        a = sample_lengths(rng, n, "alpaca", max_prompt, max_output)
        s = sample_lengths(rng, n, "sharegpt", max_prompt, max_output)
        pick = rng.random(n) < 0.5
        return np.where(pick, s[0], a[0]), np.where(pick, s[1], a[1])
    if preset not in LENGTH_PRESETS:
        raise BrownoutError(f"unknown length preset {preset!r}: {', '.join([*LENGTH_PRESETS, 'mix'])}")
    p = LENGTH_PRESETS[preset]
    return (_lognormal(rng, *p["prompt"], n, 2, max_prompt), _lognormal(rng, *p["output"], n, 1, max_output))


def _check_bounds(duration: float, max_requests: int) -> None:
    if not (0 < duration <= MAX_DURATION):
        raise BrownoutError(f"duration must be in (0, {MAX_DURATION}] s")
    if not (0 < max_requests <= MAX_REQUESTS):
        raise BrownoutError(f"max_requests must be in (0, {MAX_REQUESTS}]")


def _arrivals(rng, rate_fn, duration: float, cv: float, max_requests: int) -> list[float]:
    """Renewal process with Gamma gaps of coefficient of variation `cv` (cv = 1: Poisson), at the rate rate_fn(t) in
    force when each gap starts. Stops at `duration` or `max_requests`."""
    shape = 1.0 / (cv * cv)
    t, out = 0.0, []
    # first arrival: a fresh gap from 0 would bias the start; draw it like any other gap
    while len(out) < max_requests:
        lam = rate_fn(t)
        if lam <= 0:
            raise BrownoutError("rate must be positive")
        t += rng.gamma(shape, 1.0 / (lam * shape))
        if t >= duration:
            break
        out.append(t)
    return out


def _build(rng, times: list[float], lengths: str, max_prompt: int, max_output: int, meta: dict) -> Trace:
    p, o = sample_lengths(rng, len(times), lengths, max_prompt, max_output)
    reqs = [Request(i, float(t), int(p[i]), int(o[i])) for i, t in enumerate(times)]
    meta = {**meta, "lengths": lengths, "max_prompt": max_prompt, "max_output": max_output, "n": len(reqs)}
    return Trace(reqs, meta)


def poisson(rate: float, duration: float, lengths: str = "alpaca", seed: int = 0, max_requests: int = 10_000,
            max_prompt: int = 1024, max_output: int = 1024) -> Trace:
    """Poisson arrivals at `rate` req/s for `duration` s."""
    _check_bounds(duration, max_requests)
    rng = np.random.default_rng(seed)
    times = _arrivals(rng, lambda t: rate, duration, 1.0, max_requests)
    return _build(rng, times, lengths, max_prompt, max_output,
                  {"kind": "poisson", "rate": rate, "duration": duration, "seed": seed})


def bursty(rate: float, duration: float, cv: float = 2.0, burst_factor: float = 4.0, burst_every: float = 30.0,
           burst_len: float = 5.0, lengths: str = "alpaca", seed: int = 0, max_requests: int = 10_000,
           max_prompt: int = 1024, max_output: int = 1024) -> Trace:
    """Gamma inter-arrival times (CV `cv` > 1: clumpier than Poisson) at `rate` req/s, plus burst phases of
    `burst_len` s every `burst_every` s (first one after `burst_every`) at `burst_factor` x the rate."""
    _check_bounds(duration, max_requests)
    if cv <= 0:
        raise BrownoutError("cv must be positive")
    rng = np.random.default_rng(seed)

    def rate_fn(t: float) -> float:
        in_burst = burst_every > 0 and t >= burst_every and (t % burst_every) < burst_len
        return rate * (burst_factor if in_burst else 1.0)

    times = _arrivals(rng, rate_fn, duration, cv, max_requests)
    return _build(rng, times, lengths, max_prompt, max_output,
                  {"kind": "bursty", "rate": rate, "duration": duration, "cv": cv, "burst_factor": burst_factor,
                   "burst_every": burst_every, "burst_len": burst_len, "seed": seed})


def burst_test(base_rate: float, duration_scale: float = 1.0, duration: float = 250.0, burst_at: float = 75.0,
               factor: float = 2.0, cv: float = 1.0, lengths: str = "alpaca", seed: int = 0,
               max_requests: int = 10_000, max_prompt: int = 1024, max_output: int = 1024) -> Trace:
    """The paper's burst test: a `duration` (250) s stream whose rate goes from `base_rate` to `factor` (2) x at
    `burst_at` (75) s. `duration_scale` compresses both times (0.24 -> 60 s with the burst at 18 s); cv = 1 is
    Poisson within each phase, cv > 1 adds Gamma clumping."""
    if duration_scale <= 0:
        raise BrownoutError("duration_scale must be positive")
    d, b = duration * duration_scale, burst_at * duration_scale
    _check_bounds(d, max_requests)
    rng = np.random.default_rng(seed)
    times = _arrivals(rng, lambda t: base_rate * (factor if t >= b else 1.0), d, cv, max_requests)
    return _build(rng, times, lengths, max_prompt, max_output,
                  {"kind": "burst_test", "base_rate": base_rate, "factor": factor, "duration": d, "burst_at": b,
                   "duration_scale": duration_scale, "cv": cv, "seed": seed})


def ramp(rate0: float, rate1: float, duration: float, lengths: str = "alpaca", seed: int = 0,
         max_requests: int = 10_000, max_prompt: int = 1024, max_output: int = 1024) -> Trace:
    """A slow ramp: Poisson arrivals whose rate moves linearly from `rate0` to `rate1` req/s over `duration` s."""
    _check_bounds(duration, max_requests)
    if not (rate0 > 0 and rate1 > 0):
        raise BrownoutError("ramp rates must be positive")
    rng = np.random.default_rng(seed)
    times = _arrivals(rng, lambda t: rate0 + (rate1 - rate0) * min(1.0, t / duration), duration, 1.0, max_requests)
    return _build(rng, times, lengths, max_prompt, max_output,
                  {"kind": "ramp", "rate0": rate0, "rate1": rate1, "duration": duration, "seed": seed})


def spike(base_rate: float, factor: float, duration: float, at: float, length: float, lengths: str = "alpaca",
          seed: int = 0, max_requests: int = 10_000, max_prompt: int = 1024, max_output: int = 1024) -> Trace:
    """A short spike: Poisson at `base_rate` req/s, `factor` x that for `length` s from `at` s."""
    _check_bounds(duration, max_requests)
    if not (base_rate > 0 and factor > 0 and length > 0 and 0 <= at < duration):
        raise BrownoutError("spike needs base_rate, factor, length > 0 and 0 <= at < duration")
    rng = np.random.default_rng(seed)
    times = _arrivals(rng, lambda t: base_rate * (factor if at <= t < at + length else 1.0), duration, 1.0,
                      max_requests)
    return _build(rng, times, lengths, max_prompt, max_output,
                  {"kind": "spike", "base_rate": base_rate, "factor": factor, "duration": duration, "at": at,
                   "length": length, "seed": seed})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["poisson", "bursty", "burst"])
    ap.add_argument("--rate", type=float, default=4.0, help="req/s (poisson, bursty)")
    ap.add_argument("--base-rate", type=float, default=4.0, help="req/s before the burst (burst)")
    ap.add_argument("--duration", type=float, default=60.0, help="s (poisson, bursty)")
    ap.add_argument("--duration-scale", type=float, default=1.0, help="burst: compress the 250 s stream")
    ap.add_argument("--cv", type=float, default=None)
    ap.add_argument("--lengths", default="alpaca", choices=[*LENGTH_PRESETS, "mix"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-requests", type=int, default=10_000)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.kind == "poisson":
        tr = poisson(a.rate, a.duration, a.lengths, a.seed, a.max_requests)
    elif a.kind == "bursty":
        tr = bursty(a.rate, a.duration, cv=a.cv or 2.0, lengths=a.lengths, seed=a.seed, max_requests=a.max_requests)
    else:
        tr = burst_test(a.base_rate, a.duration_scale, cv=a.cv or 1.0, lengths=a.lengths, seed=a.seed,
                        max_requests=a.max_requests)
    tr.save(a.out)
    print(f"{a.out}: {len(tr)} requests over {tr.duration:.1f} s, cv {tr.interarrival_cv():.2f}")


if __name__ == "__main__":
    main()
