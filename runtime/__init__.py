"""Online half of Brownout: attach united experts to a transformers MoE model and turn the brownout ratio.

    bm = BrownoutMoE.attach(model, "out/mixtral-w2"); bm.set_ratio(0.5); model.generate(...)
"""
from .attach import BrownoutMoE
from .policy import POLICIES, remap

__all__ = ["BrownoutMoE", "POLICIES", "remap"]
