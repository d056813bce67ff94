"""Brownout across 2 GPUs: decode tokens/s and MoE-layer time versus ratio under transformers' tensor
parallelism and expert parallelism, side by side with 1 GPU, on a Qwen1.5-MoE-A2.7B-shaped model (or
Qwen3-30B-A3B-shaped, --shape qwen3-30b), random weights.

    python -m eval.bench_distributed                      # all phases on a 2-GPU machine (about 6-8 minutes)
    python -m eval.bench_distributed --phases prepare,single
    python -m eval.bench_distributed --phases tp,ep,report
    python -m eval.bench_distributed --shape qwen3-30b --tag distributed_bench_qwen3_h200   # Qwen3-30B-A3B shape
    python -m eval.bench_distributed --compile --graph-only    # norms and rope compiled, graphed step only
    python -m eval.bench_distributed --shape tiny --out /tmp/x   # CPU smoke test of this script (gloo, 2 processes)

Phases (each a fresh process, so every run loads the same saved checkpoint):
  prepare  random model (router scaled x30 so routing is skewed like a trained model) -> save_pretrained, and its
           united tier (`unify build`: consecutive grouping, average merge, way 4, every layer) into --work
  single   1 GPU:   from_pretrained(device_map="cuda") + BrownoutMoE.attach
  tp       2 GPUs:  torchrun, from_pretrained(tp_plan="auto") + BrownoutMoE.attach (experts sharded on I
           where the model's TP plan shards them: transformers 5.24's Qwen2-MoE plan does, 5.17's leaves them whole
           on every rank; the JSON's "experts" says which)
  ep       2 GPUs:  torchrun, from_pretrained(distributed_config=expert_parallel_config(2)) (experts sharded by
           expert; 5.24: AutoEP -> all-reduce dispatch at inference, 5.17: enable_expert_parallel with an ep_router)
           + BrownoutMoE.attach
  report   eval/results/<tag>.{json,md,png} (--tag, default distributed_bench)

The figures in eval/results: `python -m eval.bench_distributed --ratios 0 0.5 1` (about 5 minutes on 2 H100;
distributed_bench.*), and on 2 H200 with transformers 5.24 the same with `--tag distributed_bench_qwen15_h200` and,
for the Qwen3-30B-A3B shape, `--shape qwen3-30b --ratios 0 0.5 1 --new-tokens 16 --tag distributed_bench_qwen3_h200`
(prepare 155 s, single 120 s, tp and ep 100-135 s each); with `--compile --graph-only` and tags
`distributed_bench_qwen15_h200_compiled` / `distributed_bench_qwen3_h200_compiled` (Qwen1.5: 280 s for all phases;
Qwen3-30B: 490 s).

Decode: `model.generate` greedy with KV cache, no CUDA graphs (so transformers' per-step launch overhead is in it),
batches 1, 32 and 128, ratios 0..1; and per point the same decode step replayed from a CUDA graph over a static KV
cache, the TP/EP collectives captured with it (`graphed_decode_ms`; a capture that fails is reported, not hidden).
MoE-layer time: CUDA events around every fused experts module call (routing remap,
experts, and under TP/EP the all-reduce or dispatch the module runs), decode steps only, summed over layers and
averaged per step; rank 0's events (ranks run in lockstep through the collectives). Under CUDA graphs the MoE time
is the graphed step less the same step with null experts (`null_experts`), with no host time in either.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

SHAPES = {
    # Qwen1.5-MoE-A2.7B: 24 layers, 60 experts top-4, H 2048, expert I 1408, shared expert 5632 (14.3B params, bf16 28.6 GB)
    "qwen1.5": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                    num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                    shared_expert_intermediate_size=5632, intermediate_size=5632, vocab_size=151936),
    # Qwen3-30B-A3B: 48 layers, 128 experts top-8, H 2048, expert I 768, no shared expert (30.5B params, bf16 61 GB)
    "qwen3-30b": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                      num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936, norm_topk_prob=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 intermediate_size=64, vocab_size=128),
}
RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]
MODULE = "eval.bench_distributed"  # each phase runs as `python -m` from the repository root


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    from unify.build import BuildOptions, build

    work = Path(args.work)
    if (work / "model" / "config.json").exists() and (work / "united").exists():
        print(f"reusing {work}", flush=True)
        return
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape])
    cfg = AutoConfig.for_model(shape.pop("model_type", "qwen2_moe"), **shape)
    t0 = time.time()
    with torch.device(_dev()):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if _dev() == "cuda" else torch.float32).eval()
    for n, p in model.named_parameters():
        if n.endswith("mlp.gate.weight"):
            p.data.mul_(30)
    model.save_pretrained(work / "model")
    print(f"model built and saved in {time.time() - t0:.1f}s", flush=True)
    t0 = time.time()
    build(model, BuildOptions(out=str(work / "united"), way=args.way, grouping="consecutive", merge="average",
                              skip_layers=[], progress=False))
    print(f"united tier built in {time.time() - t0:.1f}s", flush=True)


class ExpertsTimer:
    """Events around every fused experts call; decode calls are those with T == batch rows."""

    def __init__(self, modules):
        self.calls: list[tuple[int, object, object]] = []
        self.on = False
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self._open = {}

    def _now(self):
        if torch.cuda.is_available():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, mod, args):
        if self.on:
            self._open[id(mod)] = (args[0].shape[0], self._now())

    def _post(self, mod, args, out):
        if self.on and id(mod) in self._open:
            T, start = self._open.pop(id(mod))
            self.calls.append((T, start, self._now()))

    def decode_ms(self, batch: int) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for T, a, b in self.calls if T == batch)
        return 1e3 * sum(b - a for T, a, b in self.calls if T == batch)


@contextlib.contextmanager
def null_experts(layers):
    """Inside the block every MoE layer's routed experts return zeros at once: no expert math, no routing remap, and
    no collective of the experts' own (EP's dispatch or all-reduce; a TP all-reduce hooked after the experts still
    runs, on zeros). A step timed so is the rest of the step; the difference to the full step is the MoE time."""
    saved = []
    for layer in layers:
        ex = layer.experts
        saved.append((ex, ex.__dict__.get("forward")))
        ex.forward = lambda hidden_states, *a, **k: torch.zeros_like(hidden_states)
    try:
        yield
    finally:
        for ex, fwd in saved:
            if fwd is None:
                del ex.forward
            else:
                ex.forward = fwd


def graphed_decode_ms_writes(reps: int) -> int:
    """Runs of the decode step in `graphed_decode_ms`: 3 warm-up, 1 capture, 3 warm-up replays, `reps` timed."""
    return 7 + reps


def graph_cache_len(prompt: int, cache_len: int, reps: int) -> int:
    return max(cache_len, prompt + graphed_decode_ms_writes(reps))


def graphed_decode_ms(model, ids: torch.Tensor, cache_len: int, reps: int, barrier) -> tuple[float | None, str | None]:
    """One decode step after a prefill of `ids` into a static KV cache of `cache_len` tokens, replayed from a CUDA
    graph: (ms per step, None), or (None, why) where the step could not be captured. A static cache attends over its
    whole length, so each replay is the work of a real decode step with `cache_len` keys. Where each replay writes:
    transformers 5.17's static cache at the step's `cache_position` (the same slot every time); 5.24's at a device
    counter of its own, which every run of the step advances, so `cache_len` is raised to hold every write (prompt
    + 7 + reps; a write past the end is an out-of-bounds index_copy_). Timed by CUDA events around `reps` replays
    after 3 warm-up replays, ranks aligned by a barrier first. Under TP/EP the collectives are captured with the step
    (NCCL), so the ranks replay in lockstep. On the CPU the same step runs eager, timed by the clock: a smoke test of
    this code, not a figure."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=graph_cache_len(ids.shape[1], cache_len, reps))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill: positions 0 .. p-1
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.full((1,), ids.shape[1], dtype=torch.long, device=ids.device)

        def step():
            return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

        if not torch.cuda.is_available():
            for _ in range(graphed_decode_ms_writes(0)):  # as many untimed runs as the GPU path makes (cache writes)
                step()
            t = time.perf_counter()
            for _ in range(reps):
                step()
            return 1e3 * (time.perf_counter() - t) / reps, None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocations and lazy set-up before the capture
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            barrier()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        except Exception as e:  # noqa: BLE001 - reported in the results, the eager figures stand
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        ms = a.elapsed_time(b) / reps
        del graph
        return ms, None


