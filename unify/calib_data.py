"""What calibration records about one MoE layer; the input of grouping and merging."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCalibration:
    """Routing statistics and a bounded token sample of one MoE layer (CPU, float32).

    Each expert's calibration inputs are the rows of `x` routed to it (`topk_idx == j`); its outputs are computed on
    demand from the weights (`unify.layout.output`), so they are never stale and cost no memory here.
    """

    freq: torch.Tensor  # [E] top-k assignments per expert, over all calibration tokens of the layer
    score_sum: torch.Tensor  # [E] sum of the routing weights each expert received when chosen
    x: torch.Tensor  # [N, H] bounded, uniformly drawn sample of the tokens entering the experts
    topk_idx: torch.Tensor  # [N, k] the sampled tokens' routed experts
    topk_w: torch.Tensor  # [N, k] and their routing weights
    tokens: int  # calibration tokens seen by this layer

    @property
    def num_experts(self) -> int:
        return self.freq.numel()

    def routed(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of x routed to expert j, the routing weight each of those rows gave it)."""
        hit = self.topk_idx == j
        rows = hit.any(-1)
        return self.x[rows], (self.topk_w * hit).sum(-1)[rows]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "freq": self.freq.tolist(), "score_sum": [round(v, 6) for v in self.score_sum.tolist()]}
