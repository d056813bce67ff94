"""What a placement strategy is, and the DTensor helpers the sharded strategies share.

A strategy decides where one model's united tier lives: on the originals' device (`local`), sharded like the
originals under tensor parallelism (`tensor_parallel`), or spread over expert-parallel ranks (`expert_parallel`).
`BrownoutMoE.attach` picks one per model and drives it in two phases, so a bad input leaves the model untouched:

    check(layer, united, e2g)   every united layer, before the model is touched: raise BrownoutError or pass
    build(layer, united, e2g)   this rank's slabs [originals; united (; padding)] for one layer, model untouched
    install(layer, state)       the original parameters become views of the slabs' front (no second copy)
    uninstall(layer, state)     the originals get their own storage back; forwards are restored
"""
from __future__ import annotations

import torch

from ..discover import MoELayer


def dtensor_class():
    """torch's DTensor, or None where torch is built without distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        return None
    return DTensor


def is_dtensor(t) -> bool:
    D = dtensor_class()
    return D is not None and isinstance(t, D)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered (a collective: every rank must call it) when `t` is a DTensor."""
    if not is_dtensor(t):
        return t
    if t.device_mesh.ndim == 1 and len(t.placements) == 1 and type(t.placements[0]).__name__ == "_StridedShard":
        # transformers' packed gate_up under TP (5.24's plan) is a lone _StridedShard, which torch 2.11's redistribute
        # refuses to read ("unable to be interpreted into a corresponding shard_order"); gather it by hand
        return gather_by_index(t)
    return t.full_tensor()


def gather_by_index(t) -> torch.Tensor:
    """`t.full_tensor()` for a DTensor sharded on one dim of a 1-D mesh, for any split rule: the global positions each
    rank holds come from sharding an index vector with the same placement (`distribute_tensor`, no communication),
    then every rank's shard and positions are all-gathered and put in place."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    mesh, placement = t.device_mesh, t.placements[0]
    dim = placement.dim % t.ndim
    group, n = mesh.get_group(), mesh.size()
    positions = torch.arange(t.shape[dim], device=t.to_local().device).view([1] * dim + [-1])
    mine = distribute_tensor(positions, mesh, [placement], src_data_rank=None).to_local().reshape(-1)
    local = t.to_local().movedim(dim, 0).contiguous()
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(n)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device), group=group)
    most = int(max(s.item() for s in sizes))
    pad = lambda x: torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])  # all_gather needs equal sizes
    shards = [local.new_empty((most, *local.shape[1:])) for _ in range(n)]
    where = [mine.new_empty(most) for _ in range(n)]
    dist.all_gather(shards, pad(local), group=group)
    dist.all_gather(where, pad(mine), group=group)
    out = local.new_empty((t.shape[dim], *local.shape[1:]))
    for shard, pos, size in zip(shards, where, sizes):
        out[pos[:int(size.item())]] = shard[:int(size.item())]
    return out.movedim(0, dim)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def set_front(module: torch.nn.Module, key: str, local: torch.Tensor) -> None:
    """Make parameter `module.<key>` hold `local` (this rank's shard when it is a DTensor: same mesh, placements and
    global shape)."""
    p = module._parameters[key]
    if is_dtensor(p):
        new = dtensor_class().from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                         run_check=False)
        module._parameters[key] = torch.nn.Parameter(new, requires_grad=p.requires_grad)
    else:
        p.data = local


def closure(fn) -> dict:
    """The free variables of a forward transformers installed on a module (its parallel style keeps them there)."""
    code = getattr(fn, "__code__", None)
    if code is None or not getattr(fn, "__closure__", None):
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))


class Placement:
    """Base strategy; subclasses implement `build` and may refine the rest."""

    name = "local"
    refused_backends: dict[str, str] = {}  # backend name -> why it cannot run under this placement

    def check(self, layer: MoELayer, united: dict[str, torch.Tensor], expert_to_group: torch.Tensor) -> None:
        pass

    def build(self, layer: MoELayer, united: dict[str, torch.Tensor],
              expert_to_group: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def mode(self, layer: int) -> str:
        """How layer `layer`'s experts are placed: local, tp, ep or ep-router."""
        return self.name

    def front(self, layer: MoELayer) -> int:
        """Slabs at the front of this rank's slabs that are the layer's own originals."""
        return layer.num_experts

    def install(self, layer: MoELayer, state) -> None:
        f = self.front(layer)
        for k, slab in state.slabs.items():
            set_front(layer.experts, k, slab[:f])

    def uninstall(self, layer: MoELayer, state) -> None:
        f = self.front(layer)
        for k, slab in state.slabs.items():
            set_front(layer.experts, k, slab[:f].clone())  # own storage, so the slabs can be freed

    def extra_bytes(self, layer: MoELayer, state) -> int:
        """Bytes of united tier (and padding) this rank holds for the layer."""
        f = self.front(layer)
        return sum(t[f:].numel() * t.element_size() for t in state.slabs.values())
