"""The brownout ratio of one united layer (docs/design.md §4): one object holding the value as a Python float, for
host code and the PyTorch remap, and as 1 - r in a float32 device scalar, for the fused remap kernel.

The device scalar is written in place, never replaced, so a CUDA graph captured once keeps reading the ratio set
after capture.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .errors import BrownoutError
from .policy import keep_tensor


def check_ratio(r) -> float:
    """`r` as a float in [0, 1]; anything else (NaN, a bool, a string) raises BrownoutError."""
    if isinstance(r, bool) or not isinstance(r, Real) or math.isnan(float(r)) or not 0.0 <= float(r) <= 1.0:
        raise BrownoutError(f"brownout ratio must be a number in [0, 1], got {r!r}")
    return float(r)


class Ratio:
    """A layer's ratio: `value` (float) and `keep` (float32 [1] tensor holding 1 - value on the layer's device)."""

    def __init__(self, value=0.0, device="cpu"):
        self._value = check_ratio(value)
        self.keep = keep_tensor(self._value, device)
        # a bool for the ratio-0 shortcut: a compiled model guards on it, so it recompiles only when the ratio crosses
        # 0, not for every new value (as a guard on the float would)
        self.off = self._value == 0.0

    @property
    def value(self) -> float:
        return self._value

    def set(self, value) -> None:
        """Check and store a new ratio, writing the device scalar in place (same memory a captured graph reads)."""
        self._value = check_ratio(value)
        self.keep.fill_(1.0 - self._value)
        self.off = self._value == 0.0

    def __float__(self) -> float:
        return self._value

    def __repr__(self) -> str:
        return f"Ratio({self._value:g})"
