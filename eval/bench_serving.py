"""GPU serving benchmark: SLO-aware brownout on a Qwen1.5-MoE-A2.7B-shaped model (random weights), docs/design.md §7.

One process: build the model on the GPU (bf16, transformers' grouped_mm experts; `--routing uniform` by default, see
`uniform_routing`), build or reuse its united checkpoint (way 4, consecutive grouping, weight averaging; the recipe's
skip layers), attach `BrownoutMoE`, start one continuous-batching engine for every run (`runtime.serving.BrownoutServer`), then

  profile      time single forwards on a (tokens x ratio) grid: the start-up table of the model-predictive
               controller. With --cuda-graphs (the intended mode) they are replayed from CUDA graphs on the brownout
               kernel, which is then the path at every ratio, 0 included. Without, eager, and the faster ratio-0
               path (the model's own grouped_mm, or the kernel at r = 1e-6) is the baseline (--zero-path auto)
  calibrate    (1) saturation runs at r = 0 and r = 1 (`runtime.serving.median_saturation`: the median of
               `--sat-repeats` runs each, interleaved, `--sat-seconds` each, the batch kept full with a shallow
               queue: `--sat-queue`): service rates mu0, mu1 in req/s; (2) the
               burst rates: after-burst rate = clamp((1 + mu1/mu0)/2, 1.05, 1.6) x mu0 (over ratio 0's capacity,
               under ratio 1's where it can be), before-burst rate = half that;
               (3) a ratio-0 run at the before-burst rate; the SLOs are `--slo-factor` x its p90 TTFT and p90
               inter-token time (so ratio 0 meets them before the burst, by construction)
  burst        the paper's burst test (250 s, the rate doubles at 75 s) compressed by --duration-scale
               (0.24 -> 60 s, burst at 18 s) for each config
  poisson      Poisson load at multiples of mu0 (--rates) for capacity (highest rate with >= 90% of tokens in SLO)

  overload     Poisson at 10x mu0: bounded queue, every request answered, rejected or timed out, bounded wall time

Configs: fixed:0 (no brownout), fixed:0.5, fixed:1, salc (the paper's rule, its constants: 5 s interval, 2 s window,
unscaled), salc:<s> (the same rule checked every <s> seconds, for a compressed trace), mpc (ours). Writes
eval/results/serving_bench.json, serving_bench.md, serving_bench.png (or under --out).

The device budget is small: `--duration-scale` compresses the trace, `--phase` splits the work over two calls (the
checkpoint and calibration are cached under --cache and reused by the second call on a warm machine).
`--tiny` runs the whole thing on CPU with a tiny model in a minute (a smoke test, numbers meaningless).

Two device calls (10 minutes each at most); the second reuses the first's calibration and profile:

    python -m eval.bench_serving --phase burst --cuda-graphs --rehearse --duration-scale 0.2 \
        --configs fixed:0,fixed:0.5,fixed:1,salc,mpc:noload,mpc
    python -m eval.bench_serving --phase all --cuda-graphs --prev eval/results/serving_bench.json --configs "" \
        --poisson-configs fixed:0,fixed:1,salc:1.2,mpc --rates 0.9,1.2,1.5 --bisect 2 --poisson-seconds 10 \
        --poisson-drain-seconds 6

`--rehearse` serves the burst trace once, untimed, before the timed runs: the engine captures a CUDA graph the
first time it meets a (query, KV) padding, which stalls that step by about two eager forwards; without it the
first timed run pays for the captures (on an H100, 8 captures made a 1.3 s stall at the height of the burst).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from runtime.serving import (BrownoutServer, FixedRatio, LatencyProfile, ServeConfig, burst_test, capacity,
                             make_controller, median_saturation, poisson, saturation_trace, summarize, timeline)
from runtime.serving.calibration import REPEATS
from runtime.serving.server import ATTENTIONS

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "eval" / "results"
QWEN15_MOE = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                  moe_intermediate_size=1408, shared_expert_intermediate_size=5632, max_position_embeddings=8192,
                  norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, max_position_embeddings=2048, tie_word_embeddings=False)
CONFIGS = ["fixed:0", "fixed:0.5", "fixed:1", "salc", "mpc"]
CALL = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())  # which call (machine session) produced a run
EPS = 1e-6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------- model + tier
def build_model(tiny: bool, seed: int):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**(TINY if tiny else QWEN15_MOE))
    dev = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = Qwen2MoeForCausalLM._from_config(cfg, experts_implementation="grouped_mm", dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def uniform_routing(model) -> int:
    """Make every router of the random model pick its top-k uniformly at random per token (as a trained,
    load-balanced router does over a batch, and as the kernel benchmark's routing does); returns how many routers.

    Why: in a random-weight model the residual stream of every token drifts towards one shared direction with depth,
    so the (random) routers send a batch to few experts: at 64 tokens, 48 of 60 experts in layer 0 but 14 in
    layer 11 (CPU, 12 layers of this shape; uniform would be 59). Ratio 0 then reads about as few weights as
    ratio 1, and brownout looks useless for a reason a trained model does not have. The router still runs (its
    cost stays in the step); a forward hook replaces its choice with the top-k of fresh uniform noise (device RNG,
    so CUDA graphs replay it) and softmax weights over those k."""
    def hook(mod, inp, out):
        logits = out[0]
        noise = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
        top, idx = noise.topk(mod.top_k, dim=-1)
        w = torch.softmax(top * 4.0, dim=-1).to(out[1].dtype)
        return logits, w, idx

    routers = _routers(model)
    for m in routers:
        m.register_forward_hook(hook)
    return len(routers)


def _routers(model) -> list:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    return [m for m in model.modules() if isinstance(m, Qwen2MoeTopKRouter)]


def distinct_experts(model, tokens: int, vocab: int) -> list[int]:
    """Distinct experts each router picks for one random batch of `tokens` tokens (how spread the routing is)."""
    seen = []
    hs = [m.register_forward_hook(lambda mod, i, o: seen.append(int(o[2].unique().numel()))) for m in _routers(model)]
    try:
        dev = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.randint(1, vocab, (1, tokens), device=dev), use_cache=False, logits_to_keep=1)
    finally:
        for h in hs:
            h.remove()
    return seen


def united_tier(model, cache: Path, tiny: bool, skip_layers):
    from unify.build import BuildOptions, build
    from runtime.checkpoint import UnitedCheckpoint, fingerprint_tensors, probe_matches, weight_probe
    from runtime.discover import find_moe_layers

    out = cache / ("united-tiny-w4" if tiny else "united-qwen15moe-w4")
    if (out / "united.json").is_file():
        moe = {l.index: l for l in find_moe_layers(model)}
        ck = UnitedCheckpoint(out)
        first, last = moe[ck.layers[0]].experts.gate_up_proj, moe[ck.layers[-1]].experts.gate_up_proj
        if probe_matches(ck.meta["base_model"].get("weight_probe", []), weight_probe(fingerprint_tensors(first, last))):
            log(f"reusing united checkpoint {out}")
            return out
    t = time.time()
    dev = "cpu" if tiny else "cuda"
    build(model, BuildOptions(out=str(out), way=4, grouping="consecutive", merge="average", device=dev,
                              overwrite=True, progress=False, skip_layers=skip_layers))
    log(f"built united checkpoint {out} in {time.time() - t:.1f} s")
    return out


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- profile
@torch.no_grad()
def profile(model, bm, tokens, ratios, reps: int, dev: str, vocab: int) -> tuple[list, dict]:
    """(tokens, ratio, seconds) points of single eager forwards, plus the ratio-0 path comparison."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pts = []
    zero = {}

    def once(n, r_set):
        x = torch.randint(1, vocab, (1, n), generator=g).to(dev)
        bm.set_ratio(r_set)
        sync(dev)
        t = time.perf_counter()
        model(input_ids=x, use_cache=False, logits_to_keep=1)
        sync(dev)
        return time.perf_counter() - t

    for n in tokens:  # warm-up (kernel compilation, autotuning) for every size and path
        for r in ratios + [EPS]:
            once(n, r)
    for n in tokens:
        for r in ratios:
            for _ in range(reps):
                pts.append((n, r, once(n, r)))
        for path, r in (("prev_impl", 0.0), ("kernel_eps", EPS)):
            zero.setdefault(path, {})[n] = float(np.median([once(n, r) for _ in range(reps)]))
    bm.set_ratio(0.0)
    return pts, zero


@torch.no_grad()
def profile_graphed(model, bm, tokens, ratios, reps: int, vocab: int) -> list:
    """(tokens, ratio, seconds) points of single forwards replayed from one CUDA graph per token count, as the
    engine runs them with --cuda-graphs (graph-safe mode: the kernel at every ratio, its ratio a device scalar the
    graph reads, so one capture serves every ratio). Median of `reps` replays timed with CUDA events, after warm-up
    replays."""
    before = bm.graph_safe
    bm.set_graph_safe(True)
    try:
        return _replay_points(model, bm, tokens, ratios, reps, vocab)
    finally:
        bm.set_graph_safe(before)


def _replay_points(model, bm, tokens, ratios, reps: int, vocab: int) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    pts = []
    for n in tokens:
        x = torch.randint(1, vocab, (1, n), generator=g).cuda()
        fwd = lambda: model(input_ids=x, use_cache=False, logits_to_keep=1)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile / autotune every ratio's kernels before the capture
            for r in ratios:
                bm.set_ratio(r)
                fwd()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd()
        for r in ratios:
            bm.set_ratio(r)
            for _ in range(3):
                graph.replay()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            pts.append((n, r, float(np.median(ts))))
        del graph
    bm.set_ratio(0.0)
    torch.cuda.synchronize()
    return pts


# --------------------------------------------------------------------------------------------------- runs
def serve(srv: BrownoutServer, trace, ctl, scfg: ServeConfig):
    """One run on the server's engine. Only the driver's settings (queue bound, timeouts, drain) of `scfg` may
    differ between runs; the engine's (batch, tokens, cache, graphs) were fixed when it started."""
    srv.cfg = scfg
    return srv.run(trace, controller=ctl)


def calibrate(srv, args, scfg) -> dict:
    cal = {}
    srv.cfg = scfg  # the saturation runs change only the driver's settings of the bench's own
    # the median of --sat-repeats runs per ratio, as the library's measure_capacity: one run moves by about +-5%
    sat = median_saturation(srv, (0.0, 1.0), args.sat_repeats, seconds=args.sat_seconds, queue=args.sat_queue,
                            rate=args.sat_rate, lengths=args.lengths, max_prompt=args.max_prompt,
                            max_output=args.max_output)
    for r, m in sat.items():
        cal[f"sat_r{r:g}"] = m
        log(f"saturation r={r:g} (median of {len(m['runs'])} runs, req/s {m['runs']}): {m}")
    cal["sat_queue"] = args.sat_queue
    mu0, mu1 = cal["sat_r0"]["req_s"], cal["sat_r1"]["req_s"]
    f = min(1.6, max(1.05, (1 + mu1 / mu0) / 2)) if mu0 > 0 and math.isfinite(mu1) else 1.3
    cal.update(mu0=mu0, mu1=mu1, burst_rate=f * mu0, base_rate=f * mu0 / 2, burst_factor_over_mu0=f)
    tr = poisson(cal["base_rate"], args.base_seconds, lengths=args.lengths, seed=12, max_prompt=args.max_prompt,
                 max_output=args.max_output)
    res = serve(srv, tr, FixedRatio(0.0), scfg)
    m = summarize(res, 1e9, 1e9, t0=min(2.0, args.base_seconds / 4))
    cal["base_run"] = {"ttft": m["ttft"], "tpot": m["tpot"], "status": m["status"]}
    cal["slo_prefill"] = args.slo_prefill or args.slo_factor * m["ttft"]["p90"]
    cal["slo_decode"] = args.slo_decode or args.slo_factor * m["tpot"]["p90"]
    cal["slo_prefill"] = max(cal["slo_prefill"], cal["slo_decode"])
    log(f"calibration: mu0 {mu0:.2f} req/s, mu1 {mu1:.2f} req/s, base rate {cal['base_rate']:.2f} -> "
        f"{cal['burst_rate']:.2f} req/s; SLO TTFT {cal['slo_prefill'] * 1e3:.0f} ms, TPOT {cal['slo_decode'] * 1e3:.0f} ms")
    return cal


def controller(spec: str, cal: dict, prof):
    """A fresh controller for one run: the calibration's SLOs, a copy of the start-up profile (the MPC learns into
    it) and the engine's saturated decode-token rates at ratios 0 and 1 (the MPC's load term)."""
    p = LatencyProfile(prof.tokens, prof.ratios, [row[:] for row in prof.lat]) if prof is not None else None
    cap = {r: cal[f"sat_r{r:g}"]["tok_s"] for r in (0.0, 1.0) if f"sat_r{r:g}" in cal}
    return make_controller(spec, cal["slo_prefill"], cal["slo_decode"], profile=p,
                           capacity=cap if len(cap) == 2 else None)


def one_config(srv, spec, trace, cal, prof, scfg, windows: dict) -> dict:
    sp, sd = cal["slo_prefill"], cal["slo_decode"]
    ctl = controller(spec, cal, prof)
    t = time.time()
    res = serve(srv, trace, ctl, scfg)
    st = [x.step_s for x in res.steps]
    dec = [x.step_s for x in res.steps if x.prefill_tokens == 0]
    out = {"config": spec, "wall_s": time.time() - t, "errors": res.errors, "call": CALL,
           "all": summarize(res, sp, sd),
           "steps": {"n": len(st), "busy_s": float(sum(st)),
                     "step_ms_p50": 1e3 * float(np.median(st)) if st else None,
                     "decode_step_ms_p50": 1e3 * float(np.median(dec)) if dec else None,
                     "graphs_captured": res.graphs_captured,
                     "batch_mean": float(np.mean([x.requests for x in res.steps])) if st else None}}
    for name, (a, b) in windows.items():
        out[name] = summarize(res, sp, sd, a, b)
    out["timeline"] = timeline(res, max(0.5, trace.duration / 60))
    log(f"  {spec:10s} viol pre/dec {out['all']['violation_prefill']:.3f}/{out['all']['violation_decode']:.3f} "
        f"mean r {out['all']['mean_ratio_time'] or 0:.2f} ttft p90 {out['all']['ttft']['p90'] or float('nan'):.3f} "
        f"tpot p90 {out['all']['tpot']['p90'] or float('nan'):.3f} status {out['all']['status']} "
        f"steps {out['steps']['n']} (p50 {out['steps']['step_ms_p50'] or float('nan'):.1f} ms, busy "
        f"{out['steps']['busy_s']:.1f} s, graphs captured {res.graphs_captured})"
        f"{' errors ' + str(res.errors) if res.errors else ''}")
    return out


# --------------------------------------------------------------------------------------------------- report
def fmt(v, pct=False, ms=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    if ms:
        return f"{1e3 * v:.0f}"
    return f"{v:.2f}"


def kind_attainment(m: dict) -> float | None:
    """The stricter of first-token (TTFT) and later-token (TPOT) attainment: on an all-token count the ~60 decode
    tokens of a request outvote its one first token, so a queue that makes most first tokens late can still
    leave 90% of all tokens in SLO."""
    vals = [1 - v for v in (m["violation_prefill"], m["violation_decode"]) if v is not None]
    return min(vals) if vals else None


MEASURES = {"all tokens": lambda m: m["attainment"], "first and later tokens each": kind_attainment}


def capacities(p: dict) -> dict:
    """Per measure and config: the highest Poisson rate with >= 90% attainment (None: not even the lowest rate),
    and whether that is only a lower bound (the highest rate tried still passed)."""
    out = {}
    for name, f in MEASURES.items():
        caps, lb = {}, {}
        for spec, rr in p["runs"].items():
            caps[spec] = capacity([(r["rate"], f(r["all"])) for r in rr])
            top = max(rr, key=lambda r: r["rate"]) if rr else None  # the highest rate this config ran at passed
            lb[spec] = top is not None and (f(top["all"]) or 0) >= 0.9
        out[name] = {"capacity": caps, "lower_bound": lb}
    return out


def markdown(doc: dict) -> str:
    cal = doc.get("calibration", {})
    lines = [f"# Serving benchmark: SLO-aware brownout ({doc['device']})", "",
             f"Model: {doc['model']}. United tier: {doc['united']}. Ratio-0 path: {doc.get('zero_path')}. "
             + ("transformers' CUDA graphs on (the brownout kernel at every ratio, 0 included; the ratio is a device "
                "scalar the graphs read), " if doc["args"].get("cuda_graphs") else "CUDA graphs off, ")
             + f"synchronous batching, batch <= "
             f"{doc['serve']['max_batch']}, queue <= {doc['serve']['max_queue']}.", ""]
    if cal:
        lines += [f"Calibration: ratio-0 service rate mu0 = {cal['mu0']:.2f} req/s, ratio-1 mu1 = {cal['mu1']:.2f} "
                  f"req/s; SLOs (x{doc['args']['slo_factor']} the ratio-0 p90 at the before-burst rate): TTFT "
                  f"{cal['slo_prefill'] * 1e3:.0f} ms, TPOT {cal['slo_decode'] * 1e3:.0f} ms.", ""]
    if "burst" in doc:
        b = doc["burst"]
        tm = b["trace"]
        lines += [f"## Burst test ({tm['duration']:.0f} s, rate {tm['base_rate']:.2f} -> {2 * tm['base_rate']:.2f} "
                  f"req/s at {tm['burst_at']:.0f} s; duration scale {tm['duration_scale']}; {tm['n']} requests, "
                  f"{tm['lengths']} lengths)", "",
                  "| config | viol. TTFT before | viol. TTFT after | viol. TPOT before | viol. TPOT after | viol. all | "
                  "goodput tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | TPOT spread p99-p50 ms | "
                  "TPOT std ms | mean ratio | rejected/timeout | call |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b["runs"]:
            a, pre, post = r["all"], r["before"], r["after"]
            st = a["status"]
            lines.append(
                f"| {r['config']} | {fmt(pre['violation_prefill'], True)} | {fmt(post['violation_prefill'], True)} | "
                f"{fmt(pre['violation_decode'], True)} | {fmt(post['violation_decode'], True)} | "
                f"{fmt(a['violation_all'], True)} | {fmt(a['goodput_tok_s'])} | "
                f"{fmt(a['ttft']['p50'], ms=True)}/{fmt(a['ttft']['p90'], ms=True)}/{fmt(a['ttft']['p99'], ms=True)} | "
                f"{fmt(a['tpot']['p50'], ms=True)}/{fmt(a['tpot']['p90'], ms=True)}/{fmt(a['tpot']['p99'], ms=True)} | "
                f"{fmt(a['tpot_spread'], ms=True)} | {fmt(a['tpot']['std'], ms=True)} | {fmt(a['mean_ratio_time'])} | "
                f"{st.get('rejected', 0)}/{st.get('timeout', 0)} | {r.get('call', '-')} |")
        lines.append("")
    if "poisson" in doc:
        p = doc["poisson"]
        # every rate some config ran at (configs kept from a --prev call may have their own grid)
        rates = sorted({round(r["rate"], 9) for runs in p["runs"].values() for r in runs} | {round(x, 9) for x in p["rates"]})
        cp = capacities(p)
        for name, f in MEASURES.items():
            caps, lb = cp[name]["capacity"], cp[name]["lower_bound"]
            lines += [f"## Poisson load ({p['seconds']:.0f} s per point): SLO attainment, {name}, by rate (req/s)",
                      "", "| config | " + " | ".join(f"{x:.2f}" for x in rates) + " | capacity @90% | vs ratio 0 | "
                      "mean ratio per rate |", "|---|" + "---|" * (len(rates) + 3)]
            base = caps.get("fixed:0")
            for spec, runs in p["runs"].items():
                by_rate = {round(r["rate"], 9): r for r in runs}
                row = [by_rate.get(x) for x in rates]  # `rates` are rounded the same way
                att = [f(r["all"]) if r else None for r in row]
                cap = caps.get(spec)
                ge = lambda s: ">= " if lb.get(s) and caps.get(s) else ""  # noqa: E731
                rel = f"{ge(spec)}{cap / base:.2f}x" if cap and base and not lb.get("fixed:0") else "-"
                mr = [r["all"]["mean_ratio_time"] if r else None for r in row]
                # mid-run CUDA graph captures stall steps: marked, not hidden
                cap_n = [(r.get("steps") or {}).get("graphs_captured", 0) if r else 0 for r in row]
                lines.append(f"| {spec} | " + " | ".join(fmt(a, True) + (f" ({n} graph capture{'s' * (n > 1)})" if n else "")
                                                         for a, n in zip(att, cap_n)) +
                             f" | {ge(spec)}{fmt(cap)} | {rel} | {', '.join(fmt(x) for x in mr)} |")
            extra = {spec: [r for r in runs if r.get("bisection")] for spec, runs in p["runs"].items()}
            if any(extra.values()):
                lines += ["", "Bisection points (rate req/s: attainment), included in the capacities: " + "; ".join(
                    f"{spec}: " + ", ".join(f"{r['rate']:.2f}: {fmt(f(r['all']), True)}" for r in rs)
                    for spec, rs in extra.items() if rs) + "."]
            calls = sorted({r.get("call") for runs in p["runs"].values() for r in runs if r.get("call")})
            if len(calls) > 1:
                lines += ["", f"Runs from {len(calls)} device calls ({', '.join(calls)}) on one calibration."]
            lines.append("")
    if doc.get("overload"):
        o = doc["overload"]
        lines += [f"## Overload: Poisson at {o['factor']:g}x ratio 0's service rate", "",
                  f"The driver admits at most {o['max_queue']} requests not yet scheduled and rejects the rest at "
                  "once; `max waiting` is the engine's own queue, which also holds requests it moved back from the "
                  "batch under cache pressure (so up to the bound plus one batch). Every request ends ok, rejected or "
                  "timed out, within the arrivals plus the drain (`wall s (bound)`).", "",
                  "| config | rate req/s | requests | ok | rejected | timeout | failed | max waiting | wall s (bound) "
                  "| goodput tok/s | mean ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in o["runs"]:
            st = r["status"]
            lines.append(f"| {r['config']} | {r['rate']:.0f} | {r['requests']} | {st.get('ok', 0)} | "
                         f"{st.get('rejected', 0)} | {st.get('timeout', 0)} | {st.get('failed', 0)} | "
                         f"{r['max_waiting']} | {r['wall_s']:.0f} ({r['bound_s']:.0f}) | {fmt(r['goodput_tok_s'])} | "
                         f"{fmt(r['mean_ratio'])} |")
        lines.append("")
    if doc.get("notes"):
        lines += ["## Notes (read before quoting)", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    pr = doc.get("profile")
    if pr:
        how = "replayed from a CUDA graph, median" if doc.get("profile_graphed") else "eager, median"
        lines += [f"## Start-up profile: one forward, no KV cache (ms, {how}), the MPC controller's prior", "",
                  "| tokens | " + " | ".join(f"r={r:g}" for r in pr["ratios"]) + " |",
                  "|---|" + "---|" * len(pr["ratios"])]
        for n, row in zip(pr["tokens"], pr["lat"]):
            lines.append(f"| {n} | " + " | ".join(f"{1e3 * v:.2f}" for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = doc["burst"]
    fig, ax = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    first = b["runs"][0]["timeline"]
    ax[0].step(first["t"], first["arrivals_per_s"], where="mid", color="k")
    ax[0].set_ylabel("arrivals / s")
    ax[0].axvline(b["trace"]["burst_at"], color="grey", ls=":")
    for r in b["runs"]:
        tl = r["timeline"]
        nan = lambda v: [x if x is not None else np.nan for x in v]  # noqa: E731
        ax[1].plot(tl["t"], nan(tl["ttft_p90"]), label=r["config"])
        ax[2].plot(tl["t"], nan(tl["tpot_p90"]), label=r["config"])
        ax[3].plot(tl["t"], nan(tl["ratio"]), label=r["config"])
    cal = doc["calibration"]
    ax[1].axhline(cal["slo_prefill"], color="r", ls="--", lw=0.8)
    ax[2].axhline(cal["slo_decode"], color="r", ls="--", lw=0.8)
    ax[1].set_ylabel("p90 TTFT (s)")
    ax[1].set_yscale("log")
    ax[2].set_ylabel("p90 TPOT (s)")
    ax[3].set_ylabel("mean ratio")
    ax[3].set_xlabel("time (s)")
    ax[3].legend(ncol=5, fontsize=8)
    fig.suptitle(f"Burst test on {doc['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["burst", "poisson", "overload", "all"], default="all")
    ap.add_argument("--overload-factor", type=float, default=10.0, help="overload phase: Poisson rate = this x mu0")
    ap.add_argument("--overload-seconds", type=float, default=10.0)
    ap.add_argument("--overload-configs", default="fixed:0,mpc")
    ap.add_argument("--duration-scale", type=float, default=0.24, help="compress the 250 s burst trace (0.24: 60 s)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--poisson-configs", default="fixed:0,fixed:1,salc,mpc")
    ap.add_argument("--rates", default="0.7,1.0,1.3,1.6", help="Poisson rates as multiples of mu0")
    ap.add_argument("--poisson-seconds", type=float, default=15.0)
    ap.add_argument("--bisect", type=int, default=0,
                    help="Poisson phase: after the rate grid, this many runs per config bisecting between its "
                         "highest passing and lowest failing rate (first and later tokens each at 90%%)")
    ap.add_argument("--lengths", default="alpaca")
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--slo-factor", type=float, default=2.0,
                    help="SLOs = this x ratio 0's p90 TTFT / inter-token time at the before-burst rate. 2 puts them "
                         "at ~3-5 engine steps, as the paper's 0.25 s / 0.15 s were for its steps; at 1.25 (~2-3 steps) "
                         "any queueing is a miss")
    ap.add_argument("--slo-prefill", type=float, default=None, help="fix the TTFT SLO (s) instead of calibrating")
    ap.add_argument("--slo-decode", type=float, default=None, help="fix the TPOT SLO (s) instead of calibrating")
    ap.add_argument("--sat-seconds", type=float, default=6.0)
    ap.add_argument("--sat-repeats", type=int, default=REPEATS,
                    help=f"calibration: saturation runs per ratio, the median kept (default {REPEATS}, as the "
                         "library's measure_capacity)")
    ap.add_argument("--sat-queue", type=int, default=16,
                    help="calibration: keep the batch full with at most this many requests waiting (arrivals at "
                         "--sat-rate, the excess rejected); 0: queue everything at t = 0 (understates the service "
                         "rate: the scheduler spends host time per waiting request)")
    ap.add_argument("--sat-rate", type=float, default=120.0,
                    help="calibration arrivals, req/s (with --sat-queue): well above the service rate, not so far "
                         "that rejecting the excess competes with the engine for the host (on the CPU smoke test "
                         "400 req/s slowed the steps by a quarter); a warning says when the queue ran dry")
    ap.add_argument("--base-seconds", type=float, default=10.0)
    ap.add_argument("--zero-path", choices=["auto", "prev_impl", "kernel_eps"], default="auto")
    ap.add_argument("--profile-reps", type=int, default=3)
    ap.add_argument("--routing", choices=["uniform", "model"], default="uniform",
                    help="uniform: each router's top-k replaced by uniform random choices (see uniform_routing: a "
                         "random model's own routing collapses onto few experts with depth); model: the random "
                         "routers as they are")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="transformers' continuous-batching CUDA graphs on. The server puts the brownout layers in "
                         "graph-safe mode: the triton kernel at every ratio (0 included: the ratio-0 baseline is the "
                         "same kernel), reading the ratio from device memory, so the captured graphs follow the "
                         "controller (the start-up profile is then timed from CUDA graphs too)")
    ap.add_argument("--async-batching", action="store_true",
                    help="transformers' async batching (CUDA): the host prepares the next step while the GPU runs "
                         "this one; steps are timed by CUDA events. On an H200 it served 23-31%% more at ratios 0 "
                         "and 1 (eval/results/README.md, \"Async batching on 5.24\")")
    ap.add_argument("--attention", choices=ATTENTIONS, default="sdpa",
                    help="the engine's attention (ServeConfig.attention): sdpa, masked over the whole batch's KV, or "
                         "varlen, packed sequences through torch's FlashAttention (its PyTorch twin on the CPU)")
    ap.add_argument("--stop-if-no-gain", action="store_true",
                    help="skip the burst and Poisson runs when calibration finds ratio 1 serving no faster than "
                         "ratio 0 (saves device time on a diagnostic call)")
    ap.add_argument("--kv-padding", type=int, default=4096,
                    help="with --cuda-graphs: the engine's KV padding grain in tokens (0: transformers' default, "
                         "16384 tokens). Finer = less attention over padding, more graphs to capture. On the H100 "
                         "at saturation (eval/results/profile_forward.md) the default grain made a step 31 ms at "
                         "ratio 0, of which 9.9 ms attention; at 1024 it was 21 ms, but the extra graphs were "
                         "captured mid-run. 4096 covers this workload's KV reads (~4k tokens) in one or two grains")
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--max-batch-tokens", type=int, default=1024)
    ap.add_argument("--drain-seconds", type=float, default=30.0,
                    help="after the last arrival, wait this long; what is left is cancelled (and its tokens count as "
                         "misses; at 10 s about 12 long requests per run were cut on an H100)")
    ap.add_argument("--poisson-drain-seconds", type=float, default=10.0,
                    help="drain after a Poisson point's last arrival (what is left then counts as missed tokens)")
    ap.add_argument("--cache", default=str(ROOT / ".bench_cache"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="serving_bench")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prev", default=None, help="a previous results JSON: reuse its calibration, profile, zero path "
                    "and merge into it (the second call of a split run)")
    ap.add_argument("--rehearse", action="store_true",
                    help="burst phase: serve the trace once at ratio 0, untimed, before the timed runs (captures the "
                         "engine graphs its shapes need; costs one trace length)")
    ap.add_argument("--time-budget", type=float, default=560.0, help="s: skip runs that would end past this")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="no runs: rewrite the markdown table and plot of a results JSON (under --out)")
    args = ap.parse_args(argv)
    if args.sat_repeats < 1:
        ap.error("--sat-repeats must be at least 1")
    if args.async_batching and args.tiny:
        ap.error("--async-batching needs CUDA (transformers overlaps steps on CUDA streams), not --tiny")
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save(doc, Path(args.out), args.tag)
        log(f"wrote {Path(args.out) / args.tag}.json/.md/.png from {args.report}")
        return

    from runtime import BrownoutMoE

    t_all = time.time()
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cpu" if args.tiny else "cuda"
    device_name = "CPU (tiny smoke test)" if args.tiny else torch.cuda.get_device_name(0)
    log(f"device {device_name}; building model")
    model = build_model(args.tiny, args.seed)
    log(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)")
    skip = [0, -1] if args.tiny else [0, 1, -2, -1]  # the recipe's (the paper leaves the first and last two alone)
    vocab = model.config.vocab_size
    log(f"routing of the random model: distinct experts per layer at 64 tokens {distinct_experts(model, 64, vocab)}")
    if args.routing == "uniform":
        n = uniform_routing(model)
        log(f"uniform routing on {n} routers: distinct experts per layer at 64 tokens "
            f"{distinct_experts(model, 64, vocab)}")
    udir = united_tier(model, cache, args.tiny, skip)
    bm = BrownoutMoE.attach(model, udir)
    if args.cuda_graphs:  # the fused kernel; the server puts it in graph-safe mode, so it runs at ratio 0 as well
        bm.set_backend("triton")
    log(bm.summary().splitlines()[2])

    tokens = [1, 8, 16, 32, 64, 128, 256, 512, 1024] if not args.tiny else [1, 8, 32, 64]
    ratios = [0.0, 0.25, 0.5, 0.75, 1.0]
    prev = json.loads(Path(args.prev).read_text()) if args.prev else None
    prof_file = cache / f"{args.tag}_profile.json"
    if prev is not None:
        pdoc = {"points": prev["profile_points"], "zero": prev["zero_paths_s"], "graphed": prev.get("profile_graphed")}
        log("reusing the profile of --prev")
    elif prof_file.is_file() and not args.tiny:
        pdoc = json.loads(prof_file.read_text())
        log("reusing profile")
    elif args.cuda_graphs and dev == "cuda":
        t = time.time()
        pts = profile_graphed(model, bm, tokens, ratios, max(5, args.profile_reps), vocab)
        pdoc = {"points": pts, "zero": {}, "graphed": True}
        prof_file.write_text(json.dumps(pdoc))
        log(f"profiled {len(pts)} graph-replayed forwards in {time.time() - t:.1f} s: "
            + ", ".join(f"{n}x{r:g}: {1e3 * v:.2f} ms" for n, r, v in pts))
    else:
        t = time.time()
        pts, zero = profile(model, bm, tokens, ratios, args.profile_reps, dev, vocab)
        pdoc = {"points": pts, "zero": {k: {str(n): v for n, v in d.items()} for k, d in zero.items()}}
        prof_file.write_text(json.dumps(pdoc))
        log(f"profiled {len(pts)} forwards in {time.time() - t:.1f} s; ratio-0 paths {zero}")
    prof = LatencyProfile.from_points(pdoc["points"], tokens=tokens, ratios=ratios)
    zero = pdoc["zero"]
    zero_path = "kernel" if args.cuda_graphs else args.zero_path
    if zero_path == "auto":
        ks = [n for n in zero["prev_impl"] if int(n) >= 16]
        faster = sum(zero["kernel_eps"][n] < zero["prev_impl"][n] for n in ks)
        zero_path = "kernel_eps" if faster > len(ks) / 2 else "prev_impl"
    log(f"ratio-0 baseline path: {zero_path}")
    handle = bm
    if zero_path == "kernel_eps":  # the same fused kernel at every ratio: r = 0 -> 1e-6 (every expert stays hot)
        for i, n in enumerate(prof.tokens):  # the profile's r = 0 column is then the kernel's
            prof.lat[i][0] = float(zero["kernel_eps"][str(n)])
        handle = KernelAtZero(bm)

    scfg = ServeConfig(max_batch=64, max_batch_tokens=args.max_batch_tokens, max_queue=args.max_queue,
                       queue_timeout_s=30.0, request_timeout_s=60.0, drain_timeout_s=args.drain_seconds,
                       num_blocks=64 if args.tiny else None, page_size=32 if args.tiny else 256,
                       max_memory_percent=None if args.tiny else 0.4, seed=args.seed,
                       use_cuda_graph=args.cuda_graphs, kv_padding_tokens=args.kv_padding,
                       async_batching=args.async_batching, attention=args.attention)
    srv = BrownoutServer(handle, None, scfg)
    srv.start()  # one engine for every run below: same batching, same cache, CUDA graphs captured once
    try:
        _phases(args, srv, scfg, prof, pdoc, zero, zero_path, cache, out, prev, device_name, skip, t_all)
    finally:
        srv.close()


class KernelAtZero:
    """The serving handle of the eager `kernel_eps` baseline: ratio 0 is sent as 1e-6, so the fused kernel runs at
    every ratio with every expert hot at 0 (for CUDA graphs the server uses graph-safe mode instead)."""

    def __init__(self, bm):
        self.bm, self.model = bm, bm.model

    def set_ratio(self, r: float) -> None:
        self.bm.set_ratio(EPS if r == 0.0 else r)


def _phases(args, srv, scfg, prof, pdoc, zero, zero_path, cache, out, prev, device_name, skip, t_all):
    if args.cuda_graphs:  # capture the engine's graphs (one per padded batch size) before anything is timed
        t = time.time()
        tr = saturation_trace(3 * scfg.max_batch, args.lengths, 7, args.max_prompt, args.max_output)
        # let it run to the end: kernel compilation and captures make the first steps take seconds, and a warm-up
        # cut short leaves the captures to the first timed run
        res = serve(srv, tr, FixedRatio(0.0), ServeConfig(**{**scfg.__dict__, "max_queue": len(tr),
                                                                "drain_timeout_s": 120.0,
                                                                "request_timeout_s": 150.0}))
        log(f"engine warm-up (graph capture): {len(res.steps)} steps in {time.time() - t:.1f} s, "
            f"{res.graphs_captured} graphs, status {summarize(res, 1e9, 1e9)['status']}{' errors ' + str(res.errors) if res.errors else ''}")
        if res.errors or not res.steps:
            raise SystemExit("the engine failed during warm-up: " + ("; ".join(res.errors) or "no step ran"))
    cal_file = cache / f"{args.tag}_calibration.json"
    if prev is not None:
        cal = prev["calibration"]
        log(f"reusing the calibration of --prev: {cal['mu0']:.2f} req/s, SLOs {cal['slo_prefill']:.3f}/{cal['slo_decode']:.3f}")
    elif cal_file.is_file() and not args.tiny:
        cal = json.loads(cal_file.read_text())
        log(f"reusing calibration: {cal['mu0']:.2f} req/s, SLOs {cal['slo_prefill']:.3f}/{cal['slo_decode']:.3f}")
    else:
        cal = calibrate(srv, args, scfg)
        cal_file.write_text(json.dumps(cal))
        if args.stop_if_no_gain and not cal["mu1"] > 1.02 * cal["mu0"]:
            log(f"ratio 1 serves {cal['mu1']:.2f} req/s, ratio 0 {cal['mu0']:.2f}: no gain to control, stopping "
                "(--stop-if-no-gain)")
            args.configs, args.poisson_configs = "", ""

    res_file = out / f"{args.tag}.json"
    doc = prev if prev is not None else (json.loads(res_file.read_text()) if res_file.is_file() else {})
    doc.update({"device": device_name, "torch": torch.__version__,
                "model": ("Qwen1.5-MoE-A2.7B shape, random weights, bf16" if not args.tiny else "tiny Qwen2-MoE (CPU)")
                + f", {args.routing} routing",
                "united": f"way 4, consecutive groups, weight average, skip layers {skip}",
                "zero_path": zero_path, "zero_paths_s": zero, "args": vars(args), "calibration": cal,
                "serve": scfg.__dict__, "profile_points": pdoc["points"], "profile": {"tokens": prof.tokens, "ratios": prof.ratios, "lat": prof.lat},
                "profile_graphed": bool(pdoc.get("graphed"))})

    if args.phase in ("burst", "all"):
        tr = burst_test(cal["base_rate"], args.duration_scale, lengths=args.lengths, seed=args.seed + 1,
                        max_prompt=args.max_prompt, max_output=args.max_output)
        tr.save(out / f"{args.tag}_burst_trace.json")  # comes back from the device with the results
        if not args.tiny:
            tr.save(ROOT / "eval" / "traces" / f"{args.tag}_burst.json")
        b_at = tr.meta["burst_at"]
        windows = {"before": (0.0, b_at), "after": (b_at, tr.duration)}
        log(f"burst trace: {len(tr)} requests, {tr.duration:.0f} s, burst at {b_at:.1f} s")
        specs = [c for c in args.configs.split(",") if c]
        old = doc.get("burst") or {}
        kept = [r for r in old.get("runs", []) if r["config"] not in specs] if old.get("trace") == tr.meta else []
        if kept:  # a --prev call re-running some configs on the same trace: the others' runs are kept
            log(f"keeping the burst runs of {[r['config'] for r in kept]} from --prev")
        doc["burst"] = {"trace": tr.meta, "runs": kept, "skipped": []}
        if args.rehearse and specs:
            # one untimed pass of the same trace at ratio 0: the engine captures the graphs of the shapes this trace
            # makes (KV grains the short warm-up never reached); captured mid-run instead, 8 of them made a 1.3 s
            # stall at the height of an H100 burst that its queue never recovered from
            t = time.time()
            res = serve(srv, tr, FixedRatio(0.0), scfg)
            log(f"rehearsal of the burst trace at ratio 0 (untimed): {time.time() - t:.0f} s, "
                f"{res.graphs_captured} graphs captured")
        for spec in specs:
            if time.time() - t_all + tr.duration + args.drain_seconds > args.time_budget:
                doc["burst"]["skipped"].append(spec)
                log(f"  {spec}: skipped (time budget)")
                continue
            doc["burst"]["runs"].append(one_config(srv, spec, tr, cal, prof, scfg, windows))
            save(doc, out, args.tag)
    if args.phase in ("poisson", "all"):
        rates = [float(x) * cal["mu0"] for x in args.rates.split(",")]
        pspecs = [c for c in args.poisson_configs.split(",") if c]
        old = doc.get("poisson") or {}
        # a --prev call running other configs keeps the earlier configs' runs (same calibration, same run length)
        pr = {k: v for k, v in old.get("runs", {}).items() if k not in pspecs} \
            if old.get("seconds") == args.poisson_seconds else {}
        if pr:
            log(f"keeping the Poisson runs of {sorted(pr)} from --prev")
        pcfg = ServeConfig(**{**scfg.__dict__, "drain_timeout_s": args.poisson_drain_seconds})

        def point(spec: str, lam: float, seed: int, **extra) -> bool:
            """One Poisson run of `spec` at `lam` req/s, kept in the doc; False if the time budget forbids it."""
            if time.time() - t_all + args.poisson_seconds + args.poisson_drain_seconds > args.time_budget:
                log(f"  {spec} @ {lam:.2f}: skipped (time budget)")
                return False
            tr = poisson(lam, args.poisson_seconds, lengths=args.lengths, seed=seed, max_prompt=args.max_prompt,
                         max_output=args.max_output)
            r = one_config(srv, spec, tr, cal, prof, pcfg, {})
            r.pop("timeline")
            pr[spec].append({**r, "rate": lam, **extra})
            doc["poisson"] = {"rates": rates, "seconds": args.poisson_seconds, "runs": pr}
            save(doc, out, args.tag)
            return True

        for spec in pspecs:
            pr[spec] = []
            for i, lam in enumerate(rates):
                point(spec, lam, 100 + i)
            # bisection between the highest passing and the lowest failing grid rate (first and later tokens each
            # at 90%): the grid alone left every config's capacity inside one interval on the H100
            for k in range(args.bisect):
                ok = [r["rate"] for r in pr[spec] if (kind_attainment(r["all"]) or 0) >= 0.9]
                bad = [r["rate"] for r in pr[spec] if (kind_attainment(r["all"]) or 0) < 0.9]
                lo, hi = max(ok, default=None), min((b for b in bad if b > max(ok, default=0)), default=None)
                if lo is None or hi is None or not point(spec, (lo + hi) / 2, 300 + k, bisection=True):
                    break
        log(f"capacity @90%: {doc.get('poisson', {}).get('capacities')}")
    if args.phase in ("overload", "all"):
        # far past capacity: the queue must stay bounded (max_queue), every request must end answered, rejected or
        # timed out, and the run must end within arrivals + drain
        lam = args.overload_factor * cal["mu0"]
        tr = poisson(lam, args.overload_seconds, lengths=args.lengths, seed=200, max_prompt=args.max_prompt,
                     max_output=args.max_output)
        ocfg = ServeConfig(**{**scfg.__dict__, "drain_timeout_s": args.poisson_drain_seconds})
        runs = []
        for spec in [c for c in args.overload_configs.split(",") if c]:
            if time.time() - t_all + args.overload_seconds + args.poisson_drain_seconds + 30 > args.time_budget:
                log(f"  overload {spec}: skipped (time budget)")
                continue
            t = time.time()
            res = serve(srv, tr, controller(spec, cal, prof), ocfg)
            m = summarize(res, cal["slo_prefill"], cal["slo_decode"])
            r = {"config": spec, "rate": lam, "requests": len(tr), "status": m["status"], "errors": res.errors,
                 "max_waiting": max([x.waiting for x in res.steps], default=0), "wall_s": time.time() - t,
                 "bound_s": args.overload_seconds + args.poisson_drain_seconds, "goodput_tok_s": m["goodput_tok_s"],
                 "ttft_p50_of_served": m["ttft"]["p50"], "mean_ratio": m["mean_ratio_time"], "call": CALL}
            runs.append(r)
            log(f"  overload {spec} @ {lam:.0f} req/s: {r['status']} max waiting {r['max_waiting']} "
                f"wall {r['wall_s']:.1f} s errors {res.errors}")
        doc["overload"] = {"factor": args.overload_factor, "max_queue": scfg.max_queue, "runs": runs}
        save(doc, out, args.tag)
    doc["wall_s_last_call"] = time.time() - t_all
    save(doc, out, args.tag)
    log(f"wrote {out / args.tag}.json/.md/.png ({time.time() - t_all:.0f} s)")


def save(doc: dict, out: Path, tag: str) -> None:
    if doc.get("poisson"):
        doc["poisson"]["capacities"] = capacities(doc["poisson"])
    (out / f"{tag}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{tag}.md").write_text(markdown(doc))
    if doc.get("burst", {}).get("runs"):
        try:
            plot(doc, out / f"{tag}.png")
        except Exception as e:  # a plot must never lose the numbers
            log(f"plot failed: {e!r}")


if __name__ == "__main__":
    main()
