"""Controllers on the real serving engine with a known speed law: a CPU check of SLO control, no GPU needed.

The GPU benchmark (eval/bench_serving.py) measures what brownout buys; this one asks only whether a controller uses
what brownout buys. It serves a burst trace on transformers' continuous batching with `BrownoutServer` and a tiny
Qwen2-MoE on the CPU, where a forward pre-hook makes every step sleep `step_ms * (1 - gain * ratio)`: ratio 0 is
overloaded after the burst, ratio 1 is not. Everything else is the production path: the engine's own scheduling
and queueing, the per-step hook, the controllers, the metrics. Numbers are about control, not speed: the law is
synthetic and says so in every output.

    python -m eval.throttled_serving                      # eval/results/throttled_serving.{json,md,png}
    python -m eval.throttled_serving --configs fixed:0,mpc --base-rate 13 --output 10   # prompt-heavy batches
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from runtime.serving import (BrownoutServer, FixedRatio, Request, ServeConfig, Trace, burst_test, make_controller,
                             measure_capacity, summarize, timeline)

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ["fixed:0", "fixed:0.5", "fixed:1", "salc", "salc:0.5", "mpc:noload", "mpc"]


def tiny_model():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(cfg).eval()


class Throttled:
    """A serving handle (what `BrownoutServer` takes in place of a `BrownoutMoE`) whose ratio sets a speed law: each
    forward of `model` first sleeps step_ms * (1 - gain * ratio). The law reads the ratio at every forward, so it
    follows `set_ratio` in either graph-safe mode (there are no graphs on the CPU)."""

    def __init__(self, model, step_ms: float, gain: float):
        self.model, self.ratio, self.graph_safe = model, 0.0, False
        model.model.register_forward_pre_hook(lambda mod, args: time.sleep(1e-3 * step_ms * (1 - gain * self.ratio)))

    def set_ratio(self, r: float) -> None:
        self.ratio = float(r)

    def set_graph_safe(self, on: bool) -> None:
        self.graph_safe = bool(on)


def make_trace(base_rate: float, duration_scale: float, seed: int, prompt: int, output: int) -> Trace:
    """The paper's burst shape (the rate doubles at 30% of the stream), fixed request lengths."""
    t = burst_test(base_rate, duration_scale=duration_scale, seed=seed, max_prompt=prompt, max_output=output)
    return Trace([Request(q.rid, q.t, prompt, output) for q in t.requests], t.meta)


def run(configs, base_rate=4.5, duration_scale=0.05, step_ms=30.0, gain=0.6, slo_prefill=0.25, slo_decode=0.1,
        seed=3, output=30, sat_seconds=3.0, log=print, load: float | None = None) -> dict:
    """Serve the burst trace under each controller of `configs`. `load`, if given, replaces `base_rate`: the rate
    after the burst as a multiple of ratio 0's saturated rate measured on this machine, so the scenario overloads
    ratio 0 by the same factor whatever the host adds to the law's sleep (a fixed rate sits near ratio 0's
    capacity on one CPU and under it on a faster one)."""
    if load is not None and not load > 0:
        raise ValueError(f"load must be positive, got {load}")
    handle = Throttled(tiny_model(), step_ms, gain)
    cfg = ServeConfig(max_batch=8, max_batch_tokens=128, num_blocks=64, page_size=32, max_memory_percent=None,
                      drain_timeout_s=10.0)
    runs = []
    with torch.no_grad(), BrownoutServer(handle, None, cfg) as srv:
        warm = make_trace(base_rate, duration_scale, seed, 8, output)
        srv.run(Trace(warm.requests[:10], warm.meta), controller=FixedRatio(0.0))  # warm-up
        # the engine's saturated output-token rates at ratios 0 and 1: the MPC's load term
        capacity = measure_capacity(srv, seconds=sat_seconds, max_prompt=8, max_output=output)
        log(f"  saturated output tokens/s: ratio 0 {capacity[0.0]:.0f}, ratio 1 {capacity[1.0]:.0f}")
        if load is not None:  # the burst doubles the base rate
            base_rate = load * capacity[0.0] / output / 2
        tr = make_trace(base_rate, duration_scale, seed, 8, output)
        b = tr.meta["burst_at"]
        for spec in configs:
            res = srv.run(tr, controller=make_controller(spec, slo_prefill, slo_decode, capacity=capacity))
            r = {"config": spec, "all": summarize(res, slo_prefill, slo_decode),
                 "before": summarize(res, slo_prefill, slo_decode, 0.0, b),
                 "after": summarize(res, slo_prefill, slo_decode, b, tr.duration),
                 "timeline": timeline(res, max(0.25, tr.duration / 50)), "errors": res.errors}
            runs.append(r)
            log(f"  {spec:9s} TTFT violations before/after {r['before']['violation_prefill']:.3f}/"
                f"{r['after']['violation_prefill']:.3f}, TPOT after {r['after']['violation_decode']:.3f}, "
                f"mean ratio {r['all']['mean_ratio_time']:.2f}, {r['all']['status']}")
    return {"device": "CPU, synthetic speed law", "law": f"each step sleeps {step_ms:g} ms x (1 - {gain:g} x ratio)",
            "trace": tr.meta, "n": len(tr), "output": output, "capacity_tok_s": capacity,
            "calibration": {"slo_prefill": slo_prefill, "slo_decode": slo_decode},  # the SLOs, named as plot() reads
            "burst": {"trace": tr.meta, "runs": runs}}


