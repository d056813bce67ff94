"""Fused two-tier MoE experts forward in Triton (docs/design.md §6).

One call computes out[t] = sum_j weights[t, j] * Slab_{ids[t, j]}(x[t]) over S weight slabs (the layer's E original
experts followed by its G united experts, concatenated), slab id S meaning "skip this slot". Layout: non-transposed,
concatenated gate/up, SiLU gate, no bias:

    gate_up [S, 2I, H] (rows 0..I-1 gate, I..2I-1 up)      down [S, H, I]

Slab(x) = down @ (silu(gate @ x) * (up @ x)).

Two paths, both free of host synchronisation and with shapes fixed by (T, k, S) alone, so a whole call can be
captured in a CUDA graph:

* decode (few slots, T*k <= a threshold): no alignment at all. A program per (slot, N tile); the program of the first
  slot that uses a slab (the "leader") gathers every slot on that slab as its rows (M = T*k padded to >= 16) and
  streams the slab's weight tile once; the other slots' programs exit at once. 2 GEMM launches + the top-k sum.
* prefill: vLLM-style alignment by slab on the GPU, then grouped GEMMs over BLOCK_M-row blocks of one slab each. Up
  to ALIGN_ONE_MAX_SLOTS slots the alignment is one program (histogram, scan, sort of (slab, slot) keys); above, a
  counts memset and two kernels (rank-by-atomic + sentinel fill, scan-and-scatter).

Stages: gate/up GEMM with silu(g)*u in the epilogue -> [T*k, I] intermediate; down GEMM with the routing weight
multiplied in -> either [T*k, H] per-slot rows then a sum over k (deterministic, "store"), or fp32 atomics into a
[T, H] buffer then a cast ("atomic").

Tile configs per (H, I, k) and T bucket live in a table per GPU model (`runtime.kernels.configs`), one per bucket for
every ratio (a CUDA graph freezes the config it captured while the ratio keeps moving); a config may take its weight
tiles through TMA tensor descriptors ("tma"), and in prefill its activation rows too ("sorted_rows": x's rows copied
in slab order by one more kernel, the intermediate kept in that order). Nsight Compute found the gathered row loads
to be what the GEMMs' warps wait on most (eval/results/kernel_ncu_h200.md); the copy pays off only at large T (the
H200's tuner took it at T = 4096 only). With gathered rows, a prefill row block with at most half its rows live (a
slab's last) may run a half-height tile ("half_tail"). On Hopper and newer every kernel launches with programmatic
dependent launch (`runtime.kernels.pdl`): it may start while the previous kernel finishes and waits for it before its
first access.
"""
from __future__ import annotations

import functools
import os

import torch

from ..layout import is_plain_silu_layout
from . import configs
from .pdl import launch_opts, pdl_start, use_pdl

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        HAS_TMA = True
    except ImportError:  # pragma: no cover - older triton: pointer loads only
        HAS_TMA = False
except ImportError:  # pragma: no cover - the CPU path does not need triton
    triton = None
    tl = None
    HAS_TRITON = HAS_TMA = False

T_BUCKETS = (1, 8, 32, 128, 512, 4096)

