"""The brownout experts forward as PyTorch custom ops (torch.library), so `torch.compile` traces a model with a united
tier attached as one graph and the compiled graph follows later `set_ratio` calls without recompiling.

Every op reads the ratio from the layer's `keep` tensor (1 - r, `runtime.ratio.Ratio.keep`), a graph input written in
place by `set_ratio`, never from a Python float, which torch.compile would bake into the graph and guard on:

    brownout::remap(top_k_index, top_k_weights, expert_to_group, keep, num_groups, policy) -> (ids, weights)
        runtime.policy.remap, any layout: what the grouped backend runs before transformers' grouped_mm (which
        torch.compile traces by itself)
    brownout::experts_reference(hidden_states, top_k_index, top_k_weights, expert_to_group, keep, gate_up, down,
                                num_groups, policy) -> out
        that remap + runtime.reference.slab_forward
    brownout::experts_triton(... same arguments ...) -> out
        runtime.kernels: the one-launch remap reading `keep` on the device + the fused two-tier kernel, so a CUDA
        graph captured from the compiled model follows `set_ratio` too
    brownout::experts_fused(hidden_states, top_k_index, top_k_weights, gate_up, down) -> out
        the fused kernel over the experts as routed, no remap and no ratio: what a layer the checkpoint left alone
        runs in graph-safe mode (runtime.experts_impl)

The two experts ops cover one layout, the one `expressible` accepts: gate and up concatenated, not transposed, no
bias, no post-expert norm, the default gate with SiLU (what the fused kernel computes). A layer of another layout
(gpt_oss: transposed, biased, its own gate) keeps the Python path of its backend: the reference computation then
breaks a torch.compile graph, the grouped backend does not.

The PyTorch remap and the reference computation read the ratio and the routing on the host (a sync), and so does
`experts_triton` with policy mass, so only `experts_triton` with hot-cold or drop can be replayed from a CUDA graph
(docs/design.md §5, graph-safe mode).
"""
from __future__ import annotations

import torch

from . import kernels
from .layout import is_plain_silu_layout
from .policy import remap as policy_remap
from .reference import slab_forward

# ops that read device memory on the host cannot be captured in a CUDA graph: the tag has inductor's CUDA graphs
# leave them out (on a torch without the tag, do not compile these in mode="reduce-overhead")
_HOST_SYNC = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)

LAYOUT = "concatenated gate/up, non-transposed, no bias, no post-expert norm, default SiLU gate"


def expressible(experts: torch.nn.Module) -> bool:
    """True when the experts ops compute exactly what `experts` computes: the layout of `LAYOUT`."""
    return is_plain_silu_layout(experts)


class _SiluGate:
    """What slab_forward reads from an experts module of the `LAYOUT` layout (transformers' `_default_apply_gate`)."""

    is_transposed = False

    @staticmethod
    def _apply_gate(gate_up_out: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up_out.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


def host_ratio(keep: torch.Tensor) -> float:
    """The ratio r from `keep` (float32 1 - r). 1 - (1 - keep) is exact in float64, so `hot_set` draws its line at
    the same float32 value as from the float `set_ratio` stored. Reads device memory: a sync on CUDA."""
    return 1.0 - float(keep.reshape(-1)[0])


def _unaliased(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    # a custom op's outputs may not alias its inputs; the remap hands the weights back as they are when k == 1
    return out.clone() if any(out.data_ptr() == t.data_ptr() and out.numel() for t in inputs) else out


@torch.library.custom_op("brownout::remap", mutates_args=(), tags=_HOST_SYNC)
def remap(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_to_group: torch.Tensor, keep: torch.Tensor,
          num_groups: int, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """runtime.policy.remap at the ratio held in `keep`: (slab ids [T, k] int64, E + G = skip; weights [T, k])."""
    a = policy_remap(top_k_index, top_k_weights, expert_to_group, num_groups, host_ratio(keep), policy)
    return _unaliased(a.ids, top_k_index), _unaliased(a.weights, top_k_weights)


@remap.register_fake
def _(top_k_index, top_k_weights, expert_to_group, keep, num_groups, policy):
    return top_k_index.new_empty(top_k_index.shape, dtype=torch.int64), torch.empty_like(top_k_weights)


@torch.library.custom_op("brownout::experts_reference", mutates_args=(), tags=_HOST_SYNC)
def experts_reference(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      expert_to_group: torch.Tensor, keep: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                      num_groups: int, policy: str) -> torch.Tensor:
    """Brownout experts forward of the `LAYOUT` layout in plain PyTorch, at the ratio held in `keep`."""
    a = policy_remap(top_k_index, top_k_weights, expert_to_group, num_groups, host_ratio(keep), policy)
    return slab_forward(_SiluGate, {"gate_up_proj": gate_up, "down_proj": down}, hidden_states, a.ids, a.weights)


@torch.library.custom_op("brownout::experts_triton", mutates_args=())
def experts_triton(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   expert_to_group: torch.Tensor, keep: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   num_groups: int, policy: str) -> torch.Tensor:
    """Brownout experts forward of the `LAYOUT` layout through runtime.kernels, at the ratio held in `keep`."""
    # the kernel reads `keep` itself; the host ratio only feeds `mass`, which falls back to the PyTorch remap
    ratio = host_ratio(keep) if policy == "mass" else 1.0
    ids, weights = kernels.remap(top_k_index, top_k_weights, expert_to_group, num_groups, ratio, policy, keep=keep)
    return kernels.fused_moe.fused_moe(hidden_states, gate_up, down, ids, weights, num_slabs=gate_up.shape[0])


@torch.library.custom_op("brownout::experts_fused", mutates_args=())
def experts_fused(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The experts forward of the `LAYOUT` layout through the fused kernel, the routing as given (no united tier)."""
    return kernels.fused_moe.fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights,
                                       num_slabs=gate_up.shape[0])


@experts_fused.register_fake
def _(hidden_states, top_k_index, top_k_weights, gate_up, down):
    return torch.empty_like(hidden_states)


def _fake_experts(hidden_states, top_k_index, top_k_weights, expert_to_group, keep, gate_up, down, num_groups, policy):
    return torch.empty_like(hidden_states)


experts_reference.register_fake(_fake_experts)
experts_triton.register_fake(_fake_experts)
