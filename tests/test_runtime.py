"""BrownoutMoE: ratio 0 is the model bit for bit, ratio 1 is the united model, Algorithm 1 exactly, bad input."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, FAST, load, make_tiny
from runtime import BrownoutMoE
from runtime.experts_impl import state_of
from runtime.policy import check_policy, remap
from runtime.ratio import Ratio, check_ratio
from unify.build import BuildOptions, build
from runtime.checkpoint import UnitedCheckpoint
from runtime.discover import find_moe_layers
from runtime.errors import BrownoutError


@pytest.fixture(scope="module")
def united(tiny_dir, tmp_path_factory):
    cache = {}

    def get(family, **kw):
        key = (family, repr(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"u-{family}")
            opts = {**FAST, "way": 2, "grouping": "similarity", "merge": "activation", **kw}
            cache[key] = str(build(tiny_dir(family), BuildOptions(out=str(out / "u"), **opts)))
        return cache[key]

    return get


def _inputs(model, b=4, s=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (b, s), generator=g)


def _replaced_copy(model, ck: UnitedCheckpoint):
    """The model with every expert of a united layer replaced by its group's united expert."""
    twin = copy.deepcopy(model)
    for layer in find_moe_layers(twin):
        if layer.index not in ck.layers:
            continue
        t = ck.tensors(layer.index)
        g = t["expert_to_group"]
        with torch.no_grad():
            for k in layer.layout.native_keys():
                getattr(layer.experts, k).copy_(t[k][g])
    return twin


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio0_identical_ratio1_united_detach_exact(tiny_dir, united, family):
    model = load(tiny_dir(family))
    x = _inputs(model)
    with torch.no_grad():
        ref = model(x).logits
        ck = UnitedCheckpoint(united(family))
        twin = _replaced_copy(model, ck)
        want1 = twin(x).logits
        bm = BrownoutMoE.attach(model, united(family))
        assert torch.equal(model(x).logits, ref)
        bm.set_ratio(1.0)
        got1 = model(x).logits
        assert not torch.equal(got1, ref)
        torch.testing.assert_close(got1, want1, rtol=1e-4, atol=1e-4)
        bm.set_ratio(0.0)
        assert torch.equal(model(x).logits, ref)
        bm.detach()
        assert torch.equal(model(x).logits, ref)
        assert all(state_of(l.experts) is None for l in find_moe_layers(model))


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_generate_same_tokens_at_ratio0(tiny_dir, united, family):
    model = load(tiny_dir(family))
    x = _inputs(model, b=2, s=8)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in a batch
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(x, **kw)
    bm = BrownoutMoE.attach(model, united(family))
    assert torch.equal(model.generate(x, **kw), ref)
    bm.set_ratio(0.5)
    torch.manual_seed(0)
    out = model.generate(x, **{**kw, "do_sample": True, "top_k": 5})  # sampling with the KV cache at ratio 0.5
    assert out.shape == ref.shape
    bm.detach()
    assert torch.equal(model.generate(x, **kw), ref)


# -- Algorithm 1 on crafted routings -------------------------------------------------------------------------------
def algorithm1(idx: list[list[int]], e2g: list[int], r: float, drop=False):
    """A direct, loop-by-loop reading of docs/design.md §4, independent of runtime.policy."""
    E = len(e2g)
    count = [0] * E
    for row in idx:
        for e in row:
            count[e] += 1
    total = sum(count)
    order = sorted(range(E), key=lambda e: (-count[e], e))
    hot, acc = set(), 0
    for e in order:
        if acc >= (1 - r) * total or count[e] == 0:
            break
        hot.add(e)
        acc += count[e]
    cold = {e for e in range(E) if count[e] > 0 and e not in hot}
    per_group = {}
    for e in cold:
        per_group.setdefault(e2g[e], set()).add(e)
    united = set() if drop else {e for e in cold if len(per_group[e2g[e]]) >= 2}
    return hot, united, cold


CRAFTED = [[0, 1], [0, 2], [0, 3], [1, 2], [4, 5], [6, 7], [0, 4], [1, 6], [0, 5], [2, 3]]


