"""The united tier under transformers' tensor parallelism (`tp_plan`, `moe_tp_experts`).

Every rank holds every expert, `gate_up_proj` sharded on 2I as [gate_r; up_r] and `down_proj` on I. The united tier
is sharded exactly like the originals (their DTensor placements, applied with `distribute_tensor`, no communication),
so each rank runs its I-slice of the united experts and transformers' all-reduce after the experts sums them like it
sums the originals. Replicating the united experts instead would be wrong (the all-reduce would add tp copies) and
cost tp times the memory. The policy runs on the global routing every rank sees (docs/design.md §4).
"""
from __future__ import annotations

import torch

from .base import Placement, is_dtensor


class TensorParallelPlacement(Placement):
    name = "tp"

    def build(self, layer, united, expert_to_group):
        slabs = {}
        for k, u in united.items():
            p = layer.experts._parameters[k]
            loc = p.to_local() if is_dtensor(p) else p.data
            u = u.to(loc.device, loc.dtype)
            if is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                u = distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None).to_local()
            slabs[k] = torch.cat([loc, u])
        return slabs
