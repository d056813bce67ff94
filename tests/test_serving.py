"""runtime.serving: trace statistics (burstiness, the burst test's doubling, length presets, determinism, JSON round
trip), BrownoutServer end to end on a tiny CPU model (records, engine reuse, overload, timeouts, graph-safe mode),
service-rate calibration, and the benchmark scripts' helpers."""
import math
import time

import numpy as np
import pytest
import torch

from runtime.errors import BrownoutError
from runtime.serving import (SALC, BrownoutServer, FixedRatio, Request, ServeConfig, ServeResult, Trace, burst_test,
                             bursty, capacity, make_controller, measure_capacity, measure_saturation, poisson,
                             service_rate, summarize, timeline)
from runtime.serving.server import StepRecord
from runtime.serving.trace import sample_lengths


def test_poisson_rate_and_cv():
    tr = poisson(20.0, 200.0, seed=1)
    assert tr.rate(0, 200) == pytest.approx(20.0, rel=0.05)
    assert tr.interarrival_cv() == pytest.approx(1.0, abs=0.07)
    assert all(0 <= r.t < 200 for r in tr.requests)
    assert np.all(np.diff(tr.arrivals()) > 0)


def test_bursty_is_burstier_than_poisson():
    tr = bursty(10.0, 300.0, cv=2.0, burst_factor=4.0, burst_every=30.0, burst_len=5.0, seed=2)
    assert tr.interarrival_cv() > 1.5
    # burst phases run at several times the mean rate
    a = tr.arrivals()
    in_burst = (a >= 30) & ((a % 30) < 5)
    burst_rate = in_burst.sum() / (9 * 5)
    calm_rate = (~in_burst).sum() / (300 - 9 * 5)
    assert burst_rate > 2.5 * calm_rate


def test_burst_test_doubles_and_scales():
    tr = burst_test(8.0, duration_scale=1.0, seed=3)
    assert tr.meta["burst_at"] == 75.0 and tr.duration == 250.0
    before, after = tr.rate(0, 75), tr.rate(75, 250)
    assert after / before == pytest.approx(2.0, rel=0.12)
    small = burst_test(8.0, duration_scale=0.24, seed=3)
    assert small.duration == pytest.approx(60.0) and small.meta["burst_at"] == pytest.approx(18.0)
    assert max(small.arrivals()) < 60.0
    g = burst_test(8.0, duration_scale=1.0, cv=2.0, seed=3)
    assert g.interarrival_cv(0, 75) > 1.5


def test_determinism_and_roundtrip(tmp_path):
    a = burst_test(5.0, 0.24, lengths="mix", seed=7)
    b = burst_test(5.0, 0.24, lengths="mix", seed=7)
    c = burst_test(5.0, 0.24, lengths="mix", seed=8)
    key = lambda t: [(round(r.t, 6), r.prompt_len, r.output_len) for r in t.requests]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    p = a.save(tmp_path / "t.json")
    d = Trace.load(p)
    assert key(d) == key(a) and d.meta == a.meta
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError):
        Trace.load(tmp_path / "bad.json")


def test_bounded():
    tr = poisson(1000.0, 100.0, max_requests=500)
    assert len(tr) == 500
    with pytest.raises(ValueError):
        poisson(1.0, -1.0)
    with pytest.raises(ValueError):
        poisson(1.0, 10.0, max_requests=10**9)


def test_length_presets():
    rng = np.random.default_rng(0)
    ap, ao = sample_lengths(rng, 40000, "alpaca", 10**6, 10**6)
    sp, so = sample_lengths(rng, 40000, "sharegpt", 10**6, 10**6)
    assert sp.mean() / ap.mean() == pytest.approx(4.3, rel=0.1)
    assert so.mean() / ao.mean() == pytest.approx(13.7, rel=0.1)
    cp, co = sample_lengths(rng, 1000, "sharegpt", 256, 512)
    assert cp.max() <= 256 and co.max() <= 512 and cp.min() >= 2 and co.min() >= 1
    with pytest.raises(ValueError):
        sample_lengths(rng, 10, "nope")


# ----------------------------------------------------------------------------- end to end, tiny model on CPU
@pytest.fixture(scope="module")
def tiny_model():
    from eval.throttled_serving import tiny_model as build

    return build()


