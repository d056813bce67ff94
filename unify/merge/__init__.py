"""Merge methods: how a group of experts becomes one united expert. One module per method behind one registry.

A method is `fn(w, ctx) -> united`, where `w` is the group's canonical weights (see `unify.layout`) stacked on a
leading member dimension [K, ...] in float32, and `united` is one canonical expert (same keys, no leading dim).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..calib_data import LayerCalibration
from ..errors import BrownoutError
from ..layout import Glu


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
MERGES: dict[str, MergeFn] = {}
NEEDS_DATA: set[str] = set()


def register(name: str, needs_data: bool = True):
    def deco(fn: MergeFn) -> MergeFn:
        MERGES[name] = fn
        if needs_data:
            NEEDS_DATA.add(name)
        return fn

    return deco


def get(name: str) -> MergeFn:
    _load_all()
    if name not in MERGES:
        raise BrownoutError(f"unknown merge method {name!r}; methods: {', '.join(sorted(MERGES))}")
    return MERGES[name]


def names() -> list[str]:
    _load_all()
    return sorted(MERGES)


def _load_all() -> None:
    from . import average, frequency, activation, distill  # noqa: F401  (each registers itself)
