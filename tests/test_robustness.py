"""eval/robustness.py: the target's verdict, the trace matrix's rates and the report, on made-up runs (the engine
path itself is the production server, exercised by tests/test_serving.py)."""
import pytest

from eval.robustness import make_traces, markdown, plot, verdict


def m(pre, dec, ratio, late_all=None):
    late_all = max(pre, dec) if late_all is None else late_all
    pcts = {"p50": 0.1, "p90": 0.2, "p99": 0.3}
    return {"all": {"violation_prefill": pre, "violation_decode": dec, "mean_ratio_time": ratio,
                    "violation_all": late_all, "goodput_req_s": 1.0, "ttft": pcts, "tpot": pcts},
            "before": {"violation_prefill": 0.0, "violation_decode": 0.0},
            "after": {"violation_prefill": pre, "violation_decode": dec}}


def fixed(*late):
    return {f"fixed:{r:g}": m(x, 0.0, r) for r, x in zip((0.0, 0.25, 0.5, 0.75, 1.0), late)}


def test_verdict_where_a_fixed_ratio_holds():
    runs = fixed(0.6, 0.3, 0.04, 0.0, 0.0)  # 0.5 is the smallest that holds
    assert verdict({**runs, "mpc": m(0.03, 0.01, 0.58)}) | {} == {
        "case": "a fixed ratio holds", "smallest_holding": 0.5, "ours_worst": 0.03, "ours_mean_ratio": 0.58,
        "met": True}
    assert not verdict({**runs, "mpc": m(0.03, 0.0, 0.65)})["met"]  # more than 0.1 above 0.5
    assert not verdict({**runs, "mpc": m(0.01, 0.06, 0.3)})["met"]  # later tokens late: both kinds count


def test_verdict_where_none_holds():
    runs = fixed(0.9, 0.8, 0.6, 0.4, 0.2)
    v = verdict({**runs, "mpc": m(0.21, 0.0, 0.9)})
    assert v["case"] == "no fixed ratio holds" and v["met"]  # within 1 point of ratio 1
    assert not verdict({**runs, "mpc": m(0.25, 0.0, 0.9)})["met"]
    # the larger of the two kinds is compared, not the all-token share (which later tokens dominate)
    assert not verdict({**runs, "mpc": m(0.25, 0.0, 0.9, late_all=0.01)})["met"]
    assert verdict(runs) == {"status": "no run of ours"}


def test_trace_rates_follow_the_measured_service_rates():
    tr = make_traces(["burst2", "ramp", "spike", "poisson"], mu0=10.0, mu1=20.0, duration=200.0, seed=0,
                     lengths="alpaca", max_prompt=16, max_output=32)
    b, at = tr["burst2"]
    assert at == pytest.approx(60.0) and b.rate(0, at) == pytest.approx(6.0, rel=0.2)
    assert b.rate(at, 200) == pytest.approx(12.0, rel=0.15)
    r, at = tr["ramp"]  # 5 -> 20 req/s: passes mu0 = 10 at a third of the stream
    assert at == pytest.approx(200 / 3) and r.rate(180, 200) == pytest.approx(19.25, rel=0.2)
    s, at = tr["spike"]
    assert s.rate(at, at + 16) == pytest.approx(18.0, rel=0.25)
    p, _ = tr["poisson"]
    assert p.rate(0, 200) == pytest.approx(15.0, rel=0.1)
    with pytest.raises(SystemExit):
        make_traces(["nope"], 10.0, 20.0, 10.0, 0, "alpaca", 16, 32)