class Handle:
    """A stand-in for BrownoutMoE with the serving protocol: records every ratio and graph-safe switch it is given
    (`events`), and may fail on ratios above 0 (`fail_above_zero`) or refuse graph-safe mode (`refuse_graph_safe`)."""

    def __init__(self, model, graph_safe=False, fail_above_zero=False, refuse_graph_safe=False):
        self.model, self.graph_safe = model, graph_safe
        self.fail_above_zero, self.refuse_graph_safe = fail_above_zero, refuse_graph_safe
        self.events: list = []

    @property
    def ratios(self) -> list[float]:
        return [x for x in self.events if not isinstance(x, tuple)]

    def set_ratio(self, r: float) -> None:
        self.events.append(r)
        if self.fail_above_zero and r > 0:
            raise RuntimeError("runtime exploded")

    def set_graph_safe(self, on: bool) -> None:
        if self.refuse_graph_safe and on:
            raise BrownoutError("graph-safe mode needs a backend that reads the ratio from device memory")
        self.events.append(("graph_safe", on))
        self.graph_safe = on


def _trace(spec):
    return Trace([Request(i, t, p, o) for i, (t, p, o) in enumerate(spec)], {"kind": "test"})


def _cfg(**kw):
    base = dict(num_blocks=64, page_size=32, max_batch_tokens=128, max_memory_percent=None, drain_timeout_s=60.0)
    base.update(kw)
    return ServeConfig(**base)


def test_serve_records_complete(tiny_model):
    h = Handle(tiny_model)
    ctl = SALC(0.25, 0.15, interval=0.05, window=0.05)
    tr = _trace([(0.0, 5, 4), (0.01, 12, 6), (0.02, 3, 1), (0.05, 20, 5), (0.1, 7, 3)])
    res = BrownoutServer(h, ctl, _cfg()).run(tr)
    assert res.errors == []
    for r in res.requests:
        assert r.status == "ok", r
        assert len(r.token_times) == r.output_len
        assert r.token_times[0] >= r.arrival and all(b >= a for a, b in zip(r.token_times, r.token_times[1:]))
    assert sum(s.prefill_tokens for s in res.steps) == sum(r.prompt_len for r in tr.requests)
    assert any(s.decode_tokens > 0 and s.prefill_tokens == 0 for s in res.steps)
    assert all(0.0 <= s.ratio <= 1.0 and s.step_s > 0 for s in res.steps)
    calls = h.ratios
    assert calls and calls[0] == 0.0 and calls[-1] == 0.0  # reset to 0 before and after the run
    assert h.events == calls  # graphs off: graph-safe mode untouched
    m = summarize(res, 1e6, 1e6)
    assert m["violation_all"] == 0.0 and m["status"] == {"ok": 5}
    assert m["ttft"]["p50"] > 0 and m["tpot"]["p99"] >= m["tpot"]["p50"]
    m0 = summarize(res, 0.0, 0.0)  # impossible SLOs: every token misses
    assert m0["violation_prefill"] == 1.0 and m0["violation_decode"] == 1.0
    tl = timeline(res, 0.5)
    assert len(tl["t"]) == len(tl["ratio"]) and sum(tl["arrivals_per_s"]) * 0.5 == pytest.approx(5)
    # the batch per step, binned: never more than the requests of the run, and some step ran each request
    busy = [n for n in tl["running"] if n is not None]
    assert busy and max(busy) <= 5 and min(busy) >= 1


def test_the_controller_sees_each_steps_batch_size(tiny_model):
    """Before every step the server tells the controller the queue and how many requests the step runs: what the
    MPC's nearly-full-batch arming reads (one step per observe_queue, the size matching the step record)."""
    seen = []

    class Spy(FixedRatio):
        def _observe_queue(self, age, waiting, now, running=None):
            seen.append(running)

    tr = _trace([(0.0, 5, 4), (0.0, 6, 4), (0.01, 3, 3)])
    res = BrownoutServer(Handle(tiny_model), Spy(0.0), _cfg(max_batch=2)).run(tr)
    assert res.errors == [] and len(seen) == len(res.steps)
    assert seen == [s.requests for s in res.steps] and max(seen) == 2 and min(seen) >= 1


def test_compile_asks_transformers_for_its_compile_path(tiny_model):
    """`ServeConfig(compile=True)` hands transformers' engine its own default compile (level 1), which resolves
    to a compile config of the varlen path; off, the engine compiles nothing. Only the engine's configuration is
    checked here (compiling a model is minutes of CPU; the tiny smoke run of eval/robustness.py does that)."""
    h = Handle(tiny_model)
    on = BrownoutServer(h, None, _cfg(compile=True))._manager()
    off = BrownoutServer(h, None, _cfg())._manager()
    try:
        assert on.continuous_batching_config.varlen_compile_config is not None  # resolved when the engine is made
        assert off.continuous_batching_config.varlen_compile_config is None
    finally:
        for m in (on, off):
            m.destroy()
    assert h.events == []  # on the CPU, compile leaves the handle's mode alone (no graph-safe switch)


