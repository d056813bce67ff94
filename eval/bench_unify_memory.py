"""Peak memory and time of `unify build` on a Mixtral-8x7B-width model (random weights, full width, few layers).

    python -m eval.bench_unify_memory [--layers 2] [--workdir /tmp/mixtral-width] [--out eval/results]

A Mixtral config at full width (hidden 4096, 8 experts of 14336, top-2) but only `--layers` decoder layers and a small
vocabulary is written with save_pretrained in bf16 (per-expert on-disk layout, 2.8 GB of experts per layer). Each build
then runs in a fresh subprocess (so its peak RSS is its own, read from getrusage) for a data-free method and a
calibrated one (similarity grouping: the layer walk, the token sample and every expert's outputs; frequency merge).
`activation` is left out here: at I = 14336 its neuron matching and ridge refit are O(I^3) per member. Every build
names its methods and `--skip-layers ''` (every layer united), so the model's recipe defaults play no part. Peak RSS is
set against the size of one layer's experts: streaming should keep it near two layers' experts plus activations,
whatever the number of layers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model(path: Path, layers: int) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    if (path / "config.json").exists():
        return
    cfg = MixtralConfig(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8, vocab_size=4096)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():  # fill in place, one tensor at a time
        p.data.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="2GB")


def run_build(model: Path, out: Path, args: list[str]) -> dict:
    code = (
        "import resource, sys, time\n"
        "from unify.cli import main\n"
        "t = time.time(); rc = main(sys.argv[1:])\n"
        "print('RESULT', rc, time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    cmd = [sys.executable, "-c", code, "build", "--model", str(model), "--out", str(out), "--overwrite", "--quiet",
           "--skip-layers", "", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    if not line:
        raise SystemExit(f"build failed: {p.stderr[-2000:]}")
    _, rc, secs, rss_kb = line[0].split()
    return {"args": " ".join(args), "rc": int(rc), "seconds": round(float(secs), 1), "peak_rss_gib": round(int(rss_kb) / 2**20, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/mixtral-width")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    a = ap.parse_args()
    work = Path(a.workdir)
    t = time.time()
    make_model(work / "model", a.layers)
    made = round(time.time() - t, 1)
    layer_gib = 8 * 3 * 4096 * 14336 * 2 / 2**30
    disk_gib = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors")) / 2**30
    rows = [run_build(work / "model", work / "u-avg", ["--way", "2", "--grouping", "consecutive", "--merge", "average"]),
            run_build(work / "model", work / "u-sim", ["--way", "2", "--grouping", "similarity", "--merge", "frequency",
                                                      "--calib-tokens", "512", "--seq-len", "256", "--samples-per-layer", "512"])]
    res = {"layers": a.layers, "experts_per_layer_gib": round(layer_gib, 2), "model_on_disk_gib": round(disk_gib, 2),
           "model_write_seconds": made, "machine": f"{__import__('os').cpu_count()} CPU cores", "builds": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unify_memory.json").write_text(json.dumps(res, indent=1))
    md = [f"# unify build on a Mixtral-8x7B-width model ({a.layers} layers, random bf16 weights)", "",
          f"Model on disk {disk_gib:.1f} GiB; one layer's experts {layer_gib:.2f} GiB (bf16). {res['machine']}.", "",
          "| build | time (s) | peak RSS (GiB) | peak RSS / one layer's experts |", "|---|---|---|---|"]
    md += [f"| {r['args']} | {r['seconds']} | {r['peak_rss_gib']} | {r['peak_rss_gib'] / layer_gib:.2f} |" for r in rows]
    (out / "unify_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
