"""Brownout on a model sharded by transformers' tensor parallelism or expert parallelism (issue 8).

    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")                                 # TP, or
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=expert_parallel_config(2))        # EP
    bm = runtime.distributed.attach(model, "out/united")   # on every rank, same arguments; then bm.set_ratio(...)

The semantics are DESIGN.md section 4, unchanged: the brownout policy runs on the *global* routing of the call (every
rank computes the same remap from the same router output), so a sharded model at ratio r computes what the single-GPU
model at ratio r computes, up to the order of floating-point sums. What changes is where each united expert lives:

- Tensor parallelism (`moe_tp_experts`: every rank holds every expert, `gate_up_proj` sharded on 2I as [gate_r; up_r]
  and `down_proj` on I): the united tier is sharded exactly like the originals (the same DTensor placements, applied
  with `distribute_tensor`), so each rank runs its I-slice of the united experts and transformers' all-reduce after
  the experts sums them like it sums the originals. No placement choice exists here: every expert is on every rank.
  Replicating united experts instead would be wrong (the all-reduce would add tp copies) and cost tp x the memory.
- Expert parallelism (`grouped_gemm` + `ep_dispatch_experts`: rank r holds originals [r*E/ep, (r+1)*E/ep)): each
  group's united expert goes on the rank that holds most of its members (`place_united`); a group with no majority
  rank is replicated on every rank while a memory budget lasts, and otherwise goes to the least-loaded tied rank.
  Each rank's local slabs are [its E/ep originals; its united experts; zero padding up to the largest count], so the
  slab space stays "rank r owns a contiguous range of L ids" that transformers' EP implementations assume. The
  remap runs on global ids *before* dispatch (the experts' own forward only sees local ids, too late for a global
  policy), its slab ids are translated to EP slab ids (`EPPlacement.ep_ids`), and the model's own EP implementation
  (all-reduce or all-to-all, copied with the slab count changed) moves the tokens. Ratio 0 calls the untouched EP
  forward: the sharded model bit for bit.

Older transformers' expert parallelism (5.17: `DistributedConfig(enable_expert_parallel=True)`, mode "ep-router") has no
dispatch rule: every rank runs the whole batch, an `ep_router` forward slices the router's output to local ids and the
experts all-reduce. Brownout places the united tier the same way (`place_united`), has the router hand the global
routing to the experts at r > 0, and keeps this rank's EP slab ids. `expert_parallel_config(size)` builds the config
for whichever transformers is installed.

The original experts' local shards become views of the front of the local slabs (no second copy), as in
`BrownoutMoE.attach`. A model without DTensor experts goes straight to `BrownoutMoE.attach`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .checkpoint import UnitedCheckpoint, config_hash
from .discover import find_moe_layers
from .errors import BrownoutError

from . import experts_impl
from .attach import BrownoutMoE, _check_ratio
from .experts_impl import LayerState, _SlabView
from .policy import POLICIES, remap
from .reference import slab_forward

DEFAULT_REPLICATE_BUDGET = 0.125  # replicas may add up to this share of a rank's local experts, per layer


# -- placement (pure, no torch.distributed) ----------------------------------------------------------------------------
@dataclass
class EPPlacement:
    """Where one layer's united experts live under expert parallelism.

    owner[g]: the rank holding group g's united expert, or -1 when every rank holds a replica.
    local[r]: the groups whose united expert rank r holds, in local slab order (after its E/ep originals).
    """

    num_experts: int
    ep_size: int
    expert_to_group: list[int]
    owner: list[int]
    local: list[list[int]]

    @property
    def num_groups(self) -> int:
        return len(self.owner)

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def united_slots(self) -> int:
        return max((len(l) for l in self.local), default=0)

    @property
    def local_slabs(self) -> int:
        """L: slabs per rank, originals + united + padding; rank r owns EP slab ids [r*L, (r+1)*L)."""
        return self.local_experts + self.united_slots

    def members_on_owner(self) -> float:
        """Share of group members whose united expert sits on their own rank (1.0 = no cold token leaves its rank)."""
        hit = sum(1 for e, g in enumerate(self.expert_to_group)
                  if self.owner[g] < 0 or self.owner[g] == e // self.local_experts)
        return hit / max(1, self.num_experts)

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """rank_of [E+G+1] (-1: replicated or skip) and pos [ep, E+G+1] (local slab index; 0 where not held)."""
        E, G, El = self.num_experts, self.num_groups, self.local_experts
        rank_of = torch.full((E + G + 1,), -1, dtype=torch.long)
        pos = torch.zeros(self.ep_size, E + G + 1, dtype=torch.long)
        for e in range(E):
            rank_of[e] = e // El
            pos[e // El, e] = e % El
        for g in range(G):
            rank_of[E + g] = self.owner[g]
        for r, groups in enumerate(self.local):
            for j, g in enumerate(groups):
                pos[r, E + g] = El + j
        return rank_of.to(device), pos.to(device)


def place_united(expert_to_group, ep_size: int, replicate="auto") -> EPPlacement:
    """Each group's united expert on the rank holding most of its members.

    Ties: a group with no majority rank (its members spread evenly over several ranks) is replicated on every rank while
    the replica budget lasts, otherwise it goes to the tied rank with the fewest united experts so far (then the lowest).
    `replicate`: "auto" (budget DEFAULT_REPLICATE_BUDGET), "none", "all", or a float budget: replicas may add at
    most that share of a rank's local experts (E/ep) per layer.
    """
    e2g = [int(g) for g in (expert_to_group.tolist() if torch.is_tensor(expert_to_group) else expert_to_group)]
    E = len(e2g)
    if ep_size < 1 or E % ep_size:
        raise BrownoutError(f"{E} experts cannot be split evenly over {ep_size} expert-parallel ranks")
    G = max(e2g) + 1 if e2g else 0
    El = E // ep_size
    if replicate == "all":
        owner = [-1] * G
        return EPPlacement(E, ep_size, e2g, owner, [list(range(G)) for _ in range(ep_size)])
    budget = {"auto": DEFAULT_REPLICATE_BUDGET, "none": 0.0}.get(replicate, replicate)
    if isinstance(budget, str) or not 0.0 <= float(budget):
        raise BrownoutError(f"replicate must be 'auto', 'none', 'all' or a budget >= 0, got {replicate!r}")
    spare = math.floor(float(budget) * El)  # extra united copies a rank may hold
    counts = [[0] * ep_size for _ in range(G)]
    for e, g in enumerate(e2g):
        counts[g][e // El] += 1
    load = [0] * ep_size
    owner = [0] * G
    # decide the groups with the clearest majority first, so ties are broken against an already-known load
    order = sorted(range(G), key=lambda g: (-(max(counts[g]) / max(1, sum(counts[g]))), g))
    for g in order:
        best = max(counts[g])
        tied = [r for r in range(ep_size) if counts[g][r] == best]
        if len(tied) > 1 and spare >= 1:
            owner[g] = -1
            spare -= 1
            continue
        r = min(tied, key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += 1
    local = [[g for g in range(G) if owner[g] in (-1, r)] for r in range(ep_size)]
    return EPPlacement(E, ep_size, e2g, owner, local)


def ep_ids(ids: torch.Tensor, weights: torch.Tensor, rank_of: torch.Tensor, pos: torch.Tensor, local_slabs: int,
           skip: int, token_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab ids over [originals; united] (skip = E+G) -> EP slab ids rank*L + local index.

    A replicated united expert (and a skipped slot, weight 0) goes to `token_rank[t]`, the rank the token is sent from
    when the batch is split by rows (no traffic under all-to-all, an even split of the work under all-reduce).
    """
    r = rank_of[ids]
    r = torch.where(r < 0, token_rank.unsqueeze(-1).expand_as(ids), r)
    out = r * local_slabs + pos[r, ids]
    weights = torch.where(ids == skip, torch.zeros_like(weights), weights)
    return out, weights


