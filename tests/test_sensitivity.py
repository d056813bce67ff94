"""unify sensitivity and runtime.schedule.RatioSchedule: the measured curves, and the allocation of a byte budget over
them (the uniform ratio's bytes, the least predicted loss, the most sensitive layer browned out last)."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import FAST, load
from runtime import BrownoutMoE
from runtime.checkpoint import CheckpointWriter, UnitedCheckpoint
from runtime.errors import BrownoutError
from runtime.schedule import RatioSchedule
from unify.build import BuildOptions, build
from unify.sensitivity import main, sensitivity

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
LEVELS = [i / 20 for i in range(21)]
FAMILY = "qwen3_moe"  # 3 decoder layers, 8 experts, top-2: way 2 gives 4 united experts per layer
# with 8 experts nearly all are read in every batch, so reads move in coarse steps: the joint search gets more slack
TINY_READS_TOLERANCE = 0.05


def _synthetic(loss: dict[int, list[float]], saved: dict[int, list[float]] | None = None) -> RatioSchedule:
    saved = saved or {k: [100 * r for r in GRID] for k in loss}
    return RatioSchedule.from_dict({"ratios": GRID, "layers": {str(k): {"nll_increase": loss[k], "saved_bytes": saved[k]}
                                                             for k in loss}})


def _first_level_on(sched: RatioSchedule) -> dict[int, float]:
    """For each layer: the lowest level on LEVELS at which the schedule gives it a ratio above 0."""
    first = {}
    for level in LEVELS:
        for layer, r in zip(sched.layers, sched.at(level)):
            if r > 0 and layer not in first:
                first[layer] = level
    return first


# -- the allocation, on synthetic curves ---------------------------------------------------------------------------

def test_budget_matches_the_uniform_ratio_and_ends_are_exact():
    rng = random.Random(0)
    loss = {k: sorted(rng.uniform(0, 1) for _ in GRID[1:]) for k in range(6)}
    saved = {k: sorted(rng.uniform(0, 5e6) for _ in GRID[1:]) for k in range(6)}
    sched = _synthetic({k: [0.0] + v for k, v in loss.items()}, {k: [0.0] + v for k, v in saved.items()})
    assert sched.at(0) == [0.0] * 6 and sched.at(1) == [1.0] * 6
    for level in (0.1, 0.25, 0.33, 0.5, 0.75, 0.9):
        want, got = sched.saved_bytes(level), sched.saved_bytes(sched.at(level))
        assert abs(got - want) <= 0.02 * want, (level, got, want)


def test_schedule_is_monotone_in_level():
    rng = random.Random(1)
    sched = _synthetic({k: [0.0] + [rng.uniform(-0.01, 1) for _ in GRID[1:]] for k in range(5)},
                       {k: [0.0] + sorted(rng.uniform(0, 1e6) for _ in GRID[1:]) for k in range(5)})
    prev = sched.at(0)
    for level in LEVELS[1:]:
        now = sched.at(level)
        assert all(b >= a - 1e-12 for a, b in zip(prev, now)), (level, prev, now)
        prev = now


def test_sensitive_layer_is_browned_out_last():
    base = [0.0, 0.1, 0.15, 0.18, 0.2]  # concave: most of the loss comes with the first cold experts
    sched = _synthetic({0: base, 1: [10 * v for v in base], 2: base, 3: [1.5 * v for v in base]})
    first = _first_level_on(sched)
    assert first[1] == max(first.values()) and sum(v == first[1] for v in first.values()) == 1
    assert [r for r in sched.at(0.75)] == [1.0, 0.0, 1.0, 1.0]  # three layers' bytes are exactly level 0.75


def test_never_worse_than_uniform_on_convex_curves():
    """With convex curves the greedy is the optimum, and the uniform ratio is one of the allocations it beats."""
    rng = random.Random(2)
    for trial in range(20):
        loss = {k: [0.0] + list(itertools.accumulate(sorted(rng.uniform(0, 1) for _ in GRID[1:]))) for k in range(4)}
        sched = _synthetic(loss)
        for level in (0.2, 0.5, 0.8):
            assert sched.predicted_loss(sched.at(level)) <= sched.predicted_loss(level) + 1e-9


def test_exact_on_a_small_problem_against_brute_force():
    """Convex curves with equal bytes per ratio step: the schedule's predicted loss is the best grid allocation's."""
    loss = {0: [0, 0.1, 0.3, 0.6, 1.0], 1: [0, 0.05, 0.1, 0.5, 0.9], 2: [0, 0.02, 0.2, 0.45, 0.7]}
    sched = _synthetic(loss)
    for steps in range(0, 13):  # budget of `steps` grid steps in all
        best = min(sum(loss[k][c] for k, c in enumerate(combo))
                   for combo in itertools.product(range(5), repeat=3) if sum(combo) == steps)
        level = steps / 12
        assert sched.predicted_loss(sched.at(level)) <= best + 1e-9


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(BrownoutError, match="grid"):
        RatioSchedule.from_dict({"ratios": [0, 0.5], "layers": {"0": {"nll_increase": [0, 1], "saved_bytes": [0, 1]}}})
    with pytest.raises(BrownoutError, match="one value per ratio"):
        _synthetic({0: [0.0, 1.0]})
    with pytest.raises(BrownoutError, match="not a sensitivity file"):
        RatioSchedule.from_dict({"layers": []})
    with pytest.raises(BrownoutError, match="does not exist"):
        RatioSchedule.load(tmp_path / "missing.json")
    with pytest.raises(BrownoutError, match=r"\[0, 1\]"):
        _synthetic({0: [0, 1, 2, 3, 4]}).at(1.5)


# -- measured on a tiny model ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    """(model directory, united checkpoint, its sensitivity dict)."""
    d = tiny_dir(FAMILY)
    out = tmp_path_factory.mktemp("sens") / "united"
    build(d, BuildOptions(out=str(out), **{**FAST, "way": 2, "grouping": "frequency", "merge": "frequency"}))
    data = sensitivity(load(d), out, tokens=1024, seq_len=64, batch_size=4, skip_tokens=0, progress=False,
                       reads_tolerance=TINY_READS_TOLERANCE)
    return d, out, data


def test_sensitivity_curves(tiny):
    d, united, data = tiny
    assert sorted(map(int, data["layers"])) == UnitedCheckpoint(united).layers
    assert data["ratios"] == GRID and data["held_out"]["predicted_tokens"] == 16 * 63
    for v in data["layers"].values():
        assert v["nll_increase"][0] == 0.0 and v["saved_bytes"][0] == 0.0
        assert all(b >= a for a, b in zip(v["read_saved_bytes"], v["read_saved_bytes"][1:]))
        assert v["saved_bytes"][-1] > 0  # ratio 1 reads fewer slabs
        assert max(abs(x) for x in v["nll_increase"][1:]) > 0  # browning a layer out changes the loss
    json.dumps(data)


def test_prefix_replay_matches_full_forwards(tiny):
    d, united, data = tiny
    full = sensitivity(load(d), united, tokens=1024, seq_len=64, batch_size=4, skip_tokens=0, reuse_prefix=False,
                       progress=False)
    for k, v in data["layers"].items():
        assert v["nll_increase"] == pytest.approx(full["layers"][k]["nll_increase"], abs=1e-5)
        assert v["saved_bytes"] == full["layers"][k]["saved_bytes"]


def test_schedule_drives_the_model(tiny):
    d, united, data = tiny
    sched = RatioSchedule.from_dict(data)
    model = load(d)
    bm = BrownoutMoE.attach(model, united)
    try:
        for level in (0.25, 0.5, 0.75):
            ratios = sched.at(level)
            want = sched.saved_bytes(level)
            assert abs(sched.saved_bytes(ratios) - want) <= 0.02 * want
            bm.set_ratio(ratios)
            assert [bm.ratio[i] for i in sorted(bm.layers)] == pytest.approx(ratios)
        handle = sched.bind(bm)  # what BrownoutServer drives: one float, the level
        handle.set_ratio(0.5)
        assert [bm.ratio[i] for i in sorted(bm.layers)] == pytest.approx(sched.at(0.5))
        assert handle.model is model
    finally:
        bm.detach()
    with pytest.raises(BrownoutError, match="layers"):
        RatioSchedule.from_dict({**data, "joint": None, "layers": {"7": next(iter(data["layers"].values()))}}).bind(bm)


def test_scaled_united_expert_is_browned_out_last(tiny, tmp_path):
    """A copy of the checkpoint with one layer's united experts scaled x10: that layer becomes by far the most
    sensitive, and the schedule turns it on last."""
    d, united, _ = tiny
    ck = UnitedCheckpoint(united)
    hot = ck.layers[1]
    w = CheckpointWriter(tmp_path / "scaled")
    for i in ck.layers:
        t = ck.tensors(i)
        w.add_layer(i, {k: (v * 10 if i == hot and k != "expert_to_group" else v) for k, v in t.items()})
    scaled = w.commit(ck.meta)
    data = sensitivity(load(d), scaled, tokens=1024, seq_len=64, batch_size=4, skip_tokens=0, progress=False,
                       reads_tolerance=TINY_READS_TOLERANCE)
    loss_at_1 = {int(k): v["nll_increase"][-1] for k, v in data["layers"].items()}
    assert loss_at_1[hot] > 3 * max(v for k, v in loss_at_1.items() if k != hot)
    first = _first_level_on(RatioSchedule.from_dict(data))
    assert first[hot] > max(v for k, v in first.items() if k != hot)


def test_cli_writes_json_atomically(tiny, tmp_path, capsys):
    d, united, _ = tiny
    out = tmp_path / "s" / "S.json"
    assert main(["--model", d, "--united", str(united), "--out", str(out), "--tokens", "256", "--seq-len", "64",
                 "--skip-tokens", "0", "--quiet"]) == 0
    assert RatioSchedule.load(out).layers == UnitedCheckpoint(united).layers
    assert [p.name for p in out.parent.iterdir()] == ["S.json"]  # no temporary file left behind
    assert json.loads(out.read_text())["joint"]["levels"] == [0.25, 0.5, 0.75]
    assert main(["--model", d, "--united", str(united), "--out", str(out), "--tokens", "256", "--seq-len", "64",
                 "--skip-tokens", "0", "--quiet", "--joint-levels", ""]) == 0
    assert "joint" not in json.loads(out.read_text()) and RatioSchedule.load(out).anchors == {}
    assert main(["--model", d, "--united", str(united), "--out", str(out), "--ratios", "0,0.5"]) == 2
    assert "include both 0 and 1" in capsys.readouterr().err


def test_evaluate_schedule_rows(tiny):
    """`unify eval --schedule`: one row per level, evaluated with the schedule's ratios set on the model."""
    from runtime.experts_impl import state_of
    from unify.sensitivity import evaluate_schedule

    d, united, data = tiny
    sched = RatioSchedule.from_dict(data)

    class FakeEvaluator:  # what evaluate_schedule needs of unify.evaluate.Evaluator: .model and .run()
        def __init__(self):
            self.model, self.seen = load(d), []

        def run(self):
            st = [self.model.model.layers[i].mlp.experts for i in sched.layers]
            self.seen.append([state_of(m).ratio.value if state_of(m) is not None else 0.0 for m in st])
            return {"t": {"metric": "acc", "value": 0.5, "stderr": 0.01, "higher_is_better": True, "all": {}}}

    ev = FakeEvaluator()
    rows = evaluate_schedule(ev, united, sched, [0, 0.5, 1])
    assert [r["ratio"] for r in rows] == [0, 0.5, 1] and {r["policy"] for r in rows} == {"hot-cold+schedule"}
    assert rows[0]["reuses_base"] and not rows[1]["reuses_base"]
    assert ev.seen[1:] == [pytest.approx(sched.at(0.5)), [1.0] * len(sched.layers)]  # [0]: the base run
    assert rows[1]["layer_ratios"] == sched.at(0.5)


