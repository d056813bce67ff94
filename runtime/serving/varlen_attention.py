"""Variable-length attention for transformers' continuous batching, from torch alone (`ServeConfig(attention="varlen")`).

Why: with SDPA, transformers' continuous batching runs every step's attention over the whole batch's gathered KV
with a dense [query tokens x KV tokens] mask, so a saturated step of 64 decode tokens attends to every request's
cache at once. That is most of the engine's floor (eval/results/README.md, "Async batching on 5.24": 10.1 ms per
null-experts step in the engine against 2.23 ms for the same forward outside it), which caps what brownout can win.
A flash implementation instead packs the sequences (`cu_seq_lens_q/k`) and each query reads only its own KV.
Transformers takes that path for any attention implementation whose name contains "flash"; the `flash_attn` package
and the hub kernels it would load are not available offline, but torch ships FlashAttention-2 as
`torch.nn.attention.varlen.varlen_attn` (torch >= 2.10). `register()` puts it behind transformers' attention
registry under `NAME`.

Semantics (both paths): query i of sequence s attends to the keys of s up to its own position, aligned at the end
of the sequence (a sequence's queries are its last `q_len` tokens, as in flash's causal mode), optionally within a
sliding window of `sliding_window` tokens. Query rows past the last sequence (CUDA-graph padding) are not defined
by the flash kernel; the twin writes zeros there, and nothing downstream reads them.

`varlen_attention_reference` is the plain PyTorch twin (one SDPA call per sequence with an explicit mask); it runs
where the flash kernel cannot (the CPU, fp32, torch < 2.10), and tests compare the two.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import BrownoutError

NAME = "brownout_flash_varlen"  # "flash" in the name is what makes transformers' engine pack sequences for it
# checked on 5.24; 5.17's engine renames the attention "paged|<name>" and expects a paged wrapper registered for it
MIN_TRANSFORMERS = (5, 24)


def _flash_fn():
    """torch's varlen FlashAttention and how its causal flag is spelled, or None where there is none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


_FLASH = _flash_fn()


def flash_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the flash kernel runs for tensors on `device` in `dtype` (CUDA, half precision, torch >= 2.10)."""
    return _FLASH is not None and torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def varlen_attention_reference(q, k, v, cu_q, cu_k, scale: float, sliding_window: int | None = None):
    """q [Tq, H, D], k / v [Tk, Hkv, D], cu_q / cu_k [N + 1] cumulative lengths -> [Tq, H, D] (zeros past cu_q[-1])."""
    out = torch.zeros_like(q)
    rep = q.shape[1] // k.shape[1]
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        nq, nk = q1 - q0, k1 - k0
        if nq == 0:
            continue
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(rep, 0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(rep, 0)
        qpos = torch.arange(nk - nq, nk, device=q.device)[:, None]  # the queries are the sequence's last tokens
        kpos = torch.arange(nk, device=q.device)[None, :]
        allowed = kpos <= qpos
        if sliding_window is not None:
            allowed &= kpos > qpos - sliding_window
        o = torch.nn.functional.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=allowed,
                                                             scale=scale)
        out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out


def varlen_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, sliding_window: int | None = None):
    """Same contract as the twin; the flash kernel where it runs, the twin elsewhere."""
    if not flash_available(q.device, q.dtype):
        return varlen_attention_reference(q, k, v, cu_q, cu_k, scale, sliding_window)
    fn, has_window, has_gqa = _FLASH
    if q.shape[1] != k.shape[1] and not has_gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    kw = {"scale": scale}
    if q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    if has_window:
        kw["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif sliding_window is not None:
        raise BrownoutError("attention='varlen': this torch's varlen_attn has no sliding window (torch >= 2.11 has)")
    else:
        kw["is_causal"] = True
    return fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), **kw)


# kept out of a compiled graph, as transformers keeps its own paged flash call: the max lengths change every step
@torch.compiler.disable
def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, softcap=None,
                             is_causal: bool | None = None, s_aux=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention-function contract: query [1, H, Tq, D], key / value [1, Hkv, Tk, D] (the engine's
    paged cache has already gathered each sequence's KV, in the order of `cu_seq_lens_k`) -> ([1, Tq, H, D], None)."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise BrownoutError(f"attention {NAME!r} runs only inside continuous batching (packed sequences with "
                            f"cu_seq_lens_q/k); load the model with another attention for generate()")
    if softcap is not None or s_aux is not None or dropout:
        raise BrownoutError(f"attention {NAME!r} has no softcap, attention sinks or dropout; use sdpa for this model")
    if is_causal is False:
        raise BrownoutError(f"attention {NAME!r} is causal only")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if max_length_q is None or max_length_k is None:  # the twin does not need them; flash sizes its grid by them
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        max_length_k = int((cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]).max())
    out = varlen_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the function with transformers' attention registry (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME


def use_varlen_attention(model) -> list:
    """Switch `model` (every config of it and its sub-models) to `NAME`; returns [(config, previous implementation)]
    for `restore_attention`.

    Set on the configs directly: `model.set_attn_implementation` would take a name with "flash" in it for a
    flash_attn package or a hub kernel and try to load one (modeling_utils, transformers 5.24).
    """
    import transformers
    from packaging.version import Version
    from transformers import PreTrainedModel

    if Version(transformers.__version__).release < MIN_TRANSFORMERS:
        raise BrownoutError(f"attention='varlen' needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (this "
                            f"is {transformers.__version__}, whose engine wraps a flash attention in its own paged "
                            f"call); use attention='sdpa'")
    register()
    configs = {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}
    if any(not hasattr(c, "_attn_implementation_internal") for c in configs.values()):
        raise BrownoutError("attention='varlen': this transformers' configs have no _attn_implementation_internal")
    before = [(c, c._attn_implementation_internal) for c in configs.values()]
    for c, _ in before:
        c._attn_implementation_internal = NAME
    return before


def restore_attention(before: list) -> None:
    for c, impl in before:
        c._attn_implementation_internal = impl
