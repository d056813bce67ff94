"""`distill` and `distill-routed`: train the united expert to imitate its members on calibration tokens.

`distill` is the paper's method: a student of one expert's shape, initialised by `activation` (or `average` with
params init=average), minimises the mean over members of ||U(x) - E_i(x)||^2 over the tokens routed to any member
(every calibration token when fewer than MIN_ROWS are), with Adam for ctx.steps minibatch steps.
`distill-routed` (ours) asks the student only for what it will actually be used for: token x is paired with the
members it was routed to, weighted by the routing weight, sum w_m(x) ||U(x) - E_m(x)||^2 / sum w_m(x); members the
router rarely picks no longer pull the student away from the ones it mostly stands in for.

Both losses reduce to a weighted regression on one target per token (see `mixture_targets`), so memory is
O(tokens x H) whatever the group size. Cost: the init, plus steps x a forward/backward of one expert on a minibatch.
params records init, loss_init and loss_final (mean squared error per output element, the loss's constant
included), and the returned student is the better of the init and the trained one.
"""
from __future__ import annotations

import torch

from ..errors import BrownoutError
from ..layout import output
from . import MergeContext, register
from .activation import activation, group_rows, mixture_targets
from .average import average

BATCH = 512  # tokens per optimizer step


def _init(w, ctx: MergeContext) -> dict[str, torch.Tensor]:
    init = ctx.params.setdefault("init", "activation")
    if init not in ("activation", "average"):
        raise BrownoutError(f"distill init {init!r} is not one of: activation, average")
    return (activation if init == "activation" else average)(w, ctx)


def _distill(w: dict[str, torch.Tensor], ctx: MergeContext, name: str, routed: bool) -> dict[str, torch.Tensor]:
    x, hit, wts, fallback = group_rows(ctx, name)
    start = _init(w, ctx)
    coef = wts if routed and not fallback and wts.sum() > 0 else torch.ones(hit.shape)
    dev = torch.device(ctx.device)
    x = x.to(dev)
    target, row_w, spread = mixture_targets({k: v.to(dev) for k, v in w.items()}, x, coef, ctx.glu)
    target, row_w = target.float(), row_w.float()
    norm = float(row_w.sum()) * target.shape[1]

    def batch_loss(p, idx) -> torch.Tensor:  # sum over rows of c_n ||U(x_n) - T_n||^2
        return (row_w[idx] * (output(p, x[idx], ctx.glu) - target[idx]).square().sum(1)).sum()

    @torch.no_grad()
    def full_loss(p) -> float:  # the whole objective, constant included, in chunks
        err = sum(float(batch_loss(p, slice(s, s + BATCH))) for s in range(0, x.shape[0], BATCH))
        return (err + float(spread.sum())) / norm

    student = {k: v.detach().to(dev, torch.float32).clone().requires_grad_() for k, v in start.items()}
    loss_init = full_loss(student)
    opt = torch.optim.Adam(student.values(), lr=ctx.lr)
    gen = torch.Generator().manual_seed(ctx.seed)
    for _ in range(ctx.steps):
        idx = torch.randperm(x.shape[0], generator=gen)[:BATCH].to(dev) if x.shape[0] > BATCH else slice(None)
        loss = batch_loss(student, idx) / row_w[idx].sum().clamp(min=1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss_final = full_loss(student)
    if not loss_final <= loss_init:  # diverged (lr too high) or NaN: the init is the better answer
        student, loss_final = start, loss_init
    ctx.params.update(loss_init=round(loss_init, 8), loss_final=round(loss_final, 8), rows=int(x.shape[0]),
                      all_rows=fallback)
    return {k: v.detach().float().cpu() for k, v in student.items()}


@register("distill", needs_data=True)
def distill(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill", routed=False)


@register("distill-routed", needs_data=True)
def distill_routed(w: dict[str, torch.Tensor], ctx: MergeContext) -> dict[str, torch.Tensor]:
    return _distill(w, ctx, "distill-routed", routed=True)
