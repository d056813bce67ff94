"""Where a model's united tier lives, chosen once per model by how transformers sharded its experts.

    not sharded                          -> LocalPlacement           (local.py)
    tensor parallel (`tp_plan`)          -> TensorParallelPlacement  (tensor_parallel.py)
    expert parallel (`ep_size`, or 5.17's `enable_expert_parallel`)
                                         -> ExpertParallelPlacement  (expert_parallel.py)

The strategy interface is in base.py; `BrownoutMoE.attach` drives it.
"""
from __future__ import annotations

import torch

from ..discover import MoELayer
from ..errors import BrownoutError
from .base import Placement, full_tensor, is_dtensor
from .expert_parallel import (EPPlacement, ExpertParallelPlacement, ep_ids, ep_implementation, expert_parallel_config,
                              is_router_ep_experts, place_united, token_ranks)
from .local import LocalPlacement
from .tensor_parallel import TensorParallelPlacement


def sharding_mode(experts: torch.nn.Module) -> str | None:
    """'ep', 'ep-router', 'tp' or None (not sharded) for one fused experts module."""
    p = experts._parameters.get("gate_up_proj")
    if p is None or not is_dtensor(p):
        return None
    if ep_implementation(experts) is not None:
        return "ep"
    if is_router_ep_experts(experts):
        return "ep-router"  # transformers before `ep_size` (5.17): `enable_expert_parallel`, an `ep_router` forward
    if getattr(experts, "_is_expert_parallel", False):
        raise BrownoutError("experts are sharded by expert (grouped_gemm) but have no ep_dispatch_experts forward; "
                            "brownout needs the model's EP plan with its dispatch rule")
    return "tp"


def choose_placement(layers: list[MoELayer], replicate="auto") -> Placement:
    """The strategy for the united layers `layers`; they must all be sharded the same way. `replicate` applies to
    expert parallelism only (see `place_united`)."""
    modes = {l.index: sharding_mode(l.experts) for l in layers}
    kinds = {m if m in (None, "tp") else "ep" for m in modes.values()}
    if len(kinds) > 1:
        how = ", ".join(f"layer {i}: {m or 'not sharded'}" for i, m in sorted(modes.items()))
        raise BrownoutError(f"united layers are sharded in different ways ({how}); cannot mix")
    kind = kinds.pop() if kinds else None
    if kind is None:
        return LocalPlacement()
    if kind == "tp":
        return TensorParallelPlacement()
    return ExpertParallelPlacement(modes, replicate)


__all__ = ["Placement", "LocalPlacement", "TensorParallelPlacement", "ExpertParallelPlacement", "EPPlacement",
           "choose_placement", "sharding_mode", "expert_parallel_config", "place_united", "ep_ids", "token_ranks",
           "full_tensor"]
