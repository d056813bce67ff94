"""`activation`: align hidden neurons, average, then refit the output projection on calibration tokens.

Two experts can compute the same function with their intermediate neurons in another order, and averaging
unaligned neurons blurs both. The most used member is the centre; every other member's neurons are matched one to
one to the centre's by the correlation of their activations on calibration tokens (Hungarian matching), permuted
(gate/up rows, down columns, biases), and the aligned weights are averaged with frequency weights. Last, the united
down projection (and its bias) is refit by ridge regression, shrunk toward the averaged one with lambda chosen by
generalised cross-validation, so that the united expert reproduces the group's outputs on those tokens. A group of neuron-permuted copies merges back exactly.

Tokens and targets: every calibration token routed to a member m contributes the pair (x, E_m(x)), without its
routing weight (the united expert must stand in for m whatever the weight). With fewer than MIN_ROWS such tokens,
all calibration tokens are used and the target is the mean of all members' outputs (the paper's distillation
objective, which needs no routing).

Parameters (`ActivationParams`): align=false skips the neuron matching (a frequency-weighted mean of unaligned
neurons), refit=false skips the ridge refit of the down projection; with both off this is the `frequency` merge.

Cost: one forward of each member on the group's calibration tokens, one I x I assignment per member (O(I^3), well
under a second at I = 4096), and one (I+1) x (I+1) eigendecomposition in float64. No training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from runtime.layout import Glu, expert, hidden, output
from .base import MergeContext, register
from .average import member_weights, weighted_mean

MIN_ROWS = 32  # fewer routed tokens than this say too little about a group: use every calibration token
RIDGE_GRID = [10.0 ** (e / 2) for e in range(-16, 5)]  # ridge lambdas tried, times the mean eigenvalue (1e-8..1e2)
NEURON_KEYS = ("gate", "up", "gate_bias", "up_bias")  # tensors whose dim 0 (per member) indexes hidden neurons


@dataclass(frozen=True)
class ActivationParams:
    align: bool = field(default=True, metadata={"help": "match every member's neurons to the centre's first"})
    refit: bool = field(default=True, metadata={"help": "refit the down projection on calibration tokens"})


def group_rows(ctx: MergeContext, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(x [N, H], routed [N, K] bool, routing weight [N, K] (0 where not routed), fallback) for the group's members.
    The rows routed to any member, or every calibration row (fallback=True) when those are fewer than MIN_ROWS."""
    c = ctx.require_calib(method)
    wts = torch.stack([(c.topk_w * (c.topk_idx == m)).sum(-1) for m in ctx.members], 1).float()
    hit = torch.stack([(c.topk_idx == m).any(-1) for m in ctx.members], 1)
    rows = hit.any(1)
    if rows.sum() < MIN_ROWS:
        return c.x.float(), hit, wts, True
    return c.x[rows].float(), hit[rows], wts[rows], False


def mixture_targets(w: dict[str, torch.Tensor], x: torch.Tensor, coef: torch.Tensor, glu: Glu):
    """For rows x [N, H] and member coefficients coef [N, K] >= 0, in float64:
    target T_n = sum_k coef_nk E_k(x_n) / c_n, row weight c_n = sum_k coef_nk, and spread s_n = sum_k coef_nk
    ||E_k(x_n) - T_n||^2, so that sum_k coef_nk ||U(x_n) - E_k(x_n)||^2 = c_n ||U(x_n) - T_n||^2 + s_n.
    One pass over the members and O(N H) memory, whatever the group size."""
    first = torch.zeros(x.shape[0], w["down"].shape[1], dtype=torch.float64, device=x.device)
    second = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    coef = coef.to(x.device, torch.float64)
    for k in range(coef.shape[1]):
        y = output(expert(w, k), x, glu).double()
        first += coef[:, k:k + 1] * y
        second += coef[:, k] * y.square().sum(1)
    c = coef.sum(1)
    target = first / c.clamp(min=1e-30)[:, None]
    return target, c, (second - c * target.square().sum(1)).clamp(min=0)


