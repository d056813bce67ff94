"""SLO controllers on synthetic latency sequences (steady, step, burst, noisy) against a simulated plant.

The plant: a step of n tokens at ratio r takes load(t) * (0.02 + 0.004 n) * (1 - 0.5 r) seconds (times noise); the
clock advances by each step's latency, so no test sleeps.
"""
import math
import random

import pytest

from runtime.serving.controller import (KINDS, SALC, FixedRatio, LatencyProfile, ModelPredictive, PIController,
                                make_controller, quantile)

SLO_P, SLO_D = 0.25, 0.15
SPEEDUP = 0.5


def plant(n, r, load=1.0):
    return load * (0.02 + 0.004 * n) * (1 - SPEEDUP * r)


def profile():
    toks, rats = [1, 8, 32, 64, 256], [0.0, 0.25, 0.5, 0.75, 1.0]
    return LatencyProfile(toks, rats, [[plant(n, r) for r in rats] for n in toks])


def controllers():
    return {
        "salc": SALC(SLO_P, SLO_D),
        "pi": PIController(SLO_P, SLO_D),
        "mpc": ModelPredictive(SLO_P, SLO_D, profile=profile()),
        "mpc-noprofile": ModelPredictive(SLO_P, SLO_D, profile=None),
    }


def simulate(ctl, load_fn, T=40.0, tokens_fn=lambda t: 32, noise=0.0, kind="decode", seed=0):
    rng = random.Random(seed)
    t, out = 0.0, []
    while t < T:
        n = tokens_fn(t)
        r = ctl.ratio(kind, t, n)
        assert 0.0 <= r <= 1.0
        lat = plant(n, r, load_fn(t)) * (math.exp(rng.gauss(0, noise)) if noise else 1.0)
        t += lat
        ctl.observe(kind, lat, t, n, r, lat)
        out.append((t, r, lat))
    return out


def changes(trace, t0):
    rs = [r for t, r, _ in trace if t >= t0]
    return sum(abs(a - b) > 1e-9 for a, b in zip(rs, rs[1:])), (max(rs) - min(rs)) if rs else 0.0


@pytest.mark.parametrize("name", list(controllers()))
def test_bounds_and_nan_safety(name):
    ctl = controllers()[name]
    rng = random.Random(1)
    t = 0.0
    bad = [float("nan"), float("inf"), -1.0, 1e9, 0.0, None]
    for i in range(3000):
        t += rng.random() * 0.05
        kind = KINDS[i % 2]
        lat = bad[i % len(bad)] if i % 7 == 0 else rng.expovariate(1 / 0.3)
        if lat is None:
            lat = float("nan")
        ctl.observe(kind, lat, t, rng.randrange(0, 4096), rng.random(), float("nan") if i % 5 == 0 else lat)
        r = ctl.ratio(kind, t, rng.randrange(0, 4096))
        assert 0.0 <= r <= 1.0 and not math.isnan(r)
    ctl.observe("decode", 0.1, float("nan"), 4)  # non-finite clock: ignored
    with pytest.raises(ValueError):
        ctl.ratio("bogus")
    ctl.reset()
    assert ctl.ratio("decode") == 0.0


@pytest.mark.parametrize("name", list(controllers()))
def test_light_steady_load_stays_off(name):
    """Latency well under the SLO (and the warning line) at r = 0: no brownout."""
    ctl = controllers()[name]
    tr = simulate(ctl, lambda t: 1.0, tokens_fn=lambda t: 16)
    assert max(r for _, r, _ in tr) == 0.0


@pytest.mark.parametrize("name", list(controllers()))
def test_heavy_steady_load_settles(name):
    """At 1.3x the SLO at r = 0 the controllers find a ratio that meets the SLO and stop moving."""
    ctl = controllers()[name]
    tr = simulate(ctl, lambda t: 1.3, T=60.0)
    n_changes, spread = changes(tr, 40.0)
    assert n_changes <= 2 and spread <= 0.11, (n_changes, spread)
    tail = [lat for t, _, lat in tr if t >= 40.0]
    assert quantile(tail, 0.9) <= SLO_D * 1.001
    assert tr[-1][1] > 0.0