def markdown(doc: dict) -> str:
    tm = doc["trace"]
    lines = ["# Controllers on continuous batching with a synthetic speed law (CPU)", "",
             f"Not a speed measurement: transformers' continuous batching serves a tiny Qwen2-MoE on the CPU and "
             f"{doc['law']}. Burst trace: {doc['n']} requests, {tm['duration']:.1f} s, rate {tm['base_rate']:g} -> "
             f"{2 * tm['base_rate']:g} req/s at {tm['burst_at']:.2f} s, prompt 8 / output {doc['output']} tokens, batch "
             f"<= 8. "
             f"SLOs: TTFT {doc['calibration']['slo_prefill'] * 1e3:.0f} ms, TPOT "
             f"{doc['calibration']['slo_decode'] * 1e3:.0f} ms."
             + (f" Command: `{doc['command'].strip()}`." if doc.get("command") else ""), "",
             "| config | TTFT viol. before | TTFT viol. after | TPOT viol. after | TTFT p90 ms | mean ratio |",
             "|---|---|---|---|---|---|"]
    for r in doc["burst"]["runs"]:
        lines.append(f"| {r['config']} | {100 * r['before']['violation_prefill']:.1f}% | "
                     f"{100 * r['after']['violation_prefill']:.1f}% | {100 * r['after']['violation_decode']:.1f}% | "
                     f"{1e3 * (r['all']['ttft']['p90'] or float('nan')):.0f} | {r['all']['mean_ratio_time']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--base-rate", type=float, default=4.5, help="req/s before the burst (twice that after)")
    ap.add_argument("--output", type=int, default=30, help="output tokens per request (30: batches of decode steps)")
    ap.add_argument("--duration-scale", type=float, default=0.05, help="of the paper's 250 s stream (0.05: 12.5 s)")
    ap.add_argument("--load", type=float, default=None,
                    help="rate after the burst as a multiple of ratio 0's measured saturated rate (replaces "
                         "--base-rate)")
    ap.add_argument("--step-ms", type=float, default=30.0)
    ap.add_argument("--gain", type=float, default=0.6, help="step time saved at ratio 1 (share)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    args = ap.parse_args(argv)
    from eval.bench_serving import plot

    doc = run(args.configs.split(","), args.base_rate, args.duration_scale, args.step_ms, args.gain,
              output=args.output, load=args.load)
    doc["command"] = "python -m eval.throttled_serving " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throttled_serving.json").write_text(json.dumps(doc, indent=1))
    (out / "throttled_serving.md").write_text(markdown(doc))
    plot(doc, out / "throttled_serving.png")
    print(markdown(doc))


if __name__ == "__main__":
    main()