@pytest.mark.parametrize("r", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("case", ["crafted", "random"])
def test_policy_matches_algorithm1(r, case):
    E, G = 8, 4
    e2g = [0, 0, 1, 1, 2, 2, 3, 3]
    if case == "crafted":
        idx = torch.tensor(CRAFTED)
    else:
        g = torch.Generator().manual_seed(int(r * 100))
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(13)])
    w = torch.rand(idx.shape, generator=torch.Generator().manual_seed(1))
    hot, uni, cold = algorithm1(idx.tolist(), e2g, r)
    a = remap(idx, w, torch.tensor(e2g), G, r, "hot-cold")
    assert set(a.hot.nonzero().flatten().tolist()) == hot
    assert set(a.united.nonzero().flatten().tolist()) == uni
    skip = E + G
    for t, row in enumerate(idx.tolist()):
        seen = {}
        for s, e in enumerate(row):
            want = E + e2g[e] if e in uni else e
            if want in seen:  # same-group slots of one token: computed once, weights added
                assert a.ids[t, s] == skip and a.weights[t, s] == 0
                assert torch.isclose(a.weights[t, seen[want]], w[t, seen[want]] + w[t, s])
            else:
                assert a.ids[t, s] == want
                seen[want] = s
    d = remap(idx, w, torch.tensor(e2g), G, r, "drop")
    for t, row in enumerate(idx.tolist()):
        for s, e in enumerate(row):
            assert (d.ids[t, s] == skip) == (e in cold)
            assert d.weights[t, s] == (0 if e in cold else w[t, s])


def test_crafted_hot_set_values():
    """The crafted case worked by hand: counts 0:5 1:3 2:3 3:2 4:2 5:2 6:2 7:1 (20 assignments)."""
    e2g = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    idx, w = torch.tensor(CRAFTED), torch.ones(10, 2)
    a = remap(idx, w, e2g, 4, 0.5)  # line at 10: 0 (5) + 1 (3) = 8 < 10, + 2 (3) = 11 crosses -> {0, 1, 2}
    assert a.hot.nonzero().flatten().tolist() == [0, 1, 2]
    assert a.united.nonzero().flatten().tolist() == [4, 5, 6, 7]  # 3 is its group's lone cold member
    a = remap(idx, w, e2g, 4, 0.75)  # line at 5: expert 0 alone reaches it
    assert a.hot.nonzero().flatten().tolist() == [0]
    assert a.united.nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7]  # 1: lone cold member of group {0, 1}
    a = remap(idx, w, e2g, 4, 1.0)
    assert a.hot.sum() == 0 and a.united.all()


def test_mass_policy_ranks_by_weight():
    e2g = torch.tensor([0, 0, 1, 1])
    idx = torch.tensor([[0], [0], [0], [1], [2], [3]])
    w = torch.tensor([[0.01], [0.01], [0.01], [0.9], [0.9], [0.9]])
    count = remap(idx, w, e2g, 2, 0.5, "hot-cold")
    mass = remap(idx, w, e2g, 2, 0.5, "mass")
    assert count.hot.nonzero().flatten().tolist() == [0]  # most assignments
    assert 0 not in mass.hot.nonzero().flatten().tolist()  # least mass


