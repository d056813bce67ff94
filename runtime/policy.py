"""Brownout policies: which top-k assignments of one MoE call go to united experts (docs/design.md §4).

Everything here is tensor ops on the routing's device with static shapes and no host synchronisation, so the same
code runs inside a CUDA graph. The output is a *remapped routing* over the concatenated slabs
[originals (0..E-1); united (E..E+G-1)], with slot id E+G meaning "skip this slot" (weight 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BrownoutError

POLICIES = ("hot-cold", "mass", "drop")
# hot-cold: the paper's Algorithm 1. Experts sorted by assignment count in this call; the hot set is the shortest
#           prefix reaching (1 - r) of the assignments (the expert that crosses the line stays hot); cold experts
#           go to their group's united expert, except a group with a single active cold member runs that original.
# mass:     ours. The same, but experts are ranked and the line is drawn by routing-weight mass instead of count:
#           an expert that many tokens pick with tiny weights contributes little output, so it is cheaper (in
#           accuracy) to send it to its united expert than an expert picked less often but with large weights.
# drop:     the paper's "full brownout" baseline: cold assignments (count ranking) are skipped, nothing replaces them.


def check_policy(policy) -> str:
    """`policy` if it names a brownout policy, else BrownoutError listing them."""
    if policy not in POLICIES:
        raise BrownoutError(f"unknown brownout policy {policy!r}; policies: {', '.join(POLICIES)}")
    return policy


@dataclass
class Assignment:
    ids: torch.Tensor  # [T, k] int64 slab ids in [0, E + G]; E + G = skipped slot
    weights: torch.Tensor  # [T, k] routing weights, same dtype as the input weights; 0 on skipped slots
    hot: torch.Tensor  # [E] bool: experts kept on their originals by the ranking
    united: torch.Tensor  # [E] bool: experts whose assignments were sent to their united expert


def hot_set(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """[E] bool: the shortest prefix of experts sorted by `score` (desc, ties -> lower id) reaching (1 - r) of the total.

    An expert is hot iff the score of the experts ranked before it is still short of the line, so the expert that
    crosses the line is included; experts with zero score are never hot.
    """
    sorted_score, order = torch.sort(score, descending=True, stable=True)
    before = torch.cumsum(sorted_score, 0) - sorted_score  # exclusive prefix sum
    need = (1.0 - ratio) * score.sum()
    hot_sorted = (before < need) & (sorted_score > 0)
    return torch.zeros_like(hot_sorted).scatter(0, order, hot_sorted)


def keep_tensor(ratio: float, device) -> torch.Tensor:
    """1 - r as a float32 [1] tensor on `device`, rounded from float64 exactly as `hot_set` rounds it: the device
    scalar the fused remap kernel reads, so a captured CUDA graph follows ratios written into it later."""
    return torch.tensor([1.0 - float(ratio)], dtype=torch.float32, device=device)


def remap(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert_to_group: torch.Tensor,
    num_groups: int,
    ratio: float,
    policy: str = "hot-cold",
) -> Assignment:
    """Apply a brownout policy to one call's routing (docs/design.md §4)."""
    check_policy(policy)
    num_experts = expert_to_group.numel()
    skip = num_experts + num_groups
    idx = top_k_index.long()
    flat = idx.reshape(-1)
    count = torch.zeros(num_experts, device=idx.device, dtype=torch.float32).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float32)
    )
    if policy == "mass":
        score = torch.zeros(num_experts, device=idx.device, dtype=torch.float32).scatter_add_(
            0, flat, top_k_weights.reshape(-1).float().abs()
        )
        score = torch.where(count > 0, score + 1e-30, score)  # a chosen expert counts even at weight 0
    else:
        score = count
    hot = hot_set(score, ratio)
    cold_active = (count > 0) & ~hot
    arange = torch.arange(num_experts, device=idx.device)

    if policy == "drop":
        table = torch.where(hot, arange, torch.full_like(arange, skip))
        ids = table[idx]
        weights = torch.where(ids == skip, torch.zeros_like(top_k_weights), top_k_weights)
        return Assignment(ids, weights, hot, torch.zeros_like(hot))

    group = expert_to_group.long().to(idx.device)
    cold_per_group = torch.zeros(num_groups, device=idx.device, dtype=torch.long).scatter_add_(
        0, group, cold_active.long()
    )
    united = cold_active & (cold_per_group[group] >= 2)  # a lone cold member keeps its original: same cost, no loss
    table = torch.where(united, num_experts + group, arange)
    ids = table[idx]
    ids, weights = dedup(ids, top_k_weights, skip)
    return Assignment(ids, weights, hot, united)


def dedup(ids: torch.Tensor, weights: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of one token on the same slab: add their weights into the first, skip the rest (computed once)."""
    k = ids.shape[-1]
    if k == 1:
        return ids, weights
    same = ids.unsqueeze(-1) == ids.unsqueeze(-2)  # [T, k, k]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    dup = (same & earlier).any(-1)  # an earlier slot of the token has the same slab
    summed = (same.to(weights.dtype) * weights.unsqueeze(-2)).sum(-1)
    weights = torch.where(dup, torch.zeros_like(weights), summed)
    ids = torch.where(dup, torch.full_like(ids, skip), ids)
    return ids, weights


def slabs_read(ids: torch.Tensor, num_slabs: int) -> torch.Tensor:
    """Number of distinct weight slabs an assignment touches (what decode time is made of). Syncs: for benchmarks."""
    used = torch.zeros(num_slabs + 1, dtype=torch.bool, device=ids.device)
    used[ids.reshape(-1)] = True
    return used[:num_slabs].sum()
