"""vLLM's fused-MoE Triton kernel, with vLLM's own tuned tile configs, timed on the bench's calls next to ours.

    pip download --no-deps vllm==0.11.0 -d WHEELS                       # any machine with the package registry
    python -m eval.vllm_yardstick extract WHEELS/vllm-0.11.0-*.whl .vendor/vllm   # CPU: the kernel + configs
    python -m eval.vllm_yardstick bench .vendor/vllm OUT.json [--seed S] [--tokens 128,512]   # GPU (+ .md, .png)

Why not import vLLM: its fused_moe module loads vLLM's compiled extension, built for another torch, and the GPU
machine has no network. `extract` reads the wheel as a zip file and writes, under DIR, the two `@triton.jit`
functions of `vllm/model_executor/layers/fused_moe/fused_moe.py` the bf16 path runs (`fused_moe_kernel` and the
helper it calls), word for word, plus vLLM's tuned config files for NVIDIA GPUs (`configs/E=..,N=..,
device_name=...json`, the bf16 ones) and SOURCE.json (the wheel's name and sha256). Nothing of vLLM is kept in this
repository; `.vendor/` is git-ignored.

What is timed, per call (CUDA graph, flushed replays, as `eval.bench_kernel`): vLLM's gate/up kernel, its down
kernel (with the routing weights) and the sum over the top-k slots (`torch.sum`, where vLLM runs its own `moe_sum`),
with the tile config vLLM would pick on this GPU (its file's entry nearest to T, else its default config). Not timed,
so the figure flatters vLLM: the alignment (`moe_align_block_size`, a CUDA op in vLLM; here `align`, its PyTorch
twin, run before capture) and silu(gate) * up between the GEMMs (vLLM's `silu_and_mul`; here done once before
capture, the down kernel then reads that buffer on every replay). Ours is timed as `bench` times it: the whole call
(remap at ratio > 0, alignment, both GEMMs with silu * up fused, top-k sum), in the same process, on the same
weights, rows and routing (the bench's routing draws of `--seed`). At ratio > 0 also "ours without the remap": the
same call on ids remapped outside the graph, as vLLM's get them. Order ours, vLLM, ours without the remap (twice),
vLLM, ours; a time is the mean of its runs.

At ratio > 0 vLLM's kernel runs on our remapped slab ids over the stacked originals + united slabs (slots the
remap skipped are left out of its alignment): vLLM has no brownout; this shows how its grouped GEMM does on the
same few-slabs-many-rows work ours gets. The lookup of vLLM's config then still uses the model's E, as a vLLM
deployment of that model would.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import shutil
import statistics
import sys
import zipfile
from pathlib import Path

import torch

KERNEL_SRC = "vllm/model_executor/layers/fused_moe/fused_moe.py"
CONFIG_DIR = "vllm/model_executor/layers/fused_moe/configs/"
KERNEL_FUNCS = ("write_zeros_to_output", "fused_moe_kernel")  # the helper first: the kernel calls it
KERNEL_FILE = "vllm_fused_moe_kernel.py"
POINTS = ((2, 0.0), (2, 0.5), (2, 1.0), (4, 0.5), (4, 1.0))  # (way, ratio): ratio 0 once, it does not use the way


# ------------------------------------------------------------------------------------------------------------------
# extract (CPU)


def jit_functions(source: str, names=KERNEL_FUNCS) -> str:
    """The source of the named top-level functions of `source`, decorators included, in the order of `names`."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            found[node.name] = "\n".join(lines[first - 1:node.end_lineno])
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{', '.join(missing)} not found at the top level of the source")
    return "\n\n\n".join(found[n] for n in names)


def is_bf16_nvidia_config(name: str) -> bool:
    """A vLLM tuned-config file for an NVIDIA GPU and unquantized weights (no dtype= or block_shape= part)."""
    return name.endswith(".json") and "device_name=NVIDIA_" in name and ",dtype=" not in name and \
        "block_shape=" not in name


