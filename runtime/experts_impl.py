"""The `brownout` experts implementation, registered in transformers' ExpertsInterface.

Every family decorated with `use_experts_implementation` dispatches its experts forward through the config's
`_experts_implementation`; setting it to "brownout" routes all of them here with no per-model patch. Layers without
brownout state (left alone by the checkpoint) and layers at ratio 0 call the implementation the model had before, so
ratio 0 is the unmodified model bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .policy import keep_tensor, remap
from .reference import slab_forward

NAME = "brownout"


@dataclass
class LayerState:
    """Brownout state of one MoE layer, kept on its experts module as `_brownout`."""

    layer: int
    num_experts: int
    num_groups: int
    expert_to_group: torch.Tensor  # [E] on the layer's device
    slabs: dict[str, torch.Tensor]  # native tensors over [originals; united], leading dim E + G
    prev_impl: str | None  # the implementation the model used before attach
    ratio: float = 0.0
    policy: str = "hot-cold"
    path: str = "auto"  # auto | reference | grouped | kernel
    # 1 - ratio as a float32 device scalar that the fused remap kernel reads at run time: writing it (through
    # `ratio`) changes what an already captured CUDA graph computes, so serving needs no graph per ratio
    keep: torch.Tensor | None = None

    def __post_init__(self):
        self.keep = keep_tensor(self.ratio, self.expert_to_group.device)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "ratio" and getattr(self, "keep", None) is not None:
            self.keep.fill_(1.0 - float(value))  # in place: the same memory a captured graph reads


def previous_forward(module: torch.nn.Module, prev_impl: str | None):
    eager = type(module).forward.__wrapped__  # functools.wraps in use_experts_implementation keeps the original
    if prev_impl in (None, "eager", NAME):
        return eager
    return ALL_EXPERTS_FUNCTIONS.get_interface(prev_impl, eager)


class _SlabView:
    """The experts module seen through the concatenated slabs: what transformers' grouped_mm path reads."""

    def __init__(self, experts: torch.nn.Module, slabs: dict[str, torch.Tensor]):
        self._experts = experts
        self.__dict__.update(slabs)
        self.num_experts = slabs["gate_up_proj"].shape[0]
        self._is_expert_parallel = False

    def __getattr__(self, name):
        return getattr(self._experts, name)


def _kernel():
    try:
        from . import kernels as k
    except Exception:  # triton missing or the kernel module not importable: fall back
        return None
    return k


def brownout_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    st: LayerState | None = getattr(self, "_brownout", None)
    # ratio 0 runs the model's own implementation (bit for bit the unmodified model) unless a path is forced,
    # which benchmarks use to time the brownout kernel itself at ratio 0
    if st is None or (st.ratio == 0.0 and st.path == "auto"):
        prev = st.prev_impl if st is not None else getattr(self, "_brownout_prev_impl", None)
        return previous_forward(self, prev)(self, hidden_states, top_k_index, top_k_weights)
    path = st.path
    if path == "auto":
        path = "reference" if hidden_states.device.type != "cuda" else "kernel"
    if path == "kernel":
        k = _kernel()
        if k is not None and k.supported(self, hidden_states.dtype, hidden_states.device):
            # one-launch remap + fused two-tier kernel, no host sync. The remap reads the ratio from st.keep (device
            # memory), so a CUDA graph captured with path "kernel" follows later set_ratio calls (hot-cold and drop;
            # `mass` runs the PyTorch remap, whose ratio a graph freezes)
            ids, w = k.remap(top_k_index, top_k_weights, st.expert_to_group, st.num_groups, st.ratio, st.policy,
                             keep=st.keep)
            return k.fused_moe.fused_moe(hidden_states, st.slabs["gate_up_proj"], st.slabs["down_proj"], ids, w,
                                         num_slabs=st.num_experts + st.num_groups)
        path = "grouped"
    a = remap(top_k_index, top_k_weights, st.expert_to_group, st.num_groups, st.ratio, st.policy)
    if path == "grouped":
        skip = a.ids == st.num_experts + st.num_groups
        # transformers' grouped path has no skip slot in every version: point skipped slots at slab 0 with weight 0
        ids = torch.where(skip, torch.zeros_like(a.ids), a.ids)
        impl = ALL_EXPERTS_FUNCTIONS.get_interface("grouped_mm", None)
        return impl(_SlabView(self, st.slabs), hidden_states, ids, a.weights)
    return slab_forward(self, st.slabs, hidden_states, a.ids, a.weights)


ExpertsInterface.register(NAME, brownout_experts_forward)
