"""Online half of Brownout: attach united experts to a transformers MoE model and turn the brownout ratio.

    bm = BrownoutMoE.attach(model, "out/mixtral-w2"); bm.set_ratio(0.5); model.generate(...)

A model sharded by transformers' expert parallelism is loaded with `distributed_config=expert_parallel_config(n)`
and attached the same way, on every rank. `compile_outside_experts(model)` compiles the norms and the rotary
embedding (the launch-bound work outside the experts) and leaves the experts alone.
"""
from .attach import BrownoutMoE
from .compile_outside import compile_outside_experts
from .backends import BACKENDS
from .placement import expert_parallel_config
from .policy import POLICIES, check_policy, remap
from .ratio import check_ratio

__all__ = ["BrownoutMoE", "compile_outside_experts", "expert_parallel_config", "BACKENDS", "POLICIES", "check_policy",
           "check_ratio", "remap"]
