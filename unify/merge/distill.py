"""`distill` and `distill-routed`: train the united expert to imitate its members on calibration tokens.

`distill` is the paper's method: a student of one expert's shape, initialised by `activation` (or by `average` or
`frequency`: parameter init), minimises the mean over members of ||U(x) - E_i(x)||^2 over the tokens routed to any
member (every calibration token when fewer than MIN_ROWS are), with Adam (parameters steps, lr) on minibatches.
`distill-routed` (ours) asks the student only for what it will actually be used for: token x is paired with the
members it was routed to, weighted by the routing weight, sum w_m(x) ||U(x) - E_m(x)||^2 / sum w_m(x); members the
router rarely picks no longer pull the student away from the ones it mostly stands in for.

Both losses reduce to a weighted regression on one target per token (see `mixture_targets`), so memory is
O(tokens x H) whatever the group size. Cost: the init, plus steps x a forward/backward of one expert on a minibatch.
A group has few tokens (hundreds) for a student with 3 I H weights, so training overfits: a share of the tokens
(parameter holdout, 20%) is held out and the student returned is the one, among the init and CHECKS snapshots, with
the lowest held-out loss (the `activation` init was fit on all the tokens, so this check leans toward keeping it).
The report records loss_init/loss_final (training tokens) and val_init/val_final (held-out tokens), as mean squared
error per output element with the loss's constant included, and best_step (0 = the init was kept).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from runtime.layout import output
from .base import MergeContext, register
from .activation import activation, group_rows, mixture_targets
from .average import average
from .frequency import frequency

BATCH = 512  # tokens per optimizer step
VAL_MIN_ROWS = 64  # below this many tokens none are held out (the check then runs on the training tokens)
CHECKS = 20  # held-out evaluations per run
INITS = {"activation": activation, "average": average, "frequency": frequency}


@dataclass(frozen=True)
class DistillParams:
    steps: int = field(default=200, metadata={"help": "Adam steps"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    init: Literal["activation", "average", "frequency"] = field(default="activation",
                                                                metadata={"help": "the merge the student starts from"})
    holdout: float = field(default=0.2, metadata={"help": "share of the group's tokens held out to pick the step kept"})

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr} must be > 0 and finite")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"holdout={self.holdout} must be in [0, 1)")


def _distill(w: dict[str, torch.Tensor], ctx: MergeContext, name: str, routed: bool) -> dict[str, torch.Tensor]:
    p = ctx.params_as(DistillParams)
    x, hit, wts, fallback = group_rows(ctx, name)
    dev = torch.device(ctx.device)
    init = INITS[p.init](w, dataclasses.replace(ctx, params=None))  # the init's own defaults; same report dict
    start = {k: v.to(dev, torch.float32) for k, v in init.items()}  # the init is computed on the CPU
    coef = wts if routed and not fallback and wts.sum() > 0 else torch.ones(hit.shape)
    x = x.to(dev)
    target, row_w, spread = mixture_targets({k: v.to(dev) for k, v in w.items()}, x, coef, ctx.glu)
    target, row_w = target.float(), row_w.float()
    gen = torch.Generator().manual_seed(ctx.seed)
    order = torch.randperm(x.shape[0], generator=gen).to(dev)
    n_val = int(p.holdout * x.shape[0]) if x.shape[0] >= VAL_MIN_ROWS else 0
    val, train = order[:n_val], order[n_val:]
    check = val if n_val else train

    def batch_loss(p, idx) -> torch.Tensor:  # sum over rows of c_n ||U(x_n) - T_n||^2
        return (row_w[idx] * (output(p, x[idx], ctx.glu) - target[idx]).square().sum(1)).sum()

    @torch.no_grad()
    def loss_on(p, rows) -> float:  # the objective on these rows, constant included, in chunks
        err = sum(float(batch_loss(p, rows[s:s + BATCH])) for s in range(0, rows.numel(), BATCH))
        return (err + float(spread[rows].sum())) / max(float(row_w[rows].sum()) * target.shape[1], 1e-30)

    def snapshot(p) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in p.items()}

    student = {k: v.detach().clone().requires_grad_() for k, v in start.items()}
    best = (loss_on(student, check), 0, snapshot(student))
    val_init = best[0]
    opt = torch.optim.Adam(student.values(), lr=p.lr)
    every = max(1, p.steps // CHECKS)
    for step in range(1, p.steps + 1):
        idx = train[torch.randperm(train.numel(), generator=gen)[:BATCH].to(dev)] if train.numel() > BATCH else train
        loss = batch_loss(student, idx) / row_w[idx].sum().clamp(min=1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == p.steps:
            v = loss_on(student, check)
            if v < best[0]:  # NaN never wins
                best = (v, step, snapshot(student))
    kept = best[2]
    ctx.report.update(loss_init=round(loss_on(start, train), 8), loss_final=round(loss_on(kept, train), 8),
                      val_init=round(val_init, 8), val_final=round(best[0], 8), best_step=best[1],
                      rows=int(x.shape[0]), val_rows=n_val, all_rows=fallback)
    return {k: v.float().cpu() for k, v in kept.items()}


@register("distill", needs_data=True, params=DistillParams)
def distill(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill", routed=False)


@register("distill-routed", needs_data=True, params=DistillParams)
def distill_routed(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill-routed", routed=True)
