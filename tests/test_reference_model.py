"""The bundled reference model loads, is a fine-grained Qwen3-MoE, generates; its local lm-eval tasks parse."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "recipes" / "reference" / "model"
TASKS = ROOT / "recipes" / "reference" / "tasks"
TASK_NAMES = ["brownout_ppl", "brownout_cont", "brownout_cloze"]


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_reference_model_loads_and_generates():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 2
    assert len(tok) == cfg.vocab_size == 8192
    n = sum(p.numel() for p in model.parameters())
    assert 15e6 < n < 18e6
    size = sum(p.stat().st_size for p in MODEL.iterdir())
    assert size <= 40 * 2**20
    assert all(p.stat().st_size <= 15 * 2**20 for p in MODEL.glob("*.safetensors"))  # 15 MiB: comes back from a GPU call
    ids = tok("The open() system call", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert tok.decode(out[0]).startswith("The open() system call")


def test_reference_recipe():
    import recipes

    r = recipes.load("reference")
    assert r.model_type == "qwen3_moe" and r.hub_id is None
    assert (r.path / "config.json").is_file() and r.tasks_path == TASKS
    calib = ROOT / "recipes" / "reference" / "calib.txt"
    assert calib.stat().st_size > 100_000


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_yaml_and_data(name):
    cfg = yaml.load((TASKS / f"{name}.yaml").read_text(), Loader=_Loader)
    assert cfg["task"] == name
    assert cfg["custom_dataset"] == ("function", f"utils.load_{name}")
    data = TASKS / f"{name}.jsonl"
    assert data.is_file() and data.stat().st_size <= 2**20
    rows = [json.loads(line) for line in data.open(encoding="utf-8")]
    if name == "brownout_ppl":
        assert cfg["output_type"] == "loglikelihood_rolling" and len(rows) >= 150
        assert all(r["text"] for r in rows)
    else:
        assert cfg["output_type"] == "multiple_choice" and len(rows) >= 400
        assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)


def test_tasks_load_through_lm_eval():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS))
    assert set(TASK_NAMES) <= set(tm.all_tasks)
    tasks = tm.load_task_or_group(TASK_NAMES)
    for name in TASK_NAMES:
        assert len(list(tasks[name].test_docs())) > 100


def test_unify_eval_end_to_end(tmp_path):
    """`unify eval` end to end on the bundled model (lm-eval, a few documents): the base is evaluated once and its
    result stands for ratio 0 (the base model bit for bit, checked in test_runtime), brownout at ratio 1 changes the
    numbers, and the report carries lm-eval's standard errors."""
    import json

    from unify.build import BuildOptions, build
    from unify.cli import main

    united = build("reference", BuildOptions(out=str(tmp_path / "u"), way=8, grouping="consecutive", merge="average",
                                             progress=False))
    out = tmp_path / "report"
    rc = main(["eval", "--model", "reference", "--united", str(united), "--ratios", "0,1", "--tasks",
               "brownout_cont,brownout_ppl", "--limit", "12", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "results.json").read_text())
    base, runs = rep["base"], rep["runs"]
    zero = next(r for r in runs if r["checkpoint"] is not None and r["ratio"] == 0.0)
    one = next(r for r in runs if r["checkpoint"] is not None and r["ratio"] == 1.0)
    assert zero["reuses_base"] and zero["tasks"] == base and not one["reuses_base"]
    assert one["tasks"]["brownout_ppl"]["value"] > base["brownout_ppl"]["value"]  # 8-way averaging at r=1 hurts
    cont = base["brownout_cont"]
    assert cont["stderr"] == cont["all"]["acc_stderr,none"] > 0 and cont["higher_is_better"] is True
    assert base["brownout_ppl"]["higher_is_better"] is False
    assert rep["n_shot"] == {"brownout_cont": 0, "brownout_ppl": 0} and rep["n_docs"]["brownout_cont"] == 12
    md = (out / "results.md").read_text()
    assert f"{cont['value']:.3f} ± {cont['stderr']:.3f}" in md and "= base |" in md
    assert (out / "results.png").stat().st_size > 0