def test_engine_is_kept_between_runs(tiny_model):
    """Inside `with server:` one engine serves several runs (the bench relies on it to capture CUDA graphs once):
    each run's records are complete, its controller is the one passed, and the engine stops at exit."""
    h = Handle(tiny_model)
    tr = _trace([(0.0, 5, 4), (0.01, 9, 3), (0.03, 4, 2)])
    with BrownoutServer(h, None, _cfg()) as srv:
        mgr = srv._mgr
        a = srv.run(tr, controller=FixedRatio(0.5))
        b = srv.run(tr, controller=FixedRatio(1.0))
        assert srv._mgr is mgr and mgr.is_running()
    assert not mgr.is_running() and srv._mgr is None
    for res, r in ((a, 0.5), (b, 1.0)):
        assert res.errors == [] and [q.status for q in res.requests] == ["ok"] * 3
        assert [len(q.token_times) for q in res.requests] == [4, 3, 2]
        assert {s.ratio for s in res.steps} == {r}
    assert 0.5 in h.ratios and 1.0 in h.ratios and h.ratios[-1] == 0.0


def test_engine_recovers_after_cancelling_a_full_cache(tiny_model):
    """A run that fills a small cache and ends with its requests cancelled must not leave the kept engine unable to
    schedule (transformers' scheduler stays closed after offloading until a request *finishes*;
    BrownoutServer._reopen_admission clears it when nothing is active): every next run is served."""
    cfg = _cfg(num_blocks=16, drain_timeout_s=0.3)
    full = _trace([(0.0005 * i, 24, 200) for i in range(48)])
    small = _trace([(0.01 * i, 6, 3) for i in range(5)])
    with BrownoutServer(Handle(tiny_model), None, cfg) as srv:
        for _ in range(3):
            srv.cfg = cfg
            a = srv.run(full)
            assert "timeout" in [r.status for r in a.requests]  # the scenario: cancellations happened
            srv.cfg = _cfg(num_blocks=16, drain_timeout_s=20.0)
            b = srv.run(small)
            assert [r.status for r in b.requests] == ["ok"] * 5, [r.status for r in b.requests]


def test_overload_rejects_cleanly(tiny_model):
    """40 requests at once, a queue of 4 and a batch of 2: the excess is rejected at once, the rest is served."""
    # all at t = 0: spread over 40 ms, as this test first had it, the engine drained a varying share meanwhile
    # (28 rejected on one CI run)
    tr = _trace([(0.0, 8, 3) for i in range(40)])
    t = time.time()
    res = BrownoutServer(Handle(tiny_model), FixedRatio(0.5), _cfg(max_batch=2, max_queue=4)).run(tr)
    assert time.time() - t < 90
    st = [r.status for r in res.requests]
    assert set(st) <= {"ok", "rejected"} and st.count("rejected") >= 30 and st.count("ok") >= 4
    for r in res.requests:
        assert len(r.token_times) == (r.output_len if r.status == "ok" else 0)
    m = summarize(res, 1e6, 1e6)  # rejected requests' tokens count as misses even with infinite SLOs
    assert m["violation_all"] == pytest.approx(st.count("rejected") / 40)
    assert m["mean_ratio_time"] == pytest.approx(0.5)


def test_timeouts_and_engine_failure_do_not_hang(tiny_model):
    tr = _trace([(0.0, 4, 900), (0.0, 4, 900), (0.3, 4, 2)])
    res = BrownoutServer(Handle(tiny_model), None, _cfg(request_timeout_s=0.5, queue_timeout_s=0.5)).run(tr)
    st = [r.status for r in res.requests]
    assert st[:2] == ["timeout", "timeout"] and st[2] in ("ok", "timeout")
    assert 0 < len(res.requests[0].token_times) < 900

    tr = _trace([(0.0, 4, 5), (0.0, 4, 5), (0.5, 4, 5)])
    t = time.time()
    res = BrownoutServer(Handle(tiny_model, fail_above_zero=True), FixedRatio(1.0), _cfg()).run(tr)
    assert time.time() - t < 60
    assert all(r.status in ("failed", "rejected") for r in res.requests), [r.status for r in res.requests]


