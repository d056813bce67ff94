#!/usr/bin/env python3
"""Score a model on the local Brownout tasks without lm-eval (same semantics), plus a unigram baseline.

    python recipes/reference/score.py --model recipes/reference/model --counts .corpus/train_counts.npy

Close to lm-eval 0.4 HFLM: rolling perplexity over disjoint windows (lm-eval overlaps later windows' context, so its perplexity is a bit lower) of the model's length with an
<|endoftext|> prefix; multiple choice sums log p(choice | context) where the choice's tokens are
those of tokenize(context + choice) past tokenize(context); acc_norm divides by the choice's length
in characters. The unigram model is p(t) = (count_t + 1) / (N + V) from the train split's token
counts, scored on exactly the same tokens as the model's perplexity. Used on the GPU machine right
after training (it needs only torch, transformers and tokenizers) and as a cross-check of lm-eval.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

TASKS = Path(__file__).resolve().parent / "tasks"


def rows(name):
    return [json.loads(line) for line in open(TASKS / f"{name}.jsonl", encoding="utf-8")]


@torch.no_grad()
def logprobs(model, seqs: list[list[int]], dev, bs=32):
    """Per-sequence arrays of log p(seq[i] | seq[:i]) for i >= 1 (right-padded batches)."""
    out = []
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    res = [None] * len(seqs)
    for k in range(0, len(order), bs):
        idx = order[k:k + bs]
        L = max(len(seqs[i]) for i in idx)
        x = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(seqs[i])] = torch.tensor(seqs[i])
        x = x.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(input_ids=x, use_cache=False).logits
        lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0].cpu()
        for r, i in enumerate(idx):
            res[i] = lp[r, :len(seqs[i]) - 1].numpy().astype(np.float64)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="recipes/reference/model")
    ap.add_argument("--tokenizer", default=None, help="dir with tokenizer.json (default: --model)")
    ap.add_argument("--counts", default=".corpus/train_counts.npy")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    dev = torch.device(args.device)
    t0 = time.time()
    tok = Tokenizer.from_file(str(Path(args.tokenizer or args.model) / "tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    eos = tok.token_to_id("<|endoftext|>")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(dev).eval()
    W = args.max_len
    counts = np.load(args.counts).astype(np.float64)
    uni = np.log((counts + 1) / (counts.sum() + counts.size))
    res = {}

    # perplexity: disjoint windows of W predicted tokens, eos prefix (lm-eval rolling, context_len=1)
    docs = rows("brownout_ppl")[: args.limit]
    seqs, owners = [], []
    for d_i, d in enumerate(docs):
        ids = [eos] + enc(d["text"])
        for s in range(0, len(ids) - 1, W):
            seqs.append(ids[max(0, s - 0): s + W + 1] if s == 0 else ids[s - 1: s + W])
            owners.append(d_i)
    lps = logprobs(model, seqs, dev)
    nll = np.zeros(len(docs))
    ntok = np.zeros(len(docs))
    unll = np.zeros(len(docs))
    for o, s, lp in zip(owners, seqs, lps):
        nll[o] -= lp.sum()
        ntok[o] += len(lp)
        unll[o] -= uni[np.array(s[1:])].sum()
    words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
    nbytes = sum(len(d["text"].encode()) for d in docs)
    res["ppl"] = {
        "docs": len(docs), "tokens": int(ntok.sum()),
        "token_perplexity": math.exp(nll.sum() / ntok.sum()),
        "unigram_token_perplexity": math.exp(unll.sum() / ntok.sum()),
        "word_perplexity": math.exp(nll.sum() / words),
        "unigram_word_perplexity": math.exp(unll.sum() / words),
        "bits_per_byte": nll.sum() / nbytes / math.log(2),
        "unigram_bits_per_byte": unll.sum() / nbytes / math.log(2),
    }

    for name in ("brownout_cont", "brownout_cloze"):
        items = rows(name)[: args.limit]
        seqs, spans = [], []
        for it in items:
            ctx = enc(it["context"])
            for ch in it["choices"]:
                whole = enc(it["context"] + ch)
                cont = whole[len(ctx):]
                full = (ctx + cont)[-(W + 1):]
                seqs.append(full)
                spans.append(len(cont))
        lps = logprobs(model, seqs, dev)
        lls = [lp[-n:].sum() for lp, n in zip(lps, spans)]
        acc = accn = 0
        k = 0
        for it in items:
            m = len(it["choices"])
            ll = np.array(lls[k:k + m])
            k += m
            acc += int(np.argmax(ll) == it["label"])
            accn += int(np.argmax(ll / np.array([len(c) for c in it["choices"]])) == it["label"])
        res[name] = {"items": len(items), "acc": acc / len(items), "acc_norm": accn / len(items), "chance": 0.25}
    res["seconds"] = time.time() - t0
    print("SCORES " + json.dumps(res), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
