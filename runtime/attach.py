"""BrownoutMoE: attach a united-expert checkpoint to a loaded transformers MoE model and turn the ratio knob.

    bm = BrownoutMoE.attach(model, "out/mixtral-w2")     # the same call on every rank of a TP / EP model
    bm.set_ratio(0.5); model.generate(...)

Attach validates everything first (checkpoint fingerprint, per-layer shapes, ratio, policy, backend, placement), so
a bad input leaves the model as it was; then each united layer gets its slabs, placed by the strategy chosen for how
the model is sharded (runtime.placement), and a compute backend chosen once (runtime.backends). Semantics: docs/design.md
§4; ratio 0 is the unmodified model bit for bit unless graph-safe mode is on.
"""
from __future__ import annotations

import torch

from . import kernels
from .backends import AUTO, choose_backend, check_backend_name
from .checkpoint import UnitedCheckpoint, config_hash, fingerprint_tensors, probe_matches, weight_probe
from .discover import MoELayer, find_moe_layers
from .errors import BrownoutError
from .experts_impl import NAME, LayerState, clear_state, leave_alone, on_kernel, set_on_kernel, set_state
from .placement import EPPlacement, Placement, choose_placement, full_tensor
from .placement.base import local_tensor
from .placement.expert_parallel import check_replicate
from .policy import check_policy
from .ratio import Ratio, check_ratio


def check_fingerprint(model, ck: UnitedCheckpoint, moe: dict[int, MoELayer]) -> None:
    """Config hash and weight probe against the checkpoint's. On a sharded model the probe gathers experts 0 and -1
    of the first and last united layer (a collective: every rank calls attach)."""
    bm = ck.meta["base_model"]
    if bm.get("config_hash") != config_hash(model.config):
        raise BrownoutError(f"{ck.path} was built from another model ({bm.get('name')}, {bm.get('model_type')}): config differs")
    missing = [i for i in ck.layers if i not in moe]
    if missing:
        raise BrownoutError(f"{ck.path} has united experts for layers {missing}, which are not MoE layers of this model")
    first = full_tensor(moe[ck.layers[0]].experts.gate_up_proj)
    last = first if ck.layers[-1] == ck.layers[0] else full_tensor(moe[ck.layers[-1]].experts.gate_up_proj)
    if not probe_matches(bm.get("weight_probe", []), weight_probe(fingerprint_tensors(first, last))):
        raise BrownoutError(f"{ck.path} was built from another model ({bm.get('name')}): expert weights differ")


