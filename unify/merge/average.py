"""`average`: the united expert is the uniform mean of its members' weights, tensor by tensor.

Needs no data and costs one pass over the group's weights. Plain weight averaging ignores that two experts' hidden
neurons need not correspond; `activation` aligns them first.
"""
from __future__ import annotations

import torch

from .base import MergeContext, register


def weighted_mean(w: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean of each stacked tensor [K, ...] over its members with `weights` [K] (normalised here)."""
    weights = weights.to(torch.float64)
    weights = weights / weights.sum()
    return {k: torch.tensordot(weights.to(v), v, dims=1) for k, v in w.items()}


def member_weights(ctx: MergeContext) -> torch.Tensor:
    """The members' calibration frequencies [K] as float64, uniform when calibration says nothing about them."""
    freq = ctx.calib.freq[ctx.members].to(torch.float64) if ctx.calib is not None else None
    if freq is None or not freq.sum() > 0:
        return torch.ones(len(ctx.members), dtype=torch.float64)
    return freq


@register("average", needs_data=False)
def average(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return {k: v.mean(0) for k, v in w.items()}
