"""The brownout remap (runtime.policy.remap, policies hot-cold and drop) as Triton kernels: one launch at small T.

runtime.policy.remap is ~35 small PyTorch launches: 50-80 us even replayed from a CUDA graph, more than the whole
experts layer at decode (Qwen3-30B-A3B, T = 1: ~25 us of weight reads). These kernels compute the same remapped
routing (same ids, same weights up to the rounding of the dedup sums) with no host sync:

  counts per expert (histogram) -> hot set (an expert is hot iff the count of the experts ranked before it, by count
  desc then id asc, is below (1 - r) of the total, and it is active) -> cold experts of groups with >= 2 active cold
  members go to E + group -> table[top_k_index] -> per-token dedup (equal slabs: weights summed into the first slot,
  the rest skipped with id E + G). Policy `mass` falls back to runtime.policy.remap.

Two paths, the same ids and bit-identical weights (they share the table and per-token helpers; counts are exact):
  - up to MULTI_PROGRAM_SLOTS top-k slots, `_remap_kernel`: one program does everything, one launch;
  - above, two launches: `_count_kernel` (programs count slot chunks into partial histograms), then `_map_kernel`
    (one program per token block: sums the partials, builds the table, maps and dedups its block).
"""
from __future__ import annotations

import torch

from .. import policy as _policy
from ..ep_routing import EPRouting, ep_local_routing, token_chunk
from .pdl import launch_opts, pdl_start, use_pdl

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# Above this many top-k slots (T * k), the multi-program path: the single program walks every slot twice, so its time
# grows with T * k, while below a few blocks one launch beats two. H200 (eval/results/remap_bench_h200.md): at
# T * k = 32768 one program takes 47-54 us, two launches 6-10 us; up to 2048 slots one program is as fast or faster.
# Tests set it to force a path.
MULTI_PROGRAM_SLOTS = 2048
# Top-k slots one program holds at once: a [BT, KP] token block, and a histogram chunk. Tests shrink it.
BLOCK_SLOTS = 1024
# Cap on the counting programs (a power of two): every map program reads all their partial histograms.
MAX_COUNT_PROGRAMS = 32

