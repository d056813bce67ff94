"""`unify eval` and its report: standard errors, the base evaluated once, "within noise", honest axes, the recipe's
tasks by default, and every checkpoint checked against the model before anything is evaluated."""
from __future__ import annotations

import json
import math

import pytest

import recipes
from runtime.errors import BrownoutError
from unify import report as rep
from unify.evaluate import resolve_tasks
from unify.loading import resolve


def entry(value, se, metric="acc", higher_is_better=True):
    return {"metric": metric, "value": value, "stderr": se, "higher_is_better": higher_is_better, "all": {}}


def tasks(cont, cont_se, cloze, cloze_se, ppl):
    return {"brownout_cont": entry(cont, cont_se), "brownout_cloze": entry(cloze, cloze_se),
            "brownout_ppl": entry(ppl, None, "word_perplexity", False)}


BASE = tasks(0.725, 0.071, 0.95, 0.035, 90.0)
NEAR = tasks(0.700, 0.072, 0.925, 0.042, 95.0)  # one question out of 40 on each task
FAR = tasks(0.300, 0.072, 0.500, 0.080, 400.0)


def synthetic_report(num_fewshot=None) -> dict:
    row = {"checkpoint": "/x/reference-w4", "way": 4, "grouping": "frequency", "merge": "activation"}
    runs = [{"checkpoint": None, "policy": None, "ratio": 0.0, "way": None, "grouping": None, "merge": None,
             "tasks": BASE, "reuses_base": False},
            {**row, "policy": "hot-cold", "ratio": 0.0, "tasks": BASE, "reuses_base": True},
            {**row, "policy": "hot-cold", "ratio": 0.5, "tasks": NEAR, "reuses_base": False},
            {**row, "policy": "hot-cold", "ratio": 1.0, "tasks": FAR, "reuses_base": False},
            {**row, "policy": "drop", "ratio": 0.0, "tasks": BASE, "reuses_base": True},
            {**row, "policy": "drop", "ratio": 1.0, "tasks": FAR, "reuses_base": False}]
    return {"model": "reference", "tasks": list(BASE), "limit": 40, "num_fewshot": num_fewshot,
            "n_shot": {t: 0 for t in BASE}, "n_docs": {t: 40 for t in BASE}, "seconds": 1.0, "base": BASE,
            "runs": runs}


# -- the numbers -----------------------------------------------------------------------------------------------------
def test_loss_and_its_standard_error_by_hand():
    base = {"a": entry(0.8, 0.04), "p": entry(50.0, None, "word_perplexity", False)}
    got = {"a": entry(0.6, 0.05), "p": entry(500.0, None, "word_perplexity", False)}
    assert rep.loss_pct(base, got) == pytest.approx(25.0)  # the perplexity task is not averaged in
    # (100/b)^2 (se_g^2 + (g/b)^2 se_b^2) = 125^2 (0.0025 + 0.5625 * 0.0016)
    assert rep.loss_pct_stderr(base, got) == pytest.approx(math.sqrt(15625 * 0.0034), abs=1e-3)
    two = {**base, "b": entry(0.5, 0.05)}
    got2 = {**got, "b": entry(0.5, 0.05)}
    var_b = 200 ** 2 * (0.0025 + 0.0025)
    assert rep.loss_pct(two, got2) == pytest.approx(12.5)
    assert rep.loss_pct_stderr(two, got2) == pytest.approx(math.sqrt(15625 * 0.0034 + var_b) / 2, abs=1e-3)
    assert rep.loss_pct_stderr(base, {"a": entry(0.6, None)}) is None  # unknown, not zero


