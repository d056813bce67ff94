"""Find the MoE layers of any transformers 5 model, with no per-family code.

Every family we support decorates its experts class with transformers' `use_experts_implementation`, which gives the
module the layout flags and fused `gate_up_proj` / `down_proj` tensors. We look for exactly that, so a new family
that follows the interface works without an adapter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import BrownoutError
from .layout import Layout

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoELayer:
    index: int  # decoder layer index (the `N` in `model.layers.N`)
    name: str  # module path of the fused experts module
    experts: torch.nn.Module
    block: torch.nn.Module  # the sparse-MoE block that owns router, experts and shared experts
    num_experts: int
    top_k: int
    layout: Layout
    shared: list[str] = field(default_factory=list)  # names of shared-expert submodules (always run, never merged)

    @property
    def hidden_size(self) -> int:
        d = self.experts.down_proj
        return d.shape[2] if self.layout.is_transposed else d.shape[1]

    @property
    def intermediate_size(self) -> int:
        d = self.experts.down_proj
        return d.shape[1] if self.layout.is_transposed else d.shape[2]


def is_fused_experts(module: torch.nn.Module) -> bool:
    gu, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        hasattr(module, "has_gate")
        and isinstance(gu, torch.Tensor) and gu.dim() == 3
        and isinstance(d, torch.Tensor) and d.dim() == 3
    )


def _top_k(block: torch.nn.Module, config) -> int:
    for child in block.children():
        for attr in ("top_k", "num_experts_per_tok"):
            if isinstance(getattr(child, attr, None), int):
                return getattr(child, attr)
    for attr in ("top_k", "num_experts_per_tok"):
        if isinstance(getattr(block, attr, None), int):
            return getattr(block, attr)
    k = getattr(config, "num_experts_per_tok", None)
    if k is None:
        raise BrownoutError("cannot tell the MoE's top-k: no router `top_k` and no config.num_experts_per_tok")
    return int(k)


def find_moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """All fused-experts MoE layers, in layer order. Raises if the model has none."""
    modules = dict(model.named_modules())
    layers: list[MoELayer] = []
    for name, mod in modules.items():
        if not is_fused_experts(mod):
            continue
        m = _LAYER_RE.search(name + ".")
        if m is None:
            continue
        parent_name = name.rsplit(".", 1)[0]
        block = modules[parent_name]
        shared = [n for n, _ in block.named_children() if "shared" in n and not n.endswith("_gate")]
        layers.append(
            MoELayer(
                index=int(m.group(1)), name=name, experts=mod, block=block,
                num_experts=mod.gate_up_proj.shape[0], top_k=_top_k(block, getattr(mod, "config", model.config)),
                layout=Layout.of(mod), shared=shared,
            )
        )
    if not layers:
        raise BrownoutError(
            f"{type(model).__name__} has no MoE layers with fused experts (transformers 5 `use_experts_implementation`)"
        )
    return sorted(layers, key=lambda l: l.index)