def worker(args):
    kind = args.worker
    dist = kind in ("tp", "ep")
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from runtime import BrownoutMoE, compile_outside_experts, expert_parallel_config
    from runtime.discover import find_moe_layers

    work = Path(args.work)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    t0 = time.time()
    if kind == "single":
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype, device_map=_dev())
    elif kind == "tp":
        model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype, tp_plan="auto")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            work / "model", dtype=dtype, distributed_config=expert_parallel_config(world))
    model.eval()
    load_s = time.time() - t0
    bm = BrownoutMoE.attach(model, work / "united")
    compiled = compile_outside_experts(model, args.compile_backend).summary() if args.compile else None
    layers = find_moe_layers(model)
    timer = ExpertsTimer([l.experts for l in layers])
    vocab = model.config.vocab_size
    sync = (lambda: torch.cuda.synchronize()) if torch.cuda.is_available() else (lambda: None)
    barrier = (lambda: torch.distributed.barrier()) if dist else (lambda: None)
    rows = []
    # ratio 0 runs the model's own experts implementation (transformers' grouped_mm): what a user has without
    # brownout. Where the layers run the triton backend (1 GPU, TP, EP), ratio 0 is also timed on the kernel in
    # graph-safe mode (path "kernel"), the path r > 0 runs, so the ratio's own effect is visible apart from the change
    # of implementation. (EP runs grouped_mm over its local slabs; its ratio 0 is transformers' EP forward.)
    points = [(r, "auto") for r in args.ratios]
    if bm.backend == "triton" and 0.0 in args.ratios:
        points.insert(1, (0.0, "kernel"))
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, vocab, (b, args.prompt), generator=g).to(_dev())
        null_ms = None  # the same graphed step with null experts: what the MoE time is measured against
        if args.graph_reps > 0:
            bm.set_ratio(0.0)  # the routers as at ratio 0 (5.17's EP router hands the experts its sliced routing)
            bm.set_graph_safe(False)
            with null_experts(layers):
                null_ms, _ = graphed_decode_ms(model, ids, args.prompt + args.new_tokens, args.graph_reps, barrier)
        for r, path in points:
            bm.set_ratio(r)
            bm.set_graph_safe(path == "kernel")
            eager = {"seconds": None, "tokens_per_s": None, "moe_ms_per_step": None, "moe_ms_per_layer_step": None,
                     "out_checksum": None}
            if not args.graph_only:
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
                    sync()
                    barrier()
                    timer.calls.clear()
                    timer.on = True
                    t = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                         do_sample=False)
                    sync()
                    s = time.perf_counter() - t
                    timer.on = False
                steps = args.new_tokens - 1  # the first new token comes from the prefill
                moe_ms = timer.decode_ms(b)
                eager = {"seconds": round(s, 4), "tokens_per_s": round(b * args.new_tokens / s, 1),
                         "moe_ms_per_step": round(moe_ms / max(1, steps), 4),
                         "moe_ms_per_layer_step": round(moe_ms / max(1, steps) / len(layers), 4),
                         "out_checksum": int(out[:, args.prompt:].sum())}
            g_ms, g_err = (graphed_decode_ms(model, ids, args.prompt + args.new_tokens, args.graph_reps, barrier)
                           if args.graph_reps > 0 else (None, "not asked for"))
            row = {"batch": b, "ratio": r, "path": path, "new_tokens": args.new_tokens, **eager,
                   # the same decode step replayed from a CUDA graph (graphed_decode_ms): no host launch overhead
                   "graph_ms_per_step": None if g_ms is None else round(g_ms, 4),
                   "graph_tokens_per_s": None if g_ms is None else round(1e3 * b / g_ms, 1),
                   "graph_error": g_err,
                   "graph_cache_len": graph_cache_len(args.prompt, args.prompt + args.new_tokens, args.graph_reps),
                   # MoE time per graphed step: the full step less the step with null experts (null_experts)
                   "graph_moe_ms_per_step": None if g_ms is None or null_ms is None else round(g_ms - null_ms, 4)}
            rows.append(row)
            if rank == 0:
                print(kind, json.dumps(row), flush=True)
    import transformers

    res = {"kind": kind, "world": world, "load_s": round(load_s, 1), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "extra_MiB_per_rank": round(bm.extra_bytes() / 2**20, 1), "backend": bm.backend,
           # how the experts ended up: "tp"/"ep"/"ep-router" (runtime.placement), or "replicated" where the loaded
           # model's plan left the experts whole on every rank (transformers 5.17's Qwen2-MoE TP plan does)
           "experts": sorted(set(bm.mode.values()) - {"local"}) or (["replicated"] if dist else ["whole"]),
           "compiled": compiled,  # what compile_outside_experts compiled (None: nothing)
           "max_mem_GiB_per_rank": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
           "rows": rows}
    if kind == "ep":
        pls = list(bm.placement.values())
        res["ep_members_on_owner"] = round(sum(p.members_on_owner() for p in pls) / max(1, len(pls)), 3)
        res["ep_united_per_rank"] = [len(l) for l in pls[0].local] if pls else None
    if rank == 0:
        (work / f"{kind}.json").write_text(json.dumps(res, indent=1))
    if dist:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def report(args):
    work, out = Path(args.work), Path(args.out)
    res = {k: json.loads((work / f"{k}.json").read_text()) for k in ("single", "tp", "ep") if (work / f"{k}.json").exists()}
    import transformers

    # versions as the workers saw them (the report may be rebuilt elsewhere from their JSON)
    tv = sorted({r.get("torch", torch.__version__) for r in res.values()}) or [torch.__version__]
    hv = sorted({r.get("transformers", transformers.__version__) for r in res.values()}) or [transformers.__version__]
    full = {"shape": args.shape, "way": args.way, "torch": ", ".join(tv), "transformers": ", ".join(hv), "runs": res}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(full, indent=1))
    names = {"single": "1 GPU", "tp": "TP 2", "ep": "EP 2"}
    kinds = [k for k in ("single", "tp", "ep") if k in res]
    eager = [k for k in kinds if any(row.get("tokens_per_s") for row in res[k]["rows"])]  # none under --graph-only
    dev = {res[k]["device"] for k in kinds}
    L = [f"# Brownout on 2 GPUs: TP and EP through transformers ({', '.join(sorted(dev))})", "",
         f"Shape `{args.shape}` (random weights, router x30), united tier way {args.way} (consecutive, average), every "
         f"layer. torch {full['torch']}, transformers {full['transformers']}. "
         + ("`model.generate`, greedy, no CUDA graphs. MoE ms/step: fused experts modules (incl. the TP all-reduce / "
            "EP dispatch), summed over layers, per decode step, rank 0 (CUDA events: GPU time between a module's first "
            "and last kernel, idle gaps included). " if eager else "")
         + "Ratio 0 is the model's own experts implementation; `0 (kernel)` is ratio 0 on the triton backend in "
         "graph-safe mode, the path r > 0 runs.", ""]
    compiled = {k: res[k].get("compiled") for k in kinds if res[k].get("compiled")}
    if compiled:
        c = next(iter(compiled.values()))
        L += [f"Compiled outside the experts (`--compile`, {', '.join(names[k] for k in compiled)}): torch.compile "
              f"({c['backend']}) of the model's {c['norms']} RMSNorm modules and its rotary embedding; experts, "
              "routers and attention matmuls as uncompiled, the same at every ratio.", ""]
    for k in kinds:
        r = res[k]
        extra = f", EP members on owner rank {r.get('ep_members_on_owner')}, united per rank {r.get('ep_united_per_rank')}" if k == "ep" else ""
        how = f", experts {'/'.join(r['experts'])}" if "experts" in r else ""
        L.append(f"- {names[k]}: {r['world']} x {r['device']}{how}, united tier {r['extra_MiB_per_rank']} MiB per rank, "
                 f"peak {r['max_mem_GiB_per_rank']} GiB per rank{extra}")
    keyed = {k: {(row["batch"], row["ratio"], row.get("path", "auto")): row for row in res[k]["rows"]} for k in kinds}
    order = {"auto": 0, "kernel": 1}
    if eager:
        L += ["", "| batch | ratio | " + " | ".join(f"{names[k]} tok/s" for k in eager) + " | "
              + " | ".join(f"{names[k]} MoE ms/step" for k in eager) + " |",
              "|---|---|" + "---|" * (2 * len(eager))]
        for key in sorted(set().union(*map(set, keyed.values())), key=lambda x: (x[0], x[1], order.get(x[2], 2))):
            cells = [f"{keyed[k][key]['tokens_per_s']}" if key in keyed[k] else "" for k in eager]
            cells += [f"{keyed[k][key]['moe_ms_per_step']:.2f}" if key in keyed[k] else "" for k in eager]
            r = f"{key[1]:g}" + (" (kernel)" if key[2] == "kernel" else "")
            L.append(f"| {key[0]} | {r} | " + " | ".join(cells) + " |")
    else:
        L += ["", "Eager `generate` not timed (`--graph-only`)."]
    graphed = [k for k in kinds if any(row.get("graph_tokens_per_s") for row in res[k]["rows"])]
    if graphed:
        cpu = all(res[k]["device"] == "cpu" for k in graphed)
        lens = sorted({row.get("graph_cache_len") or row["new_tokens"] + args.prompt
                       for k in graphed for row in res[k]["rows"]})
        L += ["", f"Decode step replayed from a CUDA graph (static KV cache of {'/'.join(map(str, lens))} slots, "
              "attended in full; the collectives captured with the step): tokens/s; MoE ms/step = that step less "
              "the same step with null experts (`null_experts`: no expert math, remap or expert collective), "
              "rank 0; and ratio 1 over ratio 0 on the same path."
              + (" On the CPU the same step runs eager: a smoke test of the code, not a figure." if cpu else ""), "",
              "| batch | ratio | " + " | ".join(f"{names[k]} tok/s" for k in graphed) + " | "
              + " | ".join(f"{names[k]} MoE ms/step" for k in graphed) + " |",
              "|---|---|" + "---|" * (2 * len(graphed))]
        for key in sorted(set().union(*map(set, keyed.values())), key=lambda x: (x[0], x[1], order.get(x[2], 2))):
            cells = []
            for k in graphed:
                row = keyed[k].get(key)
                cells.append("" if row is None else str(row.get("graph_tokens_per_s")) if row.get("graph_tokens_per_s")
                             else f"- ({row.get('graph_error')})")
            for k in graphed:
                moe = (keyed[k].get(key) or {}).get("graph_moe_ms_per_step")
                cells.append("" if moe is None else f"{moe:.2f}")
            r = f"{key[1]:g}" + (" (kernel)" if key[2] == "kernel" else "")
            L.append(f"| {key[0]} | {r} | " + " | ".join(cells) + " |")
        for k in graphed:
            for b in sorted({key[0] for key in keyed[k]}):
                one = keyed[k].get((b, 1.0, "auto"), {}).get("graph_tokens_per_s")
                zero = keyed[k].get((b, 0.0, "kernel"), keyed[k].get((b, 0.0, "auto"), {})).get("graph_tokens_per_s")
                if one and zero:
                    L.append(f"- {names[k]}, batch {b}: ratio 1 / ratio 0 (same kernel where timed) = "
                             f"{one / zero:.2f}x")
    L += ["", f"![tokens/s and MoE time per decode step versus ratio]({args.tag}.png)"]
    (out / f"{args.tag}.md").write_text("\n".join(L) + "\n")
    try:
        plot(res, names, out / f"{args.tag}.png")
    except Exception as e:  # a plot must never lose the numbers
        print(f"plot failed: {e!r}", flush=True)
    print("\n".join(L))