if HAS_TRITON:

    @triton.jit
    def _count_slots(idx_ptr, first, step, n, CH: tl.constexpr, E_PAD: tl.constexpr):
        """[E_PAD] int32 assignments per expert over the slot chunks [c0, c0 + CH), c0 in range(first, n, step)."""
        offs = tl.arange(0, CH)
        er = tl.arange(0, E_PAD)
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        n_masked = tl.sum(tl.zeros([CH], dtype=tl.int32), 0)
        for c0 in range(first, n, step):  # masked lanes land in bin 0 and are taken off again
            o = c0 + offs
            e = tl.load(idx_ptr + o, mask=o < n, other=0).to(tl.int32)
            counts += tl.histogram(e, E_PAD)
            n_masked += tl.sum((o >= n).to(tl.int32), 0)
        return tl.where(er == 0, counts - n_masked, counts)

    @triton.jit
    def _table(counts, e2g_ptr, E, G, keep_ptr, E_PAD: tl.constexpr, DROP: tl.constexpr):
        """[E_PAD] int32 slab of each expert (E + G: skipped) from the assignments per expert."""
        skip = E + G
        er = tl.arange(0, E_PAD)
        counts = tl.where(er < E, counts, 0)
        # hot set: before[e] = assignments of the experts ranked ahead of e (count desc, id asc)
        cf = counts[:, None]
        ce = counts[None, :]
        ahead = (cf > ce) | ((cf == ce) & (er[:, None] < er[None, :]))
        before = tl.sum(tl.where(ahead, cf, 0), axis=0)
        # read from device memory, not a launch argument: a captured CUDA graph follows the ratio set after capture
        need = tl.load(keep_ptr) * tl.sum(counts, 0).to(tl.float32)
        hot = (before.to(tl.float32) < need) & (counts > 0)
        if DROP:
            table = tl.where(hot, er, skip)
        else:
            cold = (counts > 0) & (hot == 0)
            grp = tl.load(e2g_ptr + er, mask=er < E, other=-1).to(tl.int32)
            same_g = grp[:, None] == grp[None, :]
            cold_in_g = tl.sum((same_g & cold[:, None]).to(tl.int32), axis=0)
            united = cold & (cold_in_g >= 2)
            table = tl.where(united, E + grp, er)
        return table

    @triton.jit
    def _map_block(idx_ptr, w_ptr, ids_ptr, wout_ptr, table, t0, T, skip, rank_of_ptr, pos_ptr, L, RANK, CHUNK,
                   K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, DROP: tl.constexpr, EP: tl.constexpr):
        """Tokens [t0, t0 + BT): each slot through the table, dedup within the token, the EP epilogue; stored."""
        tt = tl.arange(0, BT)
        kk = tl.arange(0, KP)
        tok = t0 + tt
        m2 = (tok[:, None] < T) & (kk[None, :] < K)
        o2 = tok[:, None] * K + kk[None, :]
        e2 = tl.load(idx_ptr + o2, mask=m2, other=0).to(tl.int32)
        w2 = tl.load(w_ptr + o2, mask=m2, other=0.0)
        s2 = tl.reshape(tl.gather(table, tl.reshape(e2, [BT * KP]), 0), [BT, KP])
        if DROP:
            wo = tl.where(s2 == skip, tl.zeros_like(w2), w2)
            so = s2
        else:
            w2f = w2.to(tl.float32)
            dup = tl.zeros([BT, KP], dtype=tl.int32)
            summed = tl.zeros([BT, KP], dtype=tl.float32)
            for j in tl.static_range(K):
                sel = kk[None, :] == j
                sj = tl.sum(tl.where(sel, s2, 0), axis=1)
                wj = tl.sum(tl.where(sel, w2f, 0.0), axis=1)
                same = s2 == sj[:, None]
                dup = dup | (same & (kk[None, :] > j)).to(tl.int32)
                summed += tl.where(same, wj[:, None], 0.0)
            wo = tl.where(dup != 0, 0.0, summed)
            so = tl.where(dup != 0, skip, s2)
        if EP:  # runtime.ep_routing.ep_local_routing: this rank's local slab ids, L (skip) and weight 0 elsewhere
            is_skip = so == skip
            s_safe = tl.where(is_skip, 0, so)
            r = tl.load(rank_of_ptr + s_safe, mask=m2, other=0).to(tl.int32)
            r = tl.where(r < 0, (tok // CHUNK)[:, None], r)  # a replica: the rank of the token's row chunk
            mine = (r == RANK) & (is_skip == 0) & m2
            loc = tl.load(pos_ptr + s_safe, mask=mine, other=0).to(tl.int32)
            so = tl.where(mine, loc, L)
            wo = tl.where(mine, wo, tl.zeros_like(wo))
        tl.store(ids_ptr + o2, so.to(tl.int64), mask=m2)
        tl.store(wout_ptr + o2, wo.to(wout_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _remap_kernel(idx_ptr, w_ptr, e2g_ptr, ids_ptr, wout_ptr, T, E, G, keep_ptr,
                      rank_of_ptr, pos_ptr, L, RANK, CHUNK,
                      K: tl.constexpr, KP: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr, DROP: tl.constexpr,
                      EP: tl.constexpr, USE_PDL: tl.constexpr):
        """The whole remap in one program (grid (1,)): small T."""
        pdl_start(USE_PDL)  # the router's top-k is the kernel before
        CH: tl.constexpr = BT * KP
        counts = _count_slots(idx_ptr, 0, CH, T * K, CH, E_PAD)
        table = _table(counts, e2g_ptr, E, G, keep_ptr, E_PAD, DROP)
        for t0 in range(0, T, BT):
            _map_block(idx_ptr, w_ptr, ids_ptr, wout_ptr, table, t0, T, E + G, rank_of_ptr, pos_ptr, L, RANK, CHUNK,
                       K, KP, BT, DROP, EP)

    @triton.jit
    def _count_kernel(idx_ptr, part_ptr, n, P: tl.constexpr, CH: tl.constexpr, E_PAD: tl.constexpr,
                      USE_PDL: tl.constexpr):
        """Multi-program path, stage 1: program p counts chunks p, p + P, ... into row p of the partial histograms.
        Every row is written whole, so the buffer needs no zeroing (no extra launch), no atomics, and the counts
        come out the same whatever the order the programs run in."""
        pdl_start(USE_PDL)  # the router's top-k is the kernel before
        p = tl.program_id(0)
        counts = _count_slots(idx_ptr, p * CH, P * CH, n, CH, E_PAD)
        tl.store(part_ptr + p * E_PAD + tl.arange(0, E_PAD), counts)

    @triton.jit
    def _map_kernel(idx_ptr, w_ptr, e2g_ptr, part_ptr, ids_ptr, wout_ptr, T, E, G, keep_ptr,
                    rank_of_ptr, pos_ptr, L, RANK, CHUNK, P: tl.constexpr,
                    K: tl.constexpr, KP: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr, DROP: tl.constexpr,
                    EP: tl.constexpr, USE_PDL: tl.constexpr):
        """Multi-program path, stage 2: one program per token block. Each builds the table itself from the P
        partial histograms (a [P, E_PAD] read and an [E_PAD, E_PAD] compare, E <= 128): a table kernel instead would
        be a third launch and one more wait in the chain, and no block can be mapped before the table anyway."""
        pdl_start(USE_PDL)  # the counting kernel is the one before
        parts = tl.load(part_ptr + tl.arange(0, P)[:, None] * E_PAD + tl.arange(0, E_PAD)[None, :])
        table = _table(tl.sum(parts, axis=0), e2g_ptr, E, G, keep_ptr, E_PAD, DROP)
        _map_block(idx_ptr, w_ptr, ids_ptr, wout_ptr, table, tl.program_id(0) * BT, T, E + G, rank_of_ptr, pos_ptr,
                   L, RANK, CHUNK, K, KP, BT, DROP, EP)


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def remap(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_to_group: torch.Tensor, num_groups: int,
          ratio: float, policy: str = "hot-cold", keep: torch.Tensor | None = None,
          ep: EPRouting | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [T, k] int64 over E + G slabs, E + G = skip; weights [T, k]) as runtime.policy.remap gives them.

    `keep` (optional): a float32 [1] device tensor holding 1 - ratio (`runtime.policy.keep_tensor`), read by the
    kernel at run time, so one captured CUDA graph serves every ratio written into it later. Then `ratio` only picks
    the fallbacks.

    `ep` (optional, expert parallelism over a shared batch): the ids come out as this rank's local slab ids, in the
    same launches, as `runtime.ep_routing.ep_local_routing` of the remap gives them."""
    _policy.check_policy(policy)
    if ep is None and keep is None and float(ratio) == 0.0:  # every active expert is hot: the identity
        return top_k_index.long(), top_k_weights
    if policy == "mass" or not HAS_TRITON or top_k_index.numel() == 0:
        a = _policy.remap(top_k_index, top_k_weights, expert_to_group, num_groups, ratio, policy)
        return (a.ids, a.weights) if ep is None else ep_local_routing(a.ids, a.weights, ep)
    T, k = top_k_index.shape
    E = expert_to_group.numel()
    idx = top_k_index.contiguous()
    w = top_k_weights.contiguous()
    e2g = expert_to_group.to(device=idx.device).contiguous()
    ids = torch.empty(T, k, dtype=torch.int64, device=idx.device)
    wout = torch.empty_like(w)
    kp = _pow2(k)
    bt = max(1, min(_pow2(T), BLOCK_SLOTS // kp))
    e_pad = max(2, _pow2(E))
    if keep is None:
        keep = _policy.keep_tensor(ratio, idx.device)
    if ep is not None:
        rank_of, pos, L, rank, chunk = ep.rank_of, ep.pos[ep.rank], ep.local_slabs, ep.rank, token_chunk(T, ep.ep_size)
    else:  # unused by the kernels
        rank_of, pos, L, rank, chunk = e2g, e2g, 0, 0, 1
    shape = dict(K=k, KP=kp, E_PAD=e_pad, BT=bt, DROP=(policy == "drop"), EP=ep is not None)
    warps = 8 if e_pad >= 128 else 4  # the [E_PAD, E_PAD] compare of the table
    opts = launch_opts(use_pdl(idx.device))
    if T * k <= MULTI_PROGRAM_SLOTS:
        _remap_kernel[(1,)](idx, w, e2g, ids, wout, T, E, num_groups, keep, rank_of, pos, L, rank, chunk,
                            **shape, num_warps=warps, **opts)
        return ids, wout
    n_count = min(_pow2(triton.cdiv(T * k, bt * kp)), MAX_COUNT_PROGRAMS)  # a power of two: a tl.arange length
    partial = torch.empty(n_count, e_pad, dtype=torch.int32, device=idx.device)
    _count_kernel[(n_count,)](idx, partial, T * k, P=n_count, CH=bt * kp, E_PAD=e_pad, num_warps=4, **opts)
    _map_kernel[(triton.cdiv(T, bt),)](idx, w, e2g, partial, ids, wout, T, E, num_groups, keep, rank_of, pos, L,
                                      rank, chunk, P=n_count, **shape, num_warps=warps, **opts)
    return ids, wout
