"""GPU benchmark of the runtime: MoE-layer time versus brownout ratio through `BrownoutMoE`'s experts
implementation, and decode tokens/s of a whole Qwen1.5-MoE-A2.7B-shaped model (random weights) versus ratio.

    python -m eval.bench_runtime OUTDIR [--quick]

Layer time: a real transformers experts module (MixtralExperts, transformers' fused layout) carrying brownout state
with random united slabs (consecutive groups), called exactly as the model calls it; each (shape, T, way, ratio)
point is captured in a CUDA graph and replayed with a 256 MiB L2 flush before every replay (median of 25), the
same method as eval/bench_kernel.py. Ratio 0 is timed twice: the model's own implementation (transformers'
grouped_mm), which is what `brownout` runs at ratio 0, and the triton backend in graph-safe mode (the same weights
read; the fair base for what brownout saves). Also given: distinct slabs read (from the remapped ids) and the physical limit
max(bytes of those slabs / copy bandwidth, FLOPs / bf16 matmul rate), measured in the same run.

Decode: `model.generate` (greedy, KV cache, no CUDA graphs, so it includes transformers' per-step launch overhead)
at batch 1 and 32 for ratios 0, 0.5, 1, with the united tier built by `unify build` (consecutive, average, way 4).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from eval.bench_kernel import SHAPES, capture, measure_limits, routing, time_graph
from runtime.backends import BACKENDS
from runtime.experts_impl import LayerState, brownout_experts_forward, clear_state, set_state
from runtime.policy import remap, slabs_read
from runtime.ratio import Ratio

RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]
WAYS = [2, 4]
TOKENS = [1, 8, 32, 128, 512, 4096]
dev = "cuda"


def layer_bench(bw, flops, tokens, ratios, ways):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, (E, k, H, I) in SHAPES.items():
        cfg = MixtralConfig(num_local_experts=E, num_experts_per_tok=k, hidden_size=H, intermediate_size=I)
        cfg._experts_implementation = "grouped_mm"
        ex = MixtralExperts(cfg).to(dev, torch.bfloat16)
        torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
        torch.nn.init.normal_(ex.down_proj, std=0.02)
        for way in ways:
            G = E // way
            slabs = {"gate_up_proj": torch.cat([ex.gate_up_proj.data, torch.randn(G, 2 * I, H, device=dev, dtype=torch.bfloat16) * 0.02]),
                     "down_proj": torch.cat([ex.down_proj.data, torch.randn(G, H, I, device=dev, dtype=torch.bfloat16) * 0.02])}
            st = LayerState(layer=0, num_experts=E, num_groups=G, expert_to_group=torch.arange(E, device=dev) // way,
                            slabs=slabs, prev_impl="grouped_mm", ratio=Ratio(0.0, dev), policy="hot-cold",
                            backend=BACKENDS["triton"])
            set_state(ex, st)
            for T in tokens:
                x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
                idx, w = routing(T, E, k, gen)
                # ratio 0 twice: the model's own grouped_mm (what `brownout` runs at ratio 0) and the triton
                # backend in graph-safe mode, which runs ratio 0 too (same weights read)
                for r, path in [(0.0, "model")] + [(r, "kernel") for r in ratios]:
                    st.ratio.set(r)
                    st.graph_safe = path == "kernel"
                    a = remap(idx, w, st.expert_to_group, G, r)
                    live = int((a.ids < E + G).sum())
                    touched = int(slabs_read(a.ids, E + G))
                    limit = max(touched * 3 * H * I * 2 / bw, 2 * live * 3 * H * I / flops) * 1e3
                    g, _ = capture(lambda: brownout_experts_forward(ex, x, idx, w))
                    ms = time_graph(g)
                    del g
                    row = {"shape": name, "way": way, "tokens": T, "ratio": r, "path": path, "slabs": touched, "ms": round(ms, 4),
                           "limit_ms": round(limit, 4), "pct_limit": round(100 * limit / ms, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del slabs, st
            clear_state(ex)
            torch.cuda.empty_cache()
        del ex
        torch.cuda.empty_cache()
    return rows


def decode_bench(ratios, batches, new_tokens=24, prompt=16):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from runtime import BrownoutMoE
    from unify.build import BuildOptions, build

    cfg = Qwen2MoeConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                         num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                         shared_expert_intermediate_size=5632, intermediate_size=5632, vocab_size=151936)
    t0 = time.time()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    for n, p in model.named_parameters():  # default init is fine; make the router skewed like a trained one
        if n.endswith("mlp.gate.weight"):
            p.data.mul_(30)
    print(f"model built in {time.time() - t0:.1f}s", flush=True)
    out = Path(tempfile.mkdtemp()) / "united"
    t0 = time.time()
    build(model, BuildOptions(out=str(out), way=4, grouping="consecutive", merge="average", skip_layers=[], progress=False))
    print(f"united tier built in {time.time() - t0:.1f}s", flush=True)
    bm = BrownoutMoE.attach(model, out, backend="triton")
    rows = []
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, prompt), device=dev)
        for r, path in [(0.0, "model")] + [(r, "kernel") for r in ratios]:
            bm.set_ratio(r)
            bm.set_graph_safe(path == "kernel")  # graph-safe: ratio 0 on the kernel too
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            s = time.perf_counter() - t
            row = {"batch": b, "ratio": r, "path": path, "new_tokens": new_tokens, "seconds": round(s, 3),
                   "tokens_per_s": round(b * new_tokens / s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    bm.detach()
    return rows


def _key(r):
    return "r=0 model" if r.get("path") == "model" else f"r={r['ratio']:g}"


def write_md(res, path):
    L = [f"# Runtime benchmark ({res['device']}, torch {res['torch']}, transformers {res['transformers']})", "",
         f"Copy bandwidth {res['copy_bw_TBps']:.2f} TB/s, bf16 matmul {res['bf16_TFLOPs']:.0f} TFLOP/s (same run).", "",
         "## MoE-layer time (ms, CUDA graph, L2 flushed) versus brownout ratio; in brackets % of the physical limit", "",
         "`r=0 model` is what `brownout` runs at ratio 0: the model's own implementation (transformers' grouped_mm), "
         "bit for bit the unmodified model. The other columns are the triton backend (at r=0 in graph-safe mode, "
         "`set_graph_safe(True)`). `r=1 / ideal`: time at r=1 over the kernel's time at r=0, divided by the same "
         "ratio of physical limits (1.0 = brownout turns every weight byte not read into time saved).", ""]
    rows = res["layer"]
    cols = ["r=0 model"] + [f"r={r:g}" for r in sorted({r["ratio"] for r in rows})]
    L.append("| shape | way | T | " + " | ".join(cols) + " | slabs read r=0 → r=1 | r=1 / ideal |")
    L.append("|---|---|---|" + "---|" * len(cols) + "---|---|")
    keys = sorted({(r["shape"], r["way"], r["tokens"]) for r in rows}, key=lambda k: (list(SHAPES).index(k[0]), k[1], k[2]))
    for s, wy, T in keys:
        pts = {_key(r): r for r in rows if (r["shape"], r["way"], r["tokens"]) == (s, wy, T)}
        cells = [f"{pts[c]['ms']:.3f} ({pts[c]['pct_limit']:.0f}%)" if c in pts else "-" for c in cols]
        z, one = pts["r=0"], pts[cols[-1]]
        vs_ideal = (one["ms"] / z["ms"]) / (one["limit_ms"] / z["limit_ms"])
        L.append(f"| {s} | {wy} | {T} | " + " | ".join(cells) + f" | {z['slabs']} → {one['slabs']} | {vs_ideal:.2f} |")
    if res.get("decode"):
        L += ["", "## Decode, Qwen1.5-MoE-A2.7B shape (random weights), `model.generate`, no CUDA graphs", "",
              "| batch | ratio | path | tokens/s |", "|---|---|---|---|"]
        L += [f"| {r['batch']} | {r['ratio']:g} | {r.get('path', '')} | {r['tokens_per_s']} |" for r in res["decode"]]
    Path(path).write_text("\n".join(L) + "\n")


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(5 * len(SHAPES), 4), squeeze=False)
    ts = sorted({r["tokens"] for r in res["layer"]})
    colors = {T: plt.cm.viridis(i / max(1, len(ts) - 1)) for i, T in enumerate(ts)}  # colour = T, line = way
    for ax, shape in zip(axes[0], SHAPES):
        for way in sorted({r["way"] for r in res["layer"]}):
            for T in ts:
                pts = sorted((r["ratio"], r["ms"]) for r in res["layer"] if r["shape"] == shape and r["way"] == way
                             and r["tokens"] == T and r.get("path", "kernel") == "kernel")
                if pts:
                    base = pts[0][1]
                    ax.plot([p[0] for p in pts], [p[1] / base for p in pts], marker="o", ls="-" if way == 2 else "--",
                            color=colors[T], label=f"T={T} {way}-way")
        ax.set_title(shape)
        ax.set_xlabel("brownout ratio")
        ax.set_ylabel("layer time / kernel time at ratio 0")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(prog="python -m eval.bench_runtime", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default="eval/results", help="where runtime_bench.json/.md/.png go")
    ap.add_argument("--quick", action="store_true", help="layer timings at the three smallest T only")
    ap.add_argument("--no-decode", action="store_true", help="skip the whole-model decode timing")
    a = ap.parse_args(argv)
    outdir, quick = Path(a.outdir), a.quick
    outdir.mkdir(parents=True, exist_ok=True)
    import transformers

    bw, flops = measure_limits()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "copy_bw_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12}
    print(json.dumps(res), flush=True)
    res["layer"] = layer_bench(bw, flops, TOKENS[:3] if quick else TOKENS, RATIOS, WAYS)
    (outdir / "runtime_bench.json").write_text(json.dumps(res, indent=1))
    if not a.no_decode:
        res["decode"] = decode_bench([0.0, 0.5, 1.0], [1, 32])
    (outdir / "runtime_bench.json").write_text(json.dumps(res, indent=1))
    write_md(res, outdir / "runtime_bench.md")
    plot(res, outdir / "runtime_bench.png")


if __name__ == "__main__":
    main()