def test_within_noise_both_ways():
    assert rep.within_noise(BASE, NEAR) is True
    assert rep.within_noise(BASE, FAR) is False
    # one task far off is enough to leave the noise
    assert rep.within_noise(BASE, {**NEAR, "brownout_cloze": entry(0.5, 0.08)}) is False
    # the bound is 2 combined standard errors: just inside, just outside
    se = math.hypot(0.071, 0.071)
    inside = {"brownout_cont": entry(0.725 - 1.99 * se, 0.071)}
    outside = {"brownout_cont": entry(0.725 - 2.01 * se, 0.071)}
    assert rep.within_noise({"brownout_cont": BASE["brownout_cont"]}, inside) is True
    assert rep.within_noise({"brownout_cont": BASE["brownout_cont"]}, outside) is False
    assert rep.within_noise(BASE, {**NEAR, "brownout_cont": entry(0.7, None)}) is None


def test_stderr_of_older_entries():
    old = {"metric": "acc", "value": 0.7, "all": {"acc,none": 0.7, "acc_stderr,none": 0.05}}
    assert rep.stderr_of(old) == 0.05 and rep.is_accuracy(old)
    assert not rep.is_accuracy({"metric": "word_perplexity", "value": 90.0, "all": {}})


def test_y_axis_does_not_exaggerate():
    # the values of a real report at --limit 40: the axis used to run from 0.700 to 0.725
    assert rep.y_axis([0.725, 0.725, 0.700, 0.725], [0.071] * 4, True) == (0.0, 1.0, False)
    lo, hi, log = rep.y_axis([40.0, 45.0], [None, None], False)
    assert log and lo <= 20 and hi >= 90
    lo, hi, log = rep.y_axis([25.0, 27.0], [1.0, 1.0], True)  # higher-is-better beyond 1 (a BLEU-like score)
    assert not log and lo == 0 and hi >= 28


# -- the writers -----------------------------------------------------------------------------------------------------
def _row(md: str, start: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith(start)]


def test_markdown(tmp_path):
    path = tmp_path / "results.md"
    rep.write_markdown(synthetic_report(), path)
    md = path.read_text()
    assert "few-shot: 0 (task default)" in md and "None" not in md
    assert "limit: 40 documents per task" in md and "brownout_cont, brownout_cloze, brownout_ppl" in md
    assert "cannot be told apart from the base" in md
    base, = _row(md, "| base |")
    assert "0.725 ± 0.071" in base and "0.950 ± 0.035" in base and "| 90 |" in base
    label = "| frequency+activation w4 (reference-w4) |"
    rows = _row(md, label)
    assert len(rows) == 4  # ratio 0 once for both policies, then hot-cold 0.5 and 1, drop 1
    zero, near, far_hot, far_drop = rows
    assert "| any | 0 |" in zero and zero.endswith("| 0 | = base |") and "0.725 ± 0.071" in zero
    assert "| 0.5 |" in near and near.endswith("within noise |") and "0.700 ± 0.072" in near
    for far in (far_hot, far_drop):
        assert "within noise" not in far and "= base" not in far
        loss = far.split("|")[-3]
        assert "±" in loss and float(loss.split("±")[0]) > 40
    short = {**synthetic_report(num_fewshot=5), "n_docs": {"brownout_cont": 40, "brownout_cloze": 30, "brownout_ppl": 40}}
    rep.write_markdown(short, path)
    md = path.read_text()
    assert "few-shot: 5" in md and "brownout_cloze 30" in md  # a task with fewer documents than the limit


def test_plot_has_error_bars_and_honest_axes(tmp_path):
    from matplotlib.container import ErrorbarContainer

    fig = rep.figure(synthetic_report())
    cont, cloze, ppl = fig.axes
    for ax in (cont, cloze):  # the whole 0..1 scale, with a small margin
        lo, hi = ax.get_ylim()
        assert -0.05 < lo <= 0 and 1 <= hi < 1.05
    assert ppl.get_yscale() == "log"
    assert sum(isinstance(c, ErrorbarContainer) for c in cont.containers) == 2  # hot-cold and drop
    bars = next(c for c in cont.containers if isinstance(c, ErrorbarContainer))
    assert bars.has_yerr
    rep.plot(synthetic_report(), tmp_path / "results.png")
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


