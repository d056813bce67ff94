"""torch.compile through the brownout custom ops (runtime.ops): one graph with no break, the ops in it, and a compiled
model that follows `set_ratio` without recompiling. The compiler backend is "aot_eager" (the full torch.compile front
end, functionalization included, without inductor's code generation, which is far too slow for a 2-core CPU)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from conftest import FAST, load
from runtime import BrownoutMoE, ops
from runtime.experts_impl import state_of
from unify.build import BuildOptions, build

FAMILY = "qwen2_moe"  # a shared expert beside the routed ones; the default SiLU layout the experts op covers


@pytest.fixture(scope="module")
def united(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"u-{FAMILY}")
    opts = {**FAST, "way": 2, "grouping": "similarity", "merge": "activation"}
    return str(build(tiny_dir(FAMILY), BuildOptions(out=str(out / "u"), **opts)))


def _inputs(model, b=2, s=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (b, s), generator=g)


class Recorder:
    """A torch.compile backend that keeps every graph it is given and runs it through aot_eager."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def count(self, op) -> int:
        return sum(n.target is op for g in self.graphs for n in g.graph.nodes)


def _eager(model, x, bm, ratio):
    bm.set_ratio(ratio)
    with torch.no_grad():
        return model(x, use_cache=False).logits


def _compiled(model):
    torch._dynamo.reset()
    rec = Recorder()
    fn = torch.compile(model, backend=rec, fullgraph=True)  # any graph break raises
    return rec, lambda x: fn(x, use_cache=False).logits