@pytest.mark.parametrize("name", list(controllers()))
def test_noisy_steady_load_bounded_dither(name):
    ctl = controllers()[name]
    tr = simulate(ctl, lambda t: 1.3, T=60.0, noise=0.15, seed=3)
    rs = [r for t, r, _ in tr if t >= 30.0]
    mean = sum(rs) / len(rs)
    sd = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
    assert sd < 0.15, sd
    viol = sum(lat > SLO_D for t, _, lat in tr if t >= 30.0) / len(rs)
    assert viol < 0.2, viol


@pytest.mark.parametrize("name,reaction", [("salc", 5.0 + 2.0), ("pi", 1.0), ("mpc", 1.0), ("mpc-noprofile", 1.0)])
def test_burst_reaction(name, reaction):
    """Load jumps at t = 20 s: the ratio rises within one window (SALC: one check interval + its window)."""
    ctl = controllers()[name]
    tr = simulate(ctl, lambda t: 1.0 if t < 20.0 else 2.5, T=40.0, tokens_fn=lambda t: 16)
    before = [r for t, r, _ in tr if t < 20.0]
    assert max(before) == 0.0
    first = next(t for t, r, _ in tr if t >= 20.0 and r > 0.0)
    assert first - 20.0 <= reaction, first - 20.0


def test_step_in_batch_tokens_mpc_reacts_next_step():
    """The model-predictive controller sees a bigger batch coming and raises the ratio on that very step."""
    ctl = ModelPredictive(SLO_P, SLO_D, profile=profile())
    tr = simulate(ctl, lambda t: 1.0, T=20.0, tokens_fn=lambda t: 16 if t < 10.0 else 40)
    first_big = next(i for i, (t, _, _) in enumerate(tr) if t >= 10.0)
    assert tr[first_big + 1][1] > 0.0 or tr[first_big][1] > 0.0
    after = [lat for t, _, lat in tr if t >= 10.0]
    assert max(after) <= SLO_D  # no step misses: it predicted instead of reacting


def test_salc_rule_exact():
    """The paper's rule: t *= 0.8 above the SLO, t += 0.1 under the warning line, hold between; checks every 5 s."""
    c = SALC(SLO_P, SLO_D, interval=5.0, window=2.0)
    c.observe("decode", 0.2, 0.0)  # starts the clock
    for i in range(1, 50):
        c.observe("decode", 0.2, i * 0.1)  # 4.9 s: no check yet
    assert c.ratio("decode") == 0.0
    c.observe("decode", 0.2, 5.0)
    assert c.ratio("decode") == pytest.approx(0.2)
    assert c.ratio("prefill") == 0.0  # prefill window empty -> hold
    for i in range(51, 100):
        c.observe("decode", 0.13, i * 0.1)  # in the band [0.12, 0.15]
    c.observe("decode", 0.13, 10.0)
    assert c.ratio("decode") == pytest.approx(0.2)
    for i in range(101, 150):
        c.observe("decode", 0.05, i * 0.1)
    c.observe("decode", 0.05, 15.0)
    assert c.ratio("decode") == pytest.approx(0.1)


def test_separate_kinds_and_step_ratio():
    c = ModelPredictive(SLO_P, SLO_D, profile=profile())
    assert c.step_ratio(True, False, 0.0, 8) == c.ratio("prefill", 0.0, 8)
    # a huge step: decode budget (0.15) is tighter than prefill's (0.25)
    assert c.ratio("decode", 0.0, 40) > c.ratio("prefill", 0.0, 40)
    assert c.step_ratio(True, True, 0.0, 40) == max(c.ratio("prefill", 0.0, 40), c.ratio("decode", 0.0, 40))


