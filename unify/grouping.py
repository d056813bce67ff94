"""Grouping methods: which experts of a layer share a united expert. Every method returns equal-size groups.

A method is `fn(canon, calib, glu, num_groups, seed, params=None) -> groups`, where `canon` holds all E experts of
the layer in the canonical layout (`runtime.layout`, [E, ...] float32), `params` is the method's parameter dataclass
(None = its defaults) and `groups` is a partition of range(E) into exactly `num_groups` groups of E // num_groups
members, each sorted ascending, the groups sorted by their first member. The caller checks divisibility first
(`check_partition`). `GROUPINGS.get(name)` gives the method (`fn`, `needs_data`, `params`).

- `consecutive` (the paper): expert i joins group i // way. Needs no data.
- `frequency` (MC-SMoE style): the most used experts are the centres; every other expert joins the centre whose
  outputs on calibration tokens are most similar (cosine), each centre taking exactly way - 1 of them.
- `similarity` (HC-SMoE style): average-linkage clustering of the experts' outputs on calibration tokens, then
  balanced k-means so that every group has the same size.
Both data methods cost one forward of every expert on `sample_rows` calibration tokens (512) plus an E x E assignment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from runtime.errors import BrownoutError
from runtime.layout import Glu, expert, output

from .calib_data import LayerCalibration
from .registry import Registry

GroupFn = Callable[..., list[list[int]]]
GROUPINGS = Registry("grouping")
register, get, names = GROUPINGS.register, GROUPINGS.get, GROUPINGS.names


@dataclass(frozen=True)
class SampleParams:
    """The data methods compare experts by their outputs on a seeded sample of the layer's calibration tokens."""

    sample_rows: int = field(default=512, metadata={"help": "calibration tokens the experts are compared on"})

    def __post_init__(self):
        if self.sample_rows < 1:
            raise ValueError(f"sample_rows={self.sample_rows} must be >= 1")


# -- partition sizes ------------------------------------------------------------------------------------------
def partition_sizes(num_experts: int) -> list[int]:
    """Group counts (equivalently group sizes) that split num_experts into equal groups: its divisors."""
    return [d for d in range(1, num_experts + 1) if num_experts % d == 0]


def check_partition(num_experts: int, way: int | None = None, groups: int | None = None) -> int:
    """Validate `--way` / `--groups` (exactly one of them) against E experts; return the number of groups."""
    if (way is None) == (groups is None):
        raise BrownoutError("give exactly one of --way K (experts per group) and --groups N (groups per layer)")
    flag, value = ("--way", way) if way is not None else ("--groups", groups)
    valid = partition_sizes(num_experts)
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value not in valid:
        raise BrownoutError(f"{flag} {value} does not partition {num_experts} experts; "
                            f"valid {flag} values: {', '.join(map(str, valid))}")
    return num_experts // value if way is not None else value


def _canonical(groups) -> list[list[int]]:
    return sorted(sorted(int(i) for i in g) for g in groups)


def _num_experts(canon: dict[str, torch.Tensor]) -> int:
    return canon["gate"].shape[0]


# -- methods --------------------------------------------------------------------------------------------------
@register("consecutive", needs_data=False)
def consecutive(canon, calib, glu, num_groups, seed, params=None):
    n = _num_experts(canon)
    way = n // num_groups
    return [list(range(g * way, (g + 1) * way)) for g in range(num_groups)]