# -- joint anchors ---------------------------------------------------------------------------------------------------

def _anchored(anchors: dict[float, list[float]]) -> RatioSchedule:
    base = [0.0, 0.1, 0.15, 0.18, 0.2]
    loss = {0: base, 1: [10 * v for v in base], 2: base, 3: [1.5 * v for v in base]}
    return RatioSchedule(GRID, {k: {"nll_increase": v, "saved_bytes": [100 * r for r in GRID]} for k, v in loss.items()},
                         anchors=anchors)


def test_anchors_are_kept_and_the_schedule_moves_between_them():
    anchors = {0.25: [0.25, 0.0, 0.5, 0.25], 0.5: [0.5, 0.25, 0.75, 0.5], 0.75: [1.0, 0.5, 1.0, 0.5]}
    sched = _anchored(anchors)
    assert sched.at(0) == [0.0] * 4 and sched.at(1) == [1.0] * 4
    for level, rs in anchors.items():
        assert sched.at(level) == pytest.approx(rs)
    prev = sched.at(0)
    for level in LEVELS[1:] + [0.26, 0.49, 0.51, 0.74, 0.76]:
        now = sched.at(level)
        want = sched.saved_bytes(level)
        assert abs(sched.saved_bytes(now) - want) <= 1e-9 * max(want, 1)
        lo = max((v for v in [0.0, *anchors] if v <= level), default=0.0)
        hi = min((v for v in [*anchors, 1.0] if v >= level), default=1.0)
        floor = anchors.get(lo, [0.0] * 4 if lo == 0 else [1.0] * 4)
        ceil = anchors.get(hi, [1.0] * 4 if hi == 1 else [0.0] * 4)
        assert all(f - 1e-9 <= r <= c + 1e-9 for f, r, c in zip(floor, now, ceil)), (level, now)
    for a, b in itertools.pairwise(sorted(LEVELS + [0.26, 0.49, 0.51, 0.74, 0.76])):
        assert all(y >= x - 1e-12 for x, y in zip(sched.at(a), sched.at(b))), (a, b)
    # between the anchors at 0.25 and 0.5 the single-layer curves still order the layers: 2 (flattest there), then 0,
    # then layer 3 (1.5x), the sensitive layer 1 (10x) last
    assert sched.at(0.35) == pytest.approx([0.4, 0.0, 0.75, 0.25])
    assert sched.at(0.45) == pytest.approx([0.5, 0.05, 0.75, 0.5])


