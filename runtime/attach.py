"""BrownoutMoE: attach a united-expert checkpoint to a loaded transformers MoE model and turn the ratio knob."""
from __future__ import annotations

import math
from numbers import Real

import torch

from .checkpoint import UnitedCheckpoint, config_hash, fingerprint_tensors, probe_matches, weight_probe
from .discover import MoELayer, find_moe_layers
from .errors import BrownoutError

from . import experts_impl
from .experts_impl import LayerState
from .policy import POLICIES


def _check_ratio(r) -> float:
    if isinstance(r, bool) or not isinstance(r, Real) or math.isnan(float(r)) or not 0.0 <= float(r) <= 1.0:
        raise BrownoutError(f"brownout ratio must be a number in [0, 1], got {r!r}")
    return float(r)


class BrownoutMoE:
    """Handle on a model with a united tier attached. Create with `BrownoutMoE.attach(model, united_dir)`."""

    def __init__(self, model, checkpoint: UnitedCheckpoint, layers: dict[int, MoELayer], states: dict[int, LayerState],
                 configs: list[tuple], prev_impl: dict[int, str | None]):
        self.model, self.checkpoint = model, checkpoint
        self._moe, self.layers, self._configs, self._prev_impl = layers, states, configs, prev_impl
        self._attached = True

    # -- attach / detach -----------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model, united_dir, ratio=0.0, policy: str = "hot-cold") -> "BrownoutMoE":
        """Load the united tier onto the model's devices and dtype and switch its MoE layers to `brownout`.

        Everything is checked before the model is touched: a bad checkpoint leaves the model as it was.
        """
        if getattr(model, "_brownout_attached", False):
            raise BrownoutError("this model already has a united tier attached; detach it first")
        from .distributed import sharding_mode  # lazy: distributed imports this module

        if any(sharding_mode(l.experts) for l in find_moe_layers(model)):  # tensor / expert parallel (torchrun)
            from .distributed import attach as attach_sharded

            return attach_sharded(model, united_dir, ratio=ratio, policy=policy)
        ratio = _check_ratio(ratio)
        if policy not in POLICIES:
            raise BrownoutError(f"unknown brownout policy {policy!r}; policies: {', '.join(POLICIES)}")
        ck = UnitedCheckpoint(united_dir)
        moe = {l.index: l for l in find_moe_layers(model)}
        cls._check_fingerprint(model, ck, moe)
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        for i in ck.layers:
            loaded[i] = cls._check_layer(ck, i, moe[i])
        # -- validated: now modify the model -----------------------------------------------------------------------
        states, configs, prev = {}, {}, {}
        for i, t in loaded.items():
            ex = moe[i].experts
            configs.setdefault(id(ex.config), (ex.config, ex.config._experts_implementation))
            prev[i] = ex.config._experts_implementation
            e2g = t.pop("expert_to_group")
            slabs = {}
            for k, united in t.items():
                p = getattr(ex, k)
                cat = torch.cat([p.data, united.to(p.device, p.dtype)])
                p.data = cat[: p.shape[0]]  # the original parameter now views the front of the slabs: no copy kept
                slabs[k] = cat
            states[i] = LayerState(layer=i, num_experts=moe[i].num_experts, num_groups=int(e2g.max()) + 1,
                                   expert_to_group=e2g.to(ex.gate_up_proj.device), slabs=slabs, prev_impl=prev[i],
                                   ratio=ratio, policy=policy)
            ex._brownout = states[i]
        for l in moe.values():  # left-alone layers keep their own implementation under the shared config
            if l.index not in states:
                l.experts._brownout_prev_impl = l.experts.config._experts_implementation
        for c, _ in configs.values():
            c._experts_implementation = experts_impl.NAME
        model._brownout_attached = True
        return cls(model, ck, moe, states, list(configs.values()), prev)

    @staticmethod
    def _check_fingerprint(model, ck: UnitedCheckpoint, moe: dict[int, MoELayer], cfg_hash=config_hash,
                           full=lambda t: t) -> None:
        """Config hash and weight probe against the checkpoint's. A sharded model passes its own `cfg_hash` (which
        ignores the parallel settings) and `full` (gathers a sharded experts tensor)."""
        bm = ck.meta["base_model"]
        if bm.get("config_hash") != cfg_hash(model.config):
            raise BrownoutError(f"{ck.path} was built from another model ({bm.get('name')}, {bm.get('model_type')}): config differs")
        missing = [i for i in ck.layers if i not in moe]
        if missing:
            raise BrownoutError(f"{ck.path} has united experts for layers {missing}, which are not MoE layers of this model")
        first = full(moe[ck.layers[0]].experts.gate_up_proj)
        last = first if ck.layers[-1] == ck.layers[0] else full(moe[ck.layers[-1]].experts.gate_up_proj)
        if not probe_matches(bm.get("weight_probe", []), weight_probe(fingerprint_tensors(first, last))):
            raise BrownoutError(f"{ck.path} was built from another model ({bm.get('name')}): expert weights differ")

    @staticmethod
    def _check_layer(ck: UnitedCheckpoint, i: int, layer: MoELayer) -> dict[str, torch.Tensor]:
        t = ck.tensors(i)
        e2g = t["expert_to_group"]
        G = int(e2g.max()) + 1 if e2g.numel() else 0
        if e2g.shape != (layer.num_experts,) or e2g.min() < 0 or sorted(set(e2g.tolist())) != list(range(G)):
            raise BrownoutError(f"{ck.path}: layer {i} expert_to_group is not a grouping of {layer.num_experts} experts")
        for k in layer.layout.native_keys():
            want = (G,) + tuple(getattr(layer.experts, k).shape[1:])
            if k not in t or tuple(t[k].shape) != want:
                got = tuple(t[k].shape) if k in t else "missing"
                raise BrownoutError(f"{ck.path}: layer {i} {k} has shape {got}, expected {want}")
            if not torch.isfinite(t[k]).all():
                raise BrownoutError(f"{ck.path}: layer {i} {k} has NaN or inf values")
        return {k: t[k] for k in layer.layout.native_keys()} | {"expert_to_group": e2g}

    def detach(self) -> None:
        """Restore the model exactly: original implementation, original tensors, no united tier."""
        if not self._attached:
            return
        for i, st in self.layers.items():
            ex = self._moe[i].experts
            for k in st.slabs:
                p = getattr(ex, k)
                p.data = p.data.clone()  # drop the view so the concatenated slabs can be freed
            st.slabs.clear()
            del ex._brownout
        for l in self._moe.values():
            l.experts.__dict__.pop("_brownout_prev_impl", None)
        for c, prev in self._configs:
            c._experts_implementation = prev
        self.model._brownout_attached = False
        self._attached = False

    # -- the knob ------------------------------------------------------------------------------------------------
    def set_ratio(self, ratio) -> None:
        """A global ratio, or {layer: ratio} for some layers (others keep theirs). Free to change between calls."""
        if isinstance(ratio, dict):
            bad = [k for k in ratio if k not in self.layers]
            if bad:
                raise BrownoutError(f"layers {bad} have no united experts; united layers: {sorted(self.layers)}")
            new = {k: _check_ratio(v) for k, v in ratio.items()}
        elif isinstance(ratio, (list, tuple)):
            if len(ratio) != len(self.layers):
                raise BrownoutError(f"a ratio list needs one value per united layer ({len(self.layers)}), got {len(ratio)}")
            new = {k: _check_ratio(v) for k, v in zip(sorted(self.layers), ratio)}
        else:
            r = _check_ratio(ratio)
            new = {k: r for k in self.layers}
        for k, v in new.items():
            self.layers[k].ratio = v

    def set_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise BrownoutError(f"unknown brownout policy {policy!r}; policies: {', '.join(POLICIES)}")
        for st in self.layers.values():
            st.policy = policy

    def set_path(self, path: str) -> None:
        """Force a compute path (auto, reference, grouped, kernel): for tests and benchmarks. A forced path runs at
        ratio 0 too (same semantics, but not bit for bit the model's own implementation, which `auto` runs there)."""
        for st in self.layers.values():
            st.path = path

    @property
    def ratio(self) -> dict[int, float]:
        return {k: st.ratio for k, st in self.layers.items()}

    def extra_bytes(self) -> int:
        return sum(t[st.num_experts:].numel() * t.element_size() for st in self.layers.values() for t in st.slabs.values())

    def summary(self) -> str:
        m = self.checkpoint.meta
        lines = [f"BrownoutMoE: {self.checkpoint.path} on {m['base_model']['name']}",
                 f"  method: grouping={m['grouping']} merge={m['merge']} way={m['way']}; policy={next(iter(self.layers.values())).policy}",
                 f"  united tier: {self.extra_bytes() / 2**20:.1f} MiB extra over {len(self.layers)} layers"]
        for i, st in sorted(self.layers.items()):
            lines.append(f"  layer {i:3d}: {st.num_experts} experts -> {st.num_groups} united, ratio {st.ratio:g}")
        left = sorted(set(self._moe) - set(self.layers))
        if left:
            lines.append(f"  left alone (originals only): layers {left}")
        return "\n".join(lines)

    __repr__ = summary
