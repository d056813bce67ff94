"""Compute backends of the brownout experts forward: a registry, chosen once per layer at attach or `set_backend`.

Every backend computes the same thing (docs/design.md §4): the policy's remapped routing over the layer's slabs
[originals; united], then out[t] = sum_s weights[t, s] * Slab_{ids[t, s]}(x[t]), slab id == number of slabs skipped.

    reference  runtime.reference.slab_forward: plain PyTorch, any device, dtype and layout; what the others are
               tested against
    grouped    transformers' grouped_mm experts implementation over a view of the slabs
    triton     runtime.kernels: one-launch remap + fused two-tier kernel; only where `kernels.supported` says so

"auto" picks triton on CUDA where it is supported, else grouped on CUDA, else reference. The Triton interpreter can
run the kernel on CPU, but only when asked for by name: it is a testing aid, far too slow to be chosen for a user.

A backend is graph-safe for a policy when its remap reads the ratio from device memory (`Ratio.keep`), so a CUDA
graph captured once follows later `set_ratio` calls: triton with hot-cold or drop. The others read the ratio on the
host, and a captured graph would freeze it.

Under torch.compile a backend calls its custom op (runtime.ops) instead, which reads the ratio from `Ratio.keep`
too: a Python float would be baked into the compiled graph and guarded on, one recompilation per ratio. Reference and
triton have one op for the whole forward, for the layouts `ops.expressible` accepts (others keep the Python path,
where the reference computation breaks the graph); grouped puts the remap in an op and leaves transformers'
grouped_mm, which torch.compile traces itself, to the compiler, for every layout. Eager calls keep the Python path:
the same computation, without the dispatcher's few microseconds per call or a host read of the ratio.
"""
from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from . import kernels, ops
from .ep_routing import EPRouting, ep_local_routing
from .errors import BrownoutError
from .policy import remap
from .reference import slab_forward


class SlabView:
    """The experts module seen through concatenated slabs: what transformers' grouped_mm implementation reads.

    `sentinels`: ids >= the number of slabs are off-rank slots to drop (transformers' expert-parallel convention).
    """

    def __init__(self, experts: torch.nn.Module, slabs: dict[str, torch.Tensor], sentinels: bool = False):
        self._experts = experts
        self.__dict__.update(slabs)
        self.num_experts = slabs["gate_up_proj"].shape[0]
        self._is_expert_parallel = sentinels  # the attribute transformers' grouped_mm reads for sentinel handling

    def __getattr__(self, name):
        return getattr(self._experts, name)