def test_profile_interpolation_and_from_points():
    p = profile()
    assert p.predict(32, 0.5) == pytest.approx(plant(32, 0.5))
    assert plant(16, 0.0) * 0.9 < p.predict(16, 0.0) < plant(16, 0.0) * 1.1
    assert p.predict(512, 0.0) == pytest.approx(plant(256, 0.0) * 2)
    pts = [(n, r, plant(n, r)) for n in (1, 64) for r in (0.0, 1.0) for _ in range(3)]
    q = LatencyProfile.from_points(pts)
    assert q.tokens == [1, 64] and q.predict(64, 1.0) == pytest.approx(plant(64, 1.0))
    with pytest.raises(ValueError):
        LatencyProfile.from_points(pts, tokens=[1, 8, 64])


def test_make_controller():
    assert isinstance(make_controller("fixed:0.5", SLO_P, SLO_D), FixedRatio)
    assert make_controller("fixed:0.5", SLO_P, SLO_D).ratio("decode") == 0.5
    assert isinstance(make_controller("salc", SLO_P, SLO_D), SALC)
    fast = make_controller("salc:1.2", SLO_P, SLO_D)
    assert fast.interval == 1.2 and fast.win["decode"].window_s == pytest.approx(0.48)
    assert isinstance(make_controller("mpc", SLO_P, SLO_D, profile=profile()), ModelPredictive)
    with pytest.raises(ValueError):
        make_controller("nope", SLO_P, SLO_D)


def test_bounded_memory():
    c = SALC(SLO_P, SLO_D, maxlen=128, window=1e9)
    for i in range(10_000):
        c.observe("decode", 0.1, i * 1e-4)
    assert len(c.win["decode"]) == 128


def test_mpc_does_not_pay_for_nothing():
    """Where the profile says brownout is slower (launch-bound engine), overload must not push the ratio up."""
    toks, rats = [1, 64, 1024], [0.0, 0.5, 1.0]
    slower = LatencyProfile(toks, rats, [[0.05, 0.065, 0.06] for _ in toks])
    c = ModelPredictive(SLO_P, SLO_D, profile=slower)
    t = 0.0
    for _ in range(400):  # 0.2 s steps against a 0.15 s SLO: hopeless at any ratio
        r = c.ratio("decode", t, 64)
        assert r == 0.0
        t += 0.2
        c.observe("decode", 0.2, t, 64, r, 0.05)
    # and where r = 1 is the fastest but still misses, it takes r = 1
    faster = LatencyProfile(toks, rats, [[0.05, 0.045, 0.04] for _ in toks])
    c = ModelPredictive(SLO_P, SLO_D, profile=faster)
    c.observe("decode", 0.3, 0.1, 64, 0.0, 0.05)
    assert c.ratio("decode", 0.2, 64) >= 0.9  # the smallest ratio within 2% of the fastest


def test_mpc_queue_term_reacts_before_any_late_token():
    """A queue forming is seen on the step it forms: the prefill ratio rises with the head-of-line age, before a
    single TTFT over the SLO has been observed, and falls back gradually once the queue is gone. The paper's rule
    ignores the queue."""
    prof = LatencyProfile([1, 64, 512], [0.0, 1.0], [[0.010, 0.010], [0.020, 0.016], [0.040, 0.030]])
    c = ModelPredictive(0.25, 0.15, profile=prof)
    s = SALC(0.25, 0.15)
    t = 0.0
    for _ in range(50):  # calm: fast steps, no queue
        t += 0.02
        for ctl in (c, s):
            ctl.observe_queue(0.0, 0, t)
            ctl.observe("prefill", 0.03, t, 64, ctl.ratio("prefill"), 0.02)
    assert c.ratio("prefill", t, 64) == 0.0
    c.observe_queue(0.25 * 0.25, 3, t)  # at queue_lo: still nothing
    assert c.ratio("prefill", t, 64) == 0.0
    c.observe_queue(0.25 * 0.6, 12, t)  # at queue_hi: everything to the united experts at once
    assert c.ratio("prefill", t, 64) == 1.0
    assert c.ratio("decode", t, 64) == 1.0  # a full batch of decode steps holds the queue back too
    assert c.step_ratio(False, True, t, 64) == 1.0
    s.observe_queue(0.25 * 0.6, 12, t)
    assert s.ratio("prefill", t, 64) == 0.0
    rs = []
    for _ in range(12):  # queue drained: the ratio falls by at most max_fall per step (one ratio call), to 0
        t += 0.02
        c.observe_queue(0.0, 0, t)
        rs.append(c.ratio("prefill", t, 64))
        c.observe("prefill", 0.03, t, 64, rs[-1], 0.02)
    assert all(a - b <= c.max_fall + 1e-9 for a, b in zip([1.0] + rs, rs)) and rs[-1] == 0.0
    c.observe_queue(float("nan"), 5, t)  # ignored, no crash
    assert 0.0 <= c.ratio("prefill", t, 64) <= 1.0


