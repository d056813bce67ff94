"""The simulated continuous-batching engine (eval/sim_serving.py): its step semantics on hand-checkable traces,
conservation of requests, the bounded queue and the drain deadline, saturation on it, and the robustness matrix
run through it (`--engine sim`)."""
import json

import numpy as np
import pytest

from eval import robustness, sim_serving
from runtime.serving import (FixedRatio, LatencyProfile, Request, ServeConfig, Trace, measure_capacity,
                             measure_saturation, poisson)
from runtime.serving.server import OK, REJECTED, TIMEOUT


def _flat(step_s: float, gap_s: float = 0.0, gain: float = 0.0) -> sim_serving.StepModel:
    prof = LatencyProfile([1, 1024], [0.0, 1.0], [[step_s, step_s * (1 - gain)], [step_s, step_s * (1 - gain)]])
    return sim_serving.StepModel(prof, 0.0, gap_s)


def test_one_request_step_by_step():
    """A 3-token prompt and 4 output tokens on 10 ms steps with 2 ms between them: the first token at the end of the
    prefill step, then one per step; the controller sees the arrival, the queue before each step and the step."""
    seen = []

    class Spy(FixedRatio):
        def _observe(self, kind, latency, now, tokens, ratio, step_s):
            seen.append((kind, round(latency, 6), tokens))

    srv = sim_serving.SimServer(_flat(0.010, 0.002), ServeConfig(max_batch=4, max_batch_tokens=64))
    res = srv.run(Trace([Request(0, 0.5, 3, 4)], {}), controller=Spy(0.0))
    rec = res.requests[0]
    assert rec.status == OK and rec.token_times == pytest.approx([0.51, 0.522, 0.534, 0.546])
    assert [(s.prefill_tokens, s.decode_tokens) for s in res.steps] == [(3, 0), (0, 1), (0, 1), (0, 1)]
    assert seen[0] == ("prefill", 0.01, 3) and [k for k, *_ in seen[1:]] == ["decode"] * 3
    assert seen[1][1] == pytest.approx(0.012)  # the inter-token gap: a step and a host gap


def test_async_batching_hides_the_host_gap_and_reports_each_step_a_step_late():
    """The same request with async batching: the 2 ms host gap runs beside each 10 ms step (tokens 10 ms apart),
    and the controller hears of step k only after choosing step k + 1's ratio; a host slower than the GPU paces the
    steps instead."""
    events = []

    class Spy(FixedRatio):
        def _observe(self, kind, latency, now, tokens, ratio, step_s):
            events.append(("observe", kind, round(now, 6)))

        def _ratio(self, kind, now, tokens):
            events.append(("ratio", round(now, 6)))
            return 0.0

    cfg = ServeConfig(max_batch=4, max_batch_tokens=64, async_batching=True)
    res = sim_serving.SimServer(_flat(0.010, 0.002), cfg).run(Trace([Request(0, 0.5, 3, 4)], {}), controller=Spy())
    assert res.requests[0].token_times == pytest.approx([0.51, 0.52, 0.53, 0.54])
    steps = [e for e in events if e[0] == "ratio"]
    assert len(steps) == 4
    # step 0 (ends at 0.51) is observed after step 1's ratio is chosen, before step 2's; step 1 before step 3's; the
    # last two when the engine goes idle
    order = [e[:2] if e[0] == "observe" else ("ratio",) for e in events]
    assert order == [("ratio",), ("ratio",), ("observe", "prefill"), ("ratio",), ("observe", "decode"), ("ratio",),
                     ("observe", "decode"), ("observe", "decode")]
    assert [e[2] for e in events if e[0] == "observe"] == [0.51, 0.52, 0.53, 0.54]
    slow_host = sim_serving.SimServer(_flat(0.010, 0.015), cfg).run(Trace([Request(0, 0.5, 3, 4)], {}))
    assert slow_host.requests[0].token_times == pytest.approx([0.515, 0.53, 0.545, 0.56])


def test_slots_queue_and_chunked_prefill():
    """Two slots: a third request waits for a slot; a prompt larger than the step's token budget is prefilled in
    chunks and its first token comes out of the step that finishes it; every request ends with all its tokens."""
    srv = sim_serving.SimServer(_flat(0.010), ServeConfig(max_batch=2, max_batch_tokens=8))
    tr = Trace([Request(0, 0.0, 20, 2), Request(1, 0.0, 2, 2), Request(2, 0.0, 2, 2)], {})
    res = srv.run(tr, controller=FixedRatio(0.0))
    first = {r.rid: r.token_times[0] for r in res.requests}
    assert all(r.status == OK and len(r.token_times) == r.output_len for r in res.requests)
    assert first[0] == pytest.approx(0.03)  # 20 prompt tokens in chunks of 8, 8, 4
    assert first[1] == pytest.approx(0.03)  # admitted into the third step's last 4 tokens of budget
    assert first[2] > first[1] and max(s.requests for s in res.steps) <= 2
    assert [s.waiting for s in res.steps[:3]] == [2, 2, 1]  # no budget left, then no slot