def check_layer(ck: UnitedCheckpoint, i: int, layer: MoELayer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Layer i's united tensors (native keys) and its expert_to_group, checked against the model's layer."""
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
    return {k: t[k] for k in layer.layout.native_keys()}, e2g


def _layer_backend(name: str, layer: MoELayer, placement: Placement):
    p = local_tensor(layer.experts.gate_up_proj)
    return choose_backend(name, layer.experts, p.dtype, p.device, placement.refused_backends)


class BrownoutMoE:
    """Handle on a model with a united tier attached. Create with `BrownoutMoE.attach(model, united_dir)`.

    `layers[i]`: the LayerState of united layer i; `mode[i]`: how its experts are placed (local, tp, ep, ep-router);
    `placement[i]`: under expert parallelism, where its united experts live (EPPlacement); `strategy`: the placement.
    """

    def __init__(self, model, checkpoint: UnitedCheckpoint, moe: dict[int, MoELayer], states: dict[int, LayerState],
                 strategy: Placement, configs: list[tuple]):
        self.model, self.checkpoint, self.strategy = model, checkpoint, strategy
        self.moe, self.layers, self.configs = moe, states, configs
        self.mode: dict[int, str] = {i: strategy.mode(i) for i in states}
        self.placement: dict[int, EPPlacement] = dict(getattr(strategy, "placements", {}))
        self.attached = True

    # -- attach / detach -----------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model, united_dir, ratio=0.0, policy: str = "hot-cold", backend: str = AUTO,
               replicate="auto") -> "BrownoutMoE":
        """Load the united tier onto the model's devices and dtype and switch its MoE layers to `brownout`.

        backend: "auto", "reference", "grouped" or "triton" (runtime.backends). replicate: under expert parallelism,
        how many tied united experts may be copied to every rank ("auto", "none", "all" or a budget; see
        runtime.placement.expert_parallel.place_united). On a TP / EP model call it on every rank with the same
        arguments. Everything is checked before the model is touched.
        """
        if getattr(model, "_brownout_attached", False):
            raise BrownoutError("this model already has a united tier attached; detach it first")
        ratio, policy = check_ratio(ratio), check_policy(policy)
        check_backend_name(backend)
        check_replicate(replicate)
        ck = UnitedCheckpoint(united_dir)
        moe = {l.index: l for l in find_moe_layers(model)}
        check_fingerprint(model, ck, moe)
        strategy = choose_placement([moe[i] for i in ck.layers], replicate)
        plans = {}
        for i in ck.layers:
            united, e2g = check_layer(ck, i, moe[i])
            strategy.check(moe[i], united, e2g)
            plans[i] = (united, e2g, _layer_backend(backend, moe[i], strategy))
        # -- validated: now modify the model, one layer at a time (a layer's slabs replace its originals' storage) --
        states, configs = {}, {}
        try:
            for i, (united, e2g, chosen) in plans.items():
                ex = moe[i].experts
                slabs = strategy.build(moe[i], united, e2g)
                dev = slabs["gate_up_proj"].device
                prev = ex.config._experts_implementation
                configs.setdefault(id(ex.config), (ex.config, prev))
                st = LayerState(layer=i, num_experts=moe[i].num_experts, num_groups=int(e2g.max()) + 1,
                                expert_to_group=e2g.to(dev), slabs=slabs, prev_impl=prev, ratio=Ratio(ratio, dev),
                                policy=policy, backend=chosen)
                states[i] = st
                strategy.install(moe[i], st)
                set_state(ex, st)
        except BaseException:
            for i, st in states.items():  # put back the layers done so far
                strategy.uninstall(moe[i], st)
                clear_state(moe[i].experts)
            raise
        for l in moe.values():  # left-alone layers keep their own implementation under the shared config
            if l.index not in states:
                leave_alone(l.experts, l.experts.config._experts_implementation)
        for c, _ in configs.values():
            c._experts_implementation = NAME
        model._brownout_attached = True
        return cls(model, ck, moe, states, strategy, list(configs.values()))

    def detach(self) -> None:
        """Restore the model exactly: original implementation, original tensors and forwards, no united tier."""
        if not self.attached:
            return
        for i, st in self.layers.items():
            self.strategy.uninstall(self.moe[i], st)
            st.slabs.clear()
        for l in self.moe.values():
            clear_state(l.experts)
        for c, prev in self.configs:
            c._experts_implementation = prev
        self.model._brownout_attached = False
        self.attached = False

    # -- the knobs -----------------------------------------------------------------------------------------------
    def set_ratio(self, ratio) -> None:
        """A global ratio, or {layer: ratio} for some layers (others keep theirs), or a list with one per united
        layer. Free to change between calls; every value is checked before any is set."""
        if isinstance(ratio, dict):
            bad = [k for k in ratio if k not in self.layers]
            if bad:
                raise BrownoutError(f"layers {bad} have no united experts; united layers: {sorted(self.layers)}")
            new = {k: check_ratio(v) for k, v in ratio.items()}
        elif isinstance(ratio, (list, tuple)):
            if len(ratio) != len(self.layers):
                raise BrownoutError(f"a ratio list needs one value per united layer ({len(self.layers)}), got {len(ratio)}")
            new = {k: check_ratio(v) for k, v in zip(sorted(self.layers), ratio)}
        else:
            r = check_ratio(ratio)
            new = {k: r for k in self.layers}
        for k, v in new.items():
            self.layers[k].ratio.set(v)

    def set_policy(self, policy: str) -> None:
        policy = check_policy(policy)
        if self.graph_safe:
            self._require_graph_safe({i: (st.backend, policy) for i, st in self.layers.items()})
        for st in self.layers.values():
            st.policy = policy

    def set_backend(self, name: str) -> None:
        """Compute backend of every united layer: "auto", "reference", "grouped" or "triton" (runtime.backends).
        Chosen here, once; an unknown or unsupported name raises BrownoutError and changes nothing."""
        check_backend_name(name)
        chosen = {i: _layer_backend(name, self.moe[i], self.strategy) for i in self.layers}
        if self.graph_safe:
            self._require_graph_safe({i: (b, self.layers[i].policy) for i, b in chosen.items()})
        for i, b in chosen.items():
            self.layers[i].backend = b

    def set_path(self, name: str) -> None:
        """Older name of `set_backend`, which also takes "kernel" for triton."""
        self.set_backend({"kernel": "triton"}.get(name, name))

    def set_graph_safe(self, on: bool, left_alone: str = "kernel") -> None:
        """On: ratio 0 runs through the backend as well (the same semantics, though not bit for bit the model's own
        implementation), so a CUDA graph captured at any ratio follows later `set_ratio` calls. Needs a backend that
        reads the ratio from device memory on every united layer (triton, policy hot-cold or drop). Off (the default):
        ratio 0 is the model's own implementation, bit for bit.

        left_alone: what the layers without united experts run while on. "kernel" (default): the fused kernel over
        their own experts where it supports them (unsharded, the kernel's layout and dtype), so the whole step runs
        one MoE kernel (on the serving benchmark's H200 engine a step took 0.56-0.70 ms less than with the model's
        grouped_mm in its four left-alone layers); "own": the model's implementation, as when off."""
        on = bool(on)
        if left_alone not in ("kernel", "own"):
            raise BrownoutError(f"left_alone must be 'kernel' or 'own', got {left_alone!r}")
        if on:
            self._require_graph_safe({i: (st.backend, st.policy) for i, st in self.layers.items()})
        for st in self.layers.values():
            st.graph_safe = on
        for i, l in self.moe.items():
            if i not in self.layers:
                set_on_kernel(l.experts, on and left_alone == "kernel" and self._kernel_runs(l))

    def _kernel_runs(self, layer: MoELayer) -> bool:
        """The fused kernel computes this left-alone layer exactly (an unsharded layer of its layout and dtype)."""
        if self.strategy.name != "local":
            return False
        p = layer.experts.gate_up_proj
        return type(p) in (torch.Tensor, torch.nn.Parameter) and kernels.supported(layer.experts, p.dtype, p.device)

    @property
    def left_alone_on_kernel(self) -> list[int]:
        """The left-alone layers that run the fused kernel now (graph-safe mode, left_alone="kernel")."""
        return sorted(i for i, l in self.moe.items() if i not in self.layers and on_kernel(l.experts))

    def _require_graph_safe(self, plan: dict) -> None:
        for i, (b, policy) in sorted(plan.items()):
            if not b.graph_safe(policy):
                why = f"policy {policy!r} (a PyTorch remap)" if b.graph_safe_policies else f"backend {b.name!r}"
                raise BrownoutError(f"graph-safe mode needs every united layer to read the ratio from device memory "
                                    f"(backend triton, policy hot-cold or drop); on layer {i}, {why} reads it on the host")

    @property
    def graph_safe(self) -> bool:
        return bool(self.layers) and all(st.graph_safe for st in self.layers.values())

    @property
    def backends(self) -> dict[int, str]:
        return {i: st.backend.name for i, st in self.layers.items()}

    @property
    def backend(self) -> str:
        """The backend every united layer runs ("mixed" if "auto" chose differently per layer: see `backends`)."""
        names = set(self.backends.values())
        return names.pop() if len(names) == 1 else "mixed"

    @property
    def policy(self) -> str:
        return next(iter(self.layers.values())).policy

    @property
    def ratio(self) -> dict[int, float]:
        return {k: st.ratio.value for k, st in self.layers.items()}

    def extra_bytes(self) -> int:
        """Bytes of united tier this process holds (EP padding included)."""
        return sum(self.strategy.extra_bytes(self.moe[i], st) for i, st in self.layers.items())

    def summary(self) -> str:
        m = self.checkpoint.meta
        lines = [f"BrownoutMoE: {self.checkpoint.path} on {m['base_model']['name']}",
                 f"  method: grouping={m['grouping']} merge={m['merge']} way={m['way']}; policy={self.policy}; "
                 f"backend={self.backend}; placement={self.strategy.name}",
                 f"  united tier: {self.extra_bytes() / 2**20:.1f} MiB extra over {len(self.layers)} layers"]
        for i, st in sorted(self.layers.items()):
            lines.append(f"  layer {i:3d}: {st.num_experts} experts -> {st.num_groups} united, ratio {st.ratio.value:g}")
        left = sorted(set(self.moe) - set(self.layers))
        if left:
            kern = self.left_alone_on_kernel
            lines.append(f"  left alone (originals only): layers {left}"
                         + (f"; on the fused kernel (graph-safe mode): {kern}" if kern else ""))
        return "\n".join(lines)

    __repr__ = summary