def test_compiled_model_follows_set_ratio_with_one_graph(tiny_dir, united):
    model = load(tiny_dir(FAMILY))
    x = _inputs(model)
    bm = BrownoutMoE.attach(model, united, ratio=0.5, backend="reference")
    want = {r: _eager(model, x, bm, r) for r in (0.5, 1.0, 0.0)}
    assert not torch.allclose(want[0.5], want[1.0])
    # Graph-safe mode (ratio 0 through the backend too). set_graph_safe refuses the reference backend because the
    # reference op reads the ratio on the host, which a CUDA graph cannot replay; torch.compile alone only needs the
    # ratio as a graph input, which the op gives it.
    for st in bm.layers.values():
        st.graph_safe = True
    rec, run = _compiled(model)
    with torch.no_grad():
        bm.set_ratio(0.5)
        got = run(x)
        assert rec.count(torch.ops.brownout.experts_reference.default) == len(bm.layers)
        torch.testing.assert_close(got, want[0.5], rtol=1e-4, atol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            bm.set_ratio(1.0)
            torch.testing.assert_close(run(x), want[1.0], rtol=1e-4, atol=1e-4)
            bm.set_ratio(0.0)  # the backend at ratio 0: the model's own computation up to summation order
            torch.testing.assert_close(run(x), want[0.0], rtol=1e-4, atol=1e-4)
    assert len(rec.graphs) == 1
    bm.detach()


def test_outside_graph_safe_mode_ratio0_is_the_model_and_moving_off_it_compiles_the_op(tiny_dir, united):
    model = load(tiny_dir(FAMILY))
    x = _inputs(model)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    bm = BrownoutMoE.attach(model, united, backend="reference")
    want = _eager(model, x, bm, 0.5)
    rec, run = _compiled(model)
    with torch.no_grad():
        bm.set_ratio(0.0)
        torch.testing.assert_close(run(x), ref, rtol=1e-5, atol=1e-5)
        assert rec.count(torch.ops.brownout.experts_reference.default) == 0  # the model's own implementation
        bm.set_ratio(0.5)  # the ratio-0 shortcut is a host bool: one more graph, now through the op
        torch.testing.assert_close(run(x), want, rtol=1e-4, atol=1e-4)
        want1 = _eager(model, x, bm, 1.0)
        with torch._dynamo.config.patch(error_on_recompile=True):  # off 0, a new value is no new graph
            bm.set_ratio(1.0)
            torch.testing.assert_close(run(x), want1, rtol=1e-4, atol=1e-4)
    assert rec.count(torch.ops.brownout.experts_reference.default) == len(bm.layers)
    bm.detach()


def test_grouped_backend_compiles_its_remap_op(tiny_dir, united):
    model = load(tiny_dir(FAMILY))
    x = _inputs(model)
    bm = BrownoutMoE.attach(model, united, ratio=0.5, backend="grouped")
    want = {r: _eager(model, x, bm, r) for r in (0.5, 1.0)}
    for st in bm.layers.values():
        st.graph_safe = True  # as above: no host float in the traced forward
    rec, run = _compiled(model)
    with torch.no_grad():
        bm.set_ratio(0.5)
        torch.testing.assert_close(run(x), want[0.5], rtol=1e-4, atol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            bm.set_ratio(1.0)
            torch.testing.assert_close(run(x), want[1.0], rtol=1e-4, atol=1e-4)
    assert rec.count(torch.ops.brownout.remap.default) == len(bm.layers)
    bm.detach()


def test_graph_safe_left_alone_layers_compile_to_the_fused_op(tiny_dir, tmp_path):
    """Graph-safe mode puts a left-alone layer on the fused kernel (the Triton interpreter here); compiled, it is the
    `experts_fused` op in the one graph, next to the united layers' `experts_triton`, and the graph follows
    set_ratio without recompiling."""
    model = load(tiny_dir(FAMILY))
    x = _inputs(model)
    opts = {**FAST, "way": 2, "grouping": "similarity", "merge": "activation", "skip_layers": [0]}
    bm = BrownoutMoE.attach(model, str(build(tiny_dir(FAMILY), BuildOptions(out=str(tmp_path / "u"), **opts))),
                            backend="triton")
    bm.set_graph_safe(True)
    assert bm.left_alone_on_kernel == [0]
    want = {r: _eager(model, x, bm, r) for r in (0.0, 1.0)}
    rec, run = _compiled(model)
    with torch.no_grad():
        bm.set_ratio(0.0)
        torch.testing.assert_close(run(x), want[0.0], rtol=1e-4, atol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            bm.set_ratio(1.0)
            torch.testing.assert_close(run(x), want[1.0], rtol=1e-4, atol=1e-4)
    assert rec.count(torch.ops.brownout.experts_fused.default) == 1
    assert rec.count(torch.ops.brownout.experts_triton.default) == len(bm.layers)
    assert len(rec.graphs) == 1
    bm.detach()


def test_expressible_is_the_default_silu_layout(tiny_dir):
    from runtime.discover import find_moe_layers

    assert all(ops.expressible(l.experts) for l in find_moe_layers(load(tiny_dir(FAMILY))))
    assert not any(ops.expressible(l.experts) for l in find_moe_layers(load(tiny_dir("gpt_oss"))))


def _op_inputs(T=6, H=8, I=4, E=4, G=2, k=2, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g, dtype=dtype).to(device)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
    w = torch.rand(T, k, generator=g, dtype=dtype).to(device)
    e2g = torch.tensor([0, 0, 1, 1], device=device)
    keep = torch.tensor([0.5], device=device)
    gate_up = torch.randn(E + G, 2 * I, H, generator=g, dtype=dtype).to(device)
    down = torch.randn(E + G, H, I, generator=g, dtype=dtype).to(device)
    return x, idx, w, e2g, keep, gate_up, down, G


@pytest.mark.parametrize("policy", ["hot-cold", "mass", "drop"])
def test_opcheck(policy):
    x, idx, w, e2g, keep, gate_up, down, G = _op_inputs()
    torch.library.opcheck(ops.experts_reference, (x, idx, w, e2g, keep, gate_up, down, G, policy))
    torch.library.opcheck(ops.remap, (idx, w, e2g, keep, G, policy))
    torch.library.opcheck(ops.remap, (idx[:, :1], w[:, :1], e2g, keep, G, policy))  # k == 1: no aliased output
    if torch.cuda.is_available() and ops.kernels.HAS_TRITON:
        args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in _op_inputs(dtype=torch.bfloat16)]
        torch.library.opcheck(ops.experts_triton, (*args, policy))


class SiluExperts:
    """What slab_forward reads from an experts module of the default layout (transformers' `_default_apply_gate`)."""

    is_transposed = False

    @staticmethod
    def _apply_gate(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up


def test_ops_follow_the_keep_tensor():
    """The ratio is read from `keep` at call time: writing it in place changes the result (what a compiled graph
    relies on), and the op equals the Python path at that ratio."""
    from runtime.policy import remap
    from runtime.reference import slab_forward

    x, idx, w, e2g, keep, gate_up, down, G = _op_inputs(T=12)
    outs = []
    for r in (0.0, 1.0):
        keep.fill_(1.0 - r)
        got = ops.experts_reference(x, idx, w, e2g, keep, gate_up, down, G, "hot-cold")
        a = remap(idx, w, e2g, G, r)
        want = slab_forward(SiluExperts, {"gate_up_proj": gate_up, "down_proj": down}, x, a.ids, a.weights)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        ids, _ = ops.remap(idx, w, e2g, keep, G, "hot-cold")
        assert torch.equal(ids, a.ids)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1])
