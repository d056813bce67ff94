"""`distill` and `distill-routed`: train the united expert to imitate its members on calibration tokens.

`distill` is the paper's method: a student of one expert's shape, initialised by `activation` (or `average` with
params init=average), minimises the mean over members of ||U(x) - E_i(x)||^2 over the tokens routed to any member
(every calibration token when fewer than MIN_ROWS are), with Adam for ctx.steps minibatch steps.
`distill-routed` (ours) asks the student only for what it will actually be used for: token x is paired with the
members it was routed to, weighted by the routing weight, sum w_m(x) ||U(x) - E_m(x)||^2 / sum w_m(x); members the
router rarely picks no longer pull the student away from the ones it mostly stands in for.

Both losses reduce to a weighted regression on one target per token (see `mixture_targets`), so memory is
O(tokens x H) whatever the group size. Cost: the init, plus steps x a forward/backward of one expert on a minibatch.
A group has few tokens (hundreds) for a student with 3 I H weights, so training overfits: 20% of the tokens are held
out and the student returned is the one, among the init and CHECKS snapshots, with the lowest held-out loss (the
`activation` init was fit on all the tokens, so this check leans toward keeping it).
params records init, loss_init/loss_final (training tokens) and val_init/val_final (held-out tokens), as mean squared
error per output element with the loss's constant included, and best_step (0 = the init was kept).
"""
from __future__ import annotations

import torch

from runtime.errors import BrownoutError
from runtime.layout import output
from . import MergeContext, register
from .activation import activation, group_rows, mixture_targets
from .average import average

BATCH = 512  # tokens per optimizer step
VAL_SHARE, VAL_MIN_ROWS = 0.2, 64  # tokens held out to choose which step to keep (none below VAL_MIN_ROWS tokens)
CHECKS = 20  # held-out evaluations per run


def _init(w, ctx: MergeContext) -> dict[str, torch.Tensor]:
    init = ctx.params.setdefault("init", "activation")
    if init not in ("activation", "average"):
        raise BrownoutError(f"distill init {init!r} is not one of: activation, average")
    return (activation if init == "activation" else average)(w, ctx)


def _distill(w: dict[str, torch.Tensor], ctx: MergeContext, name: str, routed: bool) -> dict[str, torch.Tensor]:
    x, hit, wts, fallback = group_rows(ctx, name)
    dev = torch.device(ctx.device)
    start = {k: v.to(dev, torch.float32) for k, v in _init(w, ctx).items()}  # the init is computed on the CPU
    coef = wts if routed and not fallback and wts.sum() > 0 else torch.ones(hit.shape)
    x = x.to(dev)
    target, row_w, spread = mixture_targets({k: v.to(dev) for k, v in w.items()}, x, coef, ctx.glu)
    target, row_w = target.float(), row_w.float()
    gen = torch.Generator().manual_seed(ctx.seed)
    order = torch.randperm(x.shape[0], generator=gen).to(dev)
    n_val = int(VAL_SHARE * x.shape[0]) if x.shape[0] >= VAL_MIN_ROWS else 0
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
    opt = torch.optim.Adam(student.values(), lr=ctx.lr)
    every = max(1, ctx.steps // CHECKS)
    for step in range(1, ctx.steps + 1):
        idx = train[torch.randperm(train.numel(), generator=gen)[:BATCH].to(dev)] if train.numel() > BATCH else train
        loss = batch_loss(student, idx) / row_w[idx].sum().clamp(min=1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == ctx.steps:
            v = loss_on(student, check)
            if v < best[0]:  # NaN never wins
                best = (v, step, snapshot(student))
    kept = best[2]
    ctx.params.update(loss_init=round(loss_on(start, train), 8), loss_final=round(loss_on(kept, train), 8),
                      val_init=round(val_init, 8), val_final=round(best[0], 8), best_step=best[1],
                      rows=int(x.shape[0]), val_rows=n_val, all_rows=fallback)
    return {k: v.float().cpu() for k, v in kept.items()}


@register("distill", needs_data=True)
def distill(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill", routed=False)


@register("distill-routed", needs_data=True)
def distill_routed(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill-routed", routed=True)
