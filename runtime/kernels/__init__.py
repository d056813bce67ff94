"""Triton kernels for the brownout experts forward (docs/design.md §6).

What the runtime calls on CUDA (check `supported(experts, dtype, device)` first, else keep the PyTorch path):

    ids, w = remap(top_k_index, top_k_weights, expert_to_group, num_groups, ratio, policy)   # 1-2 launches, no sync
    out = fused_moe.fused_moe(hidden_states, slabs["gate_up_proj"], slabs["down_proj"], ids, w)

or both at once with `experts_forward(...)`. Tile configs: one table per GPU model in `configs` (package data);
`configs.table_for(torch.cuda.get_device_name())` says which table a device runs.
"""
# NB: `runtime.kernels.fused_moe` stays the module (runtime/experts_impl.py does `from .kernels import fused_moe as k`)
from . import fused_moe  # noqa: F401
from .fused_moe import HAS_TRITON, supported  # noqa: F401
from .remap import remap  # noqa: F401


def experts_forward(hidden_states, gate_up, down, top_k_index, top_k_weights, expert_to_group, num_groups, ratio,
                    policy="hot-cold"):
    """Brownout remap + fused two-tier experts forward over slabs [originals; united] (gate_up [E+G, 2I, H])."""
    ids, w = remap(top_k_index, top_k_weights, expert_to_group, num_groups, ratio, policy)
    return fused_moe.fused_moe(hidden_states, gate_up, down, ids, w, num_slabs=gate_up.shape[0])