def _standardise(h: torch.Tensor) -> torch.Tensor:
    h = h.double() - h.double().mean(0)
    return h / (h.norm(dim=0) + 1e-12)  # dead neurons stay zero and correlate with nothing


@torch.no_grad()
def align(w: dict[str, torch.Tensor], centre: int, x: torch.Tensor, glu: Glu) -> dict[str, torch.Tensor]:
    """Permute every member's hidden neurons to best match the centre's (max total activation correlation)."""
    hc = _standardise(hidden(expert(w, centre), x, glu))
    out = {k: v.clone() for k, v in w.items()}
    for k in range(w["gate"].shape[0]):
        if k == centre:
            continue
        corr = hc.T @ _standardise(hidden(expert(w, k), x, glu))  # [I centre, I member]
        _, perm = linear_sum_assignment(corr.cpu().numpy(), maximize=True)  # rows come back as 0..I-1
        perm = torch.as_tensor(perm, device=w["gate"].device)
        for key in NEURON_KEYS:
            if key in w:
                out[key][k] = w[key][k][perm]
        out["down"][k] = w["down"][k][:, perm]
    return out


@torch.no_grad()
def refit_down(united: dict[str, torch.Tensor], x, target, row_w, glu: Glu) -> tuple[dict[str, torch.Tensor], float]:
    """Ridge regression of the down projection (+ bias) of `united` on rows x toward target [N, H], row weights [N],
    shrunk toward the current (averaged) down projection; returns it and the chosen lambda (relative to the mean
    eigenvalue). A group often has fewer routed tokens than I + 1 unknowns per output, where a tiny lambda would
    interpolate the calibration tokens and generalise badly; lambda is chosen by generalised cross-validation on a
    log grid instead, all from one eigendecomposition of the normal equations (cheap, float64)."""
    a = hidden(united, x, glu).double()
    prior = united["down"].double().T  # [I, H]
    if "down_bias" in united:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        prior = torch.cat([prior, united["down_bias"].double()[None]], 0)
    rw = row_w.to(a)[:, None]
    resid = target.to(a) - a @ prior  # what the refit may add to the averaged projection
    s, v = torch.linalg.eigh((a * rw).T @ a)
    s = s.clamp(min=0)
    b = v.T @ ((a * rw).T @ resid)  # [d, H] in the eigenbasis
    tss, bn, n = float((rw * resid.square()).sum()), b.square().sum(1), a.shape[0]
    best = (float("inf"), 0.0)
    for rel in RIDGE_GRID:
        f = 1 / (s + rel * s.mean().clamp(min=1e-30))
        df = float((s * f).sum())  # effective number of parameters
        rss = max(tss - float((bn * (2 * f - s * f * f)).sum()), 0.0)
        gcv = rss / (1 - df / n) ** 2 if df < n - 1e-6 else float("inf")
        best = min(best, (gcv, rel))
    rel = best[1] if best[0] < float("inf") else RIDGE_GRID[-1]
    sol = prior + v @ (b / (s + rel * s.mean().clamp(min=1e-30))[:, None])
    out = dict(united)
    out["down"] = sol[:united["down"].shape[1]].T.to(united["down"]).contiguous()
    if "down_bias" in united:
        out["down_bias"] = sol[-1].to(united["down_bias"])
    return out, rel


@register("activation", needs_data=True, params=ActivationParams)
def activation(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    p = ctx.params_as(ActivationParams)
    x, hit, _, fallback = group_rows(ctx, "activation")
    x = x.to(w["gate"])
    weights = member_weights(ctx)
    aligned = align(w, int(weights.argmax()), x, ctx.glu) if p.align else w  # argmax: first of equals
    united = weighted_mean(aligned, weights)
    if p.refit:
        coef = torch.ones(hit.shape) if fallback else hit.float()
        target, row_w, _ = mixture_targets(w, x, coef, ctx.glu)
        united, ctx.report["ridge"] = refit_down(united, x, target, row_w, ctx.glu)
    return united
