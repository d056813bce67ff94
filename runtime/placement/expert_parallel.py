"""The united tier under transformers' expert parallelism: rank r holds originals [r*E/ep, (r+1)*E/ep).

Each group's united expert goes on the rank that holds most of its members (`place_united`); a group with no majority
rank is replicated on every rank while a memory budget lasts, and otherwise goes to the least-loaded tied rank. Each
rank's local slabs are [its E/ep originals; its united experts; zero padding up to the largest count], so the slab
space stays "rank r owns a contiguous range of L ids", which transformers' EP implementations assume.

The policy runs on the *global* routing (docs/design.md §4: every rank computes the same remap from the same router
output), so a sharded model at ratio r computes what the single-device model computes, up to the order of sums.
Two flavours of transformers' EP, detected per layer:

- "ep" (`ep_size`, an `ep_dispatch_experts` forward with an EPImplementation: all-reduce or all-to-all): the remap
  runs on global ids *before* dispatch (the experts' own forward only sees local ids, too late for a global policy).
  Under the all-reduce scheme (every rank holds the whole batch: AllReduceEP, AutoEP at inference) the remap gives
  this rank's local slab ids directly (`runtime.ep_routing`; with triton in the remap's own launch), the local slabs
  run, and the forward all-reduces. Otherwise (all-to-all) its slab ids become EP slab ids (`ep_ids`), and a copy of
  the model's own EP implementation with the slab count changed moves the tokens.
- "ep-router" (older transformers, 5.17: `enable_expert_parallel`): no dispatch rule; every rank runs the whole batch,
  an `ep_router` forward slices the router's output to local ids and the experts all-reduce. At r > 0 the router
  hands its global routing to the experts, which remap it to this rank's local slab ids (as above) and all-reduce.

Ratio 0 calls the untouched EP forward: the sharded model bit for bit; in graph-safe mode ratio 0 runs the brownout
path too (as on one device), so a CUDA graph captured at any ratio follows `set_ratio`. The local slabs are computed
by the layer's backend over [local originals; local united; padding], off-rank slots being the slab count: the fused
kernel's skip id (triton), or transformers' sentinel (grouped, reference). With triton the remap is the one-launch
kernel reading the ratio from device memory; no host sync before the dispatch (transformers' all-to-all then reads
its split sizes on the host; the all-reduce schemes do not).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import BrownoutError
from ..ep_routing import EPRouting, row_ranks
from .base import Placement, closure, is_dtensor, local_tensor

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


def check_replicate(replicate):
    """`replicate` if it is "auto", "none", "all" or a budget >= 0, else BrownoutError."""
    if replicate in ("auto", "none", "all"):
        return replicate
    if isinstance(replicate, bool) or not isinstance(replicate, (int, float)) or not 0.0 <= float(replicate):
        raise BrownoutError(f"replicate must be 'auto', 'none', 'all' or a budget >= 0, got {replicate!r}")
    return replicate


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
    replicate = check_replicate(replicate)
    if replicate == "all":
        return EPPlacement(E, ep_size, e2g, [-1] * G, [list(range(G)) for _ in range(ep_size)])
    budget = {"auto": DEFAULT_REPLICATE_BUDGET, "none": 0.0}.get(replicate, replicate)
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
    return row_ranks(num_tokens, ep_size, device)


# -- transformers' EP, as installed on a loaded model ----------------------------------------------------------------
def shards_experts(p) -> bool:
    """A DTensor sharded on dim 0 (the expert dimension) over a one-dimensional mesh."""
    return (is_dtensor(p) and p.device_mesh.ndim == 1 and len(p.placements) == 1
            and type(p.placements[0]).__name__ == "Shard" and p.placements[0].dim == 0)


def ep_router(block: torch.nn.Module):
    """Older transformers' expert parallelism (5.17): the router whose forward an `ep_router` style wraps, or None."""
    for m in block.children():
        if closure(m.__dict__.get("forward")).get("self").__class__.__name__ == "EpRouterParallel":
            return m
    return None


def is_router_ep_experts(experts: torch.nn.Module) -> bool:
    """Experts sharded by expert under 5.17's `enable_expert_parallel` (a `MoeExpertsParallel` forward)."""
    p = experts._parameters.get("gate_up_proj")
    return shards_experts(p) and closure(experts.__dict__.get("forward")).get("self").__class__.__name__ \
        == "MoeExpertsParallel"


