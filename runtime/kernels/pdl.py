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

if HAS_TRITON:

    @triton.jit
    def pdl_start(USE_PDL: tl.constexpr):
        """The first statement of each of our kernels: wait for the previous kernel, then let the next one launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
else:  # pragma: no cover - nothing launches a kernel without triton
    pdl_start = None


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether our kernels on `device` launch with PDL (never under the Triton interpreter, which lacks it)."""
    if MODE == "off" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return MODE == "on" or _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_opts(pdl: bool) -> dict:
    """Kernel arguments for a launch: the USE_PDL constexpr, plus Triton's launch_pdl option when on."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl else {"USE_PDL": False}
