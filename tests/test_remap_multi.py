"""The multi-program path of the remap kernel (counting programs, then one map program per token block) under the
Triton interpreter: against runtime.policy.remap and ep_local_routing, and bit-equal to the single-program kernel.

The `multi` fixture forces the path at tiny T and shrinks the blocks (16 slots a program, at most 4 counting
programs), so a few dozen tokens already give several map programs, a partial last block, counting programs that
loop over chunks, and idle ones.
"""
import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

triton = pytest.importorskip("triton")

from runtime import policy  # noqa: E402
from runtime.ep_routing import EPRouting, ep_local_routing  # noqa: E402
from runtime.placement import place_united  # noqa: E402
from runtime.policy import keep_tensor  # noqa: E402

rk = importlib.import_module("runtime.kernels.remap")  # the module: runtime.kernels.remap is also the function

# (E, G, k, T): E not a power of two, k not a power of two, T not a multiple of the token block (16 // KP tokens)
SHAPES = [(11, 4, 2, 37), (60, 15, 8, 5), (7, 3, 3, 13), (16, 4, 4, 9), (9, 3, 1, 6)]


def _routing(E, k, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bias = -torch.log(torch.arange(1, E + 1, dtype=torch.float32))[torch.randperm(E, generator=g)]
    w, idx = (torch.randn(T, E, generator=g) + bias).softmax(-1).topk(k, -1)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype)


def _force_multi(monkeypatch):
    monkeypatch.setattr(rk, "MULTI_PROGRAM_SLOTS", 0)
    monkeypatch.setattr(rk, "BLOCK_SLOTS", 16)
    monkeypatch.setattr(rk, "MAX_COUNT_PROGRAMS", 4)


@pytest.fixture
def multi(monkeypatch):
    _force_multi(monkeypatch)


@pytest.mark.parametrize("pol", ["hot-cold", "drop"])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("E,G,k,T", SHAPES)
def test_multi_remap_matches_policy(multi, E, G, k, T, ratio, pol):
    idx, w = _routing(E, k, T, E * 1000 + T)
    e2g = torch.arange(E) % G
    keep = keep_tensor(ratio, "cpu") if ratio == 0.0 else None  # ratio 0 without `keep` is the identity: no kernel
    ids, wo = rk.remap(idx, w, e2g, G, ratio, pol, keep=keep)
    a = policy.remap(idx, w, e2g, G, ratio, pol)
    assert torch.equal(ids, a.ids)
    assert torch.allclose(wo, a.weights, atol=1e-6)


def test_multi_remap_reads_the_ratio_from_device_memory(multi):
    """One `keep` tensor rewritten between calls (as under a captured CUDA graph): each call follows the memory."""
    E, G, k, T = 16, 4, 4, 37
    idx, w = _routing(E, k, T, 5)
    e2g = torch.arange(E) % G
    keep = keep_tensor(0.0, "cpu")
    for r in (0.0, 0.3, 0.7, 1.0, 0.0):
        keep.fill_(1.0 - r)
        ids, wo = rk.remap(idx, w, e2g, G, 0.0, "hot-cold", keep=keep)
        a = policy.remap(idx, w, e2g, G, r, "hot-cold")
        assert torch.equal(ids, a.ids), r
        assert torch.allclose(wo, a.weights, atol=1e-6), r


@pytest.mark.parametrize("E,G,k,T,ratio,pol,ep,replicate", [
    (16, 4, 4, 37, 0.5, "hot-cold", 2, "none"), (60, 15, 4, 33, 0.7, "hot-cold", 2, "auto"),
    (12, 6, 2, 9, 0.5, "drop", 3, "all"), (16, 4, 4, 37, 0.0, "hot-cold", 2, "all"),
])
def test_multi_remap_ep_epilogue_matches_ep_local_routing(multi, E, G, k, T, ratio, pol, ep, replicate):
    """The EP epilogue in the map programs (token rows of a rank's chunk spread over several blocks), every rank."""
    idx, w = _routing(E, k, T, E * 1000 + T + ep)
    e2g = torch.arange(E) // (E // G)
    pl = place_united(e2g, ep, replicate)
    rank_of, pos = pl.tables("cpu")
    a = policy.remap(idx, w, e2g, G, ratio, pol)
    for rank in range(ep):
        routing = EPRouting(rank_of, pos, pl.local_slabs, rank, ep)
        ids, wo = rk.remap(idx, w, e2g, G, ratio, pol, keep=keep_tensor(ratio, "cpu"), ep=routing)
        want_ids, want_w = ep_local_routing(a.ids, a.weights, routing)
        assert torch.equal(ids, want_ids), rank
        assert torch.allclose(wo, want_w, atol=1e-6), rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multi_path_is_bit_equal_to_the_single_program(monkeypatch, dtype):
    """Same ids and the very same weights bits: both paths run the same table and dedup code on exact counts."""
    cases = []
    for E, G, k, T in SHAPES:
        idx, w = _routing(E, k, T, E + T, dtype)
        e2g = torch.arange(E) % G
        for pol in ("hot-cold", "drop"):
            args = (idx, w, e2g, G, 0.5, pol)
            cases.append((args, rk.remap(*args)))  # module defaults: the single program, 1024-slot blocks
    _force_multi(monkeypatch)
    for args, (ids, wo) in cases:
        multi_ids, multi_w = rk.remap(*args)
        assert torch.equal(multi_ids, ids) and torch.equal(multi_w, wo), args[1:]


def test_the_slot_count_picks_the_path(monkeypatch):
    """At the module's own constants: T * k above MULTI_PROGRAM_SLOTS runs the two kernels, up to it the one."""

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("wrong path")

    E, G, k = 12, 4, 4
    at_line = rk.MULTI_PROGRAM_SLOTS // k  # tokens of the largest single-program call
    idx, w = _routing(E, k, at_line + 3, 7)  # 3 more: not a multiple of the 256-token block
    e2g = torch.arange(E) % G
    for T, refused in ((at_line + 3, ["_remap_kernel"]), (at_line, ["_count_kernel", "_map_kernel"])):
        with monkeypatch.context() as m:
            for name in refused:
                m.setattr(rk, name, Refused())
            ids, wo = rk.remap(idx[:T], w[:T], e2g, G, 0.5)
        a = policy.remap(idx[:T], w[:T], e2g, G, 0.5)
        assert torch.equal(ids, a.ids) and torch.allclose(wo, a.weights, atol=1e-6), T


def test_bench_remap_forces_the_path_on_the_module():
    """eval.bench_remap forces a path through the module's constants (`runtime.kernels.remap` the attribute is the
    function) and puts them back after the capture."""
    import eval.bench_remap as br

    assert br.rk is rk
    seen = []
    _, run = br.variant("multi", True, 256)
    orig = br.capture
    try:
        br.capture = lambda fn: seen.append((rk.MULTI_PROGRAM_SLOTS, rk.BLOCK_SLOTS))
        run(lambda: None)
    finally:
        br.capture = orig
    assert seen == [(0, 256)] and (rk.MULTI_PROGRAM_SLOTS, rk.BLOCK_SLOTS) == (2048, 1024)