def test_mpc_load_term_holds_the_ratio_the_offered_load_needs():
    """The load term: output tokens asked for by the recent requests against the engine's saturated token rates
    (here 1000 tok/s at r = 0, 2000 at r = 1). It is armed by a queue that ratio 0 would not reach in time: before
    one, it spends nothing, even over the measured r = 0 capacity (saturated rates can understate what ratio 0
    serves). Once armed at 1.5x, it is the smallest ratio whose capacity covers 1.5x with the 5% margin, and it
    holds while the load holds, with no queue at all (the queue-only controller fell back to 0 as soon as the queue
    drained, on the H100). It follows the load back down once the arrivals slow."""
    prof = LatencyProfile([1, 64], [0.0, 1.0], [[0.010, 0.010], [0.020, 0.016]])
    c = make_controller("mpc", 0.25, 0.15, profile=prof, capacity={0.0: 1000.0, 1.0: 2000.0})
    unarmed = make_controller("mpc", 0.25, 0.15, profile=prof, capacity={0.0: 1000.0, 1.0: 2000.0})
    noload = make_controller("mpc:noload", 0.25, 0.15, profile=prof, capacity={0.0: 1000.0, 1.0: 2000.0})
    assert c.name == "mpc" and noload.name == "mpc:noload" and noload.capacity == []
    # needed ratio for `rate` tok/s: token time 1/1000 - r * (1/1000 - 1/2000) <= 1 / (1.05 rate)
    need = lambda rate: max(0.0, min(1.0, (1e-3 - 1 / (1.05 * rate)) / 5e-4))  # noqa: E731
    t, rs, queued = 0.0, [], False
    for rate, seconds in ((800.0, 3.0), (1500.0, 4.0), (800.0, 4.0)):
        for _ in range(int(seconds * rate / 50)):  # requests of 50 output tokens, evenly spaced
            t += 50 / rate
            for ctl in (c, noload, unarmed):
                ctl.observe_arrival(t, 10, 50)
                ctl.observe_queue(0.0, 0, t)
            if rate == 1500.0 and not queued:  # one queue, 0.2 s old, 5 deep: ratio 0 would be late (0.225 s)
                queued = True
                for ctl in (c, noload):
                    ctl.observe_queue(0.2, 5, t)
                assert c.queue_floor > 0.0
                for ctl in (c, noload):
                    ctl.observe_queue(0.0, 0, t)  # drained at once
            rs.append((rate, t, c.ratio("decode", t, 64), noload.ratio("decode", t, 64),
                       unarmed.ratio("decode", t, 64)))
    calm = [r for rate, tt, r, _, _ in rs if rate == 800.0 and tt < 3.0]
    assert max(calm) == 0.0
    held = [r for rate, tt, r, _, _ in rs if rate == 1500.0 and 5.0 < tt <= 7.0]  # 2-4 s after the one queue
    # up to one grid step (0.05) above the exact need, plus one arrival's worth of window quantisation
    assert min(held) >= need(1500.0) - 1e-9 and max(held) <= need(1500.0) + 0.1
    assert max(n for rate, tt, _, n, _ in rs if rate == 1500.0 and tt > 3.5) == 0.0  # no load term: back to 0
    assert max(u for *_, u in rs) == 0.0  # never armed: nothing spent
    assert rs[-1][2] == 0.0  # back to 0 after the load fell
    assert c.offered_load(t) == pytest.approx(800.0, rel=0.05)
    # the driver thread appends arrivals while the engine thread reads: no error, bounded
    import threading

    def feed():
        for i in range(20_000):
            c.observe_arrival(t + i * 1e-5, 1, 1)

    th = threading.Thread(target=feed)
    th.start()
    for _ in range(2000):
        c.observe_queue(0.0, 0, t + 0.1)
        assert 0.0 <= c.ratio("decode", t + 0.1, 64) <= 1.0
    th.join()
    with pytest.raises(ValueError):
        make_controller("mpc", 0.25, 0.15, capacity={0.0: 1000.0})


