"""unify build: checkpoint layout, every family x grouping x merge, streaming equivalence, merge invariants, recipe
defaults (the library and the CLI make the same checkpoint) and the skip-layers rule."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, FAST, load
from unify import grouping, merge
from unify.build import BuildOptions, build, choose_skipped_layers, resolve_options
from unify.cli import main
from runtime.errors import BrownoutError
from runtime.checkpoint import UnitedCheckpoint
from runtime.discover import find_moe_layers


def _build(model, out, **kw):
    """A fast build; consecutive + average unless the test names its methods (the recipes' are data-driven)."""
    return build(model, BuildOptions(out=str(out), **{**FAST, "grouping": "consecutive", "merge": "average", **kw}))


def _few_steps(m: str) -> dict | None:
    return {"steps": 5} if "steps" in merge.get(m).param_types() else None


def test_checkpoint_layout_mixtral(tiny_dir, tmp_path):
    out = _build(tiny_dir("mixtral"), tmp_path / "u", way=2)
    meta = json.loads((out / "united.json").read_text())
    model = load(tiny_dir("mixtral"))
    E, I, H = 8, 16, 32
    with safe_open(str(out / "united.safetensors"), "pt") as f:
        for layer in find_moe_layers(model):
            assert tuple(f.get_tensor(f"layers.{layer.index}.gate_up_proj").shape) == (E // 2, 2 * I, H)
            assert tuple(f.get_tensor(f"layers.{layer.index}.down_proj").shape) == (E // 2, H, I)
            assert f.get_tensor(f"layers.{layer.index}.expert_to_group").tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert meta["format_version"] == 1 and meta["way"] == 2 and meta["merge"] == "average"
    assert meta["options"]["merge_params"] == {} and meta["options"]["grouping_params"] == {}
    assert meta["base_model"]["config_hash"] and len(meta["base_model"]["weight_probe"]) == 64
    assert not any(p.name.startswith(".u") for p in tmp_path.iterdir())  # no temporary directory left


@pytest.mark.parametrize("family", FAMILIES)
def test_consecutive_average_is_exact_mean(tiny_dir, tmp_path, family):
    out = _build(tiny_dir(family), tmp_path / "u", way=2)
    ck = UnitedCheckpoint(out)
    model = load(tiny_dir(family))
    for layer in find_moe_layers(model):
        t = ck.tensors(layer.index)
        for k in layer.layout.native_keys():
            orig = getattr(layer.experts, k).detach()
            want = orig.view(orig.shape[0] // 2, 2, *orig.shape[1:]).mean(1)
            torch.testing.assert_close(t[k], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_grouping_and_merge(tiny_dir, tmp_path, family):
    """Every grouping x merge builds a valid checkpoint that the runtime can attach, for every family."""
    from runtime import BrownoutMoE

    model = load(tiny_dir(family))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    for g in grouping.names():
        for m in merge.names():
            out = _build(tiny_dir(family), tmp_path / f"{g}-{m}", way=2, grouping=g, merge=m,
                         merge_params=_few_steps(m))
            bm = BrownoutMoE.attach(model, out, ratio=1.0)
            with torch.no_grad():
                assert torch.isfinite(model(x).logits).all(), (g, m)
            bm.detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_matches_in_memory(tiny_dir, tmp_path, family):
    """Layer-by-layer streaming from the shards computes the same checkpoint as the fully loaded model."""
    kw = dict(way=2, grouping="similarity", merge="activation")
    a = UnitedCheckpoint(_build(tiny_dir(family), tmp_path / "stream", **kw))
    b = UnitedCheckpoint(_build(load(tiny_dir(family)), tmp_path / "memory", **kw))
    assert a.layers == b.layers
    for i in a.layers:
        assert a.layer_meta(i)["groups"] == b.layer_meta(i)["groups"]
        ta, tb = a.tensors(i), b.tensors(i)
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5)


def test_identical_experts_merge_back(tmp_path):
    """A layer whose experts are all the same expert merges back to it under every grouping and merge."""
    from conftest import make_tiny

    model = make_tiny("qwen3_moe")
    with torch.no_grad():
        for layer in find_moe_layers(model):
            layer.experts.gate_up_proj.copy_(layer.experts.gate_up_proj[:1].expand_as(layer.experts.gate_up_proj))
            layer.experts.down_proj.copy_(layer.experts.down_proj[:1].expand_as(layer.experts.down_proj))
    for g in grouping.names():
        for m in merge.names():
            ck = UnitedCheckpoint(_build(model, tmp_path / f"{g}-{m}", way=4, grouping=g, merge=m,
                                         merge_params=_few_steps(m)))
            for layer in find_moe_layers(model):
                t = ck.tensors(layer.index)
                torch.testing.assert_close(t["gate_up_proj"], layer.experts.gate_up_proj[:2].detach(), rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(t["down_proj"], layer.experts.down_proj[:2].detach(), rtol=1e-3, atol=1e-4)


def test_skip_layers_and_groups_flag(tiny_dir, tmp_path):
    ck = UnitedCheckpoint(_build(tiny_dir("qwen2_moe"), tmp_path / "u", **{**FAST, "groups": 2, "skip_layers": [0, -1]}))
    assert ck.layers == [1]
    assert ck.meta["way"] == 4 and ck.meta["skip_layers"] == [0, 2]
    assert ck.meta["skip_layers_requested"] == [0, -1] and ck.meta["skip_layers_from"] == "options"


def test_recipe_skip_layers_outside_in():
    paper = [0, 1, -2, -1]
    assert choose_skipped_layers(paper, 32, list(range(32)), from_recipe=True) == [0, 1, 30, 31]  # full size: all
    assert choose_skipped_layers(paper, 3, [0, 1, 2], from_recipe=True) == [0]  # 2 of 3 stay united
    assert choose_skipped_layers(paper, 4, [0, 1, 2, 3], from_recipe=True) == [0, 3]  # half stays united
    assert choose_skipped_layers(paper, 6, list(range(6)), from_recipe=True) == [0, 1, 5]  # -2 would leave 2 of 6
    assert choose_skipped_layers(paper, 1, [0], from_recipe=True) == []  # at least one layer is united
    assert choose_skipped_layers(paper, 2, [0, 1], from_recipe=True) == [0]  # -2 is 0 again; -1 would leave none
    assert choose_skipped_layers([-2, -1], 3, [1, 2], from_recipe=True) == [2]  # layer 0 is dense: 2 MoE layers
    assert choose_skipped_layers([0, 7, -9], 4, [0, 1, 2, 3], from_recipe=True) == [0]  # beyond the depth: dropped
    # a list the user gives is applied as given
    assert choose_skipped_layers([0, -1], 3, [0, 1, 2], from_recipe=False) == [0, 2]
    assert choose_skipped_layers([], 3, [0, 1, 2], from_recipe=False) == []
    with pytest.raises(BrownoutError, match=r"^--skip-layers 3 is out of range: the model has 3 decoder layers"):
        choose_skipped_layers([0, 3], 3, [0, 1, 2], from_recipe=False)
    with pytest.raises(BrownoutError, match="leaves every MoE layer alone"):
        choose_skipped_layers([0, 1, -1], 3, [0, 1, 2], from_recipe=False)


def test_recipe_defaults_fill_the_request():
    import recipes

    mixtral = recipes.load("mixtral")
    plan = resolve_options(BuildOptions(out="x"), mixtral)
    assert (plan.way, plan.groups, plan.grouping, plan.merge) == (2, None, "frequency", "activation")
    plan = resolve_options(BuildOptions(out="x", groups=2, merge="distill", merge_params={"init": "average"}), mixtral)
    assert (plan.way, plan.groups, plan.grouping, plan.merge) == (None, 2, "frequency", "distill")
    assert plan.merge_params == merge.get("distill").make_params({"init": "average"})
    plan = resolve_options(BuildOptions(out="x", way=4), None)  # no recipe
    assert (plan.way, plan.grouping, plan.merge, plan.calib) == (4, "consecutive", "average", None)
    with pytest.raises(BrownoutError, match="^give exactly one of --way K .*no default way$"):
        resolve_options(BuildOptions(out="x"), None)
    ref = recipes.load("reference")
    assert resolve_options(BuildOptions(out="x"), ref).calib == str(ref.calib)


FAST_FLAGS = ["--calib-tokens", "1024", "--seq-len", "64", "--samples-per-layer", "512", "--quiet"]


@pytest.mark.parametrize("request_", [{}, {"merge": "distill", "merge_params": {"init": "average", "steps": 3}}],
                         ids=["recipe-defaults", "distill-params"])
def test_library_and_cli_make_the_same_checkpoint(tiny_dir, tmp_path, request_):
    """build(dir, BuildOptions(...)) and `unify build --model dir ...` on the same request: the same resolved
    methods, parameters and skipped layers in united.json, and the same tensors."""
    d = tiny_dir("mixtral")  # model_type mixtral: the mixtral recipe's defaults apply to both
    fast = {k: v for k, v in FAST.items() if k != "skip_layers"}
    lib = UnitedCheckpoint(build(d, BuildOptions(out=str(tmp_path / "lib"), **fast, **request_)))
    flags = []
    if "merge" in request_:
        flags = ["--merge", request_["merge"], "--merge-param", "init=average", "--steps", "3"]
    assert main(["build", "--model", d, "--out", str(tmp_path / "cli"), *FAST_FLAGS, *flags]) == 0
    cli = UnitedCheckpoint(tmp_path / "cli")
    a, b = lib.meta, cli.meta
    for key in ("recipe", "grouping", "merge", "way", "num_groups", "skip_layers", "skip_layers_requested",
                "skip_layers_from"):
        assert a[key] == b[key], key
    assert {k: v for k, v in a["options"].items() if k != "out"} == {k: v for k, v in b["options"].items() if k != "out"}
    assert (a["recipe"], a["grouping"], a["way"]) == ("mixtral", "frequency", 2)
    assert a["skip_layers"] == [0] and a["skip_layers_requested"] == [0, 1, -2, -1] and lib.layers == [1, 2]
    want = merge.get(a["merge"]).make_params(request_.get("merge_params"))
    assert a["options"]["merge_params"] == dataclasses.asdict(want)
    assert a["options"]["grouping_params"] == {"sample_rows": 512}
    if "merge" in request_:
        assert a["options"]["merge_params"]["init"] == "average" and a["options"]["merge_params"]["steps"] == 3
    else:
        assert a["merge"] == "activation" and a["options"]["merge_params"] == {"align": True, "refit": True}
    for i in lib.layers:
        assert lib.layer_meta(i)["groups"] == cli.layer_meta(i)["groups"]
        for k, t in lib.tensors(i).items():
            assert torch.equal(t, cli.tensors(i)[k]), (i, k)


def test_python_m_unify_builds_a_three_layer_model_with_the_recipe_skip_layers(tiny_dir, tmp_path):
    """`python -m unify build --model <tiny 3-layer Mixtral dir> --way 2 --out X`, as a new user types it: the
    recipe's skip_layers [0, 1, -2, -1] would leave every layer alone; the outside-in rule keeps two united."""
    import os
    import subprocess
    import sys

    out = tmp_path / "X"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add contention on a shared machine
    p = subprocess.run([sys.executable, "-m", "unify", "build", "--model", tiny_dir("mixtral"), "--way", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    ck = UnitedCheckpoint(out)
    assert len(ck.layers) >= 2 and ck.layers == [1, 2] and ck.meta["skip_layers"] == [0]
    assert ck.meta["way"] == 2 and f"wrote {out}" in p.stdout


def test_calibration_sources(tmp_path):
    """Plain text, a `datasets` directory (save_to_disk) and a JSONL file with a named column."""
    import datasets

    from unify.calibration import load_texts
    from runtime.errors import BrownoutError

    (tmp_path / "c.txt").write_text("first paragraph\n\nsecond paragraph\n")
    assert load_texts(str(tmp_path / "c.txt")) == ["first paragraph", "second paragraph\n"]
    datasets.Dataset.from_dict({"text": ["a " * 50, "b " * 50]}).save_to_disk(str(tmp_path / "ds"))
    assert len(load_texts(str(tmp_path / "ds"))) == 2
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x y z"}) + "\n")
    assert load_texts(str(tmp_path / "c.jsonl"), column="content") == ["x y z"]
    with pytest.raises(BrownoutError, match="no column 'text'"):
        load_texts(str(tmp_path / "c.jsonl"))
    assert load_texts(None)  # the bundled default sample
