"""Calibration: text -> token batches -> per-layer routing statistics and token samples, one decoder layer at a time.

The walk is generic (GPTQ-style): one forward pass with every decoder layer replaced by a pass-through recorder
captures each layer's keyword arguments (position embeddings, the layer type's attention mask); then each layer is
materialised, run on the previous layer's outputs, and released. A pre-hook on the fused experts module sees exactly
what the experts see: the tokens and their top-k routing after the family's own router.
"""
from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import recipes

from .calib_data import LayerCalibration
from .loading import looks_like_path, missing_path_reason
from runtime.errors import BrownoutError

DEFAULT_CALIB = recipes.HERE / "calib_default.txt"
MIN_CALIB_TOKENS = 64  # below this, many experts of a layer with dozens of them (top-k of 64) get no token at all
TEXT_CHUNK = 1 << 16  # bytes read from a text file at a time, and the longest piece of text tokenised in one call
DATASET_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix -> datasets loader
SUPPORTED = "UTF-8 text, .json/.jsonl/.csv/.parquet files, a dataset directory or a hub dataset name"
MAX_BAD_SHARE = 0.1  # more undecodable bytes than this share of a chunk: binary, not text with a few stray bytes


def _text_problem(raw: bytes, text: str) -> str | None:
    """Why a chunk of a text file is binary data (NUL bytes, mostly invalid UTF-8), or None."""
    if b"\0" in raw:
        return "it holds NUL bytes"
    if text.count("\ufffd") > MAX_BAD_SHARE * max(1, len(text)):
        return "most of it is not valid UTF-8"
    return None


def _refuse_binary(source: str, why: str):
    raise BrownoutError(f"calibration file {source} is not text ({why}); give {SUPPORTED}")


def check_calib_source(source: str | None) -> None:
    """Refuse, before any model work, a calibration source that cannot be read: a missing local path, a local file
    that is neither UTF-8 text (judged by its first bytes, whatever its name) nor a dataset file, something that is
    neither a file nor a directory. Hub dataset names are not checked here (that needs the network)."""
    if source is None:
        return
    p = Path(source).expanduser()
    if not os.path.exists(p):
        if looks_like_path(source):
            raise BrownoutError(f"--calib {source}: {missing_path_reason(p, 'file or directory')}")
        return  # a dataset name
    if p.is_dir() or p.suffix.lower() in DATASET_FILES:
        return
    if not p.is_file():
        raise BrownoutError(f"--calib {source} is not a regular file; give {SUPPORTED}")
    try:
        with open(p, "rb") as f:
            raw = f.read(TEXT_CHUNK)
    except OSError as e:
        raise BrownoutError(f"cannot read calibration file {source}: {e.strerror or e}") from None
    why = _text_problem(raw, codecs.getincrementaldecoder("utf-8")("replace").decode(raw))
    if why:
        _refuse_binary(source, why)


