#!/usr/bin/env python3
"""Train the reference tokenizer (byte-level BPE, vocab 8192) on the train split and pre-tokenize.

Writes
    recipes/reference/model/{tokenizer.json, tokenizer_config.json, special_tokens_map.json}
    OUT/train.bin, OUT/heldout.bin    uint16 token ids, documents separated by <|endoftext|>
    OUT/train_counts.npy               per-token counts over train.bin (for the unigram baseline)
train.bin can be gzip-compressed (--gzip) so that it fits the device machine's carry limit.

Usage: python recipes/reference/tokenize_corpus.py [--corpus .corpus] [--model-dir recipes/reference/model]
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

VOCAB = 8192
EOS = "<|endoftext|>"


def iter_texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(train_jsonl: Path, model_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_texts(train_jsonl), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=512)
    model_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(model_dir))
    return fast


def encode_split(tok, jsonl: Path, eos_id: int) -> np.ndarray:
    ids: list[np.ndarray] = []
    batch: list[str] = []

    def flush():
        for enc in tok._tokenizer.encode_batch(batch, add_special_tokens=False):
            ids.append(np.asarray(enc.ids + [eos_id], dtype=np.uint16))
        batch.clear()

    for text in iter_texts(jsonl):
        batch.append(text)
        if len(batch) == 256:
            flush()
    flush()
    return np.concatenate(ids)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=".corpus")
    ap.add_argument("--model-dir", default="recipes/reference/model")
    ap.add_argument("--gzip", action="store_true", help="also write train.bin.gz")
    args = ap.parse_args(argv)
    corpus, model_dir = Path(args.corpus), Path(args.model_dir)
    tok = train_tokenizer(corpus / "train.jsonl", model_dir)
    eos_id = tok.convert_tokens_to_ids(EOS)
    assert len(tok) == VOCAB, len(tok)
    for split in ("train", "heldout"):
        arr = encode_split(tok, corpus / f"{split}.jsonl", eos_id)
        arr.tofile(corpus / f"{split}.bin")
        print(f"{split}: {arr.size:,} tokens ({arr.nbytes/2**20:.1f} MiB)", flush=True)
        if split == "train":
            np.save(corpus / "train_counts.npy", np.bincount(arr, minlength=VOCAB).astype(np.int64))
            if args.gzip:
                with gzip.open(corpus / "train.bin.gz", "wb", compresslevel=6) as f:
                    f.write(arr.tobytes())
                print(f"train.bin.gz: {(corpus / 'train.bin.gz').stat().st_size/2**20:.1f} MiB")


if __name__ == "__main__":
    main()