def ep_implementation(experts: torch.nn.Module):
    """The EPImplementation transformers installed on an `ep_dispatch_experts` module, or None."""
    cells = closure(experts.__dict__.get("forward"))
    if not cells:
        return None
    try:
        from transformers.distributed.expert_parallel import EPImplementation
    except Exception:
        return None
    impl = cells.get("implementation")
    return impl if isinstance(impl, EPImplementation) else None


def _retarget(impl, local_slabs: int, forward):
    """A copy of a transformers EPImplementation that runs `forward` over `local_slabs` slabs per rank."""
    if type(impl).__name__ == "MegaMoeEP" or getattr(impl, "megamoe", None) is not None:
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
    from transformers.distributed import DistributedConfig

    fields = {f.name for f in dataclasses.fields(DistributedConfig)}
    if "ep_size" in fields:
        return DistributedConfig(tp_size=size, ep_size=size, ep_implementation=implementation)
    if implementation not in ("auto", "all_reduce"):
        raise BrownoutError(f"expert-parallel implementation {implementation!r} needs a transformers whose "
                            f"DistributedConfig has ep_size (this one has only enable_expert_parallel)")
    return DistributedConfig(tp_size=size, enable_expert_parallel=True)


# -- the strategy ------------------------------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    mode: str  # "ep" or "ep-router"
    placement: EPPlacement
    rank: int
    mesh: object
    impl: object  # the EPImplementation ("ep") or the router module ("ep-router")


class ExpertParallelPlacement(Placement):
    """`modes[i]` ("ep" or "ep-router") per united layer; `placements[i]`: where layer i's united experts live."""

    name = "ep"

    def __init__(self, modes: dict[int, str], replicate="auto"):
        self.modes = dict(modes)
        self.replicate = check_replicate(replicate)
        self.plans: dict[int, _LayerPlan] = {}
        self.restore: dict[int, list[tuple[torch.nn.Module, object]]] = {}  # module, forward it had before install

    @property
    def placements(self) -> dict[int, EPPlacement]:
        return {i: p.placement for i, p in self.plans.items()}

    def mode(self, layer: int) -> str:
        return self.modes[layer]

    def check(self, layer, united, expert_to_group):
        i, ex = layer.index, layer.experts
        for k in united:
            if not shards_experts(ex._parameters.get(k)):
                raise BrownoutError(f"layer {i}: {k} is not sharded by expert over one EP mesh dimension "
                                    f"(expert FSDP is not supported with brownout)")
        if self.modes[i] == "ep":
            impl = ep_implementation(ex)
            mesh = impl.ep_mesh
        else:  # the all-reduce scheme of older transformers; the mesh is the experts' own
            impl = ep_router(layer.block)
            if impl is None:
                raise BrownoutError(f"layer {i}: experts are sharded by expert but no `ep_router` router was found in "
                                    f"{type(layer.block).__name__}")
            mesh = ex._parameters["gate_up_proj"].device_mesh
        pl = place_united(expert_to_group, mesh.size(), self.replicate)
        self.plans[i] = _LayerPlan(self.modes[i], pl, mesh.get_local_rank(), mesh, impl)

    def build(self, layer, united, expert_to_group):
        plan = self.plans[layer.index]
        pl, slabs = plan.placement, {}
        for k, u in united.items():
            loc = layer.experts._parameters[k].to_local()
            u = u.to(loc.device, loc.dtype)[pl.local[plan.rank]]
            pad = loc.new_zeros((pl.united_slots - u.shape[0],) + tuple(loc.shape[1:]))
            slabs[k] = torch.cat([loc, u, pad])
        return slabs

    def front(self, layer):
        return self.plans[layer.index].placement.local_experts

    def install(self, layer, state):
        super().install(layer, state)
        plan = self.plans[layer.index]
        if plan.mode == "ep":
            self.restore[layer.index] = [(layer.experts, layer.experts.forward)]
            layer.experts.forward = _ep_forward(layer.experts, state, plan)
        else:
            router = plan.impl
            self.restore[layer.index] = [(layer.experts, layer.experts.forward), (router, router.forward)]
            router.forward, layer.experts.forward = _router_ep_forwards(layer.experts, router, state, plan)

    def uninstall(self, layer, state):
        for module, forward in self.restore.pop(layer.index, []):
            module.forward = forward
        super().uninstall(layer, state)


def _passthrough(st) -> bool:
    """Ratio 0 outside graph-safe mode: the sharded model's own EP forward (experts_impl's rule, on one device)."""
    return st.ratio.off and not st.graph_safe


