"""Where a forward's GPU time goes: kernel time by category, per (tokens, ratio), on the serving benchmark's model.

Builds the Qwen1.5-MoE-A2.7B-shaped model of `eval/bench_serving.py` (random weights, bf16) with its united tier
(way 4, weight average), runs the brownout kernel at every ratio (the triton backend in graph-safe mode, as the
serving benchmark's engine does with CUDA graphs), and records `--reps` eager forwards per point with torch.profiler. Each kernel's
GPU time is summed by category:

  brownout    our Triton kernels (remap, routing alignment, gate/up, down, top-k sum)
  gemm        cuBLAS / CUTLASS matmuls (attention projections, router, shared expert, lm_head)
  attention   the attention kernel itself (SDPA: flash / memory-efficient / math)
  other       everything else (norms, rotary, softmax / top-k of the router, elementwise, copies)

GPU kernel time is what a CUDA graph replays (launch gaps aside), so the table says which part of the step brownout
can shorten. It also times the same forwards replayed from a CUDA graph (`graph ms`) for the gap.
Writes `profile_forward.json` and `.md` under --out (`--tag`: another stem). `--compile-outside-experts` compiles the
norms and rotary embedding first (`runtime.compile_outside_experts`), as the serving engine can.

    python -m eval.profile_forward --tokens 1,64,512 --ratios 0,1 [--engine-seconds 6]

`--engine-seconds` adds the same breakdown per step of transformers' continuous batching at saturation (eager, so
the profiler sees each kernel): how much of a serving step the MoE is, which bounds what brownout can buy there.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from eval.bench_serving import build_model, distinct_experts, profile_graphed, uniform_routing, united_tier
from runtime.serving import BrownoutServer, FixedRatio, ServeConfig, saturation_trace

ROOT = Path(__file__).resolve().parents[1]

CATEGORIES = [  # first match wins
    ("brownout", re.compile(r"_remap_kernel|_align_|_gate_up_kernel|_down_kernel|_topk_sum_kernel")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|efficient_attention", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|sm90_|sm80_|cublas|matmul", re.I)),
]


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def kernels_by_name(prof) -> dict[str, list]:
    """name -> [total GPU ms, launches] over the CUDA kernels a torch.profiler run recorded."""
    by_name: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            d = by_name.setdefault(ev.name, [0.0, 0])
            d[0] += ev.device_time / 1e3  # us -> ms
            d[1] += 1
    return by_name


def by_category(by_name: dict[str, list], per: float) -> dict[str, float]:
    """GPU ms per category, divided by `per` (forwards or steps)."""
    cats: dict[str, float] = {}
    for name, (ms, _) in by_name.items():
        cats[category(name)] = cats.get(category(name), 0.0) + ms / per
    return cats


@torch.no_grad()
def kernel_times(model, bm, n: int, r: float, reps: int, vocab: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
    bm.set_ratio(r)
    for _ in range(2):
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            model(input_ids=x, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    by_name = kernels_by_name(prof)
    cats = by_category(by_name, reps)
    top = sorted(((ms / reps, cnt // reps, name) for name, (ms, cnt) in by_name.items()), reverse=True)[:12]
    return {"tokens": n, "ratio": r, "kernel_ms": sum(cats.values()), "by_category_ms": cats,
            "kernels_per_forward": sum(c for _, c in by_name.values()) // reps,
            "top": [{"ms": ms, "count": c, "name": name[:120]} for ms, c, name in top]}


def engine_steps(model, bm, ratios, seconds: float, graphs: bool = True, kv_padding: int = 0) -> list[dict]:
    """GPU kernel time per continuous-batching step, by category, at saturation (256 requests queued at t = 0, batch
    <= 64): the engine of eval/bench_serving.py. With `graphs` (as it serves) the engine pads queries and KV to its
    graph sizes (`kv_padding` tokens; 0: transformers' default), which changes what attention costs; the profiler
    records the kernels a graph replays on recent CUDA (if `kernel ms` comes out ~0, it did not: rerun with graphs
    off, which sees every kernel but pads nothing). A step's wall time minus its kernel time is host work; the kernel
    time is what brownout's share is taken of."""
    from torch.profiler import ProfilerActivity, profile

    cfg = ServeConfig(max_batch=64, max_batch_tokens=1024, max_queue=512, drain_timeout_s=seconds,
                      max_memory_percent=0.4, use_cuda_graph=graphs, kv_padding_tokens=kv_padding)
    out = []
    with BrownoutServer(bm, None, cfg) as srv:
        t = time.perf_counter()
        srv.run(saturation_trace(256, "alpaca", 7, 512, 256), controller=FixedRatio(0.0))  # warm-up: captures, not profiled
        warm_s = time.perf_counter() - t
        for r in ratios:
            acts = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]  # CPU: a dry run
            with profile(activities=acts) as prof:
                res = srv.run(saturation_trace(256, "alpaca", 11, 512, 256), controller=FixedRatio(r))
            steps = res.steps
            n = max(1, len(steps))
            by_name = kernels_by_name(prof)
            cats = by_category(by_name, n)
            step_ms = sorted(1e3 * x.step_s for x in steps)
            span = steps[-1].t1 - steps[0].t0 if len(steps) > 1 else float("nan")
            top = sorted(((ms / n, cnt / n, name) for name, (ms, cnt) in by_name.items()), reverse=True)[:10]
            out.append({"ratio": r, "graphs": graphs, "kv_padding": kv_padding, "warmup_s": warm_s,
                        "steps": len(steps), "batch_mean": sum(x.requests for x in steps) / n,
                        "tokens_mean": sum(x.prefill_tokens + x.decode_tokens for x in steps) / n,
                        "step_ms_p50": step_ms[len(step_ms) // 2] if step_ms else None,
                        # wall time per step (host work between steps included) and decode tokens per second
                        "wall_ms_per_step": 1e3 * span / max(1, len(steps) - 1),
                        "decode_tok_s": sum(x.decode_tokens for x in steps) / span,
                        "kernel_ms_per_step": sum(cats.values()), "by_category_ms_per_step": cats,
                        "top": [{"ms": ms, "count": c, "name": name[:120]} for ms, c, name in top]})
            e = out[-1]
            print(f"engine kv_padding={kv_padding} r={r:g}: {e['steps']} steps, batch {e['batch_mean']:.1f}, "
                  f"tokens {e['tokens_mean']:.0f}, step p50 {e['step_ms_p50']:.1f} ms, wall/step "
                  f"{e['wall_ms_per_step']:.1f} ms, {e['decode_tok_s']:.0f} decode tok/s, kernels "
                  f"{e['kernel_ms_per_step']:.2f} ms/step {({k: round(v, 2) for k, v in cats.items()})}", flush=True)
    return out


def markdown(doc: dict) -> str:
    cats = ["brownout", "gemm", "attention", "other"]
    lines = [f"# Forward GPU time by kernel category ({doc['device']})", "",
             f"{doc['model']}; {doc.get('routing', 'model')} routing (distinct experts per layer at 64 tokens: "
             f"{doc.get('distinct_experts_at_64_tokens', '-')}); brownout kernel path at every ratio; "
             f"{doc['reps']} eager forwards per point under "
             "torch.profiler (kernel time only), `graph ms`: the same forward replayed from a CUDA graph.", "",
             "| tokens | ratio | graph ms | kernel ms | " + " | ".join(cats) + " | kernels |",
             "|---|---|---|---|" + "---|" * len(cats) + "---|"]
    for p in doc["points"]:
        c = p["by_category_ms"]
        lines.append(f"| {p['tokens']} | {p['ratio']:g} | {p['graph_ms']:.2f} | {p['kernel_ms']:.2f} | "
                     + " | ".join(f"{c.get(k, 0.0):.2f}" for k in cats) + f" | {p['kernels_per_forward']} |")
    if doc.get("engine"):
        mode = "CUDA graphs on" if doc["engine"][0].get("graphs") else "eager engine"
        lines += ["", f"## Continuous-batching steps at saturation ({mode}; per step)", "",
                  "KV padding: the engine's graph grain for the KV length (0: transformers' default); wall ms: time "
                  "per step including the host work between steps, under the profiler and with any graph captured "
                  "mid-run (at grains 1024 and 256 the warm-up left many to capture), so an upper bound.", "",
                  "| KV padding | ratio | steps | batch | tokens | step p50 ms | wall ms | decode tok/s | kernel ms | "
                  + " | ".join(cats) + " |",
                  "|---|---|---|---|---|---|---|---|---|" + "---|" * len(cats)]
        for e in doc["engine"]:
            c = e["by_category_ms_per_step"]
            lines.append(f"| {e.get('kv_padding', 0)} | {e['ratio']:g} | {e['steps']} | {e['batch_mean']:.1f} | "
                         f"{e['tokens_mean']:.0f} | {e['step_ms_p50']:.1f} | {e.get('wall_ms_per_step', float('nan')):.1f} | "
                         f"{e.get('decode_tok_s', float('nan')):.0f} | {e['kernel_ms_per_step']:.2f} | "
                         + " | ".join(f"{c.get(k, 0.0):.2f}" for k in cats) + " |")
    lines += ["", "## Top kernels per point (ms per forward, launches per forward)", ""]
    for e in doc.get("engine", []):
        if e.get("top"):
            lines.append(f"- engine kv={e.get('kv_padding', 0)} r={e['ratio']:g} (per step): " +
                         "; ".join(f"{t['ms']:.2f} x{t['count']:.0f} `{t['name'][:70]}`" for t in e["top"][:8]))
    for p in doc["points"]:
        lines.append(f"- T={p['tokens']} r={p['ratio']:g}: " +
                     "; ".join(f"{t['ms']:.2f} x{t['count']} `{t['name'][:70]}`" for t in p["top"][:8]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,64,512")
    ap.add_argument("--ratios", default="0,1")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--routing", choices=["uniform", "model"], default="uniform",
                    help="as in eval/bench_serving.py")
    ap.add_argument("--engine-seconds", type=float, default=0.0,
                    help="also profile continuous-batching steps at saturation for this long per ratio (0: skip)")
    ap.add_argument("--engine-eager", action="store_true", help="profile the engine with its CUDA graphs off")
    ap.add_argument("--engine-kv-padding", default="0",
                    help="comma list of the engine's KV graph grain in tokens, one engine each (0: transformers' default)")
    ap.add_argument("--compile-outside-experts", action="store_true",
                    help="torch.compile the norms and rotary embedding first (runtime.compile_outside_experts)")
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"))
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    ap.add_argument("--tag", default="profile_forward", help="file stem of the results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_forward needs a CUDA GPU")
    from runtime import BrownoutMoE, compile_outside_experts

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(False, 0)
    vocab = model.config.vocab_size
    if args.routing == "uniform":
        uniform_routing(model)
    spread = distinct_experts(model, 64, vocab)
    bm = BrownoutMoE.attach(model, united_tier(model, Path(args.cache), False, [0, 1, -2, -1]))
    bm.set_backend("triton")
    bm.set_graph_safe(True)  # the kernel at every ratio, 0 included, in the eager forwards profiled here too
    compiled = compile_outside_experts(model).summary() if args.compile_outside_experts else None
    tokens = [int(x) for x in args.tokens.split(",")]
    ratios = [float(x) for x in args.ratios.split(",")]
    graphed = {(n, r): v for n, r, v in profile_graphed(model, bm, tokens, ratios, 10, vocab)}
    points = []
    for n in tokens:
        for r in ratios:
            p = kernel_times(model, bm, n, r, args.reps, vocab)
            p["graph_ms"] = 1e3 * graphed[(n, r)]
            points.append(p)
            print(f"T={n} r={r:g}: graph {p['graph_ms']:.2f} ms, kernels {p['kernel_ms']:.2f} ms "
                  f"{ {k: round(v, 2) for k, v in p['by_category_ms'].items()} }", flush=True)
    engine = []
    if args.engine_seconds > 0:
        for kv in (int(x) for x in args.engine_kv_padding.split(",")):
            engine += engine_steps(model, bm, ratios, args.engine_seconds, graphs=not args.engine_eager, kv_padding=kv)
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "engine": engine,
           "model": "Qwen1.5-MoE-A2.7B shape, random weights, bf16, united tier way 4 (skip layers 0, 1, -2, -1)"
                    + (f", norms and rotary embedding compiled ({compiled['norms']} norms)" if compiled else ""),
           "compiled_outside": compiled,
           "routing": args.routing, "distinct_experts_at_64_tokens": spread,
           "reps": args.reps, "points": points, "wall_s": time.time() - t0}
    (out / f"{args.tag}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{args.tag}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