# -- tasks from the recipe -------------------------------------------------------------------------------------------
def test_recipe_tasks_are_the_default(tiny_dir):
    recipe = recipes.load("reference")
    tasks, folders = resolve_tasks(resolve("reference"), None)
    assert tasks == list(recipe.tasks) and folders == [str(recipe.tasks_path)]
    assert recipe.tasks_path.is_absolute()
    tasks, folders = resolve_tasks(resolve("reference"), ["brownout_cont"], "/my/tasks")
    assert tasks == ["brownout_cont"] and folders == [str(recipe.tasks_path), "/my/tasks"]
    with pytest.raises(BrownoutError, match="--tasks"):  # a model directory whose recipe has no tasks
        resolve_tasks(resolve(tiny_dir("mixtral")), None)
    assert resolve_tasks(resolve(tiny_dir("mixtral")), ["hellaswag"]) == (["hellaswag"], [])


# -- the command, with lm-eval replaced ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_united(tmp_path_factory):
    from unify.build import BuildOptions, build

    out = tmp_path_factory.mktemp("united") / "reference-w8"
    return str(build("reference", BuildOptions(out=str(out), way=8, grouping="consecutive", merge="average",
                                               progress=False)))


def test_checkpoint_of_another_model_is_refused_before_any_evaluation(tiny_dir, tmp_path, reference_united,
                                                                       monkeypatch, capsys):
    from unify.build import BuildOptions, build
    from unify.cli import main
    from unify.evaluate import Evaluator

    other = build(tiny_dir("mixtral"), BuildOptions(out=str(tmp_path / "mixtral-w2"), way=2, grouping="consecutive",
                                                    merge="average", progress=False))

    def must_not_run(self):
        pytest.fail("lm-eval ran before every checkpoint was checked")

    monkeypatch.setattr(Evaluator, "run", must_not_run)
    out = tmp_path / "report"
    rc = main(["eval", "--model", "reference", "--united", reference_united, str(other), "--tasks", "brownout_cont",
               "--out", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("unify: error:")]
    assert rc == 2 and len(errors) == 1 and "mixtral-w2 was built from another model" in errors[0]
    assert not out.exists()


def test_base_evaluated_once_with_the_recipe_tasks(tmp_path, reference_united, monkeypatch):
    from unify.cli import main
    from unify.evaluate import Evaluator

    calls = []

    def fake_run(self):
        calls.append(list(self.tasks))
        self.n_shot, self.n_docs = {t: 0 for t in self.tasks}, {t: 3 for t in self.tasks}
        return {t: entry(0.7 - 0.1 * (len(calls) > 1), 0.05) for t in self.tasks}

    monkeypatch.setattr(Evaluator, "run", fake_run)
    out = tmp_path / "report"
    rc = main(["eval", "--model", "reference", "--united", reference_united, "--ratios", "0,1",
               "--policies", "hot-cold,drop", "--limit", "3", "--out", str(out)])
    assert rc == 0
    recipe_tasks = list(recipes.load("reference").tasks)
    assert calls == [recipe_tasks] * 3  # the base, then ratio 1 for each policy; never ratio 0 again
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"] == recipe_tasks
    zero = [r for r in report["runs"] if r["checkpoint"] is not None and r["ratio"] == 0]
    assert len(zero) == 2 and all(r["reuses_base"] and r["tasks"] == report["base"] for r in zero)
    one = [r for r in report["runs"] if r["ratio"] == 1]
    assert all(not r["reuses_base"] and r["loss_pct"] > 0 and r["loss_pct_stderr"] > 0 for r in one)
    assert all(r["tasks"]["brownout_cont"]["stderr"] == 0.05 for r in report["runs"])
    md = (out / "results.md").read_text()
    assert md.count("= base |") == 1 and "few-shot: 0 (task default)" in md
    assert (out / "results.png").stat().st_size > 0