def _local_forward(ex: torch.nn.Module, st):
    """This rank's slabs on local slab ids through the layer's backend; id L (the off-rank sentinel) is skipped."""

    def local_forward(hidden_states, local_ids, weights):
        return st.backend.run(ex, st.slabs, hidden_states, local_ids, weights, sentinels=True)

    return local_forward


def _routing(st, plan: _LayerPlan) -> EPRouting:
    pl = plan.placement
    rank_of, pos = pl.tables(st.expert_to_group.device)
    return EPRouting(rank_of, pos, pl.local_slabs, plan.rank, pl.ep_size)


def _shared_batch_all_reduce(impl) -> bool:
    """Whether `impl` runs transformers' all-reduce scheme at inference: every rank holds the whole batch, runs its
    own experts, and an all-reduce sums the ranks (AllReduceEP, or AutoEP where it picks it)."""
    name = type(impl).__name__
    if name == "AllReduceEP":
        return True
    return (name == "AutoEP" and getattr(impl, "all_reduce", None) is not None
            and getattr(impl, "megamoe", None) is None)


def _ep_forward(ex: torch.nn.Module, st, plan: _LayerPlan):
    """Wrap transformers' EP forward: remap on global ids, then dispatch over the EP slab space. Under the all-reduce
    scheme at inference the remap gives this rank's local ids in the same launch (runtime.ep_routing) and the forward
    runs the slabs and the all-reduce itself: transformers' id masking (about 5 launches) and the id translation
    (about 10) are gone from every layer."""
    prev = ex.forward  # the ep_forward transformers installed (instance attribute)
    pl, impl = plan.placement, plan.impl
    L = pl.local_slabs
    routing = _routing(st, plan)
    group = impl.ep_mesh.get_group() if _shared_batch_all_reduce(impl) else None
    # ranks holding different batches (all-to-all without TP) send replicated work to themselves
    own = plan.rank if (not impl.shares_batch and impl.tp_mesh.size() == 1) else None
    dispatch = _retarget(impl, L, _local_forward(ex, st))

    def brownout_ep_forward(hidden_states, top_k_index, top_k_weights):
        if _passthrough(st):
            return prev(hidden_states, top_k_index, top_k_weights)
        hidden_states, top_k_weights = local_tensor(hidden_states), local_tensor(top_k_weights)
        if group is not None and not (torch.is_grad_enabled() and hidden_states.requires_grad):
            ids, w = st.backend.ep_remap(st, top_k_index, top_k_weights, routing)
            out = st.backend.run(ex, st.slabs, hidden_states, ids, w)
            torch.distributed.all_reduce(out, group=group)
            return out.to(hidden_states.dtype)
        ids, w = st.backend.remap(st, top_k_index, top_k_weights)
        tr = token_ranks(top_k_index.shape[0], pl.ep_size, own, top_k_index.device)
        ids, w = ep_ids(ids, w, routing.rank_of, routing.pos, L, routing.skip, tr)
        return dispatch(hidden_states, ids, w).to(hidden_states.dtype)

    return brownout_ep_forward


def _router_ep_forwards(ex: torch.nn.Module, router: torch.nn.Module, st, plan: _LayerPlan):
    """Expert parallelism of older transformers (5.17, `enable_expert_parallel`): every rank runs the whole batch, the
    router's `ep_router` forward slices the routing to this rank's experts (global ids are gone before the experts
    see them), and an all-reduce after the experts sums the ranks. At r > 0 the router hands its global routing to
    the experts instead, which remap it, keep this rank's slab ids and all-reduce themselves."""
    prev_router, prev = router.forward, ex.forward
    routing = _routing(st, plan)
    group = plan.mesh.get_group()
    routed: dict[str, torch.Tensor] = {}

    def brownout_router_forward(*args, **kwargs):
        if _passthrough(st):
            return prev_router(*args, **kwargs)
        out = type(router).forward(router, *args, **kwargs)  # the global routing: (logits, weights, ids, ...)
        routed["weights"], routed["ids"] = out[1], out[2]
        return out

    def brownout_ep_forward(hidden_states, top_k_index, top_k_weights, *rest):
        if _passthrough(st) or "ids" not in routed:
            return prev(hidden_states, top_k_index, top_k_weights, *rest)
        gids, gw = routed.pop("ids"), local_tensor(routed.pop("weights"))
        x = local_tensor(hidden_states)
        ids, w = st.backend.ep_remap(st, gids, gw, routing)  # this rank's local slab ids (shared batch)
        out = st.backend.run(ex, st.slabs, x, ids, w)
        torch.distributed.all_reduce(out, group=group)
        return out.to(x.dtype)

    return brownout_router_forward, brownout_ep_forward
