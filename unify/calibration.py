"""Calibration: text -> token batches -> per-layer routing statistics and token samples, one decoder layer at a time.

The walk is generic (GPTQ-style): one forward pass with every decoder layer replaced by a pass-through recorder
captures each layer's keyword arguments (position embeddings, the layer type's attention mask); then each layer is
materialised, run on the previous layer's outputs, and released. A pre-hook on the fused experts module sees exactly
what the experts see: the tokens and their top-k routing after the family's own router.
"""
from __future__ import annotations

from pathlib import Path
import torch

import recipes

from .calib_data import LayerCalibration
from runtime.errors import BrownoutError

DEFAULT_CALIB = recipes.HERE / "calib_default.txt"


def load_texts(source: str | None, split: str = "train", column: str = "text") -> list[str]:
    """A plain text file, a local `datasets` directory / data file, or a dataset name with split and column."""
    if source is None:
        source = str(DEFAULT_CALIB)
    p = Path(source)
    if p.is_file() and p.suffix in (".txt", ".md", ""):
        texts = [t for t in p.read_text(errors="replace").split("\n\n") if t.strip()]
    else:
        try:
            import datasets

            if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):  # save_to_disk
                ds = datasets.load_from_disk(str(p))
                ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
            elif p.is_file():
                ds = datasets.load_dataset(p.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(p), split=split)
            else:
                ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise BrownoutError(f"cannot load calibration data {source!r}: {str(e).splitlines()[0][:200]}") from None
        if column not in ds.column_names:
            raise BrownoutError(f"calibration data {source!r} has no column {column!r}; columns: {ds.column_names}")
        texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise BrownoutError(f"calibration data {source!r} is empty")
    return texts


def tokenize(texts: list[str], model_path: Path | None, vocab_size: int, num_tokens: int, seq_len: int) -> torch.Tensor:
    """[B, seq_len] token ids, num_tokens in all (fewer if the text runs out). Models saved without a tokenizer
    (tiny test models) get UTF-8 bytes modulo the vocabulary, which still exercises every expert."""
    tok = None
    if model_path is not None and any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] if tok is not None else [b % vocab_size for b in t.encode()])
        if len(ids) >= num_tokens:
            break
    seq_len = min(seq_len, num_tokens, max(1, len(ids)))
    n = min(len(ids), num_tokens) // seq_len
    if n == 0:
        raise BrownoutError("the calibration set is empty after tokenisation")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and len(mod) == model.config.num_hidden_layers:
            return name, mod
    raise BrownoutError(f"{type(model).__name__}: cannot find the decoder layer list")


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden states through unchanged."""

    def __init__(self, layer: torch.nn.Module, sink: list):
        super().__init__()
        self.layer, self.sink = layer, sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((args, kwargs))
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model, batches: torch.Tensor, batch_size: int, device) -> tuple[list[torch.Tensor], list[list]]:
    """Embedding outputs per batch, and per layer per batch the (args, kwargs) its forward receives."""
    name, layers = decoder_layers(model)
    sinks = [[] for _ in layers]
    originals = list(layers)
    embeds: list[torch.Tensor] = []
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, i, o: embeds.append(o))
    try:
        for i in range(len(layers)):
            layers[i] = _Recorder(originals[i], sinks[i])
        for b in range(0, batches.shape[0], batch_size):
            model(input_ids=batches[b : b + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
        for i in range(len(layers)):
            layers[i] = originals[i]
    return embeds, sinks


class MoEProbe:
    """Pre-hook on one fused experts module: counts routing and keeps a bounded uniform sample of its tokens."""

    def __init__(self, experts: torch.nn.Module, num_experts: int, max_samples: int, total_tokens: int, seed: int):
        self.freq = torch.zeros(num_experts, dtype=torch.float64)
        self.score_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.keep = min(1.0, max_samples / max(1, total_tokens))
        self.gen = torch.Generator().manual_seed(seed)
        self.x, self.idx, self.w = [], [], []
        self.tokens = 0
        self.handle = experts.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        vals = list(args) + list(kwargs.values())
        x, idx, w = vals[0], vals[1], vals[2]
        x2 = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x2).all():
            raise BrownoutError("NaN or inf in the activations entering an MoE layer during calibration")
        idx_c, w_c = idx.detach().cpu().long(), w.detach().cpu().double()
        self.freq.index_add_(0, idx_c.reshape(-1), torch.ones(idx_c.numel(), dtype=torch.float64))
        self.score_sum.index_add_(0, idx_c.reshape(-1), w_c.reshape(-1))
        self.tokens += x2.shape[0]
        pick = torch.rand(x2.shape[0], generator=self.gen) < self.keep
        self.x.append(x2.detach().cpu().float()[pick])
        self.idx.append(idx_c[pick])
        self.w.append(w_c.float()[pick])

    def result(self) -> LayerCalibration:
        self.handle.remove()
        return LayerCalibration(
            freq=self.freq.float(), score_sum=self.score_sum.float(), x=torch.cat(self.x), topk_idx=torch.cat(self.idx),
            topk_w=torch.cat(self.w), tokens=self.tokens,
        )
