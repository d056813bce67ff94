"""The united tier on the originals' own device: a model that is not sharded (one device, or layers spread over
devices by `device_map`; each layer's slabs live where its experts do)."""
from __future__ import annotations

import torch

from .base import Placement, local_tensor


class LocalPlacement(Placement):
    name = "local"

    def build(self, layer, united, expert_to_group):
        slabs = {}
        for k, u in united.items():
            p = layer.experts._parameters[k]
            own = local_tensor(p).detach()
            slabs[k] = torch.cat([own, self.place(p, u.to(own.device, own.dtype))])
        return slabs

    def place(self, param: torch.Tensor, united: torch.Tensor) -> torch.Tensor:
        """This process's part of one united tensor laid out like `param`: all of it, on one device."""
        return united
