"""The united tier on the originals' own device: a model that is not sharded (one device, or layers spread over
devices by `device_map`; each layer's slabs live where its experts do)."""
from __future__ import annotations

import torch

from .base import Placement


class LocalPlacement(Placement):
    name = "local"

    def build(self, layer, united, expert_to_group):
        slabs = {}
        for k, u in united.items():
            p = layer.experts._parameters[k]
            slabs[k] = torch.cat([p.data, u.to(p.device, p.dtype)])
        return slabs
