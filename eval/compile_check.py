"""The serving benchmark's model compiled and graphed: one forward's time, eager against torch.compile, each replayed
from a CUDA graph, at ratio 0 and 1 through the same fused kernel, and the non-expert floor (null experts).

Builds the Qwen1.5-MoE-A2.7B-shaped model of `eval/bench_serving.py` (random bf16 weights, uniform routing, united
tier way 4, consecutive groups, weight average, the recipe's skip layers), attaches it with the triton backend in
graph-safe mode (the kernel at ratio 0 too, its ratio a device scalar), and times one forward of T tokens as
`eval/profile_forward.py` does (`bench_serving.profile_graphed`: one sequence, no cache, last token's logits; one
graph captured per variant, replayed at each ratio; median of --reps replays after warm-up, CUDA events):

  eager       the model's own forward, captured in a CUDA graph
  compiled    torch.compile(model, fullgraph=True) (the experts as runtime.ops custom ops), compiled at ratio 0,
              then captured the same way; every later call and replay runs under error_on_recompile, so a ratio
              change that needed a new graph would stop the run
  outside     the eager forward with only the norms and the rotary embedding compiled
              (`runtime.compile_outside_experts`, the serving engine's option), captured the same way
  null        the same three for the model with a null experts implementation (zeros): attention, shared expert,
              router, norms, embeddings and lm_head, what brownout cannot shorten

Correctness, per ratio: the compiled forward (direct and replayed) and the eager replay against the eager forward,
relative error of the logits ||a - b|| / ||b||, with the same seed for the routing noise (inductor is told to use
PyTorch's own random ops, so both draw the same noise).

    python -m eval.compile_check --out DIR            # GPU: a few minutes, most of it compilation
    python -m eval.compile_check --tiny --out DIR     # CPU smoke test: reference backend, aot_eager, no graphs

Writes compile_check.json and compile_check.md under --out (each stage as it ends, so a run cut short keeps what ran).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor.config
from transformers.integrations.moe import ExpertsInterface

from eval.bench_serving import build_model, profile_graphed, uniform_routing, united_tier

ROOT = Path(__file__).resolve().parents[1]
NULL = "null"
MAX_REL_ERR = 2e-2  # bf16 logits after 24 layers, two compilers' summation orders


def null_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts implementation that computes nothing: the routed experts' share of a forward removed."""
    return torch.zeros_like(hidden_states)


ExpertsInterface.register(NULL, null_experts_forward)


class NoTier:
    """What `profile_graphed` asks of a united tier, for the model without one (the null-experts floor)."""

    graph_safe = True

    def set_graph_safe(self, on: bool) -> None:
        pass

    def set_ratio(self, r: float) -> None:
        pass


@contextlib.contextmanager
def null_experts_impl(model):
    """The model's experts swapped for the null implementation (zeros) inside the block, its own after."""
    impl = model.config._experts_implementation
    model.config._experts_implementation = NULL
    try:
        yield
    finally:
        model.config._experts_implementation = impl


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def call(fn, x, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # the routing noise of `uniform_routing`
    return fn(input_ids=x, use_cache=False, logits_to_keep=1).logits.float()


@torch.no_grad()
def replayed_logits(fn, tier, x, ratios, seed: int) -> dict[float, torch.Tensor]:
    """Logits of one CUDA graph captured at ratios[0] and replayed at each ratio (the same seed before each)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for r in ratios:
            tier.set_ratio(r)
            call(fn, x, seed)
    torch.cuda.current_stream().wait_stream(side)
    tier.set_ratio(ratios[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(input_ids=x, use_cache=False, logits_to_keep=1).logits
    got = {}
    for r in ratios:
        tier.set_ratio(r)
        torch.manual_seed(seed)
        graph.replay()
        got[r] = out.float().clone()
    del graph
    tier.set_ratio(0.0)
    return got


@torch.no_grad()
def forward_ms(fn, tier, n: int, ratios, reps: int, vocab: int) -> dict[float, float]:
    """ms per forward of `n` tokens at each ratio: CUDA-graph replays (profile_forward's method), or on CPU plain calls."""
    if torch.cuda.is_available():
        return {r: 1e3 * s for _, r, s in profile_graphed(fn, tier, [n], ratios, reps, vocab)}
    x = torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(0))
    out = {}
    for r in ratios:
        tier.set_ratio(r)
        fn(input_ids=x, use_cache=False, logits_to_keep=1)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(input_ids=x, use_cache=False, logits_to_keep=1)
            ts.append(time.perf_counter() - t)
        out[r] = 1e3 * statistics.median(ts)
    tier.set_ratio(0.0)
    return out


def compile_model(model, backend: str, mode: str | None):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, mode=mode if backend == "inductor" else None, fullgraph=True)


