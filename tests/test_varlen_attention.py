"""runtime.serving.varlen_attention: the PyTorch twin against one dense masked SDPA over the packed batch, the engine
served with it (the same greedy tokens as SDPA through transformers' continuous batching, and the twin really
called), the server switching the model's attention for the engine's lifetime only, and, on CUDA, torch's
FlashAttention against the twin in bf16 and fp16."""
import pytest
import torch

from runtime.errors import BrownoutError
from runtime.serving import BrownoutServer, FixedRatio, Request, ServeConfig, Trace
from runtime.serving import varlen_attention as va


def _packed(q_lens, k_lens, h, hkv, d, pad_q=0, pad_k=0, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(q_lens) + pad_q, sum(k_lens) + pad_k
    q, k, v = (torch.randn(n, hh, d, generator=g).to(device, dtype) for n, hh in ((tq, h), (tk, hkv), (tk, hkv)))
    cum = lambda xs: torch.tensor([0] + [sum(xs[:i + 1]) for i in range(len(xs))], dtype=torch.int32)  # noqa: E731
    return q, k, v, cum(q_lens).to(device), cum(k_lens).to(device)


def _dense(q, k, v, q_lens, k_lens, scale, window=None, causal=True):
    """Independent reference: one SDPA over the whole packed batch, with a block-diagonal mask built token by token
    from each token's (sequence, position)."""
    qs = torch.cat([torch.full((n,), s) for s, n in enumerate(q_lens)])
    ks = torch.cat([torch.full((n,), s) for s, n in enumerate(k_lens)])
    qp = torch.cat([torch.arange(nk - nq, nk) for nq, nk in zip(q_lens, k_lens)])
    kp = torch.cat([torch.arange(nk) for nk in k_lens])
    m = (qs[:, None] == ks[None, :]) & ((kp[None, :] <= qp[:, None]) | (not causal))
    if window is not None:
        m &= kp[None, :] > qp[:, None] - window
    rep = q.shape[1] // k.shape[1]
    nq, nk = len(qs), len(ks)
    o = torch.nn.functional.scaled_dot_product_attention(
        q[:nq].transpose(0, 1).float(), k[:nk].transpose(0, 1).repeat_interleave(rep, 0).float(),
        v[:nk].transpose(0, 1).repeat_interleave(rep, 0).float(), attn_mask=m, scale=scale)
    return o.transpose(0, 1)


@pytest.mark.parametrize("h,hkv,window", [(4, 4, None), (4, 2, None), (4, 1, 3)])
def test_twin_matches_one_dense_masked_attention(h, hkv, window):
    """Decode tokens, prompt chunks with history and a whole prompt in one packed batch, plus CUDA-graph padding
    past the last sequence (zero rows out, padded KV never read)."""
    q_lens, k_lens = [1, 5, 1, 7, 3], [9, 5, 1, 12, 20]
    q, k, v, cq, ck = _packed(q_lens, k_lens, h, hkv, 8, pad_q=4, pad_k=6)
    out = va.varlen_attention_reference(q, k, v, cq, ck, 0.3, window)
    ref = _dense(q, k, v, q_lens, k_lens, 0.3, window)
    torch.testing.assert_close(out[:sum(q_lens)], ref, rtol=1e-5, atol=1e-5)
    assert out[sum(q_lens):].abs().max() == 0
    assert not torch.allclose(ref, _dense(q, k, v, q_lens, k_lens, 0.3, causal=False))  # the data test causality


def test_forward_contract_and_one_line_refusals():
    q, k, v, cq, ck = _packed([2, 1], [4, 3], 2, 1, 8)
    fq, fk, fv = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # transformers' [1, H, T, D]
    out, w = va.varlen_attention_forward(None, fq, fk, fv, None, scaling=0.25, cu_seq_lens_q=cq, cu_seq_lens_k=ck,
                                         max_length_q=2, max_length_k=4, is_causal=True)
    assert w is None and out.shape == (1, 3, 2, 8)
    torch.testing.assert_close(out[0], va.varlen_attention_reference(q, k, v, cq, ck, 0.25))
    for bad in (dict(), dict(cu_seq_lens_q=cq, cu_seq_lens_k=ck, softcap=30.0),
                dict(cu_seq_lens_q=cq, cu_seq_lens_k=ck, is_causal=False)):
        with pytest.raises(BrownoutError) as e:
            va.varlen_attention_forward(None, fq, fk, fv, None, **bad)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny_model():
    from eval.throttled_serving import tiny_model as build

    return build()


def test_the_engine_generates_the_same_tokens_as_sdpa(tiny_model, monkeypatch):
    """transformers' continuous batching with the varlen attention (packed sequences, no mask) gives the greedy
    tokens it gives with SDPA, on prompts longer than a step's token budget (chunked prefill), and calls the twin."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    calls = []
    twin = va.varlen_attention_reference
    monkeypatch.setattr(va, "varlen_attention_reference", lambda *a, **kw: calls.append(1) or twin(*a, **kw))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 17, 3, 40, 9)]
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    tokens = {}
    for attention in ("sdpa", "varlen"):
        before = va.use_varlen_attention(tiny_model) if attention == "varlen" else None
        try:
            cbc = ContinuousBatchingConfig(max_requests_per_batch=4, max_batch_tokens=32, num_blocks=32, page_size=16)
            res = tiny_model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cbc,
                                            progress_bar=False)
        finally:
            if before is not None:
                va.restore_attention(before)
        tokens[attention] = [res[k].generated_tokens for k in sorted(res)]
    assert tiny_model.config._attn_implementation == "sdpa"
    assert calls and all(len(t) == 10 for t in tokens["varlen"])
    assert tokens["varlen"] == tokens["sdpa"]


def test_server_switches_the_attention_for_the_engine_only(tiny_model):
    class Handle:
        def __init__(self, model):
            self.model, self.ratios = model, []

        def set_ratio(self, r):
            self.ratios.append(r)

    cfg = dict(num_blocks=64, page_size=32, max_batch_tokens=128, max_memory_percent=None)
    tr = Trace([Request(i, 0.01 * i, p, o) for i, (p, o) in enumerate([(5, 4), (12, 3), (30, 2)])], {"kind": "test"})
    with BrownoutServer(Handle(tiny_model), FixedRatio(0.5), ServeConfig(attention="varlen", **cfg)) as srv:
        assert tiny_model.config._attn_implementation == va.NAME
        res = srv.run(tr)
    assert tiny_model.config._attn_implementation == "sdpa"
    assert res.errors == [] and [len(r.token_times) for r in res.requests] == [4, 3, 2]
    with pytest.raises(BrownoutError, match="attention") as e:
        BrownoutServer(Handle(tiny_model), None, ServeConfig(attention="flash", **cfg)).run(tr)
    assert "\n" not in str(e.value) and tiny_model.config._attn_implementation == "sdpa"
    # compiled, the engine still compiles its varlen path (transformers would not, for a "flash" attention)
    srv = BrownoutServer(Handle(tiny_model), None, ServeConfig(attention="varlen", compile=True, **cfg))
    mgr = srv._manager()
    try:
        assert mgr.continuous_batching_config.varlen_compile_config is not None
    finally:
        mgr.destroy()


def test_an_older_transformers_is_refused_in_one_line(tiny_model, monkeypatch):
    """5.17's engine renames the attention "paged|<name>" and wants its own paged wrapper: refused before any
    engine starts, the model's attention untouched."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(BrownoutError, match="transformers >= 5.24") as e:
        va.use_varlen_attention(tiny_model)
    assert "\n" not in str(e.value) and tiny_model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available() or va._FLASH is None, reason="torch's FlashAttention needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv,window", [(16, 16, None), (32, 4, None), (16, 8, 64)])
def test_flash_matches_the_twin_on_cuda(dtype, h, hkv, window):
    q_lens, k_lens = [1] * 40 + [64, 200, 1, 17], [300] * 20 + [1, 7] * 10 + [64, 900, 3000, 17]
    q, k, v, cq, ck = _packed(q_lens, k_lens, h, hkv, 128, pad_q=24, pad_k=100, dtype=dtype, device="cuda")
    assert va.flash_available(q.device, dtype)
    out = va.varlen_attention(q, k, v, cq, ck, 200, 4096, 128 ** -0.5, window)
    ref = va.varlen_attention_reference(q, k, v, cq, ck, 128 ** -0.5, window)
    n = sum(q_lens)
    torch.testing.assert_close(out[:n].float(), ref[:n].float(), rtol=2e-2, atol=2e-2)
