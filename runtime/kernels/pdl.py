"""Programmatic dependent launch (PDL, Hopper and newer) for our Triton kernels.

A kernel launched with PDL may start while the previous kernel of the stream still runs; it waits for that kernel
(and its memory) in `pdl_start` before touching anything. A chain of small kernels in a CUDA graph then overlaps
each launch and ramp-up with the previous kernel's tail.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the CPU path does not need triton
    HAS_TRITON = False

# "auto" (Hopper and newer GPUs), "on" or "off". A module setting so a benchmark can time both; the environment
# variable BROWNOUT_PDL sets it at import.
MODE = os.environ.get("BROWNOUT_PDL", "auto")
# What the down GEMM may do before it waits on the gate/up GEMM (with PDL only): ask the L2 for the weight rows it
# will read, which do not depend on that kernel, so they stream in during its tail. "off", "on" (normal lines), or
# "last" (evict-last lines, which the gate/up kernel's own streaming reads do not push out). A module setting so a
# benchmark can time each; the environment variable BROWNOUT_PREFETCH sets it at import.
PREFETCH = os.environ.get("BROWNOUT_PREFETCH", "off")
PREFETCH_MODES = {"off": 0, "on": 1, "last": 2}

if HAS_TRITON:

    @triton.jit
    def pdl_start(USE_PDL: tl.constexpr):
        """The first statement of each of our kernels: wait for the previous kernel, then let the next one launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
    @triton.jit
    def prefetch_l2(base_ptr, nbytes, EVICT_LAST: tl.constexpr, LINES: tl.constexpr):
        """Ask the L2 for the `nbytes` bytes from base_ptr, 128-byte lines, LINES at a time; nothing waits for them."""
        p0 = base_ptr.to(tl.pointer_type(tl.int8))
        offs = tl.arange(0, LINES).to(tl.int64) * 128
        for off in range(0, nbytes, LINES * 128):
            o = off + offs
            ptrs = (p0 + tl.where(o < nbytes, o, 0)).to(tl.int64)  # the address, as the asm's 64-bit operand
            if EVICT_LAST:
                tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                          dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                          dtype=tl.int32, is_pure=False, pack=1)
else:  # pragma: no cover - nothing launches a kernel without triton
    pdl_start = prefetch_l2 = None


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether our kernels on `device` launch with PDL (never under the Triton interpreter, which lacks it)."""
    if MODE == "off" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return MODE == "on" or _capable(device.index if device.index is not None else torch.cuda.current_device())


def prefetch_mode(pdl: bool) -> int:
    """The PREFETCH constexpr of the down GEMM: 0 without PDL (nothing to overlap), else PREFETCH_MODES[PREFETCH]."""
    if not pdl:
        return 0
    if PREFETCH not in PREFETCH_MODES:
        raise ValueError(f"BROWNOUT_PREFETCH={PREFETCH!r}; one of {', '.join(PREFETCH_MODES)}")
    return PREFETCH_MODES[PREFETCH]


def launch_opts(pdl: bool) -> dict:
    """Kernel arguments for a launch: the USE_PDL constexpr, plus Triton's launch_pdl option when on."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}
