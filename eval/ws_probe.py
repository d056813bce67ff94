"""Where Triton's automatic warp specialisation of a K loop (`tl.range(..., warp_specialize=True)`) computes the
right thing on this GPU, and where not (GPU only; on Hopper it is Meta's `nvgpu-warp-specialization` pass).

    python -m eval.ws_probe [LOG]

1. A plain matmul with device-made TMA descriptors, 128 x 128 x 64 tiles, 4 warps, with each of the toggles our
   GEMMs need: two dots a K step into two accumulators with silu(a) * b after (the gate/up GEMM's shape), a
   data-dependent `if` around the loop (our kernels' inactive row blocks), PDL, 4 stages, a ragged M, 64-row tiles.
   Each is run with and without WS, and compared with torch.
2. Our down GEMM with `ws_down` on a Qwen3-30B-A3B-shaped layer at T = 512 and 4096, against the reference.
Each line: the fraction of NaN in the output and the relative error. On the H200 with Triton 3.6 (December 2026),
the two-dot loop and the guarded loop came out partly NaN with WS and right without it: hence WS on the down GEMM
only (eval/results/README.md).
"""
from __future__ import annotations

import sys

import torch

import triton
import triton.language as tl


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, flag_ptr, M, N, K, WS: tl.constexpr, GUARD: tl.constexpr, PDL: tl.constexpr,
               TWO: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ b[:N].T, or with TWO silu(a @ b[:N].T) * (a @ b[N:].T); GUARD: the loop inside `if pid_m * BM <
    flag` (always true here)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    go = True
    if GUARD:
        go = pid_m * BM < tl.load(flag_ptr)
    if go:
        ad = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
        bd = tl.make_tensor_descriptor(b_ptr, shape=[2 * N, K], strides=[K, 1], block_shape=[BN, BK])
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc2 = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in tl.range(0, K, BK, warp_specialize=WS):
            a = ad.load([pid_m * BM, k0])
            acc = tl.dot(a, bd.load([pid_n * BN, k0]).T, acc)
            if TWO:
                acc2 = tl.dot(a, bd.load([N + pid_n * BN, k0]).T, acc2)
        if TWO:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _line(name, out, ref):
    nan = out.isnan().float().mean().item()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    return f"{name}: NaN fraction {nan:.3f}, relative error {err:.2e}"


def matmul_case(M, N, K, ws, guard=False, pdl=False, two=False, stages=3, BM=128, BN=128, BK=64):
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2 * N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    flag = torch.tensor([M], device="cuda", dtype=torch.int32)
    ref = a.float() @ b[:N].float().T
    if two:
        ref = torch.nn.functional.silu(ref) * (a.float() @ b[N:].float().T)
    name = (f"matmul M={M} N={N} K={K} {BM}x{BN}x{BK} 4 warps {stages} stages two_dots={int(two)} "
            f"guard={int(guard)} pdl={int(pdl)} ws={int(ws)}")
    try:
        k = _mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            a, b, c, flag, M, N, K, WS=ws, GUARD=guard, PDL=pdl, TWO=two, BM=BM, BN=BN, BK=BK, num_warps=4,
            num_stages=stages)
        torch.cuda.synchronize()
        return _line(name, c, ref) + f", warp_specialize op in TTGIR: {'ttg.warp_specialize' in k.asm['ttgir']}"
    except Exception as exc:  # a compile failure is a finding too
        return f"{name}: {type(exc).__name__}: {str(exc)[:160]}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from runtime.kernels import fused_moe as fm
    from eval import bench_kernel as bk

    fm._ensure_allocator()
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"]
    for two in (False, True):
        for ws in (False, True):
            lines.append(matmul_case(1024, 768, 2048, ws, two=two))
    for ws in (False, True):
        lines.append(matmul_case(1024, 768, 2048, ws, guard=True))
    lines += [matmul_case(1024, 768, 2048, True, pdl=True), matmul_case(1024, 768, 2048, True, stages=4),
              matmul_case(1000, 768, 2000, True), matmul_case(1024, 768, 2048, True, BM=64)]
    E, k, H, I = 128, 8, 2048, 768
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1)
    gu = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.02
    dn = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.02
    for T in (512, 4096):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        idx, w = bk.routing(T, E, k, gen)
        ref = bk.slab_reference(gu.float(), dn.float(), x.float(), idx, w.float())
        for dn_tile in ([128, 128, 64, 8, 4, 3], [128, 256, 64, 8, 4, 4]):
            cfg = {"mode": "prefill", "gu": [128, 128, 64, 8, 8, 3], "dn": dn_tile, "sum": "store", "tma": True,
                   "sorted_rows": True}
            for ws in (False, True):
                out = fm.fused_moe(x, gu, dn, idx, w, config=dict(cfg, ws_down=ws))
                torch.cuda.synchronize()
                lines.append(_line(f"fused_moe Qwen3 shape T={T} dn {dn_tile} ws_down={int(ws)}", out, ref))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if argv:
        with open(argv[0], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