def test_bounded_queue_and_drain_deadline():
    """Arrivals over `max_queue` waiting are rejected; what is left at the drain deadline times out; every request
    is answered one way or the other."""
    cfg = ServeConfig(max_batch=1, max_batch_tokens=16, max_queue=3, drain_timeout_s=0.05)
    srv = sim_serving.SimServer(_flat(0.010), cfg)
    res = srv.run(Trace([Request(i, 0.0, 1, 5) for i in range(8)], {}), controller=FixedRatio(0.0))
    status = [r.status for r in res.requests]
    assert status.count(REJECTED) == 5  # all arrive before the first step: 3 wait, 5 are turned away
    assert status.count(OK) >= 1 and status.count(TIMEOUT) >= 1
    assert set(status) <= {OK, REJECTED, TIMEOUT}


def test_saturation_on_the_sim_follows_the_law_and_jitter_is_seeded():
    """measure_capacity runs unchanged on the simulated engine: with steps of 10 ms x (1 - 0.5 ratio) and a full
    batch of 8 decoders, ratio 1 serves about twice ratio 0's tokens per second; the same seed gives the same run."""
    steps = sim_serving.law_step_model(10.0, 0.5)
    steps.jitter = 0.05
    cap = measure_capacity(sim_serving.SimServer(steps, ServeConfig(max_batch=8, max_batch_tokens=64)),
                           seconds=2.0, max_prompt=8, max_output=16)
    assert cap[1.0] / cap[0.0] == pytest.approx(2.0, rel=0.15) and cap[0.0] == pytest.approx(800.0, rel=0.2)
    tr = poisson(50.0, 1.0, seed=3, max_prompt=8, max_output=16)
    a, b = (sim_serving.SimServer(steps, ServeConfig(max_batch=8, max_batch_tokens=64), seed=5).run(tr)
            for _ in range(2))
    assert [s.step_s for s in a.steps] == [s.step_s for s in b.steps]


def test_h200_step_model_from_the_results_file():
    """The default step model reads the H200 bench_serving JSON: in-step and host times positive and a few ms."""
    m = sim_serving.h200_step_model()
    assert 0.001 < m.in_step_s < 0.02 and 0.001 < m.gap_s < 0.02
    assert m.profile.predict(64, 1.0) < m.profile.predict(64, 0.0)
    assert m.step_s(64, 0.0, np.random.default_rng(0)) == pytest.approx(m.profile.predict(64, 0.0) + m.in_step_s,
                                                                         rel=0.3)


def test_h200_step_model_from_a_robustness_file(tmp_path):
    """A robustness GPU JSON that saved its engine's profile gives the same step model as the bench_serving JSON with
    the same profile and saturated runs; one without a profile is refused in one line."""
    doc = json.loads(sim_serving.H200_PROFILE.read_text())
    cal = doc["calibration"]
    rob = {"engines": [{"profile": doc["profile"],
                        "calibration": {"saturation": {"0.0": cal["sat_r0"], "1.0": cal["sat_r1"]}}}]}
    (tmp_path / "r.json").write_text(json.dumps(rob))
    a, b = sim_serving.h200_step_model(), sim_serving.h200_step_model(tmp_path / "r.json")
    assert (a.in_step_s, a.gap_s, a.profile.lat) == (b.in_step_s, b.gap_s, b.profile.lat)
    del rob["engines"][0]["profile"]
    (tmp_path / "r.json").write_text(json.dumps(rob))
    with pytest.raises(ValueError, match="holds no step profile"):
        sim_serving.h200_step_model(tmp_path / "r.json")


