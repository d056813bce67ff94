"""What every merge method shares: the registry it registers in and the context it is called with.

A method is `fn(w, ctx) -> united`, where `w` is the group's canonical weights (see `runtime.layout`) stacked on a
leading member dimension [K, ...] in float32, and `united` is one canonical expert (same keys, no leading dim).
The method modules import this one; `unify.merge` imports them all, so importing it fills the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from runtime.errors import BrownoutError
from runtime.layout import Glu

from ..calib_data import LayerCalibration
from ..registry import Registry

MERGES = Registry("merge")
register = MERGES.register

P = TypeVar("P")


@dataclass
class MergeContext:
    members: list[int]  # expert ids (within the layer) of the group, in the order of w's leading dim
    glu: Glu  # the family's gated activation
    calib: LayerCalibration | None  # None only for data-free methods
    params: Any = None  # the method's parameter dataclass; None = its defaults
    device: str = "cpu"
    seed: int = 0
    report: dict = field(default_factory=dict)  # what the method measured on this group, written to united.json

    def params_as(self, cls: type[P]) -> P:
        if self.params is None:
            return cls()
        if not isinstance(self.params, cls):
            raise BrownoutError(f"merge context holds {type(self.params).__name__}, the method takes {cls.__name__}")
        return self.params

    def require_calib(self, method: str) -> LayerCalibration:
        if self.calib is None:
            raise BrownoutError(f"merge method {method!r} needs calibration data")
        return self.calib


MergeFn = Callable[[dict[str, torch.Tensor], MergeContext], dict[str, torch.Tensor]]