@register("frequency", needs_data=True, params=SampleParams)
def frequency(canon, calib, glu, num_groups, seed, params: SampleParams | None = None):
    n = _num_experts(canon)
    if num_groups in (1, n):
        return consecutive(canon, calib, glu, num_groups, seed)
    gram = _output_gram(canon, _require(calib, "frequency"), glu, seed, (params or SampleParams()).sample_rows)
    norm = gram.diagonal().clip(min=1e-30) ** 0.5
    cos = gram / np.outer(norm, norm)
    # stable sort: among equally used experts the lower id becomes the centre, so the result is reproducible
    order = torch.sort(-calib.freq.double(), stable=True).indices.tolist()
    centres, others = order[:num_groups], sorted(order[num_groups:])
    # every centre offers way - 1 slots; the best one-to-one filling maximises the total similarity
    slots = np.repeat(np.arange(num_groups), n // num_groups - 1)
    rows, cols = linear_sum_assignment(-cos[np.ix_(others, [centres[s] for s in slots])])
    groups = [[c] for c in centres]
    for r, c in zip(rows, cols):
        groups[slots[c]].append(others[r])
    return _canonical(groups)


@register("similarity", needs_data=True, params=SampleParams)
def similarity(canon, calib, glu, num_groups, seed, params: SampleParams | None = None):
    """Feature = an expert's outputs on a shared token sample, flattened (no pooling). Mean-pooling would call two
    experts alike when only their average output agrees; the flattened outputs' Euclidean distance is the error of
    letting one stand in for the other on those very tokens, which is what merging costs. No normalisation either:
    experts with small outputs are cheap to merge, whatever their direction. Frequency is left to the merge step."""
    n = _num_experts(canon)
    if num_groups in (1, n):
        return consecutive(canon, calib, glu, num_groups, seed)
    from sklearn.cluster import AgglomerativeClustering

    gram = _output_gram(canon, _require(calib, "similarity"), glu, seed, (params or SampleParams()).sample_rows)
    sq = np.diag(gram)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * gram, 0, None))
    labels = AgglomerativeClustering(n_clusters=num_groups, metric="precomputed", linkage="average").fit_predict(dist)
    return _canonical(_balanced_kmeans(gram, labels, num_groups))


def _balanced_kmeans(gram: np.ndarray, labels: np.ndarray, num_groups: int, iters: int = 100) -> list[list[int]]:
    """Kernel k-means with equal cluster sizes, from the Gram matrix alone (features can be huge: tokens x H).
    Assignment step = one-to-one matching of experts to `way` replicated slots per centroid; each step can only
    lower the within-cluster sum of squares, so it stops at the first repeat."""
    n = gram.shape[0]
    slots = np.repeat(np.arange(num_groups), n // num_groups)
    members = [np.flatnonzero(labels == c) for c in range(num_groups)]  # the unbalanced start
    best = None
    for _ in range(iters):
        # squared distance of every expert to every centroid: G_ii - 2 mean_j G_ij + mean_jl G_jl
        d2 = np.stack([np.diag(gram) - 2 * gram[:, m].mean(1) + gram[np.ix_(m, m)].mean() for m in members], 1)
        rows, cols = linear_sum_assignment(d2[:, slots])
        new = slots[cols[np.argsort(rows)]]
        cost = d2[np.arange(n), new].sum()
        if best is not None and cost >= best[0] - 1e-12 * abs(best[0]):
            break
        best = (cost, new)
        members = [np.flatnonzero(new == c) for c in range(num_groups)]
    return [np.flatnonzero(best[1] == c).tolist() for c in range(num_groups)]


def _require(calib: LayerCalibration | None, method: str) -> LayerCalibration:
    if calib is None:
        raise BrownoutError(f"grouping method {method!r} needs calibration data")
    return calib


@torch.no_grad()
def _output_gram(canon, calib: LayerCalibration, glu: Glu, seed: int, sample_rows: int,
                 chunk_elems: int = 1 << 24) -> np.ndarray:
    """Gram matrix [E, E] (float64) of the experts' flattened outputs on a seeded sample of `sample_rows` tokens,
    accumulated over row chunks so that memory stays at ~chunk_elems floats whatever E, H and the sample size."""
    n, x = _num_experts(canon), calib.x
    if x.shape[0] > sample_rows:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:sample_rows].sort().values]
    x = x.to(device=canon["gate"].device, dtype=torch.float32)
    step = max(1, chunk_elems // (n * x.shape[1]))
    gram = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, x.shape[0], step):
        f = torch.stack([output(expert(canon, j), x[s:s + step], glu).flatten() for j in range(n)]).double()
        gram += (f @ f.T).cpu()
    return gram.numpy()
