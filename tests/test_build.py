"""unify build: checkpoint layout, every family x grouping x merge, streaming equivalence, merge invariants."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import FAMILIES, FAST, load
from unify import grouping, merge
from unify.build import BuildOptions, build
from runtime.checkpoint import UnitedCheckpoint
from runtime.discover import find_moe_layers


def _build(model, out, **kw):
    return build(model, BuildOptions(out=str(out), **{**FAST, **kw}))


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
            out = _build(tiny_dir(family), tmp_path / f"{g}-{m}", way=2, grouping=g, merge=m)
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
            ck = UnitedCheckpoint(_build(model, tmp_path / f"{g}-{m}", way=4, grouping=g, merge=m))
            for layer in find_moe_layers(model):
                t = ck.tensors(layer.index)
                torch.testing.assert_close(t["gate_up_proj"], layer.experts.gate_up_proj[:2].detach(), rtol=1e-3, atol=1e-4)
                torch.testing.assert_close(t["down_proj"], layer.experts.down_proj[:2].detach(), rtol=1e-3, atol=1e-4)


def test_skip_layers_and_groups_flag(tiny_dir, tmp_path):
    ck = UnitedCheckpoint(_build(tiny_dir("qwen2_moe"), tmp_path / "u", **{**FAST, "groups": 2, "skip_layers": [0, -1]}))
    assert ck.layers == [1]
    assert ck.meta["way"] == 4 and ck.meta["skip_layers"] == [0, 2]


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
