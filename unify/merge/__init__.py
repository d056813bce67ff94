"""Merge methods: how a group of experts becomes one united expert. One module per method behind one registry.

A method is `fn(w, ctx) -> united`, where `w` is the group's canonical weights (see `unify.layout`) stacked on a
leading member dimension [K, ...] in float32, and `united` is one canonical expert (same keys, no leading dim).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..calib_data import LayerCalibration
from runtime.layout import Glu
from ..registry import Registry


@dataclass
class MergeContext:
    members: list[int]  # expert ids (within the layer) of the group, in the order of w's leading dim
    glu: Glu  # the family's gated activation
    calib: LayerCalibration | None  # None only for data-free methods
    steps: int = 200  # optimizer steps for training-based methods
    lr: float = 1e-3
    device: str = "cpu"
    seed: int = 0
    params: dict = field(default_factory=dict)  # method-specific extras, recorded in united.json


MergeFn = Callable[[dict[str, torch.Tensor], MergeContext], dict[str, torch.Tensor]]
_REGISTRY = Registry("merge", load=lambda: _load_all())
MERGES: dict[str, MergeFn] = _REGISTRY.methods
NEEDS_DATA: set[str] = _REGISTRY.needs_data
register, get, names = _REGISTRY.register, _REGISTRY.get, _REGISTRY.names


def _load_all() -> None:
    from . import average, frequency, activation, distill  # noqa: F401  (each registers itself)