def test_robustness_matrix_on_the_sim(tmp_path):
    """`python -m eval.robustness --engine sim` over two trace seeds: one section per seed, the summary over them,
    ours under a keyword variant recorded in the JSON."""
    robustness.main(["--engine", "sim", "--seeds", "0-1", "--traces", "burst2,spike", "--duration", "2",
                     "--drain-seconds", "1", "--mpc-kw", '{"occ_arm": null}', "--out", str(tmp_path), "--tag", "t"])
    doc = json.loads((tmp_path / "t.json").read_text())
    assert len(doc["engines"]) == 2 and doc["mpc_kw"] == {"occ_arm": None}
    assert all(set(e["traces"]) == {"burst2", "spike"} for e in doc["engines"])
    runs = doc["engines"][0]["traces"]["burst2"]["runs"]
    assert "timeline" not in runs["mpc"] and "verdict" in doc["engines"][0]["traces"]["burst2"]  # kept small
    md = (tmp_path / "t.md").read_text()
    assert "trace seed 1" in md and "## Over all runs above" in md and (tmp_path / "t.png").exists()
    assert doc["engines"][0]["calibration"]["saturation"]["1.0"]["full_queue"] == "hold"
    assert 'saturation runs held a full queue in trace order (`full_queue="hold"`)' in md
    with pytest.raises(SystemExit):
        robustness.main(["--engine", "throttled", "--seeds", "0-1"])
    for bad in (["--sat-repeats", "0"], ["--calibration-repeats", "2", "--repeat-sat-seconds", "x"]):
        with pytest.raises(SystemExit):
            robustness.main(["--engine", "sim"] + bad)


def test_trace_repeats_serve_the_same_trace_again(tmp_path):
    """--trace-repeats 3: fixed 1 and ours served twice more on the same trace, the matrix's run first in each list;
    with run jitter the runs differ, and the report lists each run's worst share and ours minus ratio 1 run by run.
    A config outside the matrix or fewer than one round is a one-line error."""
    robustness.main(["--engine", "sim", "--seeds", "0", "--traces", "burst2", "--duration", "2", "--drain-seconds",
                     "1", "--sim-run-jitter", "0.1", "--trace-repeats", "3", "--out", str(tmp_path), "--tag", "t"])
    t = json.loads((tmp_path / "t.json").read_text())["engines"][0]["traces"]["burst2"]
    reps = t["repeats"]
    assert set(reps) == {"fixed:1", "mpc"} and all(len(v) == 3 for v in reps.values())
    assert reps["mpc"][0]["all"] == t["runs"]["mpc"]["all"]  # the first is the matrix's own run
    assert len({json.dumps(r["all"]["ttft"]) for r in reps["fixed:1"]}) == 3  # three runs, not one copied
    md = (tmp_path / "t.md").read_text()
    assert "The same trace served again" in md and "| burst2 | ours - ratio 1, run by run | 3 |" in md
    for bad in (["--trace-repeats", "0"], ["--trace-repeats", "2", "--repeat-configs", "fixed:0.3"]):
        with pytest.raises(SystemExit):
            robustness.main(["--engine", "sim"] + bad)


def test_run_jitter_scales_whole_runs():
    """run_jitter: one speed factor per run on every step and gap (steps of a run all move together, runs differ,
    the same seed repeats them); run_jitter 0 draws nothing, so the per-step jitter sequence stays as it was."""
    tr = Trace([Request(i, 0.01 * i, 2, 6) for i in range(6)], {})
    cfg = ServeConfig(max_batch=8, max_batch_tokens=64)
    m = _flat(0.010, 0.002)
    m.run_jitter = 0.2
    runs = [[s.step_s for s in sim_serving.SimServer(m, cfg, seed=1).run(tr).steps] for _ in range(2)]
    srv = sim_serving.SimServer(m, cfg, seed=1)
    a, b = srv.run(tr), srv.run(tr)  # the first and second run of one engine
    assert runs[0] == runs[1] == [s.step_s for s in a.steps]  # reproducible from the seed
    fa, fb = a.steps[0].step_s / 0.010, b.steps[0].step_s / 0.010
    assert fa != pytest.approx(fb, rel=1e-3)  # runs differ
    assert all(s.step_s == pytest.approx(fa * 0.010) for s in a.steps)  # one factor for the whole run
    assert a.steps[1].t0 - a.steps[0].t1 == pytest.approx(fa * 0.002)  # the gap too
    j = _flat(0.010, 0.002)
    j.jitter = 0.05
    got = [s.step_s for s in sim_serving.SimServer(j, cfg, seed=3).run(tr).steps]
    rng = np.random.default_rng([3, 1])  # the first run's generator: its first draw goes to the first step
    assert got == pytest.approx([0.010 * float(np.exp(rng.normal(0.0, 0.05))) for _ in got])


