"""Brownout across 2 GPUs (issue 8): decode tokens/s and MoE-layer time versus ratio under transformers' tensor
parallelism and expert parallelism, side by side with 1 GPU, on a Qwen1.5-MoE-A2.7B-shaped model (random weights).

    python eval/bench_distributed.py                      # all phases on a 2-GPU machine (about 6-8 minutes)
    python eval/bench_distributed.py --phases prepare,single
    python eval/bench_distributed.py --phases tp,ep,report
    python eval/bench_distributed.py --shape tiny --out /tmp/x   # CPU smoke test of this script (gloo, 2 processes)

Phases (each a fresh process, so every run loads the same saved checkpoint):
  prepare  random model (router scaled x30 so routing is skewed like a trained model) -> save_pretrained, and its
           united tier (`unify build`: consecutive grouping, average merge, way 4, every layer) into --work
  single   1 GPU:   from_pretrained(device_map="cuda") + BrownoutMoE.attach
  tp       2 GPUs:  torchrun, from_pretrained(tp_plan="auto") (experts sharded on I) + runtime.distributed.attach
  ep       2 GPUs:  torchrun, from_pretrained(distributed_config=DistributedConfig(tp_size=2, ep_size=2)) (experts
           sharded by expert, attention by head; AutoEP -> all-reduce dispatch at inference) + runtime.distributed.attach
  report   eval/results/distributed_bench.{json,md}

Decode: `model.generate` greedy with KV cache, no CUDA graphs (so transformers' per-step launch overhead is in it),
batches 1 and 32, ratios 0..1. MoE-layer time: CUDA events around every fused experts module call (routing remap,
experts, and under TP/EP the all-reduce or dispatch the module runs), decode steps only, summed over layers and
averaged per step; rank 0's events (ranks run in lockstep through the collectives).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SHAPES = {
    # Qwen1.5-MoE-A2.7B: 24 layers, 60 experts top-4, H 2048, expert I 1408, shared expert 5632 (14.3B params, bf16 28.6 GB)
    "qwen1.5": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                    num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                    shared_expert_intermediate_size=5632, intermediate_size=5632, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 intermediate_size=64, vocab_size=128),
}
RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare(args):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from unify.build import BuildOptions, build

    work = Path(args.work)
    if (work / "model" / "config.json").exists() and (work / "united").exists():
        print(f"reusing {work}", flush=True)
        return
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(**SHAPES[args.shape])
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
    from runtime.distributed import attach, expert_parallel_config
    from unify.discover import find_moe_layers

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
    bm = attach(model, work / "united")
    layers = find_moe_layers(model)
    timer = ExpertsTimer([l.experts for l in layers])
    vocab = model.config.vocab_size
    sync = (lambda: torch.cuda.synchronize()) if torch.cuda.is_available() else (lambda: None)
    barrier = (lambda: torch.distributed.barrier()) if dist else (lambda: None)
    rows = []
    for b in args.batches:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, vocab, (b, args.prompt), generator=g).to(_dev())
        for r in args.ratios:
            bm.set_ratio(r)
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
            row = {"batch": b, "ratio": r, "new_tokens": args.new_tokens, "seconds": round(s, 4),
                   "tokens_per_s": round(b * args.new_tokens / s, 1),
                   "moe_ms_per_step": round(moe_ms / max(1, steps), 4),
                   "moe_ms_per_layer_step": round(moe_ms / max(1, steps) / len(layers), 4),
                   "out_checksum": int(out[:, args.prompt:].sum())}
            rows.append(row)
            if rank == 0:
                print(kind, json.dumps(row), flush=True)
    res = {"kind": kind, "world": world, "load_s": round(load_s, 1),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "extra_MiB_per_rank": round(bm.extra_bytes() / 2**20, 1),
           "max_mem_GiB_per_rank": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
           "rows": rows}
    if kind == "ep":
        pls = list(getattr(bm, "placement", {}).values())
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

    full = {"shape": args.shape, "way": args.way, "torch": torch.__version__, "transformers": transformers.__version__,
            "runs": res}
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_bench.json").write_text(json.dumps(full, indent=1))
    names = {"single": "1 GPU", "tp": "TP 2", "ep": "EP 2"}
    kinds = [k for k in ("single", "tp", "ep") if k in res]
    dev = {res[k]["device"] for k in kinds}
    L = [f"# Brownout on 2 GPUs: TP and EP through transformers ({', '.join(sorted(dev))})", "",
         f"Shape `{args.shape}` (random weights, router x30), united tier way {args.way} (consecutive, average), every "
         f"layer. torch {torch.__version__}, transformers {transformers.__version__}. `model.generate`, greedy, no CUDA "
         "graphs. MoE ms/step: fused experts modules (incl. the TP all-reduce / EP dispatch), summed over layers, per "
         "decode step, rank 0.", ""]
    for k in kinds:
        r = res[k]
        extra = f", EP members on owner rank {r.get('ep_members_on_owner')}, united per rank {r.get('ep_united_per_rank')}" if k == "ep" else ""
        L.append(f"- {names[k]}: {r['world']} x {r['device']}, united tier {r['extra_MiB_per_rank']} MiB per rank, "
                 f"peak {r['max_mem_GiB_per_rank']} GiB per rank{extra}")
    L += ["", "| batch | ratio | " + " | ".join(f"{names[k]} tok/s" for k in kinds) + " | "
          + " | ".join(f"{names[k]} MoE ms/step" for k in kinds) + " |",
          "|---|---|" + "---|" * (2 * len(kinds))]
    keyed = {k: {(row["batch"], row["ratio"]): row for row in res[k]["rows"]} for k in kinds}
    for key in sorted(keyed[kinds[0]]) if kinds else []:
        cells = [f"{keyed[k][key]['tokens_per_s']}" if key in keyed[k] else "" for k in kinds]
        cells += [f"{keyed[k][key]['moe_ms_per_step']:.2f}" if key in keyed[k] else "" for k in kinds]
        L.append(f"| {key[0]} | {key[1]:g} | " + " | ".join(cells) + " |")
    (out / "distributed_bench.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="prepare,single,tp,ep,report")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen1.5")
    ap.add_argument("--way", type=int, default=4)
    ap.add_argument("--work", default=None, help="checkpoint folder (default /tmp/brownout-dist-<shape>)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--worker", choices=["single", "tp", "ep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or f"/tmp/brownout-dist-{args.shape}"
    if args.worker:
        return worker(args)
    common = ["--shape", args.shape, "--way", str(args.way), "--work", args.work, "--new-tokens", str(args.new_tokens),
              "--prompt", str(args.prompt), "--batches", *map(str, args.batches), "--ratios", *map(str, args.ratios)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for phase in args.phases.split(","):
        t0 = time.time()
        if phase == "prepare":
            prepare(args)
        elif phase == "single":
            subprocess.run([sys.executable, __file__, "--worker", "single", *common], check=True, env=env)
        elif phase in ("tp", "ep"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                            __file__, "--worker", phase, *common], check=True, env=env)
        elif phase == "report":
            report(args)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        print(f"[{phase}] {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