def test_mpc_backlog_floor_is_the_smallest_ratio_that_reaches_the_queue_in_time():
    """With a capacity, the queue floor predicts: with the batch full a slot frees every s = L x token_time(r) s on
    average (L the mean output asked for), so the oldest waiting request (age a) starts after half a slot and the
    last of n after n - 1/2. The floor is the smallest grid ratio with max(a + s/2, (n - 1/2) s) <= TTFT SLO x
    (1 - margin); none waiting: 0."""
    cap = {0.0: 1000.0, 1.0: 2500.0}
    c = make_controller("mpc", 0.25, 0.15, capacity=cap)
    t = 0.0
    for _ in range(40):  # requests of 20 output tokens at 200 req/s: 4000 tok/s, over both capacities
        t += 0.005
        c.observe_arrival(t, 10, 20)
    assert c.mean_output(t) == pytest.approx(20.0)
    budget = 0.25 * (1 - c.margin)

    def expect(age, n):
        for r in c.grid:
            s = 20 * c.token_time(r)
            if max(age + 0.5 * s, (n - 0.5) * s) <= budget + 1e-12:
                return r
        return 1.0

    floors = []
    for age, n in ((0.0, 3), (0.05, 6), (0.15, 12), (0.2035, 4), (0.18, 20), (0.3, 2)):
        c.observe_queue(age, n, t)
        floors.append(c.queue_floor)
        assert c.queue_floor == expect(age, n)
    assert floors == pytest.approx([0.0, 0.0, 0.15, 0.2, 0.8, 1.0])  # worked by hand from the formula above
    assert floors == sorted(floors)
    assert c.ratio("decode", t, 64) >= c.queue_floor
    c.observe_queue(0.3, 0, t)  # nobody waits: no floor from the queue
    assert c.queue_floor == 0.0


def test_mpc_offered_load_right_after_a_start_is_not_diluted_by_the_empty_window():
    """A run that starts loaded: 1.5 s in, once `load_count` arrivals came, the load is read over the 1.5 s since the
    first arrival (which marks the start, its own tokens not counted), not over a 2 s window that reaches back before
    it (which reads 75%); with fewer arrivals, over the whole window still."""
    c = make_controller("mpc", 0.25, 0.15, capacity={0.0: 1000.0, 1.0: 2500.0}, load_count=16)
    t = 0.0
    for i in range(31):  # 20 req/s x 10 tokens from t = 0, checked at 0.5 s (10 arrivals) and at 1.5 s (30)
        if i == 10:
            assert c._recent(t)[3] == 2.0  # fewer than load_count: the whole window
        c.observe_arrival(t, 1, 10)
        t += 0.05
    assert c.offered_load(1.5) == pytest.approx(200.0, rel=0.05)
    c.reset()  # a new run: its own start
    c.observe_arrival(100.0, 1, 10)
    assert c.offered_load(101.0) == pytest.approx(5.0)  # one arrival, over the whole window


