"""Time the brownout remap's two Triton paths (runtime.kernels.remap) against each other, graph-replayed on the GPU.

The one-program kernel walks every top-k slot twice in one CTA; the multi-program path counts slot chunks in
parallel and maps token blocks in parallel, in two launches. `remap` picks the second above MULTI_PROGRAM_SLOTS
top-k slots; this benchmark times both at every point (forcing the path through that constant), with a few map
block sizes (BLOCK_SLOTS), so the threshold and the block size come from a measurement. Ids and weights of every
variant are checked against runtime.policy.remap.

    python -m eval.bench_remap OUTDIR        # OUTDIR/remap_bench.json and .md

Each variant is captured in a CUDA graph with the ratio in a device tensor (as serving runs it) and replayed 200
times between two events after a warm-up; the figure is the mean per call, so launch latency inside the graph
counts and host overhead does not. The routing is kernel_bench's (skewed softmax top-k), ratio 0.5 and 1, 4-way.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from runtime import policy

rk = importlib.import_module("runtime.kernels.remap")  # the module: runtime.kernels.remap is also the function

from .bench_kernel import SHAPES, bench_eager, capture, routing

TOKENS = [32, 128, 256, 512, 1024, 4096]
BLOCKS = [256, 1024]
RATIOS = [0.5, 1.0]
WAY = 4


def variant(name: str, multi: bool, block: int):
    """Force `rk.remap`'s path and block size while `fn` is captured (both are read at launch time)."""
    def run(fn):
        saved = rk.MULTI_PROGRAM_SLOTS, rk.BLOCK_SLOTS
        rk.MULTI_PROGRAM_SLOTS, rk.BLOCK_SLOTS = (0 if multi else 1 << 62), block
        try:
            return capture(fn)
        finally:
            rk.MULTI_PROGRAM_SLOTS, rk.BLOCK_SLOTS = saved
    return name, run


VARIANTS = [variant("one program", False, 1024)] + [variant(f"multi, block {b}", True, b) for b in BLOCKS]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="result folder (remap_bench.json, remap_bench.md)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_remap needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for shape, (E, k, _, _) in SHAPES.items():
        G = -(-E // WAY)
        e2g = torch.arange(E, device="cuda") // WAY
        for T in TOKENS:
            idx, w = routing(T, E, k, gen)
            for ratio in RATIOS:
                keep = policy.keep_tensor(ratio, "cuda")
                ref = policy.remap(idx, w, e2g, G, ratio)
                row = {"shape": shape, "T": T, "slots": T * k, "ratio": ratio, "us": {}, "match": {}}
                for name, cap in VARIANTS:
                    g, (ids, wo) = cap(lambda: rk.remap(idx, w, e2g, G, 0.0, keep=keep))
                    row["us"][name] = 1e3 * bench_eager(g.replay, 200, warmup=10)  # mean of back-to-back replays
                    row["match"][name] = bool(torch.equal(ids, ref.ids)) and bool(
                        torch.allclose(wo.float(), ref.weights.float(), atol=1e-2, rtol=0))
                    del g
                rows.append(row)
                print(shape, T, ratio, {n: round(v, 1) for n, v in row["us"].items()}, flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "way": WAY,
           "multi_program_slots": rk.MULTI_PROGRAM_SLOTS, "block_slots": rk.BLOCK_SLOTS, "rows": rows}
    (out / "remap_bench.json").write_text(json.dumps(doc, indent=1))
    names = [n for n, _ in VARIANTS]
    md = [f"# Remap paths ({doc['device']}, torch {doc['torch']}), {WAY}-way, us per call (graph-replayed)", "",
          f"`remap` takes the multi-program path above {rk.MULTI_PROGRAM_SLOTS} top-k slots, block "
          f"{rk.BLOCK_SLOTS}. All ids equal runtime.policy.remap's: "
          f"{all(all(r['match'].values()) for r in rows)}.", "",
          "| shape | T | T*k | ratio | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        md.append(f"| {r['shape']} | {r['T']} | {r['slots']} | {r['ratio']:g} | "
                  + " | ".join(f"{r['us'][n]:.1f}" for n in names) + " |")
    (out / "remap_bench.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
