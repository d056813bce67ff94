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
    md = (tmp_path / "out" / "distributed_bench.md").read_text()
    assert "Decode step replayed from a CUDA graph" in md and "not a figure" in md
    assert "- EP 2, batch 4: ratio 1 / ratio 0" in md