def test_mpc_offered_load_follows_a_burst_within_load_count_arrivals():
    """The offered load is taken over the last `load_count` arrivals (within `load_window`): after a step from 10 to
    40 req/s it reads the new rate once `load_count` arrivals of it came (0.8 s at 32), not a 2 s window later."""
    c = make_controller("mpc", 0.25, 0.15, capacity={0.0: 1000.0, 1.0: 2500.0})
    t = 0.0
    for _ in range(30):
        t += 0.1
        c.observe_arrival(t, 1, 10)
    assert c.offered_load(t) == pytest.approx(100.0, rel=0.05)
    for _ in range(32):
        t += 0.025
        c.observe_arrival(t, 1, 10)
    assert c.offered_load(t) == pytest.approx(400.0, rel=0.05)
    assert c.offered_load(t + 10.0) == 0.0  # all out of the window
    with pytest.raises(ValueError):
        make_controller("mpc", 0.25, 0.15, capacity={0.0: 1000.0, 1.0: 2500.0}, load_count=1)


def test_mpc_load_floor_reads_a_burst_onset_sooner_while_a_queue_stands():
    """With a queue that ratio 0 cannot reach in time, the load floor reads the last quarter of `load_count`
    arrivals too: 8 arrivals into a step from 4 to 16 req/s it already asks for more than the usual read alone would
    (which still mostly holds arrivals of the old rate); with no queue the floor stays unarmed at 0."""
    cap = {0.0: 200.0, 1.0: 500.0}  # tok/s; 25 tokens per request: ratio 0 carries 8 req/s, ratio 1 20 req/s
    c = make_controller("mpc", 0.16, 0.09, capacity=cap)
    c.bind(8)
    t = 0.0
    for _ in range(40):  # 4 req/s
        t += 0.25
        c.observe_arrival(t, 8, 25)
    for _ in range(8):  # then 16 req/s: 8 arrivals in
        t += 1 / 16
        c.observe_arrival(t, 8, 25)
    c.observe_queue(0.0, 0, t)
    assert c.load_floor == 0.0  # no queue: nothing armed
    slow = c._recent(t)
    assert slow[0] / slow[3] < 200.0  # the usual read (here the 2 s window: 15 arrivals) is under ratio 0's capacity
    c.observe_queue(0.12, 3, t)  # a queue ratio 0 would not reach in time
    fast = c._recent(t, 8)
    assert fast[0] / fast[3] == pytest.approx(16 * 25, rel=0.02)
    assert c.load_floor == c._load_floor(t, fast) > c._load_floor(t, slow)


def test_mpc_load_floor_stays_armed_while_ratio_0_cannot_carry_the_load():
    """Armed by a queue at a burst's peak, the floor stays armed after `load_window` s while the load is over ratio
    0's capacity, even when it reads under `arm_hold` x the peak; it disarms once the load is under that capacity."""
    cap = {0.0: 200.0, 1.0: 500.0}  # tok/s; 25 tokens per request: ratio 0 carries 8 req/s
    c = make_controller("mpc", 0.16, 0.09, capacity=cap)
    c.bind(8)
    t = 0.0
    for _ in range(64):  # a peak of 16 req/s (400 tok/s), and a queue ratio 0 would not reach in time
        t += 1 / 16
        c.observe_arrival(t, 8, 25)
    c.observe_queue(0.12, 3, t)
    assert c.load_floor > 0 and c._arm_load == pytest.approx(400.0, rel=0.05)
    c.observe_queue(0.12, 3, t + 0.01)  # a queue while armed re-arms: logged once
    assert list(c.arm_events) == [t]
    for _ in range(60):  # then 11 req/s (275 tok/s): under 0.9 x the peak, still over ratio 0's 200 tok/s
        t += 1 / 11
        c.observe_arrival(t, 8, 25)
        c.observe_queue(0.0, 0, t)
    assert t > c._armed_until and c.load_floor > 0  # past the 2 s window, still armed
    for _ in range(60):  # 6 req/s (150 tok/s): ratio 0 carries it, the floor disarms
        t += 1 / 6
        c.observe_arrival(t, 8, 25)
        c.observe_queue(0.0, 0, t)
    assert c.load_floor == 0.0