def token_ranks(num_tokens: int, ep_size: int, own_rank: int | None, device) -> torch.Tensor:
    """Row chunks like DTensor Shard(0) (ceil(T/ep) rows each) when ranks share a batch, else this rank for all."""
    if own_rank is not None:
        return torch.full((num_tokens,), own_rank, dtype=torch.long, device=device)
    chunk = max(1, -(-num_tokens // ep_size))
    return torch.arange(num_tokens, device=device) // chunk


# -- sharded-model plumbing --------------------------------------------------------------------------------------------
def _dtensor():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def _is_dtensor(t) -> bool:
    D = _dtensor()
    return D is not None and isinstance(t, D)


def _closure(fn) -> dict:
    """The free variables of a forward transformers installed on a module (its parallel style keeps them there)."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))


def _shards_experts(p) -> bool:
    """A DTensor sharded on dim 0 (the expert dimension) over a one-dimensional mesh."""
    return (_is_dtensor(p) and p.device_mesh.ndim == 1 and len(p.placements) == 1
            and type(p.placements[0]).__name__ == "Shard" and p.placements[0].dim == 0)


def ep_router(block: torch.nn.Module):
    """Older transformers' expert parallelism (5.17): the router whose forward an `ep_router` style wraps, or None."""
    for m in block.children():
        if _closure(m.__dict__.get("forward")).get("self").__class__.__name__ == "EpRouterParallel":
            return m
    return None


def ep_implementation(experts: torch.nn.Module):
    """The EPImplementation transformers installed on an `ep_dispatch_experts` module, or None."""
    cells = _closure(experts.__dict__.get("forward"))
    if not cells:
        return None
    try:
        from transformers.distributed.expert_parallel import EPImplementation
    except Exception:
        return None
    impl = cells.get("implementation")
    return impl if isinstance(impl, EPImplementation) else None


def sharding_mode(experts: torch.nn.Module) -> str | None:
    """'ep', 'tp' or None (not sharded) for one fused experts module."""
    p = experts._parameters.get("gate_up_proj")
    if p is None or not _is_dtensor(p):
        return None
    if ep_implementation(experts) is not None:
        return "ep"
    if _shards_experts(p) and _closure(experts.__dict__.get("forward")).get("self").__class__.__name__ \
            == "MoeExpertsParallel":
        return "ep-router"  # transformers before `ep_size` (5.17): `enable_expert_parallel`, an `ep_router` forward
    if getattr(experts, "_is_expert_parallel", False):
        raise BrownoutError("experts are sharded by expert (grouped_gemm) but have no ep_dispatch_experts forward; "
                            "brownout needs the model's EP plan with its dispatch rule")
    return "tp"


def _retarget(impl, local_slabs: int, forward):
    """A copy of a transformers EPImplementation that runs `forward` over `local_slabs` slabs per rank."""
    name = type(impl).__name__
    if name == "MegaMoeEP" or getattr(impl, "megamoe", None) is not None:
        raise BrownoutError("brownout does not support DeepGEMM Mega MoE expert parallelism (its kernel owns the "
                            "expert weights); use ep_implementation 'all_reduce' or 'all_to_all'")
    c = copy.copy(impl)
    c.num_local_experts = local_slabs
    c.experts_forward = forward
    for sub in ("all_to_all", "all_reduce"):
        if getattr(c, sub, None) is not None:
            setattr(c, sub, _retarget(getattr(c, sub), local_slabs, forward))
    return c


def expert_parallel_config(size: int, implementation: str = "auto"):
    """`DistributedConfig` for expert parallelism over `size` ranks on the installed transformers: `ep_size` where it
    exists (5.24 has it); before it (5.17), `enable_expert_parallel`, whose all-reduce scheme is the only one
    (`implementation` must be auto or all_reduce)."""
    import dataclasses

    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields:
        return DistributedConfig(tp_size=size, ep_size=size, ep_implementation=implementation)
    if implementation not in ("auto", "all_reduce"):
        raise BrownoutError(f"expert-parallel implementation {implementation!r} needs a transformers whose "
                            f"DistributedConfig has ep_size (this one has only enable_expert_parallel)")
    return DistributedConfig(tp_size=size, enable_expert_parallel=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _set_local(module: torch.nn.Module, key: str, local: torch.Tensor) -> None:
    """Make `module.<key>` (a DTensor parameter) wrap `local` as its shard, same mesh, placements and global shape."""
    p = module._parameters[key]
    D = _dtensor()
    new = D.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)
    module._parameters[key] = torch.nn.Parameter(new, requires_grad=p.requires_grad)


class DistributedBrownoutMoE(BrownoutMoE):
    """BrownoutMoE on a TP- or EP-sharded model: same knobs; `placement` holds the EP placement per layer."""

    placement: dict[int, EPPlacement]
    mode: dict[int, str]

    def extra_bytes(self) -> int:
        """Bytes of united tier this rank holds (EP padding included)."""
        n = 0
        for i, st in self.layers.items():
            front = self.placement[i].local_experts if self.mode[i] != "tp" else st.num_experts
            n += sum(t[front:].numel() * t.element_size() for t in st.slabs.values())
        return n

    def detach(self) -> None:
        if not self._attached:
            return
        for i, st in self.layers.items():
            ex = self._moe[i].experts
            front = self.placement[i].local_experts if self.mode[i] != "tp" else st.num_experts
            for k, slab in st.slabs.items():
                _set_local(ex, k, slab[:front].clone())  # drop the view so the slabs can be freed
            if "_brownout_ep_prev_forward" in ex.__dict__:
                ex.forward = ex.__dict__.pop("_brownout_ep_prev_forward")
            router = ex.__dict__.pop("_brownout_router", None)
            if router is not None:
                router.forward = router.__dict__.pop("_brownout_ep_prev_forward")
            st.slabs.clear()  # the base detach then only restores the implementation and state
        super().detach()


def attach(model, united_dir, ratio=0.0, policy: str = "hot-cold", replicate="auto") -> BrownoutMoE:
    """BrownoutMoE.attach for a model loaded with transformers' TP (`tp_plan`) or EP (`distributed_config`).

    Call it on every rank with the same arguments (it runs collectives for the weight check). An unsharded model is
    handed to `BrownoutMoE.attach`. `replicate` applies to EP only (see `place_united`).
    """
    moe = {l.index: l for l in find_moe_layers(model)}
    modes = {i: sharding_mode(l.experts) for i, l in moe.items()}
    if all(m is None for m in modes.values()):
        return BrownoutMoE.attach(model, united_dir, ratio=ratio, policy=policy)
    if getattr(model, "_brownout_attached", False):
        raise BrownoutError("this model already has a united tier attached; detach it first")
    ratio = _check_ratio(ratio)
    if policy not in POLICIES:
        raise BrownoutError(f"unknown brownout policy {policy!r}; policies: {', '.join(POLICIES)}")
    ck = UnitedCheckpoint(united_dir)
    # the probe reads experts 0 and -1 of the first and last united layer: `_full` gathers them (a collective)
    BrownoutMoE._check_fingerprint(model, ck, moe, full=_full)
    loaded = {i: BrownoutMoE._check_layer(ck, i, moe[i]) for i in ck.layers}
    for i in loaded:
        if modes[i] is None:
            raise BrownoutError(f"layer {i}: experts are not sharded while other layers are; cannot mix")
    # -- validated: build every layer's local slabs before touching the model --------------------------------------
    plans: dict[int, tuple] = {}
    for i, t in loaded.items():
        ex = moe[i].experts
        e2g = t.pop("expert_to_group")
        keys = list(t)
        if modes[i] == "tp":
            from torch.distributed.tensor import distribute_tensor

            slabs = {}
            for k in keys:
                p = ex._parameters[k]
                loc = p.to_local() if _is_dtensor(p) else p.data
                u = t[k].to(loc.device, loc.dtype)
                if _is_dtensor(p):  # shard the united tier exactly like the originals (no communication)
                    u = distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None).to_local()
                slabs[k] = torch.cat([loc, u])
            plans[i] = ("tp", slabs, e2g, None, None)
        else:
            for k in keys:
                if not _shards_experts(ex._parameters.get(k)):
                    raise BrownoutError(f"layer {i}: {k} is not sharded by expert over one EP mesh dimension "
                                        f"(expert FSDP is not supported with brownout)")
            if modes[i] == "ep":
                impl = ep_implementation(ex)
                mesh = impl.ep_mesh
            else:  # ep-router: the all-reduce scheme of older transformers (5.17); the mesh is the experts' own
                impl = ep_router(moe[i].block)
                if impl is None:
                    raise BrownoutError(f"layer {i}: experts are sharded by expert but no `ep_router` router was "
                                        f"found in {type(moe[i].block).__name__}")
                mesh = ex._parameters["gate_up_proj"].device_mesh
            ep_size, rank = mesh.size(), mesh.get_local_rank()
            pl = place_united(e2g, ep_size, replicate)
            slabs = {}
            for k in keys:
                loc = ex._parameters[k].to_local()
                u = t[k].to(loc.device, loc.dtype)[pl.local[rank]]
                pad = loc.new_zeros((pl.united_slots - u.shape[0],) + tuple(loc.shape[1:]))
                slabs[k] = torch.cat([loc, u, pad])
            plans[i] = (modes[i], slabs, e2g, pl, impl)
    # -- modify the model ------------------------------------------------------------------------------------------
    states, configs, prev, placement, mode = {}, {}, {}, {}, {}
    for i, (m, slabs, e2g, pl, impl) in plans.items():
        ex = moe[i].experts
        configs.setdefault(id(ex.config), (ex.config, ex.config._experts_implementation))
        prev[i] = ex.config._experts_implementation
        front = pl.local_experts if m != "tp" else moe[i].num_experts
        for k, slab in slabs.items():
            if _is_dtensor(ex._parameters[k]):
                _set_local(ex, k, slab[:front])
            else:
                ex._parameters[k].data = slab[:front]
        dev = slabs["gate_up_proj"].device
        states[i] = LayerState(layer=i, num_experts=moe[i].num_experts, num_groups=int(e2g.max()) + 1,
                               expert_to_group=e2g.to(dev), slabs=slabs, prev_impl=prev[i], ratio=ratio, policy=policy)
        ex._brownout = states[i]
        mode[i] = m
        if m == "ep":
            placement[i] = pl
            _install_ep_forward(ex, states[i], pl, impl)
        elif m == "ep-router":
            placement[i] = pl
            _install_router_ep_forward(ex, impl, states[i], pl, ex._parameters["gate_up_proj"].device_mesh)
    for l in moe.values():
        if l.index not in states:
            l.experts._brownout_prev_impl = l.experts.config._experts_implementation
    for c, _ in configs.values():
        c._experts_implementation = experts_impl.NAME
    model._brownout_attached = True
    bm = DistributedBrownoutMoE(model, ck, moe, states, list(configs.values()), prev)
    bm.placement, bm.mode = placement, mode
    return bm


def _local_forward(ex: torch.nn.Module, st: LayerState):
    """This rank's slabs on local slab ids; id L (the off-rank sentinel) is skipped."""

    def local_forward(hidden_states, local_ids, weights):
        if st.path == "reference" or (st.path == "auto" and hidden_states.device.type != "cuda"):
            return slab_forward(ex, st.slabs, hidden_states, local_ids, weights)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        view = _SlabView(ex, st.slabs)
        view._is_expert_parallel = True  # ids >= L are sentinels for transformers' grouped path
        # (the fused two-tier kernel is not wired for EP-local slabs yet: the kernel path runs grouped_mm here)
        return ALL_EXPERTS_FUNCTIONS.get_interface("grouped_mm", None)(view, hidden_states, local_ids, weights)

    return local_forward


def _install_ep_forward(ex: torch.nn.Module, st: LayerState, pl: EPPlacement, impl) -> None:
    """Wrap transformers' EP forward: remap on global ids, then dispatch over the EP slab space."""
    prev = ex.forward  # the ep_forward transformers installed (instance attribute)
    L = pl.local_slabs
    skip = pl.num_experts + pl.num_groups
    rank_of, pos = pl.tables(st.expert_to_group.device)
    rank = impl.ep_mesh.get_local_rank()
    # ranks holding different batches (all-to-all without TP) send replicated work to themselves
    own = rank if (not impl.shares_batch and impl.tp_mesh.size() == 1) else None
    dispatch = _retarget(impl, L, _local_forward(ex, st))

    def brownout_ep_forward(hidden_states, top_k_index, top_k_weights):
        if st.ratio == 0.0:
            return prev(hidden_states, top_k_index, top_k_weights)
        hidden_states, top_k_weights = _local(hidden_states), _local(top_k_weights)
        a = remap(top_k_index, top_k_weights, st.expert_to_group, st.num_groups, st.ratio, st.policy)
        tr = token_ranks(top_k_index.shape[0], pl.ep_size, own, top_k_index.device)
        ids, w = ep_ids(a.ids, a.weights, rank_of, pos, L, skip, tr)
        return dispatch(hidden_states, ids, w).to(hidden_states.dtype)

    ex._brownout_ep_prev_forward = prev
    ex.forward = brownout_ep_forward


def _install_router_ep_forward(ex: torch.nn.Module, router: torch.nn.Module, st: LayerState, pl: EPPlacement,
                               mesh) -> None:
    """Expert parallelism of older transformers (5.17, `enable_expert_parallel`): every rank runs the whole batch, the
    router's `ep_router` forward slices the routing to this rank's experts (global ids are gone before the experts
    see them), and an all-reduce after the experts sums the ranks. At r > 0 the router hands its global routing to
    the experts instead, which remap it, keep this rank's slab ids and all-reduce themselves."""
    prev_router, prev = router.forward, ex.forward
    L = pl.local_slabs
    skip = pl.num_experts + pl.num_groups
    rank_of, pos = pl.tables(st.expert_to_group.device)
    rank, group = mesh.get_local_rank(), mesh.get_group()
    local_forward = _local_forward(ex, st)
    routed: dict[str, torch.Tensor] = {}

    def brownout_router_forward(*args, **kwargs):
        if st.ratio == 0.0:
            return prev_router(*args, **kwargs)
        out = type(router).forward(router, *args, **kwargs)  # the global routing: (logits, weights, ids, ...)
        routed["weights"], routed["ids"] = out[1], out[2]
        return out

    def brownout_ep_forward(hidden_states, top_k_index, top_k_weights, *rest):
        if st.ratio == 0.0 or "ids" not in routed:
            return prev(hidden_states, top_k_index, top_k_weights, *rest)
        gids, gw = routed.pop("ids"), _local(routed.pop("weights"))
        x = _local(hidden_states)
        a = remap(gids, gw, st.expert_to_group, st.num_groups, st.ratio, st.policy)
        tr = token_ranks(gids.shape[0], pl.ep_size, None, gids.device)  # shared batch: split replicated work by rows
        ids, w = ep_ids(a.ids, a.weights, rank_of, pos, L, skip, tr)
        mine = torch.div(ids, L, rounding_mode="floor") == rank
        out = local_forward(x, torch.where(mine, ids - rank * L, L), torch.where(mine, w, torch.zeros_like(w)))
        torch.distributed.all_reduce(out, group=group)
        return out.to(x.dtype)

    router._brownout_ep_prev_forward, ex._brownout_ep_prev_forward = prev_router, prev
    router.forward, ex.forward = brownout_router_forward, brownout_ep_forward
    ex.__dict__["_brownout_router"] = router  # not a submodule: nn.Module.__setattr__ would register it


__all__ = ["attach", "place_united", "EPPlacement", "ep_ids", "token_ranks", "sharding_mode", "expert_parallel_config",
           "DistributedBrownoutMoE"]