def test_bad_anchors_and_newer_files_are_refused():
    with pytest.raises(BrownoutError, match="monotone"):
        _anchored({0.25: [0.5, 0, 0, 0], 0.5: [0.25, 0.5, 0.5, 0.5]})
    with pytest.raises(BrownoutError, match="one ratio per layer"):
        _anchored({0.5: [0.5, 0.5]})
    with pytest.raises(BrownoutError, match="strictly between"):
        _anchored({1.0: [1.0] * 4})
    data = {"ratios": GRID, "layers": {"0": {"nll_increase": [0, 1, 2, 3, 4], "saved_bytes": [0, 1, 2, 3, 4]}}}
    with pytest.raises(BrownoutError, match="newer than this runtime"):
        RatioSchedule.from_dict({**data, "version": 3})
    assert RatioSchedule.from_dict({**data, "version": 1}).anchors == {}
    got = RatioSchedule.from_dict({**data, "version": 2, "joint": {"levels": [0.5], "ratios": [[0.5]]}})
    assert got.anchors == {0.5: [0.5]}


def test_joint_anchors_measured_on_the_tiny_model(tiny):
    d, united, data = tiny
    j = data["joint"]
    assert data["version"] == 2 and j["levels"] == [0.25, 0.5, 0.75]
    sched = RatioSchedule.from_dict(data)
    for k, level in enumerate(j["levels"]):
        assert sched.at(level) == pytest.approx(j["ratios"][k], abs=1e-6)
        want = sched.saved_bytes(level)
        assert abs(sched.saved_bytes(j["ratios"][k]) - want) <= 0.02 * want
        assert j["nll_increase"][k] <= min(j["uniform_nll_increase"][k], j["start_nll_increase"][k]) + 1e-9
        assert abs(j["reads_vs_uniform"][k]) <= TINY_READS_TOLERANCE + 1e-9
    for a, b in zip(j["ratios"], j["ratios"][1:]):
        assert all(y >= x for x, y in zip(a, b))