def test_mpc_nearly_full_batch_arms_the_load_floor_before_a_queue():
    """With no queue at all, a batch of at least `occ_arm` (0.9) x slots requests about to run arms the load floor
    while the offered load reads over ratio 0's saturated rate; under that rate, or with the batch emptier, or with
    occ_arm=None, nothing arms. The arming is logged once."""
    cap = {0.0: 200.0, 1.0: 500.0}  # tok/s; 25 tokens per request: ratio 0 carries 8 req/s
    for rate, running, occ, armed in ((12.0, 8, 0.9, True), (12.0, 7, 0.9, False), (6.0, 8, 0.9, False),
                                      (12.0, 8, None, False)):
        c = make_controller("mpc", 0.16, 0.09, capacity=cap, occ_arm=occ)
        c.bind(8)
        t = 0.0
        for _ in range(64):
            t += 1 / rate
            c.observe_arrival(t, 8, 25)
            c.observe_queue(0.0, 0, t, running)
        assert (c.load_floor > 0) == armed and len(c.arm_events) == int(armed)
        if armed:  # the floor carries the load: 300 tok/s needs more than ratio 0's 200
            assert c.ratio("decode", t, 8) >= c.load_floor and c.token_time(c.load_floor) * 300.0 < 1.0
    with pytest.raises(ValueError):
        make_controller("mpc", 0.16, 0.09, capacity=cap, occ_arm=1.5)


def test_erlang_c_and_the_queueing_floor():
    """Erlang C against closed forms (M/M/1: P(wait) = rho; M/M/2 at 1 erlang: 1/3), and the MPC's queueing model:
    once the server binds the batch size, the load floor keeps the predicted share of first tokens waiting past the
    TTFT budget under `queue_eps`, which takes more ratio than carrying the load alone (the 5%-margin rule)."""
    from runtime.serving.controller import erlang_c

    assert erlang_c(1, 0.7) == pytest.approx(0.7) and erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(8, 8.0) == 1.0 and erlang_c(8, 0.0) == 0.0
    assert erlang_c(64, 40.0) < erlang_c(64, 55.0) < erlang_c(64, 63.0) < 1.0
    cap = {0.0: 200.0, 1.0: 500.0}  # tok/s: a step of 8 at r = 0 takes 40 ms, at r = 1 16 ms
    plain = make_controller("mpc", 0.16, 0.09, capacity=cap)
    queued = make_controller("mpc", 0.16, 0.09, capacity=cap)
    queued.bind(8)
    assert queued.slots == 8 and plain.slots is None
    given = make_controller("mpc", 0.16, 0.09, capacity=cap, slots=4)
    given.bind(8)
    assert given.slots == 4  # an explicit batch size is kept
    t = 0.0
    for _ in range(64):  # 9 req/s of 25 tokens: 225 tok/s, over ratio 0's 200
        t += 1 / 9
        for c in (plain, queued):
            c.observe_arrival(t, 8, 25)
            c.observe_queue(0.0, 0, t)
    assert plain.load_floor == queued.load_floor == 0.0  # nobody waited yet: the floor is not armed
    for c in (plain, queued):
        c.observe_queue(0.01, 1, t)  # one request waits, but ratio 0 reaches it in time: still not armed
    assert plain.load_floor == queued.load_floor == 0.0
    for c in (plain, queued):
        c.observe_queue(0.12, 3, t)  # a queue ratio 0 would not reach in time: armed for load_window s
    assert 0.0 < plain.load_floor < queued.load_floor <= 1.0
    r = queued.load_floor
    tokens, _, n, span = queued._recent(t)
    lam = n / span
    assert tokens / n == 25.0 and lam == pytest.approx(9.0, rel=0.06)
    assert queued.late_share(r, lam, 25.0, 0.0) <= queued.queue_eps
    assert queued.late_share(r - 0.05, lam, 25.0, 0.0) > queued.queue_eps  # the smallest grid ratio that fits
    assert queued.late_share(0.0, lam, 25.0, 0.0) == 1.0  # over capacity: the queue grows without bound
