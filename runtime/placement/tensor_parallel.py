"""The united tier under transformers' tensor parallelism (`tp_plan`, `moe_tp_experts`).

Every rank holds every expert, `gate_up_proj` sharded on 2I as [gate_r; up_r] and `down_proj` on I. The united tier
is sharded exactly like the originals (their DTensor placements, applied with `distribute_tensor`, no communication),
so each rank runs its I-slice of the united experts and transformers' all-reduce after the experts sums them like it
sums the originals. Replicating the united experts instead would be wrong (the all-reduce would add tp copies) and
cost tp times the memory. The policy runs on the global routing every rank sees (docs/design.md §4).
"""
from __future__ import annotations

import torch

from .base import is_dtensor
from .local import LocalPlacement


class TensorParallelPlacement(LocalPlacement):
    name = "tp"

    def place(self, param: torch.Tensor, united: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the united tensor, cut exactly like `param`'s (no communication)."""
        if not is_dtensor(param):
            return united
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(united, param.device_mesh, param.placements, src_data_rank=None).to_local()
