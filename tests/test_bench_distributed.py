"""The 2-GPU benchmark's code on the CPU (gloo, 2 processes, tiny shape): every phase runs, each point has its eager
generate figures and the timed decode step of `graphed_decode_ms` (eager on the CPU), and the report has both tables.
The GPU runs (eval/results/distributed_bench*) need 2 GPUs; this keeps their code from rotting in between."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_distributed_tiny_smoke(tmp_path):
    cmd = [sys.executable, "-m", "eval.bench_distributed", "--shape", "tiny", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out"), "--ratios", "0", "1", "--batches", "1", "4", "--new-tokens", "3",
           "--graph-reps", "2"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "distributed_bench.json").read_text())
    assert set(doc["runs"]) == {"single", "tp", "ep"}
    for kind, run in doc["runs"].items():
        keys = {(r["batch"], r["ratio"]) for r in run["rows"]}
        assert keys == {(1, 0.0), (1, 1.0), (4, 0.0), (4, 1.0)}, (kind, keys)
        for r in run["rows"]:
            assert r["tokens_per_s"] > 0 and r["graph_error"] is None and r["graph_tokens_per_s"] > 0, (kind, r)
            assert isinstance(r["graph_moe_ms_per_step"], float), (kind, r)  # step less the null-experts step
    md = (tmp_path / "out" / "distributed_bench.md").read_text()
    assert "Decode step replayed from a CUDA graph" in md and "not a figure" in md
    assert "- EP 2, batch 4: ratio 1 / ratio 0" in md


def test_null_experts_zeroes_then_restores_each_forward():
    """The MoE time of the graphed step is the step less the same step under `null_experts`: inside, the experts give
    zeros; after, each module has exactly the forward it had (a class forward, or an instance one such as EP's)."""
    from types import SimpleNamespace

    import torch

    from eval.bench_distributed import null_experts

    plain, wrapped = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wrapped.forward = lambda x, *a: 3 * x  # an instance forward, as transformers' EP installs
    layers = [SimpleNamespace(experts=plain), SimpleNamespace(experts=wrapped)]
    x = torch.ones(4, 2)
    want = plain(x)
    with null_experts(layers):
        assert torch.equal(plain(x), torch.zeros(4, 2)) and torch.equal(wrapped(x, None), torch.zeros(4, 2))
    assert "forward" not in plain.__dict__ and torch.equal(plain(x), want)
    assert torch.equal(wrapped(x), 3 * x)


def test_bench_distributed_compiled_graph_only(tmp_path):
    """--compile compiles the norms and rotary embedding outside the experts (aot_eager here: the torch.compile front
    end without inductor's code generation), --graph-only skips eager generate; the report says both."""
    cmd = [sys.executable, "-m", "eval.bench_distributed", "--shape", "tiny", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "out"), "--ratios", "0", "1", "--batches", "2", "--new-tokens", "3",
           "--graph-reps", "2", "--phases", "prepare,single,report", "--compile", "--compile-backend", "aot_eager",
           "--graph-only"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((tmp_path / "out" / "distributed_bench.json").read_text())["runs"]["single"]
    # the tiny Qwen2-MoE: input and post-attention norms of 2 layers and the final norm; one modeling module's rope
    assert run["compiled"] == {"backend": "aot_eager", "norms": 5, "rope_functions": 1}
    for r in run["rows"]:
        assert r["tokens_per_s"] is None and r["graph_error"] is None and r["graph_tokens_per_s"] > 0, r
    md = (tmp_path / "out" / "distributed_bench.md").read_text()
    assert "Eager `generate` not timed" in md and "Compiled outside the experts" in md
