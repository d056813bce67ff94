"""`frequency`: the mean of the members' weights, each weighted by how often the router chose it in calibration.

Costs the same as `average` plus the router statistics; a united expert leans toward the members it mostly stands in
for. Uniform when none of the members was chosen.
"""
from __future__ import annotations

import torch

from .base import MergeContext, register
from .average import member_weights, weighted_mean


@register("frequency", needs_data=True)
def frequency(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    ctx.require_calib("frequency")
    return weighted_mean(w, member_weights(ctx))
