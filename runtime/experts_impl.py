"""The `brownout` experts implementation, registered in transformers' ExpertsInterface, and the per-layer state it reads.

Every family decorated with `use_experts_implementation` dispatches its experts forward through the config's
`_experts_implementation`; setting it to "brownout" routes all of them here with no per-model patch. Layers without
brownout state (left alone by the checkpoint) and layers at ratio 0 call the implementation the model had before, so
ratio 0 is the unmodified model bit for bit (docs/design.md §4). In graph-safe mode ratio 0 runs the layer's backend
too, so a CUDA graph captured at any ratio follows later ratios.

A left-alone layer keeps the model's implementation, except in graph-safe mode where the handle may put it on the
fused kernel too (`BrownoutMoE.set_graph_safe`, left_alone="kernel"): the same routing and weights, no remap, so a
serving step runs one kernel for every MoE layer instead of the model's grouped_mm for a few of them.

Under torch.compile the backends read the ratio from device memory (runtime.ops). The one host read left is the
ratio-0 test outside graph-safe mode, on a Python float the compiler guards on: a compiled model recompiles once per
distinct ratio it meets there. Graph-safe mode skips that test, so a model compiled in it follows every `set_ratio`
with one graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from . import kernels, ops
from .backends import Backend
from .ratio import Ratio

NAME = "brownout"
_STATE = "_brownout"  # attribute on a united layer's experts module: its LayerState
_LEFT_ALONE = "_brownout_prev_impl"  # attribute on a left-alone experts module: the implementation it keeps
_ON_KERNEL = "_brownout_on_kernel"  # attribute on a left-alone experts module: True while it runs the fused kernel


@dataclass(eq=False)  # identity, not field-wise comparison of tensors
class LayerState:
    """Brownout state of one united MoE layer."""

    layer: int
    num_experts: int
    num_groups: int
    expert_to_group: torch.Tensor  # [E] on the slabs' device
    slabs: dict[str, torch.Tensor]  # native tensors [originals; united (; padding under EP)], leading slab dim
    prev_impl: str | None  # the implementation the model used before attach
    ratio: Ratio
    policy: str
    backend: Backend  # chosen at attach or set_backend; the forward does not choose again
    graph_safe: bool = False  # ratio 0 runs the backend as well, instead of the model's own implementation


def state_of(experts: torch.nn.Module) -> LayerState | None:
    return getattr(experts, _STATE, None)


def set_state(experts: torch.nn.Module, state: LayerState) -> None:
    setattr(experts, _STATE, state)


def clear_state(experts: torch.nn.Module) -> None:
    for attr in (_STATE, _LEFT_ALONE, _ON_KERNEL):
        experts.__dict__.pop(attr, None)


def leave_alone(experts: torch.nn.Module, prev_impl: str | None) -> None:
    """A layer the checkpoint has no united experts for keeps `prev_impl` under the shared config's `brownout`."""
    setattr(experts, _LEFT_ALONE, prev_impl)


def set_on_kernel(experts: torch.nn.Module, on: bool) -> None:
    """A left-alone layer runs the fused kernel over its own experts (on) or the implementation it kept (off)."""
    if on:
        setattr(experts, _ON_KERNEL, True)
    else:
        experts.__dict__.pop(_ON_KERNEL, None)


def on_kernel(experts: torch.nn.Module) -> bool:
    return getattr(experts, _ON_KERNEL, False)


def fused_own_experts(experts: torch.nn.Module, hidden_states, top_k_index, top_k_weights):
    """The fused kernel over the module's own experts, the routing as given: what the model computes, in one kernel."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if torch.compiler.is_compiling():  # the op: torch.compile traces through it with no graph break
        return ops.experts_fused(hidden_states, top_k_index, top_k_weights, gate_up, down)
    return kernels.fused_moe.fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights,
                                       num_slabs=gate_up.shape[0])


def previous_forward(module: torch.nn.Module, prev_impl: str | None):
    eager = type(module).forward.__wrapped__  # functools.wraps in use_experts_implementation keeps the original
    if prev_impl in (None, "eager", NAME):
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(prev_impl, eager)


def brownout_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    st = state_of(self)
    if st is None and on_kernel(self):
        return fused_own_experts(self, hidden_states, top_k_index, top_k_weights)
    if st is None or (not st.graph_safe and st.ratio.off):  # graph-safe first: no float for the compiler
        prev = st.prev_impl if st is not None else getattr(self, _LEFT_ALONE, None)
        return previous_forward(self, prev)(self, hidden_states, top_k_index, top_k_weights)
    return st.backend.forward(self, st, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(NAME, brownout_experts_forward)