def test_joint_replay_matches_full_forwards(tiny):
    """A probe that replays from a later layer gives the NLL and reads of a pass from the embeddings."""
    from unify.calibration import decoder_layers
    from unify.sensitivity import _held_out_batches, _JointProbe

    d, united, data = tiny
    model = load(d)
    ids = _held_out_batches(None, "train", "text", None, model.config.vocab_size, 512, 64, 0)
    chunks = list(torch.split(ids, 4))
    bm = BrownoutMoE.attach(model, united)
    _, layer_list = decoder_layers(model)
    united_layers = sorted(bm.layers)
    probe = _JointProbe(model, bm, chunks, "cpu", layer_list, united_layers, sum(c.numel() - c.shape[0] for c in chunks))
    try:
        at = probe.measure([0.5] * len(united_layers), record=True)
        changed = [0.5] * (len(united_layers) - 1) + [1.0]
        replayed = probe.measure(changed, at, len(united_layers) - 1)
        full = probe.measure(changed)
        assert replayed["nll"] == pytest.approx(full["nll"], abs=1e-6)
        assert replayed["reads"] == pytest.approx(full["reads"])
        assert full["nll"] != pytest.approx(at["nll"], abs=1e-9)  # the change is seen
        assert list(layer_list) == [m for m in probe.originals]  # no stand-in left behind
    finally:
        probe.close()
        bm.detach()


