"""The Triton fused MoE kernels against the PyTorch slab reference, under the Triton interpreter on the CPU.

Tiny shapes, fp32 and fp16 (bf16 gives garbage under the interpreter; it is checked on the GPU by
eval/bench_kernel.py). The interpreter needs numpy < 2.4.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime import policy  # noqa: E402
from runtime.kernels import fused_moe as fm  # noqa: E402
from runtime.reference import slab_forward  # noqa: E402


class StandIn(torch.nn.Module):
    """What slab_forward needs of an experts module: the layout flag and the default SiLU gate."""

    is_transposed = False

    def _apply_gate(self, h):
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u


# prefill path with small tiles: N = I = 40 not a multiple of BLOCK_N, K = H = 48 not a multiple of BLOCK_K
PREFILL = {"mode": "prefill", "gu": [16, 16, 32, 2, 4, 2], "dn": [16, 32, 32, 2, 4, 2], "sum": "store"}
PREFILL_ATOMIC = dict(PREFILL, sum="atomic")
DECODE = {"mode": "decode", "gu": [16, 16, 32, 1, 4, 2], "dn": [16, 32, 32, 1, 4, 2], "sum": "store"}
# weight tiles through TMA tensor descriptors: rows of 96 / 80 bytes (16-byte aligned); the last N tile of a slab
# runs into the next rows (gate into up, up into the next slab, the last slab past the end: zeros)
PREFILL_TMA = dict(PREFILL, tma=True)
DECODE_TMA = dict(DECODE, tma=True)
H, I = 48, 40


def _case(E, G, k, T, ratio, dtype, seed, pol="hot-cold", routing=None):
    g = torch.Generator().manual_seed(seed)
    S = E + G
    gu = (torch.randn(S, 2 * I, H, generator=g) * 0.15).to(dtype)
    dn = (torch.randn(S, H, I, generator=g) * 0.15).to(dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    if routing is None:
        bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
        p = (torch.randn(T, E, generator=g) + bias).softmax(-1)
        w, idx = p.topk(k, -1)
        w = w / w.sum(-1, keepdim=True)
    else:
        idx, w = routing
    a = policy.remap(idx, w.to(dtype), torch.arange(E) % G, G, ratio, policy=pol)
    return x, gu, dn, a


def _check(x, gu, dn, a, config):
    S = gu.shape[0]
    out = fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=config)
    ref = slab_forward(StandIn(), {"gate_up_proj": gu.double(), "down_proj": dn.double()}, x.double(), a.ids,
                       a.weights.double())
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = 1e-5 if x.dtype == torch.float32 else 3e-3
    assert err < tol, f"relative error {err:.3g}"
    return a


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_prefill_fp32(k, ratio):
    # E = 11 experts + 4 groups = 15 slabs: not a multiple of BLOCK_M; T = 7 (odd)
    _check(*_case(11, 4, k, 7, ratio, torch.float32, seed=10 * k + int(4 * ratio)), PREFILL)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_decode_fp32(k, ratio):
    _check(*_case(11, 4, k, 3, ratio, torch.float32, seed=100 + k), DECODE)


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize("config", [PREFILL_TMA, DECODE_TMA], ids=["prefill", "decode"])
def test_tma_weights_fp32(k, ratio, config):
    _check(*_case(11, 4, k, 5, ratio, torch.float32, seed=300 + k), config)


@pytest.mark.parametrize("k", [2, 8])
def test_t1_default_config(k):
    # T = 1 through the config lookup (decode path by default), ratio 1 with dedup skips
    _check(*_case(13, 3, k, 1, 1.0, torch.float32, seed=7 + k), None)


def test_prefill_atomic_sum_fp32():
    _check(*_case(11, 4, 4, 9, 0.5, torch.float32, seed=3), PREFILL_ATOMIC)


PREFILL32_HALF = {"mode": "prefill", "gu": [32, 16, 32, 2, 4, 2], "dn": [32, 32, 32, 2, 4, 2], "sum": "store",
                  "half_tail": True}


@pytest.mark.parametrize("config", [PREFILL32_HALF, dict(PREFILL32_HALF, sum="atomic"),
                                    dict(PREFILL32_HALF, tma=True)], ids=["store", "atomic", "tma"])
def test_half_tail_blocks(config, monkeypatch):
    # 32-row blocks, T = 40 x k = 2 on 11 skewed experts: blocks with more than 16 live rows (full tiles) and the
    # slabs' last blocks with 16 or fewer (half-height tiles); the same output as with full tiles everywhere
    x, gu, dn, a = _case(11, 4, 2, 40, 0.0, torch.float32, seed=41)
    S = gu.shape[0]
    sorted_ids, _, total, _ = fm.moe_align(a.ids.reshape(-1).to(torch.int32), S, 32)
    live = (sorted_ids[: int(total)] < a.ids.numel()).view(-1, 32).sum(1)
    assert (live > 16).any() and (live <= 16).any(), live
    calls = []
    real = fm._gate_up_kernel

    class Spy:  # the launch asked for half tiles
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw["HALF_TAIL"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(fm, "_gate_up_kernel", Spy())
    _check(x, gu, dn, a, config)
    out_half = fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=config)
    out_full = fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=dict(config, half_tail=False))
    # not where it cannot apply: 16-row blocks, or rows copied in slab order (TMA row tiles)
    fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=dict(PREFILL, half_tail=True))
    fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=dict(config, tma=True, sorted_rows=True))
    assert calls == [True, True, False, False, False]
    assert torch.allclose(out_half, out_full, rtol=1e-6, atol=1e-6)


# each k, each ratio and each sum mode twice, in 6 of the 18 combinations (the interpreter takes ~4 s a case)
@pytest.mark.parametrize("k,ratio,atomic", [(1, 0.0, False), (1, 0.5, True), (4, 0.5, False), (4, 1.0, True),
                                            (8, 1.0, False), (8, 0.0, True)])
def test_sorted_rows_fp32(k, ratio, atomic, monkeypatch):
    # activation rows copied in slab order and read through TMA, inter kept in that order: the same output
    config = dict(PREFILL_TMA, sorted_rows=True, sum="atomic" if atomic else "store")
    x, gu, dn, a = _case(11, 4, k, 9, ratio, torch.float32, seed=500 + k)
    copies = []

    class Spy:  # the row copy runs (the path did not fall back to gathered loads)
        def __getitem__(self, grid):
            copies.append(grid)
            return fm_gather[grid]

    fm_gather = fm._gather_rows_kernel
    monkeypatch.setattr(fm, "_gather_rows_kernel", Spy())
    _check(x, gu, dn, a, config)
    assert len(copies) == 1
    S = gu.shape[0]
    plain = fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=dict(config, sorted_rows=False))
    assert torch.allclose(fm.fused_moe(x, gu, dn, a.ids, a.weights, num_slabs=S, config=config), plain,
                          atol=1e-6, rtol=1e-6)


def test_sorted_rows_copy():
    # the row copy alone: position p holds x[token of the slot aligned at p], zeros on padding
    x, gu, dn, a = _case(11, 4, 4, 9, 1.0, torch.float32, seed=9)
    ids = a.ids.reshape(-1).to(torch.int32)
    S, bm, k = gu.shape[0], 16, a.ids.shape[1]
    sorted_ids, _, total, blocks = fm.moe_align(ids, S, bm)
    xs = torch.full((blocks * bm, H), float("nan"))
    fm._gather_rows_kernel[(blocks,)](x, sorted_ids, total, xs, ids.numel(), H, x.stride(0), xs.stride(0), k,
                                      BLOCK_M=bm, BLOCK_H=32, USE_PDL=False)
    n = int(total)
    live = sorted_ids[:n] < ids.numel()
    assert torch.equal(xs[:n][live], x[sorted_ids[:n][live].long() // k])
    assert (xs[:n][~live] == 0).all() and xs[n:].isnan().all()  # past the padded length: untouched


@pytest.mark.parametrize("config", [PREFILL, DECODE, PREFILL_TMA, dict(PREFILL_TMA, sorted_rows=True)])
def test_fp16(config):
    _check(*_case(11, 4, 4, 5, 0.5, torch.float16, seed=5), config)


@pytest.mark.parametrize("config", [PREFILL, DECODE])
def test_shared_group_dedup(config):
    # every token picks experts 0 and 2 (one group when G = 2, way 2 interleaved) and 1 (group 1):
    # at ratio 1 both 0 and 2 go to united slab E + 0 and are merged; the second slot is skipped
    E, G, T = 6, 2, 5
    idx = torch.tensor([[0, 2, 1, 3]] * T)
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1]] * T)
    x, gu, dn, a = _case(E, G, 4, T, 1.0, torch.float32, seed=11, routing=(idx, w))
    assert (a.ids == E + G).any(), "expected dedup'd (skipped) slots"
    assert torch.allclose(a.weights.sum(-1), w.sum(-1))
    _check(x, gu, dn, a, config)


def test_drop_policy_skips():
    a = _check(*_case(11, 4, 4, 7, 0.5, torch.float32, seed=21, pol="drop"), PREFILL)
    assert (a.ids == 15).any()


def test_all_skipped():
    E, G, T, k = 5, 2, 3, 2
    x, gu, dn, a = _case(E, G, k, T, 0.0, torch.float32, seed=1)
    ids = torch.full((T, k), E + G)
    out = fm.fused_moe(x, gu, dn, ids, torch.zeros(T, k), num_slabs=E + G, config=PREFILL)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("one_program", [True, False])
def test_align_invariants(monkeypatch, one_program):
    monkeypatch.setattr(fm, "ALIGN_ONE_MAX_SLOTS", 4096 if one_program else 0)
    S, T, k, bm = 7, 9, 4, 16
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, S + 1, (T * k,), generator=g)  # S = skip
    sorted_ids, block_slab, total, nblocks = fm.moe_align(ids, S, bm)
    total = int(total)
    counts = torch.bincount(ids, minlength=S + 1)[:S]
    assert total == int(((counts + bm - 1) // bm * bm).sum())
    live = sorted_ids[:total]
    real = live[live < T * k].long()
    assert sorted(real.tolist()) == sorted((ids < S).nonzero().flatten().tolist())  # each live slot exactly once
    for b in range(total // bm):
        rows = sorted_ids[b * bm:(b + 1) * bm].long()
        rows = rows[rows < T * k]
        assert len(rows) > 0 and (ids[rows] == block_slab[b]).all()


@pytest.mark.parametrize("S,n,bm", [(7, 36, 16), (60, 128, 16), (20, 300, 64), (5, 1, 16)])
def test_align_one_program_is_stable(monkeypatch, S, n, bm):
    """The one-program alignment: each slab's slots in slot order, padded with the sentinel, blocks named by their
    slab, the same total as the two-kernel path (whose order within a slab follows its atomics)."""
    g = torch.Generator().manual_seed(S + n)
    ids = torch.randint(0, S + 1, (n,), generator=g)  # S = skip
    monkeypatch.setattr(fm, "ALIGN_ONE_MAX_SLOTS", 4096)
    sorted_ids, block_slab, total, nblocks = fm.moe_align(ids, S, bm)
    monkeypatch.setattr(fm, "ALIGN_ONE_MAX_SLOTS", 0)
    _, _, total2, nblocks2 = fm.moe_align(ids, S, bm)
    assert int(total) == int(total2) and nblocks == nblocks2
    want, pos = torch.full_like(sorted_ids, n), 0
    for s in range(S):
        slots = (ids == s).nonzero().flatten().to(torch.int32)
        want[pos:pos + len(slots)] = slots
        if len(slots):
            assert (block_slab[pos // bm:(pos + len(slots) + bm - 1) // bm] == s).all()
        pos += (len(slots) + bm - 1) // bm * bm
    assert pos == int(total)
    assert torch.equal(sorted_ids, want)


def test_supported():
    class Silu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act_fn = torch.nn.SiLU()

    def _default_apply_gate(self, h):
        g, u = h.chunk(2, -1)
        return self.act_fn(g) * u

    Silu._apply_gate = _default_apply_gate
    ex = Silu()
    ex.is_transposed, ex.is_concatenated, ex.has_bias, ex.has_gate = False, True, False, True
    cuda = torch.device("cuda")
    assert fm.supported(ex, torch.bfloat16, cuda)
    assert not fm.supported(ex, torch.float64, cuda)
    ex.is_transposed = True
    assert not fm.supported(ex, torch.bfloat16, cuda)
    ex.is_transposed, ex.has_bias = False, True
    assert not fm.supported(ex, torch.bfloat16, cuda)
    ex.has_bias = False
    ex.act_fn = torch.nn.GELU()
    assert not fm.supported(ex, torch.bfloat16, cuda)
    assert not fm.supported(StandIn(), torch.bfloat16, cuda)  # custom _apply_gate


def test_config_lookup():
    # off a GPU ("cpu": no table of its own) the lookup runs the fallback table, the H100 one
    from runtime.kernels import configs

    tuned = configs.load(configs.FALLBACK_DEVICE)["shapes"]["2048,768,8"]
    assert fm.device_name("cpu") == "cpu" and configs.table_for("cpu")[1]
    assert fm.get_config(1, 2048, 768, 8, "cpu") == tuned["1"]
    assert fm.get_config(3000, 2048, 768, 8, "cpu") == tuned["4096"]
    assert fm.get_config(1, 2048, 768, 8)["mode"] == "decode"
    assert fm.get_config(4096, 2048, 768, 8)["mode"] == "prefill"
    assert fm.get_config(4096, 123, 45, 3) == fm.default_config(4096, 3)  # unknown shape: default
    assert fm.t_bucket(3) == 8 and fm.t_bucket(10**6) == 4096


@pytest.mark.parametrize("E,G,k,T,ratio,pol", [
    (11, 4, 2, 7, 0.5, "hot-cold"), (11, 4, 4, 33, 1.0, "hot-cold"), (8, 2, 2, 5, 0.5, "hot-cold"),
    (64, 16, 8, 9, 0.5, "hot-cold"), (60, 15, 4, 300, 0.7, "hot-cold"), (11, 4, 4, 33, 0.5, "drop"),
    (128, 32, 8, 1, 1.0, "hot-cold"), (9, 3, 1, 4, 1.0, "hot-cold"), (13, 4, 8, 1100, 0.3, "hot-cold"),
])
def test_fused_remap_matches_policy(E, G, k, T, ratio, pol):
    from runtime.kernels.remap import remap

    g = torch.Generator().manual_seed(E * 1000 + T)
    bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
    w, idx = (torch.randn(T, E, generator=g) + bias).softmax(-1).topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    e2g = torch.arange(E) % G
    ids, wo = remap(idx, w, e2g, G, ratio, pol)
    a = policy.remap(idx, w, e2g, G, ratio, pol)
    assert torch.equal(ids, a.ids)
    assert torch.allclose(wo, a.weights, atol=1e-6)


def test_fused_remap_reads_the_ratio_from_device_memory():
    """One `keep` tensor, rewritten between calls (as set_ratio does under a captured CUDA graph): each call follows
    the value in memory, whatever `ratio` argument it was given."""
    from runtime.kernels.remap import remap
    from runtime.policy import keep_tensor

    E, G, k, T = 16, 4, 4, 37
    g = torch.Generator().manual_seed(5)
    bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
    w, idx = (torch.randn(T, E, generator=g) + bias).softmax(-1).topk(k, -1)
    e2g = torch.arange(E) % G
    keep = keep_tensor(0.0, "cpu")
    for r in (0.0, 0.3, 0.5, 0.7, 1.0, 0.0):
        keep.fill_(1.0 - r)
        ids, wo = remap(idx, w, e2g, G, 0.0, "hot-cold", keep=keep)
        a = policy.remap(idx, w, e2g, G, r, "hot-cold")
        assert torch.equal(ids, a.ids), r
        assert torch.allclose(wo, a.weights, atol=1e-6)


@pytest.mark.parametrize("E,G,k,T,ratio,pol,ep,replicate", [
    (16, 4, 4, 37, 0.5, "hot-cold", 2, "none"), (16, 4, 4, 37, 1.0, "hot-cold", 2, "all"),
    (60, 15, 4, 33, 0.7, "hot-cold", 2, "auto"), (12, 6, 2, 9, 0.5, "drop", 3, "all"),
    (128, 32, 8, 1, 1.0, "hot-cold", 2, "all"),
    (16, 4, 4, 37, 0.0, "hot-cold", 2, "none"),
])
def test_fused_remap_ep_epilogue_matches_ep_local_routing(E, G, k, T, ratio, pol, ep, replicate):
    """The remap kernel's EP epilogue (this rank's local slab ids in the same launch) against its PyTorch twin, on
    every rank, with owned and replicated united experts; ratio 0 through `keep` too (graph-safe ratio 0)."""
    from runtime.ep_routing import EPRouting, ep_local_routing
    from runtime.kernels.remap import remap
    from runtime.placement import place_united
    from runtime.policy import keep_tensor

    g = torch.Generator().manual_seed(E * 1000 + T + ep)
    bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
    w, idx = (torch.randn(T, E, generator=g) + bias).softmax(-1).topk(k, -1)
    e2g = torch.arange(E) // (E // G)
    pl = place_united(e2g, ep, replicate)
    rank_of, pos = pl.tables("cpu")
    a = policy.remap(idx, w, e2g, G, ratio, pol)
    for rank in range(ep):
        routing = EPRouting(rank_of, pos, pl.local_slabs, rank, ep)
        ids, wo = remap(idx, w, e2g, G, ratio, pol, keep=keep_tensor(ratio, "cpu"), ep=routing)
        want_ids, want_w = ep_local_routing(a.ids, a.weights, routing)
        assert torch.equal(ids, want_ids), rank
        assert torch.allclose(wo, want_w, atol=1e-6), rank


def test_ep_local_routing_is_ep_ids_then_the_all_reduce_mask():
    """The shared-batch EP routing equals the two-step form it replaces: EP slab ids (`ep_ids`, replicas to the
    token's row-chunk rank) then transformers' AllReduceEP mask (off-rank -> local id L, weight 0). Over the ranks
    every live slot is kept exactly once."""
    from runtime.ep_routing import EPRouting, ep_local_routing
    from runtime.placement import ep_ids, place_united, token_ranks

    E, G, k, T, ep = 16, 4, 4, 21, 2
    g = torch.Generator().manual_seed(3)
    w, idx = torch.randn(T, E, generator=g).softmax(-1).topk(k, -1)
    e2g = torch.arange(E) // 4
    a = policy.remap(idx, w, e2g, G, 0.75, "hot-cold")
    pl = place_united(e2g, ep, "all")
    rank_of, pos = pl.tables("cpu")
    L, kept = pl.local_slabs, torch.zeros(T, k, dtype=torch.long)
    glob, gw = ep_ids(a.ids, a.weights, rank_of, pos, L, E + G, token_ranks(T, ep, None, "cpu"))
    for rank in range(ep):
        ids, wo = ep_local_routing(a.ids, a.weights, EPRouting(rank_of, pos, L, rank, ep))
        off = glob // L != rank
        assert torch.equal(wo, torch.where(off, torch.zeros_like(gw), gw))
        live = wo != 0
        assert torch.equal(ids[live], (glob % L)[live]) and bool((ids[off] == L).all())
        kept += live.long()
    assert torch.equal(kept, (a.weights != 0).long())


def test_flush_kernel_is_told_apart():
    # the profile splits its trace into replays at the L2 flush, a fill (--flush write) or a reduction (read)
    from eval import bench_kernel as bk
    assert bk._is_flush_kernel("void at::native::reduce_kernel<512, 1, ReduceOp<float, func_wrapper_t>>", 60.0)
    assert bk._is_flush_kernel("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", 80.0)
    assert not bk._is_flush_kernel("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>", 2.0)
    assert not bk._is_flush_kernel("_gate_up_kernel", 100.0)


def test_stream_read_probe():
    # the bandwidth probe of eval/bench_kernel.py against its torch twin: per-chunk sums, a partial last chunk
    from eval import bench_kernel as bk
    buf = torch.randn(10000)
    out = bk.stream_read(buf, 4096, 1024, 4)
    ref = torch.nn.functional.pad(buf, (0, 3 * 4096 - buf.numel())).view(3, 4096).sum(1)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_profile_gemm_shares(tmp_path):
    # eval/bench_kernel.py's profile: each GEMM against its share of the call's limit (gate/up 2/3, down 1/3), ours
    # by kernel name, the vendor's as its two longest kernels in launch order
    from eval import bench_kernel as bk
    H, I, slabs, live, bw, flops = 2048, 1024, 16, 4096, 4e12, 8e14
    lim_us = 1e3 * max(bk.limit_terms_ms(slabs, live, H, I, bw, flops))
    assert bk.kernel_pct("_gate_up_kernel", 100.0, slabs, live, H, I, bw, flops) == pytest.approx(200 / 3 * lim_us / 100)
    assert bk.kernel_pct("_down_kernel", 50.0, slabs, live, H, I, bw, flops) == pytest.approx(100 / 3 * lim_us / 50)
    assert bk.kernel_pct("_topk_sum_kernel", 5.0, slabs, live, H, I, bw, flops) is None
    row = {"shape": "olmoe-1b-7b", "tokens": 512, "way": 4, "ratio": 1.0, "limit_ms": 0.06, "pdl_off_ms": 0.16,
           "pdl_on_ms": 0.155, "kernels_pdl_off": {"kernels": [["_gate_up_kernel", 100.0], ["_down_kernel", 50.0]],
                                                   "kernel_sum_us": 150.0},
           "ours_gemm_us": [["_gate_up_kernel", 100.0, 40.0], ["_down_kernel", 50.0, 40.0]],
           "vendor": {"ms": 0.12, "kernels": [["prep", 1.0], ["gemm_a", 80.0], ["silu", 3.0], ["gemm_b", 20.0]]}}
    path = tmp_path / "p.md"
    bk.write_profile_md({"device": "X", "copy_bw_TBps": 4.0, "bf16_TFLOPs": 800, "rows": [row]}, path)
    line = [ln for ln in path.read_text().splitlines() if ln.startswith("| olmoe-1b-7b")][-1]
    # other = 155 - 150; vendor gate/up 80 us = 2/3 * 60 / 80 = 50%, down 20 us = 1/3 * 60 / 20 = 100%
    assert line == ("| olmoe-1b-7b | 512 | 4 | 1.0 | 60.0 | 155.0 | 100.0 (40) | 50.0 (40) | 5.0 | 120.0 "
                    "| 80.0 (50) | 20.0 (100) |")
    # the one-change variants: B / A of the same run
    row["variants"] = {"align_one": 0.150, "align_two": 0.160}
    bk.write_profile_md({"device": "X", "copy_bw_TBps": 4.0, "bf16_TFLOPs": 800, "rows": [row]}, path)
    line = [ln for ln in path.read_text().splitlines() if ln.startswith("| olmoe-1b-7b")][-1]
    assert line == "| olmoe-1b-7b | 512 | 4 | 1.0 | 60.0 | align_two 160.0 | align_one 150.0 | 0.938 |"


def test_ncu_md_reads_a_raw_export(tmp_path):
    # eval/bench_kernel.py ncu-md: one row per kernel, named by the run's NCU_POINT lines (two kernels a point),
    # values scaled by the units row, the tightest occupancy limit, the three largest stalls
    import csv

    from eval import bench_kernel as bk
    cols = {"ID": ("", ["0", "1"]), "Kernel Name": ("", ["_gate_up_kernel", "_down_kernel"]),
            "device__attribute_display_name": ("", ["NVIDIA H200", "NVIDIA H200"]),
            "launch__grid_size": ("", ["1,792", "896"]), "launch__registers_per_thread": ("register/thread",
                                                                                       ["101", "178"]),
            "launch__shared_mem_per_block": ("Kbyte/block", ["99.38", "149.0"]),
            "launch__waves_per_multiprocessor": ("", ["6.79", "6.79"]),
            "gpu__time_duration.sum": ("msecond", ["0.0946", "0.0467"]),
            "sm__cycles_elapsed.avg.per_second": ("Mhz", ["1603.2", "1730"]),
            "dram__bytes_read.sum": ("Gbyte", ["0.1431", "0.0758"]),
            "dram__bytes_read.sum.pct_of_peak_sustained_elapsed": ("%", ["31.2", "34"]),
            "sm__throughput.avg.pct_of_peak_sustained_elapsed": ("%", ["47.1", "44"]),
            "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active": ("%", ["63.4", "60"]),
            "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active": ("%", ["7.9", "0"]),
            "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", ["24", "12"]),
            "smsp__warps_eligible.avg.per_cycle_active": ("warp", ["0.81", "0.28"]),
            "smsp__issue_active.avg.pct_of_peak_sustained_active": ("%", ["44", "21"])}
    for lim, vals in (("blocks", ["32", "32"]), ("registers", ["2", "1"]), ("shared_mem", ["2", "1"]),
                      ("warps", ["8", "8"])):
        cols[f"launch__occupancy_limit_{lim}"] = ("block", vals)
    for stall, vals in (("long_scoreboard", ["2.15", "3.82"]), ("barrier", ["1.81", "1.93"]),
                        ("wait", ["1.33", "1.44"]), ("selected", ["1", "1"]), ("drain", ["0.04", "0.18"])):
        cols[f"smsp__average_warps_issue_stalled_{stall}_per_issue_active.ratio"] = ("inst", vals)
    raw = tmp_path / "r.csv"
    with open(raw, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(cols))
        w.writerow([u for u, _ in cols.values()])
        for j in range(2):
            w.writerow([v[j] for _, v in cols.values()])
    log = tmp_path / "log.txt"
    log.write_text("==PROF== Connected\nNCU_POINT 0 olmoe-1b-7b T=512 w4 r1.0: slabs 16, live slots 3534\n")
    bk.ncu_md(raw, log, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "(NVIDIA H200)" in text.splitlines()[0]
    rows = [ln for ln in text.splitlines() if ln.startswith("| olmoe")]
    assert rows[0] == ("| olmoe-1b-7b T=512 w4 r1.0 | gate_up | 1792 | 101 | 99 | 2 | 6.79 | 94.6 | 1.60 | 143 | 31 "
                       "| 47 | 63 | wgmma | 24 | 0.81 | 44 | long_scoreboard 2.15, barrier 1.81, wait 1.33 |")
    assert rows[1].startswith("| olmoe-1b-7b T=512 w4 r1.0 | down | 896 | 178 | 149 | 1 | 6.79 | 46.7 | 1.73 | 76 ")
    assert "| mma.sync |" in rows[1] and rows[1].endswith("long_scoreboard 3.82, barrier 1.93, wait 1.44 |")


def test_tuner_never_picks_a_wrong_candidate(monkeypatch):
    # eval/bench_kernel.py's tuner checks each candidate's output against the reference before timing it: a config
    # that computes something else is timed as inf, however fast it would be (graphs and timings faked on the CPU)
    from eval import bench_kernel as bk

    class Graph:
        def __init__(self, fn, out, cfg):
            self.fn, self.out, self.cfg = fn, out, cfg

        def replay(self):
            self.out.copy_(self.fn())

    bad_gu = [32, 32, 32, 4, 4, 2]
    real = fm.fused_moe
    current = [None]  # the config of the last call, for the fake graph to time

    def fused(x, gu, dn, ids, w, config=None, **kw):
        current[0] = config
        out = real(x, gu, dn, ids, w, config=config, **kw)
        return out * 1.5 if config and config["gu"] == bad_gu else out  # fast and wrong

    def capture(fn):
        out = fn()
        return Graph(fn, out, current[0]), out

    monkeypatch.setattr(fm, "fused_moe", fused)
    monkeypatch.setattr(bk, "capture", capture)
    monkeypatch.setattr(bk, "time_graph", lambda g, reps=25: 0.001 if g.cfg["gu"] == bad_gu else 1.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bk, "DECODE_T", [(16, 32, 4, 2)])
    monkeypatch.setattr(bk, "MID_GU", [tuple(bad_gu), (16, 16, 32, 2, 4, 2)])
    monkeypatch.setattr(bk, "MID_DN", [(32, 32, 4, 2)])
    x, gu, dn, a = _case(11, 4, 4, 9, 0.5, torch.float32, seed=21)
    best, score, res = bk._tune_point(x, [(gu, dn, a.ids, a.weights)], 9 * 4)
    assert best["gu"] != bad_gu
    tried_bad = [ms for ms, c in res if c["gu"] == bad_gu]
    assert tried_bad and all(m == [float("inf")] for m in tried_bad)
    assert all(m == [1.0] for m, c in res if c["gu"] != bad_gu)  # every correct candidate was timed


def _fake_tuner_kernels(monkeypatch, x, gu, dn, a, timed):
    """The tuner's kernels and timings faked on the CPU: every candidate computes the reference (only the candidates
    are under test), its graph is timed by `timed(config)`."""
    from eval import bench_kernel as bk
    ref = bk.slab_reference(gu, dn, x, a.ids, a.weights)
    current = [None]

    def fused(x, gu, dn, ids, w, config=None, **kw):
        current[0] = config
        return ref.clone()

    class Graph:
        def __init__(self, cfg, out):
            self.cfg, self.out = cfg, out

        def replay(self):
            self.out.copy_(ref)

    def capture(fn):
        out = fn()
        return Graph(current[0], out), out

    monkeypatch.setattr(fm, "fused_moe", fused)
    monkeypatch.setattr(bk, "capture", capture)
    monkeypatch.setattr(bk, "time_graph", lambda g, reps=25: timed(g.cfg))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)


def test_tuner_tries_half_tiles_on_the_best_and_on_twice_as_tall_blocks(monkeypatch):
    # the tuner's last prefill stage: half-height tiles on the best config, and on blocks twice as tall (both GEMMs
    # on the same alignment)
    from eval import bench_kernel as bk
    x, gu, dn, a = _case(11, 4, 4, 9, 0.5, torch.float32, seed=22)

    def timed(c):  # 64-row tiles win alone; twice as tall with half tiles wins overall
        return 0.5 if c.get("half_tail") and c["gu"][0] == 128 else 1.0 if c["gu"][0] == 64 else 2.0

    _fake_tuner_kernels(monkeypatch, x, gu, dn, a, timed)
    monkeypatch.setattr(bk, "MID_GU", [(64, 64, 64, 8, 4, 4), (128, 64, 64, 8, 8, 3), (128, 128, 64, 8, 8, 3)])
    monkeypatch.setattr(bk, "MID_DN", [(64, 128, 4, 4), (128, 64, 4, 4)])
    best, score, res = bk._tune_point(x, [(gu, dn, a.ids, a.weights)], 256)
    half = [c for _, c in res if c.get("half_tail")]
    assert {c["gu"][0] for c in half} == {64, 128}  # on the best tiles, and on blocks twice as tall
    assert all(c["dn"][0] == c["gu"][0] and c["dn"][3] == c["gu"][3] for c in half)
    assert sorted(tuple(c["gu"]) for c in half if c["gu"][0] == 128) == [(128, 64, 64, 8, 4, 4), (128, 64, 64, 8, 8, 3),
                                                                        (128, 128, 64, 8, 8, 3)]
    assert best["half_tail"] and best["gu"][0] == best["dn"][0] == 128
    assert all(m[0] < float("inf") for m, _ in res)  # every candidate passed the output check and was timed


def _fake_capture(monkeypatch, fused):
    """fm.fused_moe replaced by `fused`, and bench_kernel's graph capture by an eager call on the CPU: the fake graph
    replays by calling again and carries the config it was captured with, for a faked time_graph to read."""
    from eval import bench_kernel as bk
    current = [None]

    def traced(*args, config=None, **kw):
        current[0] = config
        return fused(*args, config=config, **kw)

    class Graph:
        def __init__(self, fn, out, cfg):
            self.fn, self.out, self.cfg = fn, out, cfg

        def replay(self):
            self.out.copy_(self.fn())

    def capture(fn):
        out = fn()
        return Graph(fn, out, current[0]), out

    monkeypatch.setattr(fm, "fused_moe", traced)
    monkeypatch.setattr(bk, "capture", capture)


def test_ab_times_two_tables_on_the_bench_routings(monkeypatch, tmp_path):
    # `bench_kernel ab`: both tables' configs on the same calls, each checked against the reference, timed A B B A;
    # the routing at a bucket is the one the bench draws there (graphs and timings faked on the CPU)
    import json
    from eval import bench_kernel as bk

    _fake_capture(monkeypatch, fm.fused_moe)
    order = []

    def timed(g, reps=25):
        order.append(g.cfg["sum"])
        return 0.5 if g.cfg["sum"] == "atomic" else 1.0

    monkeypatch.setattr(bk, "dev", "cpu")
    monkeypatch.setattr(bk, "time_graph", timed)
    monkeypatch.setattr(bk, "measure_limits", lambda: (1e12, 1e14))
    monkeypatch.setattr(bk, "SHAPES", {"tiny": (11, 4, H, I)})
    monkeypatch.setattr(bk, "WAYS", [4])
    monkeypatch.setattr(bk, "RATIOS", [0.0, 1.0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    a_path, b_path = tmp_path / "a.json", tmp_path / "b.json"
    a_path.write_text(json.dumps({"shapes": {}}))  # the defaults
    b_path.write_text(json.dumps({"shapes": {fm.shape_key(H, I, 4): {"8": PREFILL_ATOMIC}}}))
    seen = []
    real_remap = policy.remap
    monkeypatch.setattr(policy, "remap", lambda idx, *a, **kw: seen.append(idx) or real_remap(idx, *a, **kw))
    res = bk.ab(a_path, b_path, tmp_path / "ab.json", seed=0, tokens=[8], dtype=torch.float32, copies=2)
    assert torch.is_grad_enabled()  # ab ran without gradients and left them on
    rows = res["rows"]
    assert len(rows) == len(bk.WAYS) * len(bk.RATIOS) and {r["tokens"] for r in rows} == {8}
    assert order == ["store", "atomic", "atomic", "store"] * 2 * len(rows)  # on each copy
    assert all(len(r["ms_a_copies"]) == 2 and len(r["ms_b_each"]) == 4 for r in rows)
    assert all(r["ms_b"] / r["ms_a"] == 0.5 and r["config_b"] == PREFILL_ATOMIC for r in rows)
    assert all(r["relerr_a"] < 5e-3 and r["relerr_b"] < 5e-3 for r in rows)  # ratio 1: bf16 routing weights
    gen = torch.Generator().manual_seed(0)
    drawn = [bk.routing(T, 11, 4, gen)[0] for T in bk.TOKENS][bk.TOKENS.index(8)]  # the bench's draw at T = 8
    assert seen and all(torch.equal(idx, drawn) for idx in seen)
    md = (tmp_path / "ab.md").read_text()
    assert "| tiny | 8 | 0.500 | 0.500-0.500 | - |" in md and "| 0.500 / 0.500 | 1.000 |" in md


def test_timing_warms_up_first(monkeypatch):
    # every timed replay set starts after at least WARMUP_MS of flushed replays (events faked: 0.1 ms a replay)
    from eval import bench_kernel as bk

    class Event:
        def __init__(self, **kw):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 0.1

    class Graph:
        replays = 0

        def replay(self):
            self.replays += 1

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bk, "_flush", lambda: None)
    monkeypatch.setattr(bk, "WARMUP_MS", 2.0)
    g = Graph()
    assert bk.time_graph(g, reps=5) == 0.1
    assert g.replays == 1 + 20 + 5  # the probe, 2 ms of warm-up, the timed ones
    g.replays = 0
    bk.warm_up(g, 0)
    assert g.replays == 0


def test_tuner_keeps_the_incumbent_where_the_stages_miss_it(monkeypatch):
    # a re-tune times the table's current config too: the stages vary one part at a time and can miss a combination
    # an earlier tuning found (the incumbent's tiles are in no candidate list)
    from eval import bench_kernel as bk
    x, gu, dn, a = _case(11, 4, 4, 9, 0.5, torch.float32, seed=24)
    incumbent = {"mode": "decode", "gu": [16, 64, 128, 1, 4, 4], "dn": [16, 16, 256, 1, 4, 4], "sum": "store"}
    _fake_tuner_kernels(monkeypatch, x, gu, dn, a, lambda c: 0.5 if c == incumbent else 1.0)
    monkeypatch.setattr(bk, "DECODE_T", [(16, 32, 4, 2), (32, 64, 4, 3)])
    monkeypatch.setattr(bk, "MID_GU", [(16, 16, 32, 2, 4, 2)])
    monkeypatch.setattr(bk, "MID_DN", [(32, 32, 4, 2)])
    best, _, res = bk._tune_point(x, [(gu, dn, a.ids, a.weights)], 9 * 4, incumbent)
    assert best == incumbent and sum(c == incumbent for _, c in res) == 1
    best, _, res = bk._tune_point(x, [(gu, dn, a.ids, a.weights)], 9 * 4)
    assert best != incumbent and incumbent not in [c for _, c in res]


def test_a_partial_retune_says_which_buckets_it_kept_and_under_which_flush():
    from eval import bench_kernel as bk
    before_the_key = {"shapes": {}}
    once = {"shapes": {}, "flush": "read", "kept_buckets": bk.kept_buckets(before_the_key, [32, 128, 512, 4096])}
    assert once["kept_buckets"] == {"1": "write", "8": "write"}
    assert bk.kept_buckets(once, [1]) == {"8": "write", "32": "read", "128": "read", "512": "read", "4096": "read"}
    assert bk.kept_buckets(once, [1, 8]) == {"32": "read", "128": "read", "512": "read", "4096": "read"}


def test_tuner_routings_are_per_point_and_held_out_from_the_bench(monkeypatch):
    # the tile tuner scores on routings of its own seeds, one generator per point: a point's routing does not move
    # when other buckets are skipped (--buckets), and none is the bench's (seed 0's generator, drawn in turn)
    from eval import bench_kernel as bk
    monkeypatch.setattr(bk, "dev", "cpu")
    E, k = 60, 4
    a = bk.tune_routing(128, E, k, bk.TUNE_SEEDS[0])
    assert torch.equal(a[0], bk.tune_routing(128, E, k, bk.TUNE_SEEDS[0])[0])  # the same point, the same routing
    assert not torch.equal(a[0], bk.tune_routing(128, E, k, bk.TUNE_SEEDS[1])[0])  # seeds differ
    assert 0 not in bk.TUNE_SEEDS and len(bk.TUNE_SEEDS) >= 2
    gen = torch.Generator().manual_seed(0)
    bench_draws = [bk.routing(T, E, k, gen)[0] for T in bk.TOKENS]  # the bench's first shape at every T
    for seed in bk.TUNE_SEEDS:
        for T, drawn in zip(bk.TOKENS, bench_draws):
            assert not torch.equal(bk.tune_routing(T, E, k, seed)[0], drawn)


def test_check_runs_each_distinct_config_of_a_table_once():
    from eval import bench_kernel as bk

    a = {"mode": "prefill", "gu": [64, 64, 64, 8, 4, 4], "dn": [64, 64, 64, 8, 4, 4], "sum": "store"}
    b = dict(a, tma=True)
    table = {"shapes": {"4096,14336,2": {"1": a, "8": b, "32": dict(a)}, "2048,768,8": {"512": b, "4096": a}}}
    got = bk.table_configs(table)
    assert got == {"table 4096,14336,2 T=1": a, "table 4096,14336,2 T=8": b}
    shipped = bk.table_configs(bk.configs.load("NVIDIA H200"))
    assert len(shipped) > 4 and all(c["mode"] in ("decode", "prefill") for c in shipped.values())


def test_variants_times_each_change_between_two_runs_of_the_table_entry(monkeypatch, tmp_path):
    # `bench_kernel variants`: per point and routing the table's entry, each variant, the entry again; a variant
    # that computes something else is inf, never a time (graphs and timings faked on the CPU)
    import json
    from eval import bench_kernel as bk
    base = dict(PREFILL, tma=True)
    order, wrong_runs = [], []

    def fused(x, gu, dn, ids, w, config=None, **kw):
        out = bk.slab_reference(gu, dn, x, ids, w)
        if config.get("sorted_rows"):  # the sorted-rows variant is wrong here
            wrong_runs.append(1)
            return out * 1.5
        return out

    def timed(g, reps=25):
        order.append("half" if g.cfg.get("half_tail") else "base")
        return 0.8 if g.cfg.get("half_tail") else 1.0

    _fake_capture(monkeypatch, fused)
    monkeypatch.setattr(bk, "dev", "cpu")
    monkeypatch.setattr(bk, "time_graph", timed)
    monkeypatch.setattr(bk, "measure_limits", lambda: (1e12, 1e14))
    monkeypatch.setattr(bk, "SHAPES", {"tiny": (11, 4, H, I)})
    monkeypatch.setattr(bk.configs, "load", lambda name: {"shapes": {fm.shape_key(H, I, 4): {"8": base}}})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    overrides = bk.parse_overrides(["half_tail=1", "sorted_rows=1,half_tail=0"])
    assert overrides == [{"half_tail": True}, {"sorted_rows": True, "half_tail": False}]
    for bad in ("tma", "tma=2", "tiles=1", "tma=1,sortedrows=1", "warps=3", "block_m=0", "dn_stages=x", "ws=1"):
        with pytest.raises(ValueError):
            bk.parse_overrides([bad])
    # tile fields go into one or both GEMMs' tiles; the entry itself is left alone
    tiles = bk.parse_overrides(["sorted_rows=1,block_m=128,warps=2,stages=3,dn_warps=8,gu_stages=5"])[0]
    assert tiles == {"sorted_rows": True, "block_m": 128, "warps": 2, "stages": 3, "dn_warps": 8, "gu_stages": 5}
    assert bk.apply_override(base, tiles) == dict(base, sorted_rows=True, gu=[128, 16, 32, 2, 2, 5],
                                                  dn=[128, 32, 32, 2, 8, 3])
    assert base == dict(PREFILL, tma=True)
    res = bk.variants(tmp_path / "v.json", overrides, buckets=[8], dtype=torch.float32)
    rows = res["rows"]
    assert len(rows) == len(bk.TUNE_SEEDS) * len(bk.TUNE_WAYS_RATIOS) and {r["tokens"] for r in rows} == {8}
    assert order == ["base", "half", "base"] * len(rows)  # the wrong variant was never timed
    assert len(wrong_runs) == 2  # captured and replayed once, never again on the point's other routings
    assert all(r["base"] == base and r["variant_over_base"] == [0.8, float("inf")] for r in rows)
    assert json.loads((tmp_path / "v.json").read_text())["overrides"] == overrides
    md = (tmp_path / "v.md").read_text()
    assert "| half_tail=1 | sorted_rows=1,half_tail=0 |" in md and "| 0.800 [0.800-0.800] | inf |" in md


@pytest.mark.parametrize("two,guard", [(False, False), (True, False), (False, True)])
def test_ws_probe_matmul_matches_its_twin(two, guard):
    # eval/ws_probe.py's matmul (the warp-specialisation probe's kernel) against its PyTorch twin, WS asked for (the
    # interpreter runs the loop as written); ragged M, N and K, descriptors made in the kernel
    from eval import ws_probe
    g = torch.Generator().manual_seed(3)
    M, N, K = 40, 24, 80
    a = torch.randn(M, K, generator=g)
    b = torch.randn(2 * N, K, generator=g)
    c = torch.full((M, N), float("nan"))
    flag = torch.tensor([M], dtype=torch.int32)
    ws_probe._launch(a, b, c, flag, True, guard=guard, two=two, BM=16, BN=16, BK=32)
    assert torch.allclose(c, ws_probe.matmul_reference(a, b, two), atol=1e-4, rtol=1e-4)