def extract(wheel, out_dir) -> dict:
    """Write the kernel module, the tuned configs and SOURCE.json from a vLLM wheel into out_dir (new or empty: a
    folder with other files in it is refused, so nothing this did not write is replaced). -> SOURCE.json's dict."""
    wheel, out_dir = Path(wheel), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; give a new folder")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        if KERNEL_SRC not in names:
            raise ValueError(f"{wheel.name} has no {KERNEL_SRC}: not a vLLM wheel this knows")
        funcs = jit_functions(z.read(KERNEL_SRC).decode())
        cfgs = {Path(n).name: z.read(n) for n in names if n.startswith(CONFIG_DIR) and is_bf16_nvidia_config(n)}
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    tmp = out_dir.with_name(out_dir.name + ".part")
    if tmp.exists():
        raise FileExistsError(f"{tmp} exists (left by an earlier run?); remove it first")
    src = {"wheel": wheel.name, "sha256": sha, "kernel_source": KERNEL_SRC, "functions": list(KERNEL_FUNCS),
           "configs": len(cfgs)}
    (tmp / "configs").mkdir(parents=True)
    try:
        (tmp / KERNEL_FILE).write_text(
            f"# Extracted by eval/vllm_yardstick.py from {wheel.name} (sha256 {sha}), {KERNEL_SRC}, word for word.\n"
            "# vLLM is Apache-2.0 licensed; used only as a timing yardstick, never by the runtime.\n"
            "import triton\nimport triton.language as tl\n\n\n" + funcs + "\n")
        for n, b in cfgs.items():
            (tmp / "configs" / n).write_bytes(b)
        (tmp / "SOURCE.json").write_text(json.dumps(src, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp)  # ours, made just above: nothing half-written stays
        raise
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    tmp.rename(out_dir)  # all or nothing
    return src


# ------------------------------------------------------------------------------------------------------------------
# vLLM's config choice and alignment, in PyTorch


def config_file_name(E: int, N: int, device_name: str) -> str:
    return f"E={E},N={N},device_name={device_name.replace(' ', '_')}.json"


def default_config(M: int, E: int) -> dict:
    """vLLM's get_default_config for unquantized weights (no num_warps / num_stages: Triton's defaults)."""
    if M <= E:
        return {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1}
    return {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8}


def pick_config(vendor_dir, E: int, N: int, M: int, device_name: str) -> tuple[dict, str]:
    """The config vLLM's try_get_optimal_moe_config picks for w2 of shape [E, H, N] at M tokens: its file's entry
    whose key is nearest to M (the first such key in file order), else the default. -> (config, where from)."""
    path = Path(vendor_dir) / "configs" / config_file_name(E, N, device_name)
    if not path.is_file():
        return default_config(M, E), "default"
    table = json.loads(path.read_text())
    table.pop("triton_version", None)
    table = {int(key): val for key, val in table.items()}
    key = min(table, key=lambda x: abs(x - M))
    return dict(table[key]), f"{path.name}[{key}]"


def align(ids: torch.Tensor, block_m: int, num_experts: int):
    """vLLM's moe_align_block_size, by our own alignment (`fused_moe.moe_align`: the same sort, each slab's slots
    padded with the sentinel ids.numel() to a multiple of block_m, slots with ids >= num_experts left out; here:
    slots the remap skipped), in vLLM's array sizes, so its kernel gets vLLM's grid.
    -> (sorted_token_ids int32 [numel + E*(block_m-1)], expert_ids int32 [that / block_m], num_post_pad int32 [1])."""
    from runtime.kernels import fused_moe as fm
    n = ids.numel()
    ours, block_slab, total, _ = fm.moe_align(ids.reshape(-1).to(torch.int32), num_experts, block_m)
    max_len = n + num_experts * (block_m - 1)  # >= the padded total; ours may run past it on sentinels only
    sorted_ids = torch.full((max_len,), n, dtype=torch.int32, device=ids.device)
    sorted_ids[:min(max_len, ours.numel())] = ours[:max_len]
    expert_ids = torch.zeros(-(-max_len // block_m), dtype=torch.int32, device=ids.device)
    expert_ids[:block_slab.numel()] = block_slab  # read by vLLM's kernel only for blocks below the total
    return sorted_ids, expert_ids, total


# ------------------------------------------------------------------------------------------------------------------
# the call (GPU)


def load_kernel(vendor_dir):
    """The extracted module (fused_moe_kernel), imported from its file."""
    path = Path(vendor_dir) / KERNEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {KERNEL_FILE} in {vendor_dir}; run `python -m eval.vllm_yardstick extract` first")
    spec = importlib.util.spec_from_file_location("vllm_fused_moe_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # triton's jit resolves the helper through the module's globals
    spec.loader.exec_module(mod)
    return mod


def launch(kernel, A, B, C, topk_weights, sorted_ids, expert_ids, num_post_pad, mul_routed_weight, top_k, config):
    """vLLM's invoke_fused_moe_kernel for unquantized weights, restated: the same EM cap for small batches, grid and
    arguments. A [M, K]; B [E, N, K]; C [M', top_k', N] (row = flat slot index)."""
    import triton
    import triton.language as tl
    config = dict(config)
    bk = config.pop("BLOCK_SIZE_K")
    EM = sorted_ids.size(0)
    if A.size(0) < config["BLOCK_SIZE_M"]:  # vLLM: few tokens -> at most M * top_k live blocks
        EM = min(EM, A.size(0) * top_k * config["BLOCK_SIZE_M"])
    grid = (triton.cdiv(EM, config["BLOCK_SIZE_M"]) * triton.cdiv(B.size(1), config["BLOCK_SIZE_N"]),)
    compute = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[A.dtype]
    kernel.fused_moe_kernel[grid](
        A, B, C, None, None, None, topk_weights, sorted_ids, expert_ids, num_post_pad,
        B.size(1), B.size(2), EM, A.size(0) * top_k,
        A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1), C.stride(1), C.stride(2),
        0, 0, 0, 0, 0, 0, 0, 0, 0,
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=compute, use_fp8_w8a8=False,
        use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False, HAS_BIAS=False, BLOCK_SIZE_K=bk,
        **config)


class VllmCall:
    """vLLM's fused_experts path on given slab ids: buffers made and the alignment done here, outside the timing;
    `full()` runs the whole path (silu * up included) and returns [T, H]; `timed()` is the graph's part."""

    def __init__(self, kernel, x, gu, dn, ids, weights, num_slabs, config):
        T, k = ids.shape
        I = dn.shape[2]
        self.kernel, self.x, self.gu, self.dn, self.config = kernel, x, gu, dn, config
        self.w = weights.contiguous()
        self.k = k
        self.sorted_ids, self.expert_ids, self.npp = align(ids, config["BLOCK_SIZE_M"], num_slabs)
        self.c1 = torch.zeros(T, k, 2 * I, device=x.device, dtype=x.dtype)
        self.c2 = torch.zeros(T * k, I, device=x.device, dtype=x.dtype)
        self.c3 = torch.zeros(T, k, gu.shape[2], device=x.device, dtype=x.dtype)  # skipped slots' rows stay 0

    def gate_up(self):
        launch(self.kernel, self.x, self.gu, self.c1, self.w, self.sorted_ids, self.expert_ids, self.npp, False,
               self.k, self.config)

    def down_and_sum(self):
        launch(self.kernel, self.c2, self.dn, self.c3, self.w, self.sorted_ids, self.expert_ids, self.npp, True, 1,
               self.config)
        return self.c3.sum(1)

    def full(self):
        self.gate_up()
        I = self.c2.shape[1]
        h = self.c1.view(-1, 2 * I)
        self.c2.copy_(torch.nn.functional.silu(h[:, :I].float()).to(h.dtype) * h[:, I:])
        return self.down_and_sum()

    def timed(self):
        self.gate_up()
        return self.down_and_sum()


@torch.no_grad()
def bench(vendor_dir, out_path, seed=0, tokens=None, reps=25):
    """Ours and vLLM's kernel on the bench's calls (`POINTS` at every T of `tokens`); -> the result dict, written to
    out_path (+ .md, .png)."""
    from eval import bench_kernel as bk
    from runtime import policy
    from runtime.kernels import fused_moe as fm
    import triton

    kernel = load_kernel(vendor_dir)
    src = json.loads((Path(vendor_dir) / "SOURCE.json").read_text())
    device_name = torch.cuda.get_device_name()
    bw, flops = bk.measure_limits()
    res = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__, "vllm": src,
           "copy_bw_TBps": bw / 1e12, "bf16_TFLOPs": flops / 1e12, "routing_seed": seed, "flush": bk.FLUSH,
           "rows": []}
    gen = torch.Generator(device=bk.dev)
    gen.manual_seed(seed)
    for name, (E, k, H, I) in bk.SHAPES.items():
        gu0 = torch.randn(E, 2 * I, H, device=bk.dev, dtype=torch.bfloat16) * 0.02
        dn0 = torch.randn(E, H, I, device=bk.dev, dtype=torch.bfloat16) * 0.02
        slabs = {way: bk.make_slabs(E, H, I, way, gu0, dn0) for way in bk.WAYS}
        del gu0, dn0
        for T in bk.TOKENS:
            x = torch.randn(T, H, device=bk.dev, dtype=torch.bfloat16)
            idx, w = bk.routing(T, E, k, gen)  # drawn at every T, as the bench draws them
            if tokens and T not in tokens:
                continue
            vcfg, vfrom = pick_config(vendor_dir, E, I, T, device_name)
            for way, ratio in POINTS:
                gu, dn, G, e2g = slabs[way]
                S = E + G
                a = policy.remap(idx, w, e2g, G, ratio)
                live = int((a.ids < S).sum())
                limit_ms = max(bk.limit_terms_ms(int(policy.slabs_read(a.ids, S)), live, H, I, bw, flops))
                ref = bk.slab_reference(gu, dn, x, a.ids, a.weights)
                row = {"shape": name, "tokens": T, "way": way, "ratio": ratio, "limit_ms": limit_ms,
                       "ours_config": fm.get_config(T, H, I, k), "vllm_config": vcfg, "vllm_config_from": vfrom}
                rm = bk.remapper(idx, w, e2g, G, ratio)
                g_ours, out = bk.capture(lambda gu=gu, dn=dn, rm=rm: fm.fused_moe(x, gu, dn, *rm(), num_slabs=S))
                out.fill_(float("nan"))
                g_ours.replay()
                torch.cuda.synchronize()
                row["ours_relerr"] = bk.relerr(out, ref)
                vc = VllmCall(kernel, x, gu, dn, a.ids, a.weights, S, vcfg)
                row["vllm_relerr"] = bk.relerr(vc.full(), ref)  # the whole path, silu * up included
                g_v, vout = bk.capture(vc.timed)
                vout.fill_(float("nan"))
                g_v.replay()
                torch.cuda.synchronize()
                row["vllm_graph_relerr"] = bk.relerr(vout, ref)
                graphs = {"ours": g_ours, "vllm": g_v}
                if ratio:  # ours on the remapped ids made outside the graph, as vLLM's: no remap timed
                    ids, ww = rm()
                    graphs["ours_noremap"], _ = bk.capture(lambda gu=gu, dn=dn, ids=ids, ww=ww: fm.fused_moe(
                        x, gu, dn, ids, ww, num_slabs=S))
                order = ("ours", "vllm", "ours_noremap", "ours_noremap", "vllm", "ours")
                times = {n: [] for n in graphs}
                for n in order:
                    if n in graphs:
                        times[n].append(bk.time_graph(graphs[n], reps))
                del g_ours, g_v, vc, graphs
                for n in times:
                    row[f"{n}_ms"] = statistics.mean(times[n])
                    row[f"{n}_pct"] = 100 * limit_ms / row[f"{n}_ms"]
                res["rows"].append(row)
                print(f"VLLM {name} T={T} w{way} r{ratio:g}: limit {limit_ms:.4f} ms | ours {row['ours_ms']:.4f} "
                      f"({row['ours_pct']:.0f}%) vllm {row['vllm_ms']:.4f} ({row['vllm_pct']:.0f}%, {vfrom}) | "
                      f"relerr {row['ours_relerr']:.1e} / {row['vllm_relerr']:.1e}", flush=True)
        del slabs
        torch.cuda.empty_cache()
    Path(out_path).write_text(json.dumps(res, indent=1))
    write_md(res, Path(out_path).with_suffix(".md"))
    try:
        plot(res, Path(out_path).with_suffix(".png"))
    except Exception as exc:  # no matplotlib: the JSON and the table are written
        print("plot failed:", exc)
    return res


def write_md(res, path):
    L = [f"# vLLM's fused-MoE Triton kernel and ours on the same calls: {res['device']}, torch {res['torch']}, "
         f"triton {res['triton']}", "",
         f"vLLM kernel from `{res['vllm']['wheel']}`, with the tile config vLLM picks on this GPU (its tuned file's "
         "entry nearest to T, else its default). Timed for vLLM: its gate/up and down kernels and the top-k sum; "
         "not timed: its alignment and silu * up (so its figure flatters it). Ours: the whole call. Bench routings "
         f"of seed {res['routing_seed']}, L2 flush {res['flush']}; ceilings copy {res['copy_bw_TBps']:.2f} TB/s, "
         f"bf16 {res['bf16_TFLOPs']:.0f} TFLOP/s. % = limit / time.", "",
         "| shape | T | way | ratio | limit ms | ours ms (%) | vLLM ms (%) | vLLM / ours | ours without the remap ms "
         "(%) | vLLM config from | relerr ours / vLLM |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        nr = f"{r['ours_noremap_ms']:.4f} ({r['ours_noremap_pct']:.0f})" if "ours_noremap_ms" in r else "-"
        L.append(f"| {r['shape']} | {r['tokens']} | {r['way']} | {r['ratio']:g} | {r['limit_ms']:.4f} | "
                 f"{r['ours_ms']:.4f} ({r['ours_pct']:.0f}) | {r['vllm_ms']:.4f} ({r['vllm_pct']:.0f}) | "
                 f"{r['vllm_ms'] / r['ours_ms']:.2f} | {nr} | {r['vllm_config_from']} | {r['ours_relerr']:.1e} / "
                 f"{r['vllm_relerr']:.1e} |")
    faster = [r for r in res["rows"] if r["vllm_ms"] < r["ours_ms"]]
    q = [r["vllm_ms"] / r["ours_ms"] for r in res["rows"]]
    L += ["", f"vLLM / ours, geometric mean over {len(q)} calls: {statistics.geometric_mean(q):.2f}; vLLM faster "
          f"at {len(faster)}" + (": " + ", ".join(f"{r['shape']} T={r['tokens']} w{r['way']} r{r['ratio']:g} "
                                                   f"({r['vllm_ms'] / r['ours_ms']:.2f})" for r in faster)
                                 if faster else "") + "."]
    nr = [r for r in res["rows"] if "ours_noremap_ms" in r]
    if nr:
        faster = [r for r in nr if r["vllm_ms"] < r["ours_noremap_ms"]]
        L.append(f"At ratio > 0 against ours without the remap ({len(nr)} calls): vLLM faster at {len(faster)}" + (
            ": " + ", ".join(f"{r['shape']} T={r['tokens']} w{r['way']} r{r['ratio']:g} "
                             f"({r['vllm_ms'] / r['ours_noremap_ms']:.2f})" for r in faster) if faster else "") + ".")
    Path(path).write_text("\n".join(L) + "\n")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = list(dict.fromkeys(r["shape"] for r in res["rows"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.4), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        for (way, ratio), style in (((2, 0.0), "-"), ((4, 1.0), "--")):
            pts = [r for r in res["rows"] if r["shape"] == s and r["way"] == way and r["ratio"] == ratio]
            Ts = [r["tokens"] for r in pts]
            ax.plot(Ts, [r["ours_pct"] for r in pts], "o" + style, color="C0", label=f"ours w{way} r{ratio:g}")
            ax.plot(Ts, [r["vllm_pct"] for r in pts], "s" + style, color="C1", label=f"vLLM w{way} r{ratio:g}")
        ax.set_xscale("log", base=2)
        ax.set_title(s)
        ax.set_xlabel("tokens T")
        ax.set_ylim(0, 105)
    axes[0][0].set_ylabel("% of the physical limit")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Ours vs vLLM's fused-MoE kernel ({res['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m eval.vllm_yardstick", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="the kernel and tuned configs out of a vLLM wheel (CPU)")
    e.add_argument("wheel", help="a vllm-*.whl (pip download --no-deps vllm==0.11.0)")
    e.add_argument("dir", help="a new (or empty) folder to write them to, e.g. .vendor/vllm")
    b = sub.add_parser("bench", help="time vLLM's kernel and ours on the same calls (GPU)")
    b.add_argument("dir", help="the folder `extract` wrote")
    b.add_argument("out", help="result JSON (+ .md and .png beside it)")
    b.add_argument("--seed", type=int, default=0, help="the bench's routing seed (default 0)")
    b.add_argument("--tokens", help="only these T of 1,8,32,128,512,4096 (default: all)")
    a = ap.parse_args(argv)
    if a.cmd == "extract":
        if not Path(a.wheel).is_file():
            ap.error(f"extract: no wheel at {a.wheel}")
        try:
            print(json.dumps(extract(a.wheel, a.dir)))
        except (FileExistsError, ValueError, zipfile.BadZipFile) as exc:
            ap.error(f"extract: {exc}")
        return
    if not (Path(a.dir) / KERNEL_FILE).is_file():
        ap.error(f"bench: no {KERNEL_FILE} in {a.dir}; run extract first")
    if Path(a.out).suffix.lower() != ".json":
        ap.error(f"bench: {a.out} is not a .json path")
    from eval.bench_kernel import TOKENS
    try:
        tokens = [int(t) for t in a.tokens.split(",")] if a.tokens else None
    except ValueError:
        ap.error("--tokens wants T values, e.g. 128,512")
    bad = [t for t in tokens or [] if t not in TOKENS]
    if bad:
        ap.error(f"--tokens: {bad[0]} is not one of {TOKENS}")
    if not torch.cuda.is_available():
        ap.error("bench needs a CUDA GPU")
    bench(a.dir, a.out, seed=a.seed, tokens=tokens)


if __name__ == "__main__":
    main()