def plot(res: dict, names: dict, path: Path) -> None:
    """tokens/s (top) and MoE ms per decode step (bottom) versus ratio, one column per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({row["batch"] for r in res.values() for row in r["rows"]})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 8.5), squeeze=False)
    for j, b in enumerate(batches):
        for k, r in res.items():
            rows = sorted((x for x in r["rows"] if x["batch"] == b), key=lambda x: x["ratio"])
            auto = [x for x in rows if x.get("path", "auto") == "auto"]
            kern = [x for x in rows if x.get("path") == "kernel"]
            for i, key in enumerate(("tokens_per_s", "moe_ms_per_step")):
                timed = [x for x in auto if x.get(key) is not None]  # none under --graph-only
                line, = axes[i][j].plot([x["ratio"] for x in timed], [x[key] for x in timed], "o-",
                                        label=names[k] if timed else None)
                gkey = "graph_tokens_per_s" if i == 0 else "graph_moe_ms_per_step"
                graphed = [x for x in auto if x.get(gkey) is not None]
                if graphed:  # the same decode step replayed from a CUDA graph
                    axes[i][j].plot([x["ratio"] for x in graphed], [x[gkey] for x in graphed], "^--",
                                    color=line.get_color(), label=f"{names[k]}, CUDA-graph step")
                ek = [x for x in kern if x.get(key) is not None]
                if ek:
                    axes[i][j].plot([x["ratio"] for x in ek], [x[key] for x in ek], "s", mfc="none",
                                    color=line.get_color(), label=f"{names[k]}, ratio 0 on the kernel")
                gk = [x for x in kern if x.get(gkey) is not None]
                if gk:
                    axes[i][j].plot([x["ratio"] for x in gk], [x[gkey] for x in gk], "^", mfc="none", ms=9,
                                    color=line.get_color(), label=f"{names[k]}, ratio 0 on the kernel, CUDA-graph step")
        axes[0][j].set_title(f"batch {b}")
        axes[0][j].set_ylabel("decode tokens/s")
        axes[1][j].set_ylabel("MoE ms per decode step")
        axes[1][j].set_yscale("log")  # eager (host-bound) and graphed MoE times differ tenfold
        axes[1][j].set_xlabel("brownout ratio")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    dev = sorted({r["device"] for r in res.values()})
    eager = any(row.get("tokens_per_s") for r in res.values() for row in r["rows"])
    comp = any(r.get("compiled") for r in res.values())
    fig.suptitle(f"Brownout under TP and EP ({', '.join(dev)}): " + ("model.generate (solid), " if eager else "")
                 + "one decode step replayed from a CUDA graph (dashed)"
                 + (", norms and rotary embedding compiled" if comp else ""))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="prepare,single,tp,ep,report")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5")
    ap.add_argument("--way", type=int, default=4)
    ap.add_argument("--work", default=None, help="checkpoint folder (default /tmp/brownout-dist-<shape>)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    ap.add_argument("--tag", default="distributed_bench", help="report file names: TAG.json, TAG.md, TAG.png")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--graph-reps", type=int, default=20,
                    help="replays of the CUDA-graph decode step per point (0: eager generate only)")
    ap.add_argument("--graph-only", action="store_true",
                    help="time only the CUDA-graph decode step (no eager generate figures)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the norms and rotary embedding outside the experts (compile_outside_experts)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    ap.add_argument("--worker", choices=["single", "tp", "ep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.graph_only and args.graph_reps <= 0:
        ap.error("--graph-only needs --graph-reps > 0: nothing would be timed")
    args.work = args.work or f"/tmp/brownout-dist-{args.shape}"
    if args.worker:
        return worker(args)
    common = ["--shape", args.shape, "--way", str(args.way), "--work", args.work, "--new-tokens", str(args.new_tokens),
              "--prompt", str(args.prompt), "--batches", *map(str, args.batches), "--ratios", *map(str, args.ratios),
              "--graph-reps", str(args.graph_reps), "--compile-backend", args.compile_backend,
              *(["--graph-only"] if args.graph_only else []), *(["--compile"] if args.compile else [])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    failed = []
    for phase in args.phases.split(","):
        t0 = time.time()
        rc = 0
        if phase == "prepare":  # a process of its own: the random model it builds must not hold GPU memory later
            rc = subprocess.run([sys.executable, "-m", MODULE, "--phases", "_prepare", *common], env=env,
                                cwd=ROOT).returncode
        elif phase == "_prepare":
            prepare(args)
        elif phase == "single":
            rc = subprocess.run([sys.executable, "-m", MODULE, "--worker", "single", *common], env=env,
                                cwd=ROOT).returncode
        elif phase in ("tp", "ep"):
            rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={args.nproc}", "-m", MODULE, "--worker", phase, *common], env=env,
                                cwd=ROOT).returncode
        elif phase == "report":
            report(args)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        if rc:  # go on: a later phase (the report above all) still gives what the others measured
            failed.append(phase)
        print(f"[{phase}] {time.time() - t0:.1f}s" + (f" FAILED (exit {rc})" if rc else ""), flush=True)
    if failed:
        raise SystemExit(f"phases failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