def test_schedule_bound_is_below_any_grid_allocation():
    """eval/schedule_bound: the lower bound at the uniform bytes ignores joint anchors, and no allocation on the
    measured grid that saves at least the uniform bytes predicts less (brute force over 5^3; these curves are not
    convex, and the schedule's own allocation predicts more than a grid allocation at 0.5)."""
    from eval.schedule_bound import bound_rows

    loss = {0: [0, 0.1, 0.15, 0.3, 0.6], 1: [0, 0.02, 0.05, 0.06, 0.2], 2: [0, 0.3, 0.5, 0.6, 0.7]}
    saved = {0: [0, 30, 55, 80, 100], 1: [0, 20, 50, 70, 90], 2: [0, 40, 60, 90, 120]}
    doc = {"ratios": GRID, "layers": {str(k): {"nll_increase": loss[k], "saved_bytes": saved[k]} for k in loss},
           "joint": {"levels": [0.5], "ratios": [[0.5, 0.5, 0.5]]}}
    plain = _synthetic(loss, saved)
    for row in bound_rows(doc, [0.25, 0.5, 0.75]):
        assert row["ratios"] == pytest.approx(plain.at(row["level"]))
        assert row["least"] <= min(row["uniform"], row["greedy"]) + 1e-12
        need = plain.saved_bytes(row["level"])
        for combo in itertools.product(range(5), repeat=3):
            if sum(saved[k][i] for k, i in enumerate(combo)) >= need - 1e-9:
                assert sum(loss[k][i] for k, i in enumerate(combo)) >= row["least"] - 1e-9, (row["level"], combo)
    study = {"per_way": {"2": {"sensitivity": {k: v for k, v in doc.items() if k != "ratios"}}}}
    assert [r["least"] for r in bound_rows(study, [0.5])] == pytest.approx([plain.least_loss(0.5)])
    # on convex curves the bound is the schedule's own allocation
    convex = _synthetic({0: [0, 0.1, 0.25, 0.45, 0.7], 1: [0, 0.01, 0.03, 0.06, 0.1]})
    for level in (0.25, 0.5, 0.75):
        assert convex.least_loss(level) == pytest.approx(convex.predicted_loss(convex.at(level)))