def test_sim_like_replays_a_gpu_run(tmp_path):
    """--sim-like: the GPU run's calibration as is (trace rates, SLOs), the model's step times scaled to its
    saturated rates, and the report sets the GPU's figures beside the model's; a wrong use is one line."""
    gpu = robustness.RESULTS / "robustness_h200_occ_median_seed3.json"
    robustness.main(["--engine", "sim", "--sim-like", str(gpu), "--seed", "3", "--traces", "poisson", "--duration",
                     "2", "--drain-seconds", "1", "--out", str(tmp_path), "--tag", "t"])
    g = json.loads(gpu.read_text())["engines"][0]
    doc = json.loads((tmp_path / "t.json").read_text())["engines"][0]
    assert doc["calibration"]["mu0"] == g["calibration"]["mu0"] and doc["calibration"]["slo_prefill"] == \
        g["calibration"]["slo_prefill"]
    s0, s1 = doc["sim_like"]["scale"]
    assert 0.8 < s0 < 1.25 and 0.8 < s1 < 1.25 and s0 != s1  # the model's ~52 / 61 req/s against 50.2 / 60.4
    md = (tmp_path / "t.md").read_text()
    assert "The model against the GPU run it replays" in md
    assert "| poisson | fixed:0 | 70.0% / " in md  # the GPU's late first tokens after the change, then the model's
    for bad in (["--engine", "throttled", "--sim-like", str(gpu)], ["--engine", "sim", "--sim-like", str(tmp_path)]):
        with pytest.raises(SystemExit):
            robustness.main(bad)


def test_scaled_step_model():
    """StepModel.scale multiplies step and gap times at ratios 0 and 1, linearly between; the controller's profile
    of the scaled engine reads the same at the profile's grid points."""
    m = _flat(0.010, 0.002, gain=0.5)
    m.scale = (2.0, 1.0)
    rng = np.random.default_rng(0)
    assert m.step_s(8, 0.0, rng) == pytest.approx(0.020) and m.step_s(8, 1.0, rng) == pytest.approx(0.005)
    assert m.step_s(8, 0.5, rng) == pytest.approx(0.0075 * 1.5)
    prof = m.scaled_profile()  # scaled at its grid's ratios (0 and 1 here), linear between as any profile
    assert prof.predict(8, 0.0) == pytest.approx(0.020) and prof.predict(8, 1.0) == pytest.approx(0.005)
    res = sim_serving.SimServer(m, ServeConfig(max_batch=4, max_batch_tokens=64)).run(
        Trace([Request(0, 0.0, 3, 3)], {}), controller=FixedRatio(0.0))
    assert res.steps[1].t0 - res.steps[0].t1 == pytest.approx(0.004)  # the gap at ratio 0, doubled


def test_a_held_queue_serves_the_trace_in_order_and_turns_away_only_after_its_last_arrival():
    """full_queue="hold": arrivals that find max_queue waiting wait at the door in trace order, so what is served is
    a prefix of the trace, whatever the engine's speed; what is still at the door when the last arrival time has
    passed is rejected. "reject" (serving) turns the excess away as it comes, so the served set has gaps."""
    tr = Trace([Request(i, 0.001 * i, 2, 4) for i in range(200)], {})  # 1000 req/s, far over the engine's rate
    served = {}
    for mode in ("reject", "hold"):
        for step_s in (0.004, 0.006):
            cfg = ServeConfig(max_batch=2, max_batch_tokens=16, max_queue=3, drain_timeout_s=1.0, full_queue=mode)
            res = sim_serving.SimServer(_flat(step_s), cfg).run(tr, controller=FixedRatio(0.0))
            ok = [r.rid for r in res.requests if r.status == OK]
            assert set(r.status for r in res.requests) <= {OK, REJECTED}
            served[mode, step_s] = ok
    for step_s in (0.004, 0.006):
        ok = served["hold", step_s]
        assert ok == list(range(len(ok))) and 5 < len(ok) < 200  # a prefix, then the rest turned away
        assert served["reject", step_s] != list(range(len(served["reject", step_s])))  # gaps
    assert len(served["hold", 0.004]) > len(served["hold", 0.006])  # the faster engine reaches further


def test_saturation_runs_hold_the_queue_by_default():
    """The calibration's saturation runs admit in trace order (full_queue="hold") unless told otherwise, and say
    which admission they used."""
    steps = sim_serving.law_step_model(10.0, 0.5)
    srv = sim_serving.SimServer(steps, ServeConfig(max_batch=8, max_batch_tokens=64))
    held = measure_saturation(srv, 0.0, seconds=2.0, max_prompt=8, max_output=16)
    turned = measure_saturation(srv, 0.0, seconds=2.0, max_prompt=8, max_output=16, full_queue="reject")
    assert held["full_queue"] == "hold" and turned["full_queue"] == "reject"
    assert held["tok_s"] == pytest.approx(turned["tok_s"], rel=0.1)  # the same engine, the same rate
    assert srv.cfg == ServeConfig(max_batch=8, max_batch_tokens=64)  # the driver settings are put back
