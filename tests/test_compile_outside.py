"""runtime.compile_outside: the norms and the rotary embedding compiled, the experts left alone, and undo restoring
both. Backend "aot_eager" (torch.compile's front end and autograd tracing, no code generation), so the compiled
model must give the eager model's logits."""
import sys

import pytest
import torch

from conftest import FAST, load
from runtime import BrownoutMoE, compile_outside_experts
from runtime.compile_outside import ROPE_FUNCTION, compiled_outside
from runtime.errors import BrownoutError
from unify.build import BuildOptions, build

FAMILY = "qwen2_moe"


@pytest.fixture(scope="module")
def united(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"uc-{FAMILY}")
    return str(build(tiny_dir(FAMILY), BuildOptions(out=str(out / "u"), **{**FAST, "way": 2})))


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them through aot_eager."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_compiles_norms_and_rope_and_undo_restores(tiny_dir, united):
    model = load(tiny_dir(FAMILY))
    bm = BrownoutMoE.attach(model, united)
    bm.set_ratio(0.5)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    eager = _logits(model, ids)
    modeling = sys.modules[type(model).__module__]
    rope = getattr(modeling, ROPE_FUNCTION)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]

    torch._dynamo.reset()
    backend = Counting()
    done = compile_outside_experts(model, backend=backend)
    assert compiled_outside(model) is done
    # every norm (2 per layer + the final one) and the one modeling module's rotary embedding
    assert len(norms) >= 3 and done.summary() == {"backend": backend, "norms": len(norms), "rope_functions": 1}
    assert all(m._compiled_call_impl is not None for m in norms)
    assert getattr(modeling, ROPE_FUNCTION) is not rope
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules() if m not in norms)
    with pytest.raises(BrownoutError, match="already applied"):
        compile_outside_experts(model, backend="aot_eager")

    # the forward runs through the compiled norms and rope (the backend saw their graphs), with the same logits
    torch.testing.assert_close(_logits(model, ids), eager, rtol=1e-5, atol=1e-5)
    assert backend.graphs >= 2  # a norm graph and the rope graph at least
    ids2 = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    bm.set_ratio(1.0)
    ref1 = _logits(model, ids2)  # another shape and ratio: the compiled path still serves them

    done.undo()
    assert compiled_outside(model) is None
    assert all(m._compiled_call_impl is None for m in norms)
    assert getattr(modeling, ROPE_FUNCTION) is rope
    assert torch.equal(_logits(model, ids2), ref1)


def test_undo_leaves_a_function_it_did_not_set(tiny_dir):
    """If something else replaced the rotary function after us, undo must not put ours back over it."""
    model = load(tiny_dir(FAMILY))
    modeling = sys.modules[type(model).__module__]
    orig = getattr(modeling, ROPE_FUNCTION)
    done = compile_outside_experts(model, backend="aot_eager")
    theirs = lambda *a, **k: orig(*a, **k)  # noqa: E731
    setattr(modeling, ROPE_FUNCTION, theirs)
    try:
        done.undo()
        assert getattr(modeling, ROPE_FUNCTION) is theirs
    finally:
        setattr(modeling, ROPE_FUNCTION, orig)


def test_a_model_with_nothing_to_compile_is_an_error():
    with pytest.raises(BrownoutError, match="nothing to compile"):
        compile_outside_experts(torch.nn.Sequential(torch.nn.Linear(2, 2)), backend="aot_eager")


def test_compile_check_times_the_outside_variant(tmp_path):
    """eval.compile_check's CPU smoke test runs the norms-and-rope variant beside eager and the full compile, with
    the same logits (aot_eager), and reports it."""
    import json
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "eval.compile_check", "--tiny", "--reps", "2", "--out", str(tmp_path),
                        "--cache", str(tmp_path / "cache")], cwd=root, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "compile_check.json").read_text())
    assert not doc["failures"], doc["failures"]
    assert {"outside_r0", "outside_r1", "outside_null"} <= set(doc["times_ms"])
    assert doc["rel_err"]["outside_direct@0"] == 0.0 and doc["rel_err"]["outside_direct@1"] == 0.0
    assert "| norms and rope compiled, graphed |" in (tmp_path / "compile_check.md").read_text()


def test_raise_recompile_limits_only_raises(monkeypatch):
    """Dynamo's per-function entry limit goes up to 64 (the compiled engine's attention compiles once per layer on
    transformers 5.24), and a limit already higher stays."""
    import torch._dynamo

    from runtime.compile_outside import raise_recompile_limits

    cfg = torch._dynamo.config
    monkeypatch.setattr(cfg, "recompile_limit", 8)
    monkeypatch.setattr(cfg, "accumulated_recompile_limit", 256)
    raise_recompile_limits()
    assert cfg.recompile_limit == 64 and cfg.accumulated_recompile_limit == 1024
    monkeypatch.setattr(cfg, "recompile_limit", 100)
    raise_recompile_limits()
    assert cfg.recompile_limit == 100
