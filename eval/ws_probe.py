"""Where Triton's automatic warp specialisation of a K loop (`tl.range(..., warp_specialize=True)`) computes the
right thing on this GPU, and where not (GPU only; on Hopper it is Meta's `nvgpu-warp-specialization` pass).

    python -m eval.ws_probe [LOG]

1. A plain matmul with device-made TMA descriptors, 128 x 128 x 64 tiles, 4 warps, with each of the toggles our
   GEMMs need: two dots a K step into two accumulators with silu(a) * b after (the gate/up GEMM's shape), a
   data-dependent `if` around the loop (our kernels' inactive row blocks), PDL, 4 stages, a ragged M, 64-row tiles.
   Each is run with and without WS, and compared with torch.
2. The same plain matmul timed with and without WS (both with descriptors made in the kernel, so only the loop's
   schedule differs; `triton.testing.do_bench`, median, L2 cleared between runs) on three shapes: square, and the
   down and gate/up GEMMs of a Qwen3-30B-A3B layer at T = 4096 as one dense GEMM (32768 rows).
Each line: the fraction of NaN in the output and the relative error. On the H200 with Triton 3.6 (December 2026),
the two-dot loop and the guarded loop came out partly NaN with WS and right without it (eval/results/README.md:
why the fused kernels do not use it). Up to 9d86345 a third part ran our down GEMM with the `ws_down` option.
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
    flag` (always true here). Its PyTorch twin is `matmul_reference`."""
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
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def matmul_reference(a, b, two=False):
    """What `_mm_kernel` computes, in fp32."""
    N = b.shape[0] // 2
    out = a.float() @ b[:N].float().T
    return torch.nn.functional.silu(out) * (a.float() @ b[N:].float().T) if two else out


def _line(name, out, ref):
    from eval.bench_kernel import relerr
    return f"{name}: NaN fraction {out.isnan().float().mean().item():.3f}, relative error {relerr(out, ref):.2e}"


def _operands(M, N, K):
    """a [M, K], b [2N, K] (its first N rows for the one-dot loop, all for the two-dot one), c [M, N] filled with
    NaN (a tile the kernel never stored shows), and the guard's flag (M: every row block runs)."""
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2 * N, K, device="cuda", dtype=torch.bfloat16) * 0.05
    c = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    return a, b, c, torch.tensor([M], device="cuda", dtype=torch.int32)


def _launch(a, b, c, flag, ws, guard=False, pdl=False, two=False, stages=3, BM=128, BN=128, BK=64):
    (M, K), N = a.shape, c.shape[1]
    return _mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, b, c, flag, M, N, K, WS=ws, GUARD=guard, PDL=pdl, TWO=two, BM=BM, BN=BN, BK=BK, num_warps=4,
        num_stages=stages)


def matmul_case(M, N, K, ws, guard=False, pdl=False, two=False, stages=3, BM=128, BN=128, BK=64):
    a, b, c, flag = _operands(M, N, K)
    ref = matmul_reference(a, b, two)
    name = (f"matmul M={M} N={N} K={K} {BM}x{BN}x{BK} 4 warps {stages} stages two_dots={int(two)} "
            f"guard={int(guard)} pdl={int(pdl)} ws={int(ws)}")
    try:
        k = _launch(a, b, c, flag, ws, guard, pdl, two, stages, BM, BN, BK)
        torch.cuda.synchronize()
        return _line(name, c, ref) + f", warp_specialize op in TTGIR: {'ttg.warp_specialize' in k.asm['ttgir']}"
    except Exception as exc:  # a compile failure is a finding too
        return f"{name}: {type(exc).__name__}: {str(exc)[:160]}"


def matmul_speed(M, N, K, ws, stages):
    """TFLOP/s of the plain matmul (one dot a K step), or the error text."""
    a, b, c, flag = _operands(M, N, K)
    name = f"speed matmul M={M} N={N} K={K} 128x128x64 4 warps {stages} stages ws={int(ws)}"
    try:
        ms = triton.testing.do_bench(lambda: _launch(a, b, c, flag, ws, stages=stages), warmup=50, rep=200,
                                     return_mode="median")
    except Exception as exc:
        return f"{name}: {type(exc).__name__}: {str(exc)[:160]}"
    return f"{name}: {ms * 1e3:.1f} us, {2 * M * N * K / ms / 1e9:.0f} TFLOP/s"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # the descriptors made in the kernel need a global scratch
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"]
    for two in (False, True):
        for ws in (False, True):
            lines.append(matmul_case(1024, 768, 2048, ws, two=two))
    for ws in (False, True):
        lines.append(matmul_case(1024, 768, 2048, ws, guard=True))
    lines += [matmul_case(1024, 768, 2048, True, pdl=True), matmul_case(1024, 768, 2048, True, stages=4),
              matmul_case(1000, 768, 2000, True), matmul_case(1024, 768, 2048, True, BM=64)]
    for M, N, K in ((8192, 8192, 8192), (32768, 2048, 768), (32768, 768, 2048)):
        for stages in (3, 4):
            for ws in (False, True):
                lines.append(matmul_speed(M, N, K, ws, stages))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if argv:
        with open(argv[0], "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