def _text_file_pieces(path: Path, source: str) -> Iterator[str]:
    """The paragraphs (split at blank lines) of a UTF-8 text file, read TEXT_CHUNK bytes at a time; a paragraph
    longer than TEXT_CHUNK characters comes in pieces cut at a space where there is one. Undecodable bytes become
    U+FFFD; a chunk that is binary data stops the read with a one-line error."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    buf = ""
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(TEXT_CHUNK)
                text = decoder.decode(raw, final=not raw)
                why = _text_problem(raw, text)
                if why:
                    _refuse_binary(source, why)
                buf += text
                *done, buf = buf.split("\n\n")
                yield from (t for t in done if t.strip())
                while len(buf) > TEXT_CHUNK:  # one long paragraph (a single-line file): in bounded pieces
                    cut = buf.rfind(" ", 0, TEXT_CHUNK) + 1 or TEXT_CHUNK
                    piece, buf = buf[:cut], buf[cut:]
                    if piece.strip():
                        yield piece
                if not raw:
                    break
    except OSError as e:
        raise BrownoutError(f"cannot read calibration file {source}: {e.strerror or e}") from None
    if buf.strip():
        yield buf


def _dataset(source: str, p: Path, split: str):
    """A `datasets` dataset for a local data file or directory (streamed: read as it is iterated, nothing cached)
    or a hub name (memory-mapped from the cache)."""
    import datasets

    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):  # save_to_disk
            ds = datasets.load_from_disk(str(p))
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        if p.is_file():
            return datasets.load_dataset(DATASET_FILES[p.suffix.lower()], data_files=str(p), split=split,
                                         streaming=True)
        if p.is_dir():
            return datasets.load_dataset(str(p), split=split, streaming=True)
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise BrownoutError(f"cannot load calibration data {source!r}: {str(e).splitlines()[0][:200]}") from None


def iter_texts(source: str | None, split: str = "train", column: str = "text") -> Iterator[str]:
    """The calibration texts of `source`, lazily: a UTF-8 text file (by content, whatever its name), a local
    .json/.jsonl/.csv/.parquet file or dataset directory (never looked up on the hub), or a dataset name with split
    and column. Read only as far as it is iterated."""
    if source is None:
        source = str(DEFAULT_CALIB)
    check_calib_source(source)
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() not in DATASET_FILES:
        yield from _text_file_pieces(p, source)
        return
    with _datasets_quiet():
        ds = _dataset(source, p, split)
        names = getattr(ds, "column_names", None)
        if names is not None and column not in names:
            raise BrownoutError(f"calibration data {source!r} has no column {column!r}; columns: {names}")
        try:
            for row in ds:
                if column not in row:
                    raise BrownoutError(f"calibration data {source!r} has no column {column!r}; columns: "
                                        f"{sorted(row)}")
                t = row[column]
                if isinstance(t, str) and t.strip():
                    yield t
        except BrownoutError:
            raise
        except Exception as e:  # a malformed line of a streamed file surfaces while iterating
            raise BrownoutError(f"cannot read calibration data {source!r}: {str(e).splitlines()[0][:200]}") from None


@contextmanager
def _datasets_quiet():
    """`datasets` logs a failure before raising it; here the raised error is reported, in one line."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def load_texts(source: str | None, split: str = "train", column: str = "text") -> list[str]:
    """Every text of `source` (see `iter_texts`) as a list; the build streams them instead."""
    texts = list(iter_texts(source, split, column))
    if not texts:
        raise BrownoutError(f"calibration data {source!r} is empty")
    return texts


def tokenize(texts: Iterable[str], model_path: Path | None, vocab_size: int, num_tokens: int, seq_len: int,
             source: str | None = None) -> torch.Tensor:
    """[B, seq_len] token ids, num_tokens in all (fewer if the text runs out, but at least MIN_CALIB_TOKENS).
    Texts are read and tokenised one at a time and no further than the budget needs. Models saved without a
    tokenizer (tiny test models) get UTF-8 bytes modulo the vocabulary, which still exercises every expert."""
    tok = None
    if model_path is not None and any((model_path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
    ids: list[int] = []
    seen_text = False
    texts = iter(texts)
    try:
        for t in texts:
            seen_text = True
            # verbose=False: a long piece is only counted here, never fed to the model whole
            ids.extend(tok(t, verbose=False)["input_ids"] if tok is not None else [b % vocab_size for b in t.encode()])
            if len(ids) >= num_tokens:
                break
    finally:
        if hasattr(texts, "close"):  # a generator: close its file now, not when it is collected
            texts.close()
    name = source if source is not None else "the calibration data"
    if not seen_text:
        raise BrownoutError(f"calibration data {name!r} is empty")
    if len(ids) < MIN_CALIB_TOKENS:
        raise BrownoutError(f"calibration data {name!r} gives only {len(ids)} tokens after tokenisation; at least "
                            f"{MIN_CALIB_TOKENS} are needed")
    seq_len = min(seq_len, num_tokens, len(ids))
    n = min(len(ids), num_tokens) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, torch.nn.ModuleList) and len(mod) == model.config.num_hidden_layers:
            return name, mod
    raise BrownoutError(f"{type(model).__name__}: cannot find the decoder layer list")


class LayerStandIn(torch.nn.Module):
    """Base of modules put in a decoder layer's place for a pass: attribute reads it does not answer (a layer's
    `attention_type`, which some models read to pick a mask) go to the layer it replaces."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)


class _Recorder(LayerStandIn):
    """Stands in for a decoder layer: records its call and passes the hidden states through unchanged."""

    def __init__(self, layer: torch.nn.Module, sink: list):
        super().__init__(layer)
        self.sink = sink

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