def test_default_cache_on_the_cpu_is_sized_for_the_batch(tiny_model):
    """With `num_blocks` None on the CPU, transformers would allocate a share of the machine's RAM as KV cache; the
    server asks for room for the batch instead (16 MB here), so the run is served without the process growing."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    res = BrownoutServer(Handle(tiny_model), None, ServeConfig(page_size=32, max_batch_tokens=128)).run(
        _trace([(0.0, 5, 3), (0.01, 6, 2)]))
    assert res.errors == [] and [q.status for q in res.requests] == ["ok", "ok"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024


def test_server_takes_a_handle_not_a_model(tiny_model):
    with pytest.raises(BrownoutError, match="BrownoutMoE handle"):
        BrownoutServer(tiny_model, FixedRatio(0.0), _cfg())


@pytest.mark.parametrize("before", [False, True])
def test_cuda_graphs_switch_the_handle_to_graph_safe_mode_by_themselves(tiny_model, before):
    """With `use_cuda_graph=True` the server puts the handle in graph-safe mode before the engine starts (before any
    ratio reaches the model) and puts back the mode it found when the engine stops; no call by the user. (On the
    CPU transformers then serves without graphs; the switch does not depend on that.)"""
    h = Handle(tiny_model, graph_safe=before)
    tr = _trace([(0.0, 5, 3), (0.01, 6, 2)])
    with BrownoutServer(h, FixedRatio(0.5), _cfg(use_cuda_graph=True)) as srv:
        assert h.graph_safe is True and h.events == [("graph_safe", True), 0.0]
        a = srv.run(tr)
        b = srv.run(tr)
        assert h.graph_safe is True  # one switch for every run of the engine
    for res in (a, b):
        assert res.errors == [] and [q.status for q in res.requests] == ["ok", "ok"]
    assert {s.ratio for s in a.steps} == {0.5} and 0.5 in h.ratios
    assert [e for e in h.events if isinstance(e, tuple)] == [("graph_safe", True), ("graph_safe", before)]
    assert h.events[-1] == ("graph_safe", before) and h.graph_safe is before
    # a bare run starts and stops its own engine: the same switch around it
    h.events.clear()
    res = BrownoutServer(h, FixedRatio(1.0), _cfg(use_cuda_graph=True)).run(tr)
    assert res.errors == [] and h.events[0] == ("graph_safe", True) and h.events[-1] == ("graph_safe", before)
    assert 1.0 in h.ratios


def test_cuda_graphs_with_a_handle_that_cannot_follow_the_ratio_start_nothing(tiny_model):
    """Where graph-safe mode is refused (or the handle has no such mode), starting with graphs on fails with a
    one-line BrownoutError before any engine exists, instead of serving a ratio frozen into the graphs."""
    h = Handle(tiny_model, refuse_graph_safe=True)
    srv = BrownoutServer(h, FixedRatio(1.0), _cfg(use_cuda_graph=True))
    with pytest.raises(BrownoutError) as e:
        srv.run(_trace([(0.0, 5, 3)]))
    assert "\n" not in str(e.value) and srv._mgr is None and h.events == [] and h.graph_safe is False

    class RatioOnly:
        model = tiny_model
        set_ratio = staticmethod(lambda r: None)

    srv = BrownoutServer(RatioOnly(), None, _cfg(use_cuda_graph=True))
    with pytest.raises(BrownoutError, match="set_graph_safe"):
        srv.start()
    assert srv._mgr is None
    BrownoutServer(RatioOnly(), None, _cfg()).run(_trace([(0.0, 5, 2)]))  # graphs off: no graph-safe mode needed


def test_real_handle_refuses_graphs_on_the_cpu(tiny_dir, tmp_path):
    """A BrownoutMoE on the CPU cannot follow the ratio from device memory: the server's start fails with its
    one-line BrownoutError (raised by set_graph_safe, before transformers' engine is created)."""
    from conftest import FAMILIES, load
    from runtime import BrownoutMoE
    from unify.build import BuildOptions, build

    family = "qwen2_moe" if "qwen2_moe" in FAMILIES else FAMILIES[0]
    model = load(tiny_dir(family))
    out = build(tiny_dir(family), BuildOptions(out=str(tmp_path / "u"), way=2, grouping="consecutive",
                                               merge="average", progress=False, skip_layers=[]))
    bm = BrownoutMoE.attach(model, out)
    srv = BrownoutServer(bm, None, _cfg(use_cuda_graph=True))
    with pytest.raises(BrownoutError) as e:
        srv.start()
    assert "\n" not in str(e.value) and srv._mgr is None and bm.graph_safe is False


def test_async_batching_on_the_cpu_fails_before_any_engine(tiny_model):
    """transformers overlaps async steps on CUDA streams: on the CPU the server refuses in one line, starting
    nothing and leaving the handle as it was."""
    h = Handle(tiny_model)
    srv = BrownoutServer(h, FixedRatio(1.0), _cfg(async_batching=True))
    with pytest.raises(BrownoutError, match="async_batching") as e:
        srv.run(_trace([(0.0, 5, 3)]))
    assert "\n" not in str(e.value) and srv._mgr is None and h.events == []


def test_the_hook_reads_the_batch_of_either_io_layout():
    """Synchronous batching keeps the batch on the IO object; async batching on the current one of two IO pairs."""
    from types import SimpleNamespace as NS

    from runtime.serving.engine_steps import scheduled_requests

    assert scheduled_requests(NS(requests_in_batch=["a", "b"])) == ["a", "b"]
    pairs = [NS(host_io=NS(requests_in_batch=["p0"])), NS(host_io=NS(requests_in_batch=["p1"]))]
    assert scheduled_requests(NS(io_pairs=pairs, current_pair=1)) == ["p1"]
    assert scheduled_requests(NS(io_pairs=pairs, current_pair=0)) == ["p0"]


def test_steps_in_flight_come_back_in_order_once_done():
    """Async steps are timed by a start and an end event on the compute stream. `done` returns the finished steps
    oldest first with their GPU time (start to end, ms -> s), and stops at the first one not finished: a later step
    cannot be reported before an earlier one."""
    from runtime.serving.engine_steps import StepsInFlight

    class Ev:
        made: list = []

        def __init__(self):
            self.at, self.passed = None, False
            Ev.made.append(self)

        def record(self, stream):
            assert stream == "compute"
            self.at = 10.0 * len(Ev.made)  # ms on a fake GPU clock

        def query(self):
            return self.passed

        def elapsed_time(self, end):
            return end.at - self.at

    f = StepsInFlight("compute", Ev)
    for name in "abc":
        f.launched(f.begin(), name)
    assert f.done() == [] and len(f) == 3
    ends = Ev.made[1::2]
    ends[1].passed = True  # b's end passed but a's not (cannot happen on one stream): nothing is reported early
    assert f.done() == []
    ends[0].passed = True
    assert f.done() == [("a", 0.01), ("b", 0.01)] and len(f) == 1
    ends[2].passed = True
    assert f.done() == [("c", 0.01)] and f.done() == [] and len(f) == 0


# ----------------------------------------------------------------------------- service-rate calibration
def test_service_rate_counts_decode_tokens_over_the_window():
    steps = [StepRecord(t0=0.1 * i, t1=0.1 * i + 0.08, step_s=0.08, prefill_tokens=4 * (i == 0), decode_tokens=8,
                        requests=8, ratio=0.0) for i in range(20)]
    res = ServeResult([], steps, 2.0, {}, "fixed:0")
    r = service_rate(res, 0.5, 1.5, mean_out=4.0)  # steps starting at 0.5 .. 1.4: 10 steps over 0.98 s
    assert r["tok_s"] == pytest.approx(80 / 0.98) and r["req_s"] == pytest.approx(r["tok_s"] / 4)
    assert r["step_p50"] == pytest.approx(0.08) and r["batch_mean"] == 8
    assert r["step_share"] == pytest.approx(0.8 / 0.98)  # 10 steps of 80 ms in 0.98 s; the rest is host work
    assert r["step_mean"] == pytest.approx(0.08) and r["decode_share"] == 1.0
    assert math.isnan(service_rate(res, 5.0)["tok_s"])
    # one long step (a compile) moves the mean, not the median; steps that carry prefill rows lower the decode share
    steps[7] = StepRecord(t0=0.7, t1=1.5, step_s=0.8, prefill_tokens=0, decode_tokens=8, requests=8, ratio=0.0)
    steps[8] = StepRecord(t0=0.8, t1=0.88, step_s=0.08, prefill_tokens=64, decode_tokens=4, requests=8, ratio=0.0)
    r = service_rate(res, 0.5, 1.5)
    assert r["step_p50"] == pytest.approx(0.08) and r["step_mean"] == pytest.approx((9 * 0.08 + 0.8) / 10)
    assert r["decode_share"] == pytest.approx(76 / 80)


def test_measure_capacity_on_the_engine():
    """On the throttled engine (each step sleeps 30 ms x (1 - 0.6 ratio)), ratio 1 serves more tokens per second
    than ratio 0; the driver settings are put back after the measurement, the engine keeps serving."""
    from eval.throttled_serving import Throttled, tiny_model as build

    h = Throttled(build(), 30.0, 0.6)
    cfg = _cfg(max_batch=8)
    with BrownoutServer(h, None, cfg) as srv:
        sat = measure_saturation(srv, 0.0, seconds=1.5, max_prompt=8, max_output=16)
        assert srv.cfg is cfg
        assert set(sat) >= {"tok_s", "req_s", "step_p50", "batch_mean", "dry_steps"} and 0 <= sat["dry_steps"] <= 1
        assert sat["batch_mean"] > 4  # the batch was kept (nearly) full
        cap = measure_capacity(srv, repeats=1, seconds=1.5, max_prompt=8, max_output=16)  # the median: below
        assert set(cap) == {0.0, 1.0} and cap[1.0] > 1.3 * cap[0.0] > 0
        ctl = make_controller("mpc", 0.25, 0.1, capacity=cap)
        assert ctl.token_time(1.0) < ctl.token_time(0.0)
        res = srv.run(_trace([(0.0, 5, 3)]))
        assert [q.status for q in res.requests] == ["ok"]
    with pytest.raises(BrownoutError):
        measure_saturation(srv, 0.0, seconds=0)


def test_saturation_doubles_the_rate_while_the_queue_runs_dry():
    """A queue that ran dry on more than DRY_SHARE of the window's steps understates the rate: the run is repeated at
    twice the arrival rate, at most MAX_DOUBLINGS times; the figure comes from the last run and names its rate."""
    from runtime.serving import calibration
    from runtime.serving.server import ServeResult, StepRecord

    class Fake:  # an engine whose queue stays full only from `full_at` req/s offered
        def __init__(self, full_at):
            self.cfg, self.full_at, self.rates = ServeConfig(max_batch=8), full_at, []

        def run(self, trace, controller=None):
            rate = len(trace.requests) / 2.0  # arrivals per s of the 2 s Poisson trace
            self.rates.append(rate)
            waiting = 4 if rate >= self.full_at else 0
            steps = [StepRecord(0.1 * i, 0.1 * i + 0.1, 0.1, 0, 8, 8, 0.0, waiting) for i in range(20)]
            return ServeResult([], steps, 2.0, {}, "fixed")

    for full_at, runs in ((7.0, 1), (28.0, 3), (1e9, 1 + calibration.MAX_DOUBLINGS)):  # offered ~10, 20, 40 req/s
        eng = Fake(full_at)
        sat = measure_saturation(eng, 0.0, seconds=2.0, rate=10.0, max_prompt=8, max_output=16)
        assert len(eng.rates) == runs and sat["rate"] == 10.0 * 2 ** (runs - 1)
        assert sat["dry_steps"] == (0.0 if full_at < 1e9 else 1.0)
        assert eng.cfg == ServeConfig(max_batch=8)  # the driver settings are put back


def test_capacity_is_the_median_of_interleaved_runs():
    """measure_capacity first makes WARM_RUNS run(s) it throws away, then keeps, per ratio, the run of median rate
    out of REPEATS, the ratios interleaved and each run on another saturation trace; every kept run's rate is
    listed. repeats < 1 and warm_runs < 0 are refused."""
    from runtime.serving import calibration, median_saturation
    from runtime.serving.server import ServeResult, StepRecord

    class Fake:  # decode tokens per step: a per-run sequence, whatever the ratio
        def __init__(self, per_step):
            self.cfg, self.per_step, self.calls = ServeConfig(max_batch=8), list(per_step), []

        def run(self, trace, controller=None):
            self.calls.append((controller.r, trace.requests[0].prompt_len, trace.requests[1].t))
            d = self.per_step.pop(0)
            steps = [StepRecord(0.1 * i, 0.1 * i + 0.1, 0.1, 0, d, 8, controller.r, 4) for i in range(20)]
            return ServeResult([], steps, 2.0, {}, "fixed")

    assert calibration.REPEATS == 3 and calibration.WARM_RUNS == 1
    eng = Fake([1, 8, 4, 2, 5, 6, 3])  # a warm run (1, not kept); ratio 0 gets 8, 2, 6 tokens per step; 1 gets 4, 5, 3
    cap = measure_capacity(eng, seconds=2.0, rate=10.0, max_prompt=8, max_output=16)
    assert [c[0] for c in eng.calls] == [0.0] + [0.0, 1.0] * 3  # the warm run, then interleaved
    assert len({c[1:] for c in eng.calls[:1] + eng.calls[1::2]}) == 4  # the warm run's and ratio 0's: all differ
    assert cap == {0.0: pytest.approx(6 / 0.1), 1.0: pytest.approx(4 / 0.1)}  # 20 steps in 2 s: tokens/step x 10
    m = median_saturation(Fake([8, 4, 2, 5]), repeats=2, warm_runs=0, seconds=2.0, rate=10.0, max_prompt=8,
                          max_output=16)
    assert m[0.0]["tok_s"] == pytest.approx(20.0) and m[1.0]["tok_s"] == pytest.approx(40.0)  # the lower median
    assert m[0.0]["runs"] == pytest.approx([4 * m[0.0]["req_s"], m[0.0]["req_s"]])  # 80 and 20 tokens/s, in order
    assert m[0.0]["step_p50_runs"] == pytest.approx([0.1, 0.1])  # each kept run's step time beside its rate
    with pytest.raises(BrownoutError):
        median_saturation(Fake([]), repeats=0)
    with pytest.raises(BrownoutError):
        median_saturation(Fake([]), warm_runs=-1)


def test_capacity_interpolation():
    assert capacity([(1, 0.99), (2, 0.95), (4, 0.8)]) == pytest.approx(2 + 2 * (0.05 / 0.15))
    assert capacity([(1, 0.5), (2, 0.4)]) is None
    assert capacity([(1, 0.99), (2, 0.95)]) == 2
    assert math.isclose(capacity([(2, 0.95), (1, 0.99), (3, 0.85)]), 2.5)


def test_capacities_use_bisection_points():
    """eval/bench_serving.py --bisect: points between the grid rates sharpen the capacity, and a capacity is a lower
    bound only when the highest grid rate itself passed (not when the last point appended, a bisection, did)."""
    from eval.bench_serving import capacities

    def run(rate, pre, dec, bis=False):
        r = {"rate": rate, "all": {"attainment": 1 - dec, "violation_prefill": pre, "violation_decode": dec}}
        return {**r, "bisection": True} if bis else r

    p = {"rates": [10.0, 20.0], "runs": {
        "a": [run(10, 0.0, 0.0), run(20, 0.5, 0.0), run(15, 0.0, 0.0, True), run(17.5, 0.3, 0.0, True)],
        "b": [run(10, 0.0, 0.0), run(20, 0.0, 0.0)]}}
    cp = capacities(p)["first and later tokens each"]
    # between 15 (100%) and 17.5 (70%): 15 + 2.5 * (1.0 - 0.9) / (1.0 - 0.7)
    assert cp["capacity"]["a"] == pytest.approx(15 + 2.5 / 3)
    assert cp["lower_bound"] == {"a": False, "b": True}
    assert capacities(p)["all tokens"]["lower_bound"]["a"] is True  # all decode tokens in SLO up to 20


def test_uniform_routing_replaces_the_routers_choice():
    """The serving benchmark's `--routing uniform`: every router still runs, but its top-k becomes k distinct
    uniform-random experts per token with weights summing to 1, and the model runs on them."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from eval.bench_serving import distinct_experts, uniform_routing

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                         shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    m = Qwen2MoeForCausalLM(cfg).eval()
    assert uniform_routing(m) == 2
    got = []
    m.model.layers[0].mlp.gate.register_forward_hook(lambda mod, i, o: got.append(o))
    with torch.no_grad():
        m(input_ids=torch.randint(1, 64, (1, 200)), use_cache=False)
    _, w, idx = got[0]
    assert idx.shape == (200, 4) and int(idx.min()) >= 0 and int(idx.max()) < 16
    assert all(len(set(row.tolist())) == 4 for row in idx)
    assert torch.allclose(w.float().sum(-1), torch.ones(200), atol=1e-3)
    counts = torch.bincount(idx.flatten(), minlength=16).float()
    assert counts.min() > 0.4 * counts.mean()  # spread over every expert
    assert distinct_experts(m, 64, 64) == [16, 16]


def test_controller_uses_brownout_on_the_real_engine():
    """eval/throttled_serving.py: transformers' continuous batching on the CPU, each step sleeping 30 ms x
    (1 - 0.6 ratio). After the burst, ratio 0 is overloaded (1.4x its measured capacity) and its first tokens queue; our controller must keep
    most of them within the SLO by raising the ratio, without pinning it at 1, and stay at 0 before the burst.
    Outputs of 30 tokens fill the batch with decode steps: a controller that raises the ratio only on steps carrying
    prompts let 55-62% of first tokens miss here."""
    from eval.throttled_serving import run

    # the rate after the burst is 1.4x ratio 0's saturated rate measured on this host: a fixed rate sat at ratio 0's
    # capacity on one CI machine (49% of first tokens late) and far above it on another (93%)
    doc = run(["fixed:0", "mpc"], duration_scale=0.05, log=lambda *_: None, load=1.4)
    f0, mpc = doc["burst"]["runs"]
    assert f0["errors"] == [] and mpc["errors"] == []
    assert f0["after"]["violation_prefill"] > 0.45  # the scenario really overloads ratio 0
    assert mpc["after"]["violation_prefill"] < min(0.3, 0.5 * f0["after"]["violation_prefill"])
    assert 0.02 < mpc["all"]["mean_ratio_time"] < 0.6
    assert mpc["before"]["violation_prefill"] < 0.05 and mpc["before"]["mean_ratio_time"] < 0.05


def test_ramp_and_spike_traces():
    from runtime.serving import ramp, spike

    r = ramp(2.0, 20.0, 60.0, seed=3)
    assert r.rate(0, 10) == pytest.approx(3.5, rel=0.35) and r.rate(50, 60) == pytest.approx(18.5, rel=0.2)
    assert r.meta["kind"] == "ramp" and r.duration == 60.0
    s = spike(4.0, 5.0, 80.0, at=20.0, length=20.0, seed=3)
    assert s.rate(20, 40) == pytest.approx(20.0, rel=0.15) and s.rate(40, 80) == pytest.approx(4.0, rel=0.25)
    assert ramp(2.0, 20.0, 60.0, seed=3).arrivals().tolist() == r.arrivals().tolist()  # seeded
    for bad in (lambda: ramp(0.0, 1.0, 10.0), lambda: spike(1.0, 2.0, 10.0, at=11.0, length=1.0),
                lambda: spike(1.0, 2.0, 10.0, at=1.0, length=0.0)):
        with pytest.raises(BrownoutError):
            bad()


def test_bench_serving_calibrates_on_the_median_of_repeated_runs(monkeypatch):
    """eval/bench_serving.py's calibration takes `--sat-repeats` saturation runs per ratio and keeps the median
    (`median_saturation`, as the library's measure_capacity), so mu0 / mu1 and the burst rates come from it."""
    from types import SimpleNamespace

    from eval import bench_serving as bs

    seen = {}

    def fake_median(srv, ratios, repeats, **kw):
        seen["repeats"], seen["ratios"] = repeats, tuple(ratios)
        return {0.0: {"req_s": 40.0, "tok_s": 400.0, "runs": [38.0, 40.0, 45.0][:repeats]},
                1.0: {"req_s": 60.0, "tok_s": 600.0, "runs": [60.0, 55.0, 61.0][:repeats]}}

    monkeypatch.setattr(bs, "median_saturation", fake_median)
    monkeypatch.setattr(bs, "serve", lambda *a, **k: None)
    monkeypatch.setattr(bs, "summarize", lambda *a, **k: {"ttft": {"p90": 0.1}, "tpot": {"p90": 0.02}, "status": {}})
    a = SimpleNamespace(sat_repeats=3, sat_seconds=1.0, sat_queue=16, sat_rate=120.0, lengths="alpaca", max_prompt=8,
                        max_output=8, base_seconds=1.0, slo_prefill=None, slo_decode=None, slo_factor=2.0)
    cal = bs.calibrate(SimpleNamespace(cfg=None), a, scfg="scfg")
    assert seen == {"repeats": 3, "ratios": (0.0, 1.0)}
    assert cal["mu0"] == 40.0 and cal["mu1"] == 60.0 and cal["sat_r0"]["runs"] == [38.0, 40.0, 45.0]
    assert cal["burst_rate"] == pytest.approx(1.25 * 40.0)  # (1 + 60/40) / 2 x mu0
    with pytest.raises(SystemExit):
        bs.main(["--sat-repeats", "0"])


def test_a_held_queue_admits_in_trace_order(tiny_model):
    """full_queue="hold" on the real engine: a burst far over its rate is served as a prefix of the trace (held at
    the door in order), the rest turned away once the last arrival time has passed; a bad value is refused."""
    tr = _trace([(0.002 * i, 8, 3) for i in range(150)])  # 500 req/s for 0.3 s
    res = BrownoutServer(Handle(tiny_model), FixedRatio(0.0), _cfg(max_batch=2, max_queue=2, full_queue="hold")).run(tr)
    ok = [r.rid for r in res.requests if r.status == "ok"]
    assert set(r.status for r in res.requests) <= {"ok", "rejected"}
    assert ok == list(range(len(ok))) and 2 <= len(ok) < 150
    with pytest.raises(BrownoutError, match="full_queue"):
        BrownoutServer(Handle(tiny_model), FixedRatio(0.0), _cfg(full_queue="drop")).run(tr)