def test_reference_and_grouped_backends_agree(tiny_dir, united):
    model = load(tiny_dir("qwen3_moe"))
    x = _inputs(model)
    bm = BrownoutMoE.attach(model, united("qwen3_moe"), ratio=0.5, backend="reference")
    assert bm.backend == "reference"
    with torch.no_grad():
        a = model(x).logits
        bm.set_backend("grouped")
        assert bm.backend == "grouped"
        b = model(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bm.set_path("reference")  # the older name still works
    assert bm.backend == "reference"
    bm.detach()


def test_auto_backend_on_cpu_is_reference(tiny_dir, united):
    """"auto" never picks the Triton interpreter: on CPU it is the reference backend, chosen once at attach."""
    model = load(tiny_dir("qwen3_moe"))
    bm = BrownoutMoE.attach(model, united("qwen3_moe"))
    assert bm.backends == {i: "reference" for i in bm.layers}
    bm.detach()


def test_unknown_and_unsupported_backends_refused(tiny_dir, united, monkeypatch):
    model = load(tiny_dir("qwen3_moe"))
    with pytest.raises(ValueError, match="unknown compute backend 'kernl'.*reference, grouped, triton"):
        BrownoutMoE.attach(model, united("qwen3_moe"), backend="kernl")
    bm = BrownoutMoE.attach(model, united("qwen3_moe"), backend="grouped")
    for bad in ("kernl", "Triton", None):
        with pytest.raises(ValueError, match="unknown compute backend"):
            bm.set_backend(bad)
    with pytest.raises(ValueError, match="unknown compute backend 'kernl'"):
        bm.set_path("kernl")
    # without the Triton interpreter the fused kernel runs on CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BrownoutError, match="'triton' is not supported here"):
        bm.set_backend("triton")
    with pytest.raises(BrownoutError, match="'triton' is not supported here"):
        bm.set_path("kernel")
    assert bm.backend == "grouped"  # a refused choice changes nothing
    bm.detach()


def test_graph_safe_refused_where_the_ratio_is_read_on_the_host(tiny_dir, united):
    model = load(tiny_dir("qwen3_moe"))
    bm = BrownoutMoE.attach(model, united("qwen3_moe"), backend="reference")
    with pytest.raises(BrownoutError, match="graph-safe.*backend 'reference' reads it on the host"):
        bm.set_graph_safe(True)
    assert not bm.graph_safe
    bm.set_backend("triton")  # the interpreter here
    bm.set_policy("mass")
    with pytest.raises(BrownoutError, match="policy 'mass'"):
        bm.set_graph_safe(True)
    bm.set_policy("hot-cold")
    bm.set_graph_safe(True)
    assert bm.graph_safe
    with pytest.raises(BrownoutError, match="graph-safe"):
        bm.set_backend("grouped")  # would silently freeze the ratio of a captured graph
    with pytest.raises(BrownoutError, match="graph-safe"):
        bm.set_policy("mass")
    assert bm.backend == "triton" and bm.policy == "hot-cold"
    bm.set_graph_safe(False)
    bm.detach()


def test_graph_safe_ratio_zero_runs_the_backend(tiny_dir, united, monkeypatch):
    """Graph-safe mode runs ratio 0 through the fused kernel (Triton interpreter here): every expert stays hot, so the
    logits are the model's within float rounding. Off again, ratio 0 is the model's own implementation bit for bit."""
    from runtime import kernels

    calls = []
    fused = kernels.fused_moe.fused_moe
    monkeypatch.setattr(kernels.fused_moe, "fused_moe", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = load(tiny_dir("qwen3_moe"))
    x = _inputs(model)
    with torch.no_grad():
        want = model(x).logits
        bm = BrownoutMoE.attach(model, united("qwen3_moe"), backend="triton")
        assert torch.equal(model(x).logits, want) and not calls
        bm.set_graph_safe(True)
        torch.testing.assert_close(model(x).logits, want, rtol=1e-4, atol=1e-4)
        assert len(calls) == len(bm.layers)
        bm.set_graph_safe(False)
        assert torch.equal(model(x).logits, want)
    bm.detach()


def test_graph_safe_runs_left_alone_layers_on_the_kernel(tiny_dir, united, monkeypatch):
    """In graph-safe mode a layer the checkpoint left alone runs the fused kernel over its own experts (the Triton
    interpreter here): the model's computation within float rounding, at every ratio. left_alone="own" keeps the
    model's implementation there; off again, ratio 0 is the model bit for bit; a bad choice is refused."""
    from runtime import kernels

    slabs_per_call = []
    fused = kernels.fused_moe.fused_moe
    monkeypatch.setattr(kernels.fused_moe, "fused_moe",
                        lambda *a, **k: slabs_per_call.append(a[1].shape[0]) or fused(*a, **k))
    model = load(tiny_dir("qwen3_moe"))
    x = _inputs(model)
    with torch.no_grad():
        want = model(x).logits
        bm = BrownoutMoE.attach(model, united("qwen3_moe", skip_layers=[0]), backend="triton")
        left = sorted(set(bm.moe) - set(bm.layers))
        assert left == [0] and bm.layers and bm.left_alone_on_kernel == []
        E = bm.moe[0].num_experts
        bm.set_ratio(1.0)
        want1 = model(x).logits  # the left-alone layer on the model's own implementation
        with pytest.raises(BrownoutError, match="left_alone must be"):
            bm.set_graph_safe(True, left_alone="fast")
        assert not bm.graph_safe
        bm.set_graph_safe(True)
        assert bm.left_alone_on_kernel == [0] and "on the fused kernel (graph-safe mode): [0]" in bm.summary()
        slabs_per_call.clear()
        torch.testing.assert_close(model(x).logits, want1, rtol=1e-4, atol=1e-4)
        # one call per MoE layer: the left-alone one over its E experts, each united one over E + G slabs
        assert sorted(slabs_per_call) == sorted([E] + [E + st.num_groups for st in bm.layers.values()])
        bm.set_ratio(0.0)
        torch.testing.assert_close(model(x).logits, want, rtol=1e-4, atol=1e-4)
        bm.set_graph_safe(True, left_alone="own")
        slabs_per_call.clear()
        torch.testing.assert_close(model(x).logits, want, rtol=1e-4, atol=1e-4)
        assert bm.left_alone_on_kernel == [] and E not in slabs_per_call
        bm.set_graph_safe(True)
        bm.set_graph_safe(False)
        assert bm.left_alone_on_kernel == [] and torch.equal(model(x).logits, want)
        bm.set_graph_safe(True)
    bm.detach()  # clears the left-alone layer's kernel flag with the rest
    assert not any(k.startswith("_brownout") for k in vars(bm.moe[0].experts))
    with torch.no_grad():
        assert torch.equal(model(x).logits, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernel needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_left_alone_layers_on_the_cuda_kernel_match_the_model(tiny_dir, united, dtype):
    """On CUDA, in bf16 and fp16, a left-alone layer on the fused kernel gives the model's logits within the dtype's
    rounding (the comparison is the same model in graph-safe mode with left_alone="own")."""
    model = load(tiny_dir("qwen3_moe")).to("cuda", dtype)
    x = _inputs(model).cuda()
    bm = BrownoutMoE.attach(model, united("qwen3_moe", skip_layers=[0]), backend="triton")
    with torch.no_grad():
        bm.set_graph_safe(True, left_alone="own")
        want = model(x).logits.float()
        bm.set_graph_safe(True)
        assert bm.left_alone_on_kernel == [0]
        got = model(x).logits.float()
    bm.detach()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_kernel_path_follows_the_ratio_in_device_memory(tiny_dir, united):
    """The triton backend (Triton interpreter here) computes what the reference backend does, and set_ratio rewrites
    the same device scalar the kernel reads, so a CUDA graph captured once serves every later ratio."""
    from runtime.kernels import fused_moe as fm

    model = load(tiny_dir("qwen3_moe"))
    x = _inputs(model)
    bm = BrownoutMoE.attach(model, united("qwen3_moe"))
    experts = [m for m in model.modules() if state_of(m) is not None]
    assert experts and all(fm.supported(e, torch.float32, "cpu") for e in experts)
    ptrs = [state_of(e).ratio.keep.data_ptr() for e in experts]
    with torch.no_grad():
        for r in (0.5, 1.0, 0.25):
            bm.set_ratio(r)
            assert [state_of(e).ratio.keep.data_ptr() for e in experts] == ptrs  # written in place
            assert all(float(state_of(e).ratio.keep) == pytest.approx(1 - r) for e in experts)
            bm.set_backend("reference")
            want = model(x).logits
            bm.set_path("kernel")
            assert bm.backend == "triton"
            torch.testing.assert_close(model(x).logits, want, rtol=1e-4, atol=1e-4)
    bm.detach()


def test_ratio_object_writes_the_device_scalar_in_place():
    r = Ratio(0.25)
    keep, ptr = r.keep, r.keep.data_ptr()
    assert r.value == 0.25 and keep.dtype == torch.float32 and float(keep) == 0.75
    r.set(0.6)
    assert r.keep is keep and r.keep.data_ptr() == ptr
    assert r.value == 0.6 and float(r) == 0.6 and float(keep) == pytest.approx(0.4)
    assert keep.item() == torch.tensor(1.0 - 0.6, dtype=torch.float32).item()  # rounded like policy.hot_set rounds it
    with pytest.raises(BrownoutError):
        r.set(1.5)
    assert r.value == 0.6 and float(keep) == pytest.approx(0.4)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None, True])
def test_check_ratio_rejects(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_ratio(bad)


def test_check_ratio_and_policy_accept():
    assert check_ratio(0) == 0.0 and isinstance(check_ratio(1), float)
    assert [check_policy(p) for p in ("hot-cold", "mass", "drop")] == ["hot-cold", "mass", "drop"]


@pytest.mark.parametrize("bad", ["hotcold", "", None, "Drop"])
def test_check_policy_rejects(bad):
    with pytest.raises(BrownoutError, match="unknown brownout policy"):
        check_policy(bad)
    with pytest.raises(ValueError, match="unknown brownout policy"):
        remap(torch.tensor([[0, 1]]), torch.ones(1, 2), torch.tensor([0, 0]), 1, 0.5, bad)


def test_per_layer_ratio_and_summary(tiny_dir, united):
    model = load(tiny_dir("qwen2_moe"))
    bm = BrownoutMoE.attach(model, united("qwen2_moe"))
    bm.set_ratio({1: 0.5})
    assert bm.ratio == {0: 0.0, 1: 0.5, 2: 0.0}
    bm.set_ratio([0.1, 0.2, 0.3])
    assert bm.ratio == {0: 0.1, 1: 0.2, 2: 0.3}
    s = bm.summary()
    assert "4 united" in s and "ratio 0.2" in s and "MiB extra" in s
    assert bm.extra_bytes() == sum(t[8:].numel() * 4 for st in bm.layers.values() for t in st.slabs.values()) > 0
    bm.detach()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_bad_ratio(tiny_dir, united, bad):
    model = load(tiny_dir("qwen2_moe"))
    bm = BrownoutMoE.attach(model, united("qwen2_moe"), ratio=0.25)
    with pytest.raises(BrownoutError, match=r"\[0, 1\]"):
        bm.set_ratio(bad)
    with pytest.raises(BrownoutError, match=r"\[0, 1\]"):
        bm.set_ratio({0: bad})
    assert bm.ratio == {0: 0.25, 1: 0.25, 2: 0.25}
    bm.detach()


def test_bad_layer_map(tiny_dir, united):
    model = load(tiny_dir("qwen2_moe"))
    bm = BrownoutMoE.attach(model, united("qwen2_moe", skip_layers=[0]))
    with pytest.raises(BrownoutError, match="no united experts"):
        bm.set_ratio({0: 0.5})  # left alone by the checkpoint
    with pytest.raises(BrownoutError, match="no united experts"):
        bm.set_ratio({7: 0.5})  # no such layer
    bm.detach()


def _unchanged(model, x, ref):
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert all(state_of(l.experts) is None for l in find_moe_layers(model))
    assert model.config._experts_implementation != "brownout"


def test_checkpoint_of_another_model(tiny_dir, united, tmp_path):
    x = torch.randint(0, 96, (2, 8))
    other = make_tiny("qwen2_moe", seed=1)  # same config, other weights
    with torch.no_grad():
        ref = other(x).logits
    with pytest.raises(BrownoutError, match="another model"):
        BrownoutMoE.attach(other, united("qwen2_moe"))
    _unchanged(other, x, ref)
    bigger = make_tiny("qwen2_moe", hidden_size=48)  # other config
    with pytest.raises(BrownoutError, match="another model"):
        BrownoutMoE.attach(bigger, united("qwen2_moe"))
    mixtral = load(tiny_dir("mixtral"))
    with pytest.raises(BrownoutError, match="another model"):
        BrownoutMoE.attach(mixtral, united("qwen2_moe"))


def test_missing_and_corrupt_files(tiny_dir, united, tmp_path):
    import shutil

    model = load(tiny_dir("qwen2_moe"))
    x = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        ref = model(x).logits
    with pytest.raises(BrownoutError, match="does not exist"):
        BrownoutMoE.attach(model, tmp_path / "nope")
    d = tmp_path / "c"
    shutil.copytree(united("qwen2_moe"), d)
    f = d / "united.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(BrownoutError, match="corrupt"):
        BrownoutMoE.attach(model, d)
    f.unlink()
    with pytest.raises(BrownoutError, match="missing"):
        BrownoutMoE.attach(model, d)
    (d / "united.json").write_text("{not json")
    with pytest.raises(BrownoutError, match="corrupt"):
        BrownoutMoE.attach(model, d)
    _unchanged(model, x, ref)
    with pytest.raises(BrownoutError, match="policy"):
        BrownoutMoE.attach(model, united("qwen2_moe"), policy="nope")
    with pytest.raises(BrownoutError, match=r"\[0, 1\]"):
        BrownoutMoE.attach(model, united("qwen2_moe"), ratio=2)
    _unchanged(model, x, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tiny_dir, united, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral"), dtype=dtype).eval()
    x = _inputs(model, b=2, s=16)
    with torch.no_grad():
        ref = model(x).logits
        bm = BrownoutMoE.attach(model, united("mixtral"))
        assert all(st.slabs["gate_up_proj"].dtype == dtype for st in bm.layers.values())
        assert torch.equal(model(x).logits, ref)
        bm.set_ratio(1.0)
        assert torch.isfinite(model(x).logits).all()
        bm.detach()
