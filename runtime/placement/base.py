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
    return t.full_tensor() if is_dtensor(t) else t


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