if HAS_TRITON:

    @triton.jit
    def _align_rank_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, num_slots, max_padded, S,
                           BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Fill the padded sorted list with the sentinel (num_slots) and give every live slot its rank in its slab."""
        pdl_start(USE_PDL)
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32) + num_slots, mask=offs < max_padded)
        m = offs < num_slots
        s = tl.load(ids_ptr + offs, mask=m, other=S).to(tl.int32)
        live = m & (s < S)
        r = tl.atomic_add(counts_ptr + s, tl.full([BLOCK], 1, tl.int32), mask=live)
        tl.store(rank_ptr + offs, r, mask=live)

    @triton.jit
    def _align_scatter_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, block_slab_ptr, total_ptr, num_slots, S,
                              BLOCK_M: tl.constexpr, S_PAD: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        """Exclusive scan of the BLOCK_M-padded counts (every program redoes it: S is small), then scatter."""
        pdl_start(USE_PDL)
        pid = tl.program_id(0)
        sl = tl.arange(0, S_PAD)
        c = tl.load(counts_ptr + sl, mask=sl < S, other=0)
        padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        excl = tl.cumsum(padded, 0) - padded
        if pid == 0:
            tl.store(total_ptr, tl.sum(padded, 0))
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < num_slots
        s = tl.load(ids_ptr + offs, mask=m, other=S).to(tl.int32)
        live = m & (s < S)
        r = tl.load(rank_ptr + offs, mask=live, other=0)
        pos = tl.gather(excl, tl.where(live, s, 0), 0) + r
        tl.store(sorted_ptr + pos, offs.to(tl.int32), mask=live)
        # the slot of rank 0 mod BLOCK_M opens a block: it names the block's slab
        tl.store(block_slab_ptr + pos // BLOCK_M, s, mask=live & (r % BLOCK_M == 0))

    @triton.jit
    def _align_one_kernel(ids_ptr, sorted_ptr, block_slab_ptr, total_ptr, num_slots, max_padded, S,
                          BLOCK_M: tl.constexpr, S_PAD: tl.constexpr, N_PAD: tl.constexpr, USE_PDL: tl.constexpr):
        """The whole alignment in one program, no atomics: a histogram, the scan, and a sort of (slab, slot) keys
        give every live slot its place (stable: slots of a slab keep their order). Skipped slots key as slab S, which
        sorts last and is not stored. One launch where the two-kernel path takes a memset and two."""
        pdl_start(USE_PDL)
        offs = tl.arange(0, N_PAD)
        m = offs < num_slots
        s = tl.load(ids_ptr + offs, mask=m, other=S).to(tl.int32)
        s = tl.where(m & (s < S), s, S)  # dead (skipped or past the end) -> S; S < S_PAD
        counts = tl.histogram(s, S_PAD)
        sl = tl.arange(0, S_PAD)
        padded = tl.where(sl < S, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
        excl = tl.cumsum(padded, 0) - padded  # first padded position of each slab
        first = tl.cumsum(counts, 0) - counts  # first sorted position of each slab, unpadded
        tl.store(total_ptr, tl.sum(padded, 0))
        for i in range(0, max_padded, N_PAD):  # the sentinel everywhere first; the slots overwrite theirs
            f = i + offs
            tl.store(sorted_ptr + f, tl.zeros([N_PAD], dtype=tl.int32) + num_slots, mask=f < max_padded)
        tl.debug_barrier()  # the fill's stores before the scatter's, within the one program
        key = tl.sort(s * N_PAD + offs)  # by slab, then by slot
        ks = key // N_PAD
        live = ks < S
        ksc = tl.where(live, ks, 0)
        rank = offs - tl.gather(first, ksc, 0)  # offs: the sorted position
        pos = tl.gather(excl, ksc, 0) + rank
        tl.store(sorted_ptr + pos, key % N_PAD, mask=live)
        tl.store(block_slab_ptr + pos // BLOCK_M, ks, mask=live & (rank % BLOCK_M == 0))

    @triton.jit
    def _rows(pid, ids_ptr, sorted_ptr, block_slab_ptr, total_ptr, num_slots, S, num_n,
              DECODE: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, NUM_M):
        """-> (slab, slot rows [BLOCK_M], row mask, pid_m, pid_n, active)."""
        rows = tl.arange(0, BLOCK_M)
        if DECODE:
            pid_m = pid // num_n
            pid_n = pid % num_n
            all_ids = tl.load(ids_ptr + rows, mask=rows < num_slots, other=S).to(tl.int32)
            s = tl.load(ids_ptr + pid_m).to(tl.int32)
            dup = tl.sum(((all_ids == s) & (rows < pid_m)).to(tl.int32), 0)
            active = (s < S) & (dup == 0)
            slot = rows
            row_mask = all_ids == s
        else:
            # grouped ordering: GROUP_M row blocks share the N sweep (weights of a slab stay in L2)
            num_in_group = GROUP_M * num_n
            group = pid // num_in_group
            first_m = group * GROUP_M
            size_m = tl.minimum(NUM_M - first_m, GROUP_M)
            pid_m = first_m + ((pid % num_in_group) % size_m)
            pid_n = (pid % num_in_group) // size_m
            total = tl.load(total_ptr)
            active = pid_m * BLOCK_M < total
            s = tl.load(block_slab_ptr + pid_m)  # pid_m < NUM_M: in bounds; garbage past `total`, unused
            slot = tl.load(sorted_ptr + pid_m * BLOCK_M + rows)
            row_mask = slot < num_slots
        return s, slot, row_mask, pid_m, pid_n, active

    @triton.jit
    def _load_rows(ptrs, row_mask, offs_k, k_left, EVEN_K: tl.constexpr):
        """The [BLOCK_M, BLOCK_K] activation tile of one K step: gathered rows, masked past K unless K is even."""
        if EVEN_K:
            a = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            a = tl.load(ptrs, mask=row_mask[:, None] & (offs_k < k_left)[None, :], other=0.0)
        return a

    @triton.jit
    def _a_tile(desc, ptrs, row_mask, offs_k, pid_m, k0, K, SORTED: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr):
        """A GEMM's [BLOCK_M, BLOCK_K] activation tile at K step k0: the block's rows through the descriptor (rows
        already in slab order) or gathered by slot."""
        if SORTED:
            a = desc.load([pid_m * BLOCK_M, k0])
        else:
            a = _load_rows(ptrs, row_mask, offs_k, K - k0, EVEN_K)
        return a

    @triton.jit
    def _gate_up_tile(x_ptr, x_desc, w_ptr, w_desc, inter_ptr, s, slot, row_mask, pid_m, pid_n, N, K,
                      stride_xm, stride_ws, stride_wn, stride_im, top_k, EVEN_K: tl.constexpr, TMA: tl.constexpr,
                      SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program's tile of `_gate_up_kernel` over the BLOCK_M rows `slot` (those of row_mask live)."""
        token = slot // top_k
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_nc = tl.where(n_mask, offs_n, 0)
        x_ptrs = x_ptr + token[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        wg_ptrs = w_ptr + s.to(tl.int64) * stride_ws + offs_nc[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        wu_ptrs = wg_ptrs + N * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        row_g = s * (2 * N) + pid_n * BLOCK_N
        for k0 in range(0, K, BLOCK_K):
            a = _a_tile(x_desc, x_ptrs, row_mask, offs_k, pid_m, k0, K, SORTED, EVEN_K, BLOCK_M)
            if TMA:
                bg = w_desc.load([row_g, k0]).T
                bu = w_desc.load([row_g + N, k0]).T
            elif EVEN_K:
                bg = tl.load(wg_ptrs)
                bu = tl.load(wu_ptrs)
            else:
                k_mask = offs_k < K - k0
                bg = tl.load(wg_ptrs, mask=k_mask[:, None], other=0.0)
                bu = tl.load(wu_ptrs, mask=k_mask[:, None], other=0.0)
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        if SORTED:  # every row of the block, padding too (zeros: its activation rows were): no stale rows
            i_ptrs = inter_ptr + (pid_m * BLOCK_M + tl.arange(0, BLOCK_M))[:, None].to(tl.int64) * stride_im \
                + offs_n[None, :]
            tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=n_mask[None, :])
        else:
            i_ptrs = inter_ptr + slot[:, None].to(tl.int64) * stride_im + offs_n[None, :]
            tl.store(i_ptrs, h.to(inter_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _gate_up_kernel(x_ptr, x_desc, w_ptr, w_desc, inter_ptr, ids_ptr, sorted_ptr, block_slab_ptr, total_ptr,
                        num_slots, S, N, K, NUM_M,
                        stride_xm, stride_ws, stride_wn, stride_im,
                        top_k, DECODE: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr, SORTED: tl.constexpr,
                        HALF_TAIL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        USE_PDL: tl.constexpr):
        """inter[slot, n] = silu(gate_s[n] . x[tok]) * (up_s[n] . x[tok]); N = I, K = H.
        HALF_TAIL (prefill, not SORTED): a row block with at most BLOCK_M / 2 live rows (the end of a slab's rows:
        alignment puts them first) computes only its first half, so the padding costs half the MMA work.
        TMA: the weight tiles come through a tensor descriptor over gate_up viewed [S * 2N, K] (the copy engine; rows
        past a half or the end are other rows or zeros, and only feed the masked-off columns).
        SORTED (prefill, with TMA): the activation rows too, from x_desc over the rows already copied in slab order
        (`_gather_rows_kernel`); inter is then written in that order (row = aligned position), for the down GEMM
        to read the same way."""
        pdl_start(USE_PDL)  # the ids / alignment come from the kernel just before
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        s, slot, row_mask, pid_m, pid_n, active = _rows(pid, ids_ptr, sorted_ptr, block_slab_ptr, total_ptr,
                                                        num_slots, S, num_n, DECODE, BLOCK_M, GROUP_M, NUM_M)
        if active:
            if HALF_TAIL:  # a block with at most half its rows live (a slab's last) runs as a half-height tile
                if tl.sum(row_mask.to(tl.int32), 0) <= BLOCK_M // 2:
                    half = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M // 2))
                    _gate_up_tile(x_ptr, x_desc, w_ptr, w_desc, inter_ptr, s, half, half < num_slots, pid_m, pid_n,
                                  N, K, stride_xm, stride_ws, stride_wn, stride_im, top_k, EVEN_K, TMA, SORTED,
                                  BLOCK_M // 2, BLOCK_N, BLOCK_K)
                else:
                    _gate_up_tile(x_ptr, x_desc, w_ptr, w_desc, inter_ptr, s, slot, row_mask, pid_m, pid_n, N, K,
                                  stride_xm, stride_ws, stride_wn, stride_im, top_k, EVEN_K, TMA, SORTED, BLOCK_M,
                                  BLOCK_N, BLOCK_K)
            else:
                _gate_up_tile(x_ptr, x_desc, w_ptr, w_desc, inter_ptr, s, slot, row_mask, pid_m, pid_n, N, K,
                              stride_xm, stride_ws, stride_wn, stride_im, top_k, EVEN_K, TMA, SORTED, BLOCK_M,
                              BLOCK_N, BLOCK_K)

    @triton.jit
    def _down_tile(inter_ptr, i_desc, w_ptr, w_desc, out_ptr, weights_ptr, s, slot, row_mask, pid_m, pid_n, N, K,
                   stride_im, stride_ws, stride_wn, stride_om, top_k, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr,
                   TMA: tl.constexpr, SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """One program's tile of `_down_kernel` over the BLOCK_M rows `slot` (those of row_mask live)."""
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_nc = tl.where(n_mask, offs_n, 0)
        a_ptrs = inter_ptr + slot[:, None].to(tl.int64) * stride_im + offs_k[None, :]
        b_ptrs = w_ptr + s.to(tl.int64) * stride_ws + offs_nc[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        row_d = s * N + pid_n * BLOCK_N  # TMA: down viewed [S * N, K]
        for k0 in range(0, K, BLOCK_K):
            a = _a_tile(i_desc, a_ptrs, row_mask, offs_k, pid_m, k0, K, SORTED, EVEN_K, BLOCK_M)
            if TMA:
                b = w_desc.load([row_d, k0]).T
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=(offs_k < K - k0)[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        rw = tl.load(weights_ptr + slot, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * rw[:, None]
        mask = row_mask[:, None] & n_mask[None, :]
        if ATOMIC:
            token = slot // top_k
            o_ptrs = out_ptr + token[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.atomic_add(o_ptrs, acc, mask=mask, sem="relaxed")
        else:
            o_ptrs = out_ptr + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _down_kernel(inter_ptr, i_desc, w_ptr, w_desc, out_ptr, weights_ptr, ids_ptr, sorted_ptr, block_slab_ptr,
                     total_ptr, num_slots, S, N, K, NUM_M,
                     stride_im, stride_ws, stride_wn, stride_om,
                     top_k, DECODE: tl.constexpr, EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, TMA: tl.constexpr,
                     SORTED: tl.constexpr, HALF_TAIL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     USE_PDL: tl.constexpr):
        """y[slot, n] = weights[slot] * (down_s[n] . inter[slot]); N = H, K = I. Store per slot, or atomically per token.
        SORTED: inter's rows are in aligned order (as `_gate_up_kernel` wrote them), read through i_desc."""
        pdl_start(USE_PDL)  # waits for `inter`; nothing is read before (no stale-cache questions)
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        s, slot, row_mask, pid_m, pid_n, active = _rows(pid, ids_ptr, sorted_ptr, block_slab_ptr, total_ptr,
                                                        num_slots, S, num_n, DECODE, BLOCK_M, GROUP_M, NUM_M)
        if active:
            if HALF_TAIL:  # as in `_gate_up_kernel`
                if tl.sum(row_mask.to(tl.int32), 0) <= BLOCK_M // 2:
                    half = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M // 2))
                    _down_tile(inter_ptr, i_desc, w_ptr, w_desc, out_ptr, weights_ptr, s, half, half < num_slots,
                               pid_m, pid_n, N, K, stride_im, stride_ws, stride_wn, stride_om, top_k, EVEN_K, ATOMIC,
                               TMA, SORTED, BLOCK_M // 2, BLOCK_N, BLOCK_K)
                else:
                    _down_tile(inter_ptr, i_desc, w_ptr, w_desc, out_ptr, weights_ptr, s, slot, row_mask, pid_m, pid_n,
                               N, K, stride_im, stride_ws, stride_wn, stride_om, top_k, EVEN_K, ATOMIC, TMA, SORTED,
                               BLOCK_M, BLOCK_N, BLOCK_K)
            else:
                _down_tile(inter_ptr, i_desc, w_ptr, w_desc, out_ptr, weights_ptr, s, slot, row_mask, pid_m, pid_n, N,
                           K, stride_im, stride_ws, stride_wn, stride_om, top_k, EVEN_K, ATOMIC, TMA, SORTED, BLOCK_M,
                           BLOCK_N, BLOCK_K)

    @triton.jit
    def _gather_rows_kernel(x_ptr, sorted_ptr, total_ptr, xs_ptr, num_slots, H, stride_xm, stride_sm, top_k,
                            BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
        """xs[p] = x[token of the slot at aligned position p] for one BLOCK_M block of positions, zeros where the
        position is padding; blocks past the padded length exit at once."""
        pdl_start(USE_PDL)
        pid_m = tl.program_id(0)
        if pid_m * BLOCK_M < tl.load(total_ptr):
            pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            slot = tl.load(sorted_ptr + pos)
            live = slot < num_slots
            token = tl.where(live, slot // top_k, 0)
            for h0 in range(0, H, BLOCK_H):
                offs = h0 + tl.arange(0, BLOCK_H)
                m = live[:, None] & (offs < H)[None, :]
                v = tl.load(x_ptr + token[:, None].to(tl.int64) * stride_xm + offs[None, :], mask=m, other=0.0)
                tl.store(xs_ptr + pos[:, None].to(tl.int64) * stride_sm + offs[None, :], v,
                         mask=(offs < H)[None, :])

    @triton.jit
    def _topk_sum_kernel(y_ptr, ids_ptr, out_ptr, N, S, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                         USE_PDL: tl.constexpr):
        """out[t, n] = sum over the token's live slots j of y[t*k + j, n] (skipped slots were never written)."""
        pdl_start(USE_PDL)
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = offs < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            s = tl.load(ids_ptr + t * TOP_K + j)
            acc += tl.load(y_ptr + (t * TOP_K + j).to(tl.int64) * N + offs, mask=m & ((offs * 0 + s) < S), other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * N + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------------------------
# configs

_DEFAULTS = {
    # mode decode: no alignment, rows = all slots (M = T*k padded); prefill: aligned BLOCK_M blocks.
    # gu / dn: [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages] (BLOCK_M ignored in decode mode);
    # optional: "tma" (weight tiles through tensor descriptors), "sorted_rows" (prefill with tma: the activation
    # rows too, copied in slab order first), "half_tail" (prefill, BLOCK_M >= 32, not sorted_rows: a block with at
    # most BLOCK_M / 2 live rows runs a half-height tile)
    "decode": {"mode": "decode", "gu": [16, 32, 128, 1, 4, 4], "dn": [16, 32, 128, 1, 4, 4], "sum": "store"},
    "small": {"mode": "prefill", "gu": [16, 64, 128, 1, 4, 4], "dn": [16, 64, 128, 1, 4, 4], "sum": "store"},
    "mid": {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4], "sum": "store"},
    "large": {"mode": "prefill", "gu": [128, 64, 64, 8, 8, 3], "dn": [128, 128, 64, 8, 8, 3], "sum": "store"},
}
DECODE_MAX_SLOTS = 64
# Alignment in one program (`_align_one_kernel`) up to this many top-k slots, else the memset and two kernels. On an
# H200 (eval/results/kernel_profile_variants_h200{,_seed1}.md) one program saved 0.2-8.4 us a call (mostly 1-4) at
# 64-1024 slots and lost 8-66 us at 2048-4096 (its sort grows with the slots). A module setting so a benchmark can
# time both paths (0: always the two-kernel path).
ALIGN_ONE_MAX_SLOTS = int(os.environ.get("BROWNOUT_ALIGN_ONE_MAX_SLOTS", "1024"))
ALIGN_ONE_WARPS = 8


@functools.lru_cache(maxsize=None)
def _device_name(device_type: str, index: int | None) -> str:
    return torch.cuda.get_device_name(index) if device_type == "cuda" else device_type


def device_name(device=None) -> str:
    """The name a tile config table is looked up by: the GPU model for a CUDA device ("NVIDIA H100 80GB HBM3"), else
    the device type ("cpu", under the Triton interpreter). None: the current CUDA device, else "cpu"."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _device_name(device.type, device.index)


def shape_key(H: int, I: int, k: int) -> str:
    return f"{H},{I},{k}"


def t_bucket(T: int) -> int:
    """The smallest tuned bucket >= T (the largest for T beyond them)."""
    for b in T_BUCKETS:
        if T <= b:
            return b
    return T_BUCKETS[-1]


def default_config(T: int, k: int) -> dict:
    slots = T * k
    if slots <= DECODE_MAX_SLOTS:
        return _DEFAULTS["decode"]
    if slots <= 512:
        return _DEFAULTS["small"]
    if slots <= 8192:
        return _DEFAULTS["mid"]
    return _DEFAULTS["large"]


def get_config(T: int, H: int, I: int, k: int, device=None) -> dict:
    """The tuned config of (H, I, k) at T's bucket in the table of `device`'s GPU model (`configs.load`), else a
    default. Decode mode only while T*k <= DECODE_MAX_SLOTS.
    Not a function of the brownout ratio: a CUDA graph freezes the config it captured while the ratio it reads (from
    device memory) keeps moving, so the tuner picks one config per bucket that does well at every ratio."""
    return config_in(configs.load(device_name(device)), T, H, I, k)


def config_in(table: dict, T: int, H: int, I: int, k: int) -> dict:
    """`get_config` from a given table (a benchmark compares two)."""
    entry = table["shapes"].get(shape_key(H, I, k), {}).get(str(t_bucket(T)))
    cfg = entry if entry is not None else default_config(T, k)
    if cfg["mode"] == "decode" and T * k > DECODE_MAX_SLOTS:  # decode rows are all the slots: keep M bounded
        cfg = _DEFAULTS["mid"] if T * k > 512 else _DEFAULTS["small"]
    return cfg


# ------------------------------------------------------------------------------------------------------------------
# launch


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def moe_align(ids_flat: torch.Tensor, num_slabs: int, block_m: int, pdl: bool = False):
    """GPU alignment by slab, no host sync: -> (sorted slot ids [max_padded] int32 (sentinel = T*k),
    block slab [max_blocks] int32, total padded length [1] int32). Static sizes from (T*k, S, BLOCK_M)."""
    num_slots = ids_flat.numel()
    dev = ids_flat.device
    max_blocks = triton.cdiv(num_slots + min(num_slabs, num_slots) * (block_m - 1), block_m)
    max_padded = max_blocks * block_m
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    block_slab = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    if num_slots <= ALIGN_ONE_MAX_SLOTS:
        n_pad = _pow2(max(num_slots, 16))
        _align_one_kernel[(1,)](ids_flat, sorted_ids, block_slab, total, num_slots, max_padded, num_slabs,
                                BLOCK_M=block_m, S_PAD=_pow2(num_slabs + 1), N_PAD=n_pad, num_warps=ALIGN_ONE_WARPS,
                                **launch_opts(pdl))
        return sorted_ids, block_slab, total, max_blocks
    counts = torch.zeros(num_slabs, dtype=torch.int32, device=dev)
    rank = torch.empty(num_slots, dtype=torch.int32, device=dev)
    blk = 1024
    _align_rank_kernel[(triton.cdiv(max_padded, blk),)](ids_flat, counts, rank, sorted_ids, num_slots, max_padded,
                                                         num_slabs, BLOCK=blk, **launch_opts(pdl))
    _align_scatter_kernel[(triton.cdiv(num_slots, blk),)](ids_flat, counts, rank, sorted_ids, block_slab, total,
                                                           num_slots, num_slabs, BLOCK_M=block_m,
                                                           S_PAD=_pow2(max(num_slabs, 2)), BLOCK=blk,
                                                           **launch_opts(pdl))
    return sorted_ids, block_slab, total, max_blocks


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              num_slabs: int | None = None, config: dict | None = None) -> torch.Tensor:
    """out [T, H] = sum_j weights[t, j] * Slab_{ids[t, j]}(x[t]); ids == num_slabs skips the slot.

    x [T, H]; gate_up [S, 2I, H]; down [S, H, I]; ids [T, k] integer; weights [T, k]. No host synchronisation.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    T, H = x.shape
    k = ids.shape[1]
    S = gate_up.shape[0] if num_slabs is None else int(num_slabs)
    I = down.shape[2]
    assert gate_up.shape[1] == 2 * I and gate_up.shape[2] == H and down.shape[1] == H, "layout mismatch"
    assert gate_up.stride(2) == 1 and down.stride(2) == 1, "weights must be contiguous along the reduction dim"
    x = x.contiguous()
    ids = ids.contiguous()
    weights = weights.contiguous()
    num_slots = T * k
    out_dtype = x.dtype
    if T == 0:
        return torch.zeros(0, H, dtype=out_dtype, device=x.device)
    cfg = config or get_config(T, H, I, k, x.device)
    decode = cfg["mode"] == "decode"
    gm, gn, gk, ggm, gw, gs = cfg["gu"]
    dm, dn_, dk, dgm, dw, ds = cfg["dn"]
    atomic = cfg.get("sum", "store") == "atomic"
    ids_flat = ids.view(-1)
    dev = x.device
    pdl = use_pdl(dev)
    if decode:
        bm = _pow2(max(16, num_slots))
        gm = dm = bm
        sorted_ids = block_slab = total = ids_flat  # unused
        num_m_g = num_m_d = num_slots
    else:
        if gm != dm:  # both GEMMs walk the same alignment
            dm = gm
        sorted_ids, block_slab, total, num_m_g = moe_align(ids_flat, S, gm, pdl)
        num_m_d = num_m_g
    # weight tiles through TMA descriptors (tuned per shape; needs 16-byte aligned rows)
    tma = bool(cfg.get("tma")) and HAS_TMA and (H * gate_up.element_size()) % 16 == 0 \
        and (I * down.element_size()) % 16 == 0 and gate_up.is_contiguous() and down.is_contiguous()
    if tma:
        gu_desc = TensorDescriptor.from_tensor(gate_up.view(-1, H), block_shape=[gn, gk])
        dn_desc = TensorDescriptor.from_tensor(down.view(-1, I), block_shape=[dn_, dk])
    else:
        gu_desc, dn_desc = gate_up, down  # unused
    # activation rows through TMA too: x's rows copied in slab order first, inter kept in that order (one more
    # write and read of the rows, against gathered loads in both GEMMs)
    sorted_rows = tma and not decode and bool(cfg.get("sorted_rows"))
    # half-height tiles for half-empty blocks (a per-bucket choice for the tuner: on the H200 they won 3-6% at some
    # points and lost 1-2% at others; its table takes them at 10 of its 19 prefill buckets): gathered rows only
    # (TMA row tiles have a fixed height), and the half must make a tl.dot (16 rows)
    half_tail = bool(cfg.get("half_tail")) and not decode and not sorted_rows and gm >= 32
    if sorted_rows:
        xs = torch.empty(num_m_g * gm, H, dtype=x.dtype, device=dev)
        _gather_rows_kernel[(num_m_g,)](x, sorted_ids, total, xs, num_slots, H, x.stride(0), xs.stride(0), k,
                                        BLOCK_M=gm, BLOCK_H=min(256, _pow2(H)), num_warps=4, **launch_opts(pdl))
        inter = torch.empty(num_m_g * gm, I, dtype=x.dtype, device=dev)
        x_desc = TensorDescriptor.from_tensor(xs, block_shape=[gm, gk])
        i_desc = TensorDescriptor.from_tensor(inter, block_shape=[dm, dk])
    else:
        inter = torch.empty(num_slots, I, dtype=x.dtype, device=dev)
        x_desc = i_desc = inter  # unused
    if atomic:  # zeroed before the first kernel, so the kernels chain directly (PDL)
        y = torch.zeros(T, H, dtype=torch.float32, device=dev)
    else:
        y = torch.empty(num_slots, H, dtype=x.dtype, device=dev)
    grid_g = (num_m_g * triton.cdiv(I, gn),)
    _gate_up_kernel[grid_g](x, x_desc, gate_up, gu_desc, inter, ids_flat, sorted_ids, block_slab, total,
                            num_slots, S, I, H, num_m_g,
                            x.stride(0), gate_up.stride(0), gate_up.stride(1), inter.stride(0),
                            k, DECODE=decode, EVEN_K=(H % gk == 0), TMA=tma, SORTED=sorted_rows, HALF_TAIL=half_tail,
                            BLOCK_M=gm, BLOCK_N=gn, BLOCK_K=gk, GROUP_M=ggm, num_warps=gw, num_stages=gs,
                            **launch_opts(pdl))
    grid_d = (num_m_d * triton.cdiv(H, dn_),)
    _down_kernel[grid_d](inter, i_desc, down, dn_desc, y, weights.view(-1), ids_flat, sorted_ids, block_slab, total,
                         num_slots, S, H, I, num_m_d,
                         inter.stride(0), down.stride(0), down.stride(1), y.stride(0),
                         k, DECODE=decode, EVEN_K=(I % dk == 0), ATOMIC=atomic, TMA=tma, SORTED=sorted_rows,
                         HALF_TAIL=half_tail, BLOCK_M=dm, BLOCK_N=dn_, BLOCK_K=dk, GROUP_M=dgm, num_warps=dw,
                         num_stages=ds, **launch_opts(pdl))
    if atomic:
        return y.to(out_dtype)
    out = torch.empty(T, H, dtype=out_dtype, device=dev)
    bn = min(1024, _pow2(H))
    _topk_sum_kernel[(T, triton.cdiv(H, bn))](y, ids_flat, out, H, S, TOP_K=k, BLOCK_N=bn, num_warps=4,
                                              **launch_opts(pdl))
    return out


def supported(experts: torch.nn.Module, dtype: torch.dtype, device) -> bool:
    """True when fused_moe computes exactly what the module's experts do: CUDA, bf16/fp16, non-transposed,
    concatenated gate/up, no bias, no post-expert norm, the default gate with SiLU. Else use the PyTorch path."""
    if not HAS_TRITON:
        return False
    device = torch.device(device)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interp:
        return False
    if dtype not in (torch.bfloat16, torch.float16) and not (interp and dtype == torch.float32):
        return False
    return is_plain_silu_layout(experts)