class Backend:
    """One way to compute the experts forward over slabs. Subclasses set `name` and override `run`."""

    name = ""
    graph_safe_policies: tuple[str, ...] = ()  # policies whose ratio this backend reads from device memory
    op = None  # runtime.ops experts op computing the whole forward under torch.compile, for `ops.expressible` layouts

    def supported(self, experts: torch.nn.Module, dtype: torch.dtype, device) -> bool | str:
        """True, or a one-line reason why this backend cannot compute these experts in `dtype` on `device`."""
        return True

    def graph_safe(self, policy: str) -> bool:
        return policy in self.graph_safe_policies

    def remap(self, state, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's routing remapped by its policy and ratio: (slab ids, weights); id E + G skips the slot."""
        a = remap(top_k_index, top_k_weights, state.expert_to_group, state.num_groups, state.ratio.value, state.policy)
        return a.ids, a.weights

    def ep_remap(self, state, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 ep: EPRouting) -> tuple[torch.Tensor, torch.Tensor]:
        """The remap as this rank's local slab ids under expert parallelism over a shared batch (runtime.ep_routing):
        ids in [0, L], L skipping the slot."""
        ids, weights = self.remap(state, top_k_index, top_k_weights)
        return ep_local_routing(ids, weights, ep)

    def run(self, experts: torch.nn.Module, slabs: dict[str, torch.Tensor], hidden_states: torch.Tensor,
            ids: torch.Tensor, weights: torch.Tensor, sentinels: bool = False) -> torch.Tensor:
        """Experts output over `slabs`; ids == number of slabs (or beyond, with `sentinels`) contribute nothing."""
        raise NotImplementedError

    def forward(self, experts: torch.nn.Module, state, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.op is not None and torch.compiler.is_compiling() and ops.expressible(experts):
            return self.op(hidden_states, top_k_index, top_k_weights, state.expert_to_group, state.ratio.keep,
                           state.slabs["gate_up_proj"], state.slabs["down_proj"], state.num_groups, state.policy)
        ids, weights = self.remap(state, top_k_index, top_k_weights)
        return self.run(experts, state.slabs, hidden_states, ids, weights)

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


class ReferenceBackend(Backend):
    name = "reference"
    op = ops.experts_reference

    def run(self, experts, slabs, hidden_states, ids, weights, sentinels=False):
        return slab_forward(experts, slabs, hidden_states, ids, weights)


class GroupedBackend(Backend):
    name = "grouped"

    def supported(self, experts, dtype, device):
        if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
            return "this transformers has no grouped_mm experts implementation"
        return True

    def remap(self, state, top_k_index, top_k_weights):
        if torch.compiler.is_compiling():  # the ratio as a graph input, not a constant guarded on
            return ops.remap(top_k_index, top_k_weights, state.expert_to_group, state.ratio.keep, state.num_groups,
                             state.policy)
        return super().remap(state, top_k_index, top_k_weights)

    def run(self, experts, slabs, hidden_states, ids, weights, sentinels=False):
        if not sentinels:
            # not every transformers version drops sentinel ids: point skipped slots at slab 0 with weight 0
            skip = ids >= slabs["gate_up_proj"].shape[0]
            ids = torch.where(skip, torch.zeros_like(ids), ids)
            weights = torch.where(skip, torch.zeros_like(weights), weights)
        impl = ALL_EXPERTS_FUNCTIONS.get_interface("grouped_mm", None)
        return impl(SlabView(experts, slabs, sentinels), hidden_states, ids, weights)


class TritonBackend(Backend):
    name = "triton"
    graph_safe_policies = ("hot-cold", "drop")  # `mass` falls back to the PyTorch remap, which reads the ratio on the host
    op = ops.experts_triton

    def supported(self, experts, dtype, device):
        if not kernels.HAS_TRITON:
            return "triton is not installed"
        if not kernels.supported(experts, dtype, device):
            return (f"the fused kernel does not cover {type(experts).__name__} in {dtype} on {torch.device(device).type} "
                    f"(it needs CUDA, bf16 or fp16, and a concatenated, non-transposed SiLU layout without bias)")
        return True

    def remap(self, state, top_k_index, top_k_weights):
        # one or two launches, no host sync; the kernels read 1 - ratio from `keep`, so a captured graph follows
        # set_ratio
        return kernels.remap(top_k_index, top_k_weights, state.expert_to_group, state.num_groups, state.ratio.value,
                             state.policy, keep=state.ratio.keep)

    def ep_remap(self, state, top_k_index, top_k_weights, ep):
        # the remap and the EP translation in the same launches
        return kernels.remap(top_k_index, top_k_weights, state.expert_to_group, state.num_groups, state.ratio.value,
                             state.policy, keep=state.ratio.keep, ep=ep)

    def run(self, experts, slabs, hidden_states, ids, weights, sentinels=False):
        gate_up = slabs["gate_up_proj"]
        if sentinels:  # expert-parallel local slabs: an off-rank slot (id >= slab count) is the kernel's skip id
            ids = ids.clamp(max=gate_up.shape[0])
        return kernels.fused_moe.fused_moe(hidden_states, gate_up, slabs["down_proj"], ids, weights,
                                           num_slabs=gate_up.shape[0])


BACKENDS: dict[str, Backend] = {b.name: b for b in (ReferenceBackend(), GroupedBackend(), TritonBackend())}
AUTO = "auto"


def get_backend(name) -> Backend:
    """The registered backend called `name`; BrownoutError listing the names for anything else."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise BrownoutError(f"unknown compute backend {name!r}; backends: {AUTO}, {', '.join(BACKENDS)}")
    return BACKENDS[name]


def check_backend_name(name) -> str:
    """`name` if it is "auto" or a registered backend (checked before anything is resolved against a layer)."""
    if name != AUTO:
        get_backend(name)
    return name


def choose_backend(name: str, experts: torch.nn.Module, dtype: torch.dtype, device,
                   refused: dict[str, str] | None = None) -> Backend:
    """The backend one layer runs: `name`, or for "auto" the fastest that supports it. `refused` maps backend names
    the layer's placement cannot run to the reason; asking for one of them raises BrownoutError with that reason."""
    refused = refused or {}
    device = torch.device(device)
    if name == AUTO:
        order = ("triton", "grouped") if device.type == "cuda" else ()
        for n in order:
            if n not in refused and BACKENDS[n].supported(experts, dtype, device) is True:
                return BACKENDS[n]
        return BACKENDS["reference"]
    b = get_backend(name)
    if name in refused:
        raise BrownoutError(f"backend {name!r} is not available here: {refused[name]}")
    ok = b.supported(experts, dtype, device)
    if ok is not True:
        raise BrownoutError(f"backend {name!r} is not supported here: {ok or 'unsupported'}")
    return b