@torch.no_grad()
def check_outputs(variant: str, fn, tier, x, ratios, want: dict, cuda: bool, seed: int) -> dict:
    """Relative errors of `fn` (direct and, on CUDA, replayed from a graph) against the eager logits `want`."""
    errs = {}
    for r in ratios:
        tier.set_ratio(r)
        errs[f"{variant}_direct@{r:g}"] = rel_err(call(fn, x, seed), want[r])
    if cuda:
        for r, got in replayed_logits(fn, tier, x, ratios, seed).items():
            errs[f"{variant}_graph@{r:g}"] = rel_err(got, want[r])
    tier.set_ratio(0.0)
    return errs


def markdown(doc: dict) -> str:
    t = doc["times_ms"]

    def cell(k):
        return f"{t[k]:.2f}" if k in t else "-"

    def over(a, b):
        return f"{t[a] / t[b]:.2f}" if a in t and b in t else "-"

    lines = [f"# Compiled and graphed forward ({doc['device']})", "",
             f"{doc['model']}; {doc['routing']}; experts: {doc['backend']}. One forward of T = {doc['tokens']} "
             f"tokens (one sequence, no cache, last token's logits), {doc['timing']}. Compiled: {doc['compile']}.", "",
             "| forward | ratio 0 ms | ratio 1 ms | ratio 1 / ratio 0 | null experts ms |", "|---|---|---|---|---|"]
    for label, v in (("eager, graphed", "eager"), ("norms and rope compiled, graphed", "outside"),
                     ("compiled, graphed", "compiled")):
        lines.append(f"| {label} | {cell(v + '_r0')} | {cell(v + '_r1')} | {over(v + '_r1', v + '_r0')} | "
                     f"{cell(v + '_null')} |")
    lines.append(f"| compiled / eager | {over('compiled_r0', 'eager_r0')} | {over('compiled_r1', 'eager_r1')} | | "
                 f"{over('compiled_null', 'eager_null')} |")
    errs = doc["rel_err"]
    lines += ["",
              "- compile time (first call): " + (", ".join(f"{k} {v:.0f} s" for k, v in doc["compile_s"].items()) or "-"),
              "- recompiles once compiled at ratio 0 (every later call and replay under error_on_recompile): "
              + ("none" if doc.get("recompile_error") is None else f"**{doc['recompile_error']}**"),
              f"- logits relative error against the eager forward at the same ratio (limit {MAX_REL_ERR:g}): "
              + (", ".join(f"{k} {v:.1e}" for k, v in errs.items()) or "-")
              + ("; all pass" if errs and all(v < MAX_REL_ERR for v in errs.values()) else ""),
              "- for scale, the eager logits move by " + ", ".join(f"{k} {v:.1e}" for k, v in doc["controls"].items())]
    if doc.get("failures"):
        lines += ["", "Failures:", ""] + [f"- {k}: `{v.splitlines()[0][:300]}`" for k, v in doc["failures"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30, help="timed replays per point (median)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (inductor), e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, reference backend, no graphs")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor; aot_eager with --tiny)")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the compiled null floor once this much has run")
    ap.add_argument("--skip-null-compiled", action="store_true", help="leave out the compiled null floor (one compile)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "brownout_bench_cache"))
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    args = ap.parse_args(argv)
    from runtime import BrownoutMoE, compile_outside_experts

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("compile_check needs a CUDA GPU (or --tiny)")
    backend = args.compile_backend or ("aot_eager" if args.tiny else "inductor")
    mode = None if args.mode == "default" else args.mode
    torch._inductor.config.fallback_random = True  # PyTorch's random ops: compiled and eager draw the same routing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ratios = [0.0, 1.0]
    n, seed = args.tokens, 1234
    doc = {"device": "CPU (tiny smoke test)" if args.tiny else torch.cuda.get_device_name(0),
           "torch": torch.__version__, "tokens": n, "reps": args.reps,
           "model": ("tiny Qwen2-MoE" if args.tiny else "Qwen1.5-MoE-A2.7B shape, 24 layers, random bf16 weights")
           + ", united tier way 4 (consecutive, weight average)",
           "routing": "uniform routing (bench_serving.uniform_routing)",
           "timing": (f"median of {args.reps} CUDA-graph replays after 3 warm-up replays, CUDA events "
                      "(bench_serving.profile_graphed)") if cuda else f"median of {args.reps} plain calls (CPU)",
           "compile": f"torch.compile(fullgraph=True, backend={backend!r}, mode={args.mode!r}), "
                      "inductor fallback_random",
           "backend": "reference" if args.tiny else "triton, graph-safe (the kernel at ratio 0 too), hot-cold",
           "times_ms": {}, "compile_s": {}, "rel_err": {}, "controls": {}, "recompile_error": None, "failures": {}}

    def save():
        doc["wall_s"] = time.time() - t0
        (out / "compile_check.json").write_text(json.dumps(doc, indent=1))
        (out / "compile_check.md").write_text(markdown(doc))

    def log(msg):
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    def failed(what: str, e: Exception) -> None:  # a variant that failed: its error is the result, the run goes on
        doc["failures"][what] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
        traceback.print_exc()
        log(f"{what} failed: {doc['failures'][what]}")

    model = build_model(args.tiny, 0)
    vocab = model.config.vocab_size
    uniform_routing(model)
    skip = [0, -1] if args.tiny else [0, 1, -2, -1]  # as bench_serving
    udir = united_tier(model, Path(args.cache), args.tiny, skip)
    dev = next(model.parameters()).device
    x = torch.randint(1, vocab, (1, n), generator=torch.Generator().manual_seed(1)).to(dev)
    log(f"model and united tier ready on {doc['device']}")

    # -- the non-expert floor, eager
    with null_experts_impl(model):
        doc["times_ms"]["eager_null"] = forward_ms(model, NoTier(), n, [0.0], args.reps, vocab)[0.0]
    log(f"null eager {doc['times_ms']['eager_null']:.2f} ms")
    save()

    # -- brownout, eager
    bm = BrownoutMoE.attach(model, udir)
    if args.tiny:  # no kernel on CPU: the reference op, with ratio 0 through it as graph-safe mode does
        bm.set_backend("reference")
        for st in bm.layers.values():
            st.graph_safe = True
    else:
        bm.set_backend("triton")
        bm.set_graph_safe(True)
    with torch.no_grad():
        want = {}
        for r in ratios:
            bm.set_ratio(r)
            want[r] = call(model, x, seed)
        bm.set_ratio(0.0)
    with torch.no_grad():  # what a wrong ratio or wrong routing noise would show as
        doc["controls"]["ratio 1 against 0"] = rel_err(want[1.0], want[0.0])
        doc["controls"]["with other routing noise"] = rel_err(call(model, x, seed + 1), want[0.0])
    if cuda:
        for r, got in replayed_logits(model, bm, x, ratios, seed).items():
            doc["rel_err"][f"eager_graph@{r:g}"] = rel_err(got, want[r])
    t = forward_ms(model, bm, n, ratios, args.reps, vocab)
    doc["times_ms"]["eager_r0"], doc["times_ms"]["eager_r1"] = t[0.0], t[1.0]
    log(f"brownout eager r0 {t[0.0]:.2f} ms, r1 {t[1.0]:.2f} ms; errors {doc['rel_err']}")
    save()

    # -- only the norms and the rotary embedding compiled (the serving engine's --compile-outside-experts)
    try:
        tc = time.time()
        done = compile_outside_experts(model, backend)
        try:
            with torch.no_grad():
                call(model, x, seed)
            doc["compile_s"]["outside"] = time.time() - tc
            doc["rel_err"].update(check_outputs("outside", model, bm, x, ratios, want, cuda, seed))
            t = forward_ms(model, bm, n, ratios, args.reps, vocab)
            doc["times_ms"]["outside_r0"], doc["times_ms"]["outside_r1"] = t[0.0], t[1.0]
            with null_experts_impl(model):
                doc["times_ms"]["outside_null"] = forward_ms(model, NoTier(), n, [0.0], args.reps, vocab)[0.0]
        finally:
            done.undo()  # the full compile below traces the model as it was
        log(f"outside compiled r0 {t[0.0]:.2f} ms, r1 {t[1.0]:.2f} ms, null {doc['times_ms']['outside_null']:.2f} ms")
    except Exception as e:
        failed("outside compiled", e)
    save()

    # -- brownout, compiled at ratio 0; ratio 1 must run on the same graph
    try:
        cm = compile_model(model, backend, mode)
        bm.set_ratio(0.0)
        tc = time.time()
        with torch.no_grad():
            call(cm, x, seed)
        doc["compile_s"]["brownout"] = time.time() - tc
        log(f"compiled in {doc['compile_s']['brownout']:.0f} s")
        with torch._dynamo.config.patch(error_on_recompile=True):
            try:
                doc["rel_err"].update(check_outputs("compiled", cm, bm, x, ratios, want, cuda, seed))
                t = forward_ms(cm, bm, n, ratios, args.reps, vocab)
            except torch._dynamo.exc.RecompileError as e:
                doc["recompile_error"] = str(e).splitlines()[0][:300]
                raise
        doc["times_ms"]["compiled_r0"], doc["times_ms"]["compiled_r1"] = t[0.0], t[1.0]
        log(f"brownout compiled r0 {t[0.0]:.2f} ms, r1 {t[1.0]:.2f} ms; errors {doc['rel_err']}")
    except Exception as e:  # keep the rest of the run; the error is the result
        failed("compiled brownout", e)
    save()

    # -- the non-expert floor, compiled
    bm.detach()
    if args.skip_null_compiled or time.time() - t0 > args.budget_s:
        doc["failures"]["compiled null"] = "skipped (--skip-null-compiled or past --budget-s)"
    else:
        with null_experts_impl(model):
            try:
                cm = compile_model(model, backend, mode)
                tc = time.time()
                with torch.no_grad():
                    call(cm, x, seed)
                doc["compile_s"]["null"] = time.time() - tc
                doc["times_ms"]["compiled_null"] = forward_ms(cm, NoTier(), n, [0.0], args.reps, vocab)[0.0]
                log(f"null compiled {doc['times_ms']['compiled_null']:.2f} ms")
            except Exception as e:
                failed("compiled null", e)
    save()
    print(markdown(doc))


if __name__ == "__main__":
    main()
