"""Expert-parallel routing for ranks that share one batch: remapped slab ids -> this rank's local slab ids.

Under the all-reduce scheme of expert parallelism every rank holds the whole batch, runs its own slabs on the slots
routed to them, and an all-reduce sums the ranks. This module is the PyTorch form of that translation; the Triton
remap kernel (`runtime.kernels.remap(..., ep=...)`) does the same in its epilogue, so the whole EP routing of a layer
is one launch instead of about 15 small ones (the EP id translation and transformers' AllReduceEP masking), each a
few microseconds even replayed from a CUDA graph: on the H200 EP 2 spent about 60 us a layer in MoE work that does
not shrink with the ratio (eval/results/distributed_bench*.md, batch 1), one GPU about 30.

A slot's rank: the rank holding its slab (`rank_of`); a replicated united expert (rank -1) goes to the rank of the
token's row chunk (`ceil(T / ep_size)` rows per rank, like DTensor Shard(0)), which splits the replicated work evenly.
On this rank the slot becomes the slab's local index (`pos[rank, slab]`); anywhere else, and for a skipped slot (id
`skip` = E + G), it becomes `local_slabs` (the skip id of the local slab space) with weight 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EPRouting:
    """One layer's EP tables on this rank (runtime.placement.expert_parallel.EPPlacement.tables)."""

    rank_of: torch.Tensor  # [E+G+1] int64: the rank holding slab s, -1 for a replica (or the skip slot)
    pos: torch.Tensor  # [ep_size, E+G+1] int64: local slab index of slab s on rank r (0 where not held)
    local_slabs: int  # L: slabs per rank; local id L skips the slot
    rank: int
    ep_size: int

    @property
    def skip(self) -> int:
        return self.rank_of.numel() - 1


def token_chunk(num_tokens: int, ep_size: int) -> int:
    """Rows per rank when a shared batch is split by rows (like DTensor Shard(0))."""
    return max(1, -(-num_tokens // ep_size))


def row_ranks(num_tokens: int, ep_size: int, device) -> torch.Tensor:
    """The rank of each token's row chunk (`token_chunk` rows per rank): where a replicated slot's work goes."""
    return torch.arange(num_tokens, device=device) // token_chunk(num_tokens, ep_size)


def ep_local_routing(ids: torch.Tensor, weights: torch.Tensor, ep: EPRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab ids over [originals; united] (E + G skips) -> (local slab ids in [0, L], weights): this rank's slots
    kept, the rest skipped."""
    rows = row_ranks(ids.shape[0], ep.ep_size, ids.device)
    r = ep.rank_of[ids]
    r = torch.where(r < 0, rows.unsqueeze(-1).expand_as(ids), r)
    mine = (r == ep.rank) & (ids != ep.skip)
    local = torch.where(mine, ep.pos[ep.rank][ids], torch.full_like(ids, ep.local_slabs))
    return local, torch.where(mine, weights, torch.zeros_like(weights))
