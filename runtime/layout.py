"""Expert tensor layouts, and the expert math every other module shares.

transformers 5 fuses each MoE layer's experts into 3-D tensors whose layout differs by family; the flags that
`use_experts_implementation` sets on the experts module (`is_transposed`, `is_concatenated`, `has_bias`) say which.
Merging works in one *canonical* layout, per expert:

    gate [E, I, H]   up [E, I, H]   down [E, H, I]   (+ gate_bias [E, I], up_bias [E, I], down_bias [E, H])

so that y = down @ glu(gate @ x + gate_bias, up @ x + up_bias) + down_bias, where glu is the family's gated
activation (SiLU(g) * u for most; GPT-OSS clamps). The united checkpoint stores the family's *native* layout,
so the runtime can concatenate it onto the model's own tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BrownoutError

CANON_KEYS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@dataclass(frozen=True)
class Layout:
    """The layout flags of one fused experts module (see transformers' `use_experts_implementation`)."""

    is_transposed: bool = False
    is_concatenated: bool = True
    has_bias: bool = False

    @staticmethod
    def of(experts: torch.nn.Module) -> "Layout":
        if not getattr(experts, "has_gate", True):
            raise BrownoutError(f"{type(experts).__name__}: experts without a gate projection are not supported")
        if getattr(experts, "has_post_expert_norm", False):
            raise BrownoutError(f"{type(experts).__name__}: experts with a post-expert norm are not supported")
        return Layout(
            is_transposed=bool(getattr(experts, "is_transposed", False)),
            is_concatenated=bool(getattr(experts, "is_concatenated", True)),
            has_bias=bool(getattr(experts, "has_bias", False)),
        )

    def native_keys(self) -> tuple[str, ...]:
        return ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if self.has_bias else ())

    # -- native <-> canonical ------------------------------------------------------------------------------
    def to_canonical(self, native: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gu, down = native["gate_up_proj"], native["down_proj"]
        if self.is_transposed:  # [E, H, 2I] and [E, I, H]
            gu, down = gu.transpose(1, 2), down.transpose(1, 2)
        gate, up = self._split(gu, dim=1)
        out = {"gate": gate, "up": up, "down": down}  # views where the layout allows: no copy of a whole layer
        if self.has_bias:
            gb, ub = self._split(native["gate_up_proj_bias"], dim=1)
            out.update(gate_bias=gb, up_bias=ub, down_bias=native["down_proj_bias"])
        return out

    def to_native(self, canon: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        down = canon["down"].transpose(1, 2) if self.is_transposed else canon["down"]
        out = {"gate_up_proj": self.fuse_gate_up(canon["gate"], canon["up"]).contiguous(), "down_proj": down.contiguous()}
        if self.has_bias:
            out["gate_up_proj_bias"] = self._join(canon["gate_bias"], canon["up_bias"], dim=1).contiguous()
            out["down_proj_bias"] = canon["down_bias"].contiguous()
        return out

    def fuse_gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Per-expert gate and up [E, I, H] -> the native fused gate_up_proj."""
        gu = self._join(gate, up, dim=1)
        return gu.transpose(1, 2) if self.is_transposed else gu

    def _split(self, t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_concatenated:
            return t.chunk(2, dim=dim)
        lead = (slice(None),) * (dim % t.dim())
        return t[lead + (slice(0, None, 2),)], t[lead + (slice(1, None, 2),)]  # strided views, no copies

    def _join(self, a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        dim = dim % a.dim()
        if self.is_concatenated:
            return torch.cat([a, b], dim=dim)
        return torch.stack([a, b], dim=dim + 1).flatten(dim, dim + 1)  # interleave g0, u0, g1, u1, ...

    def join_gate_up(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Pre-activations [N, I] x 2 -> the module's native [N, 2I] order (what `_apply_gate` expects)."""
        return self._join(g, u, dim=-1)


def native_of(experts: torch.nn.Module, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    layout = layout or Layout.of(experts)
    return {k: getattr(experts, k).detach() for k in layout.native_keys()}


Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def glu_of(experts: torch.nn.Module, layout: Layout | None = None) -> Glu:
    """The family's gated activation as glu(gate_pre, up_pre) -> [N, I], through the module's own `_apply_gate`."""
    layout = layout or Layout.of(experts)
    return lambda g, u: experts._apply_gate(layout.join_gate_up(g, u))


def expert(canon: dict[str, torch.Tensor], j: int) -> dict[str, torch.Tensor]:
    """Expert j of a canonical stack, as a float32 canonical dict without the leading dimension (upcast one expert
    at a time, so a layer can stay in its own dtype)."""
    return {k: v[j].float() for k, v in canon.items()}


def hidden(w: dict[str, torch.Tensor], x: torch.Tensor, glu: Glu) -> torch.Tensor:
    """Intermediate activations [N, I] of one canonical expert `w` on inputs x [N, H]."""
    g = x @ w["gate"].T
    u = x @ w["up"].T
    if "gate_bias" in w:
        g, u = g + w["gate_bias"], u + w["up_bias"]
    return glu(g, u)


def output(w: dict[str, torch.Tensor], x: torch.Tensor, glu: Glu) -> torch.Tensor:
    """Output [N, H] of one canonical expert `w` on inputs x [N, H]."""
    y = hidden(w, x, glu) @ w["down"].T
    if "down_bias" in w:
        y = y + w["down_bias"]
    return y


def is_plain_silu_layout(experts: torch.nn.Module) -> bool:
    """The layout the fused kernel and the compiled ops compute: gate and up concatenated, not transposed, no bias, no
    post-expert norm, transformers' default gate with SiLU."""
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return False
    if getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        return False
    if getattr(experts, "has_post_expert_norm", False):
        return False
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if getattr(gate_fn, "__name__", "") != "_default_apply_gate":
        return False
    act = getattr(experts, "act_fn", None)
    return act is torch.nn.functional.silu or isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
