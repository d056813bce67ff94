"""The plain-PyTorch experts computation over concatenated [originals; united] slabs: the `reference` backend
(runtime.backends), which runs on any device, dtype and layout and which every other backend is tested against.
Layout flags come from the experts module (transformers' use_experts_implementation).
"""
from __future__ import annotations

import torch


def _linear(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ w if transposed else torch.nn.functional.linear(x, w)


def slab_forward(
    experts: torch.nn.Module,
    slabs: dict[str, torch.Tensor],
    hidden_states: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """out[t] = sum_s weights[t, s] * Slab_{ids[t, s]}(x[t]); slab id == num_slabs is skipped.

    `slabs` holds `gate_up_proj`, `down_proj` (+ biases) with a leading slab dimension in the module's native layout;
    `experts` supplies the layout flags and the family's `_apply_gate`.
    """
    transposed = bool(getattr(experts, "is_transposed", False))
    num_slabs = slabs["gate_up_proj"].shape[0]
    out = torch.zeros_like(hidden_states)
    flat = ids.reshape(-1)
    hit = torch.zeros(num_slabs + 1, dtype=torch.bool, device=ids.device)
    hit[flat] = True
    for s in hit[:num_slabs].nonzero().flatten().tolist():
        token, slot = torch.where(ids == s)
        x = hidden_states[token]
        h = _linear(x, slabs["gate_up_proj"][s], transposed)
        if "gate_up_proj_bias" in slabs:
            h = h + slabs["gate_up_proj_bias"][s]
        h = experts._apply_gate(h)
        y = _linear(h, slabs["down_proj"][s], transposed)
        if "down_proj_bias" in slabs:
            y = y + slabs["down_proj_bias"][s]
        y = y * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out