def test_compare_variants_are_checked_before_anything_runs(capsys):
    """`--compare` names same-process engine variants; a bad one (or one for an engine that cannot take it) stops
    the run at once with a one-line message, before a model is built."""
    from eval.robustness import OwnLeftAlone, compare_label, compare_ok, main

    from runtime.serving import ServeConfig

    assert all(compare_ok(w) for w in ("eager", "batching", "attention", "null", "leftalone", "kv:1024"))
    assert not any(compare_ok(w) for w in ("kv:N", "kv:", "kv:0", "kv:x", "fast"))
    main_cfg = ServeConfig(async_batching=True, attention="varlen")
    assert compare_label("kv:256", main_cfg) == "same engine with KV padding 256"
    assert compare_label("batching", main_cfg) == "same engine with synchronous batching"
    assert compare_label("attention", main_cfg) == "same engine with sdpa attention"
    assert compare_label("attention", ServeConfig()) == "same engine with varlen attention"
    assert "left-alone layers on the model's own" in compare_label("leftalone", main_cfg)

    class Handle:  # what `--compare leftalone` wraps: its server's graph-safe switch keeps the model's own there
        graph_safe, calls = False, []

        def set_graph_safe(self, on, left_alone="kernel"):
            self.calls.append((on, left_alone))

    h = OwnLeftAlone(Handle())
    h.set_graph_safe(True)
    h.set_graph_safe(False)
    assert h.calls == [(True, "own"), (False, "own")] and h.graph_safe is False
    for argv, msg in ((["--engine", "gpu", "--tiny", "--compare", "kv:x"], "--compare: unknown ['kv:x']"),
                      (["--compare", "null"], "are for --engine gpu"),
                      (["--engine", "gpu", "--tiny", "--async-batching"], "--async-batching needs CUDA"),
                      (["--engine", "throttled", "--async-batching"], "--async-batching is for --engine gpu")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_report_and_plot(tmp_path):
    runs = {**fixed(0.6, 0.3, 0.04, 0.0, 0.0), "salc": m(0.5, 0.0, 0.1), "mpc": m(0.03, 0.0, 0.55)}
    for r in runs.values():
        r["timeline"] = {}
    doc = {"device": "test engine", "duration": 10.0, "skipped": [],
           "calibration": {"mu0": 10.0, "mu1": 20.0, "slo_prefill": 0.2, "slo_decode": 0.1},
           "traces": {"burst2": {"runs": runs, "verdict": verdict(runs)}}}
    md = markdown([doc], "python -m eval.robustness")
    assert "Target met on 1 of 1 traces" in md and "| burst2 | mpc | 0.0% / 3.0% |" in md
    plot([doc], tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "| engine | req/s ratio 0 |" not in md  # no saturation records: no rates table
    sat = lambda req, share: {"req_s": req, "tok_s": 50 * req, "step_p50": 0.02, "step_share": share}  # noqa: E731
    doc["calibration"]["saturation"] = {"0.0": sat(10.0, 0.8), "1.0": sat(14.0, 0.75)}
    doc["eager_saturation"] = {"0.0": sat(8.0, 0.9), "1.0": sat(9.0, 0.9)}
    md = markdown([doc], "python -m eval.robustness --compile --eager-saturation")
    assert "| same engine without torch.compile | 8.00 | 9.00 | 1.12x |" in md  # a results file from before --compare
    doc["compare_saturation"] = {"batching": {"label": "same engine with async batching", **doc.pop("eager_saturation")}}
    md = markdown([doc], "python -m eval.robustness --compile --compare batching")
    assert "| same engine with async batching | 8.00 | 9.00 | 1.12x |" in md
    assert "| this engine | 10.00 | 14.00 | 1.40x | 20.0 / 20.0 | 500 / 700 | 80.0% / 75.0% |" in md
    # --compare reject: its row, then the holding runs it was interleaved with
    doc["compare_saturation"] = {"reject": {"label": "rejecting", "0.0": sat(6.0, 0.9), "1.0": sat(7.0, 0.9),
                                            "hold_interleaved": {"label": "holding, interleaved",
                                                                 "0.0": sat(10.0, 0.9), "1.0": sat(15.0, 0.9)}}}
    md = markdown([doc], "python -m eval.robustness --compile --compare reject")
    lines = md.splitlines()
    i = lines.index(next(ln for ln in lines if ln.startswith("| rejecting | 6.00 | 7.00 | 1.17x |")))
    assert lines[i + 1].startswith("| holding, interleaved | 10.00 | 15.00 | 1.50x |")


def test_admissions_are_interleaved_abba(monkeypatch):
    """`--compare reject`: both admissions on one engine, in ABBA order, repeat i on the same trace seed for both,
    after one warm run; the median run of each (admission, ratio) is kept."""
    import argparse

    import eval.robustness as rb

    calls = []

    def fake(srv, r, seed, full_queue, **kw):
        calls.append((full_queue, r, seed))
        rate = {"hold": 10.0, "reject": 5.0}[full_queue] * (1 + r) + seed % 3
        return {"tok_s": 50 * rate, "req_s": rate, "step_p50": 0.01, "step_mean": 0.011, "decode_share": 0.9}

    monkeypatch.setattr(rb, "measure_saturation", fake)
    args = argparse.Namespace(sat_repeats=3, sat_seconds=1.0, sat_queue=4, sat_rate=50.0, lengths="alpaca",
                              max_prompt=64, max_output=16)
    out = rb.interleaved_admissions(None, args)
    assert calls[0] == ("hold", 0.0, 10)  # the warm run
    order = [(fq, seed) for fq, r, seed in calls[1:] if r == 0.0]
    assert order == [("hold", 11), ("reject", 11), ("reject", 12), ("hold", 12), ("hold", 13), ("reject", 13)]
    assert len(calls) == 1 + 3 * 2 * 2
    # seeds 11, 12, 13 add 2, 0, 1: the median run is seed 13's
    assert out["hold"][0.0]["req_s"] == 11.0 and out["reject"][1.0]["req_s"] == 11.0
    assert out["hold"][1.0]["runs"] == [22.0, 20.0, 21.0]

    # compare_saturation("reject") runs them all on one engine, started once (outside `with`, every run of
    # `server.run` starts and stops an engine of its own: cold runs, a void comparison)

    class Srv:
        cfg, up, starts = None, False, 0

        def __enter__(self):
            self.up, self.starts = True, self.starts + 1
            return self

        def __exit__(self, *exc):
            self.up = False

    srv = Srv()
    seen = []
    monkeypatch.setattr(rb, "warm_up", lambda s, a: seen.append(s.up) or 1.0)
    monkeypatch.setattr(rb, "measure_saturation", lambda s, *a, **k: seen.append(s.up) or fake(s, *a, **k))
    row = rb.compare_saturation(srv, args, "reject")
    assert srv.starts == 1 and len(seen) == 2 + 12 and all(seen)
    assert row["0.0"]["req_s"] == out["reject"][0.0]["req_s"]
    assert row["hold_interleaved"]["1.0"]["req_s"] == out["hold"][1.0]["req_s"]


def test_tiny_engine_with_norms_and_rope_compiled(tmp_path):
    """The GPU engine's path end to end on its tiny CPU twin, with --compile-outside-experts (aot_eager) and the
    eager saturation measured first: the report names both, and the figures are real runs (numbers meaningless)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "eval.robustness", "--engine", "gpu", "--tiny", "--compile-outside-experts",
           "--compile-backend", "aot_eager", "--compare", "eager,null", "--traces", "spike", "--duration", "1.5",
           "--sat-seconds", "1", "--sat-repeats", "1", "--base-seconds", "1", "--drain-seconds", "3",
           "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--tag", "t"]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "compiled outside the experts: {'backend': 'aot_eager', 'norms': 9, 'rope_functions': 1}" in p.stdout
    doc = json.loads((tmp_path / "t.json").read_text())["engines"][0]
    assert "norms and rotary embedding compiled (aot_eager)" in doc["device"]
    cmp = doc["compare_saturation"]
    assert list(cmp) == ["eager", "null"]
    for sat in (cmp["eager"], cmp["null"], doc["calibration"]["saturation"]):
        assert sat["0.0"]["req_s"] > 0 and sat["1.0"]["req_s"] > 0
    runs = doc["traces"]["spike"]["runs"]
    assert set(runs) == {"fixed:0", "fixed:0.25", "fixed:0.5", "fixed:0.75", "fixed:1", "salc", "mpc"}
    assert all(r["all"]["status"].get("ok", 0) > 0 for r in runs.values())
    md = (tmp_path / "t.md").read_text()
    assert "| same engine without torch.compile |" in md and "| same engine with null experts" in md
    from eval import sim_serving  # the engine's step profile is kept: a simulated twin of it can start from the file

    assert doc["profile"]["tokens"] == [1, 8, 32, 64] and len(doc["profile"]["lat"]) == 4
    m = sim_serving.h200_step_model(tmp_path / "t.json")
    assert m.profile.lat == doc["profile"]["lat"] and m.in_step_s >= 0 and m.gap_s >= 0
