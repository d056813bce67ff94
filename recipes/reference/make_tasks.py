#!/usr/bin/env python3
"""Build the local lm-eval tasks (recipes/reference/tasks/) from the held-out split, and calib.txt from train.

    python recipes/reference/make_tasks.py [--corpus .corpus]

* brownout_ppl   : 200 held-out passages (1-2k chars) scored with loglikelihood_rolling.
* brownout_cont  : 500 items; a held-out context (~600 chars) and four continuations (~120 chars):
                   the true one and three spans from other held-out documents.
* brownout_cloze : 500 items; a held-out context ending just before a word, four choices
                   "<word><rest of the line>" where three words are same-length distractors
                   drawn from other held-out documents; the right context is shared.
Every choice starts with a space and the context ends without one (target_delimiter ""), so
whitespace gives nothing away. Deterministic (fixed seeds). The loaders the YAML files name live in
recipes/reference/tasks/utils.py, which is source, not generated.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "recipes" / "reference" / "tasks"


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def passages(text: str, lo: int = 1000, hi: int = 2000) -> list[str]:
    """Cut a document into passages of lo..hi chars at paragraph (else line) boundaries."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        cand = (cur + "\n\n" + para) if cur else para
        if len(cand) <= hi:
            cur = cand
            continue
        if len(cur) >= lo:
            out.append(cur)
        cur = para if len(para) <= hi else ""
        if len(para) > hi:  # split a long paragraph at line breaks
            buf = ""
            for ln in para.split("\n"):
                if len(buf) + len(ln) + 1 > hi and len(buf) >= lo:
                    out.append(buf)
                    buf = ""
                buf = (buf + "\n" + ln) if buf else ln
            cur = buf if len(buf) <= hi else ""
    if len(cur) >= lo:
        out.append(cur)
    return out


def word_cut(s: str, n: int) -> str:
    """First ~n chars of s, cut at the last space before n (keeps s whole if it is shorter)."""
    if len(s) <= n:
        return s
    j = s.rfind(" ", int(n * 0.7), n)
    return s[: j if j > 0 else n]


def alpha_ratio(s: str) -> float:
    return sum(c.isalpha() for c in s) / max(1, len(s))


def make_ppl(docs, rng, n=200):
    cands = []
    for d in docs:
        ps = [p for p in passages(d["text"]) if alpha_ratio(p) > 0.45]
        rng.shuffle(ps)
        cands += [(d["id"], p) for p in ps[:3]]
    rng.shuffle(cands)
    cands = sorted(cands[:n], key=lambda x: x[0])
    return [{"id": f"ppl-{i}", "doc": did, "text": p} for i, (did, p) in enumerate(cands)]


def space_positions(text: str, lo: int, hi: int) -> list[int]:
    """Positions i with text[i] == ' ' preceded by a word char, inside [lo, hi)."""
    return [m.start() for m in re.finditer(r"(?<=\w) (?=\S)", text[lo:hi])]


def make_cont(docs, rng, n=500, ctx_len=600, cont_len=120):
    by_id = {d["id"]: d["text"] for d in docs}
    ids = [d["id"] for d in docs if len(d["text"]) > ctx_len + cont_len + 50]
    weights = [min(len(by_id[i]), 40000) for i in ids]
    items, tries = [], 0
    while len(items) < n and tries < 50 * n:
        tries += 1
        did = rng.choices(ids, weights)[0]
        t = by_id[did]
        sp = [p + ctx_len for p in space_positions(t, ctx_len, len(t) - cont_len - 10)]
        if not sp:
            continue
        i = rng.choice(sp)
        ctx = t[i - ctx_len:i]
        ctx = ctx[ctx.find(" ") + 1:] if " " in ctx[:80] else ctx
        true = word_cut(t[i:i + cont_len + 30], cont_len)
        if alpha_ratio(true) < 0.5 or alpha_ratio(ctx) < 0.4 or len(true) < 0.7 * cont_len:
            continue
        dist = []
        while len(dist) < 3:
            oid = rng.choice(ids)
            if oid == did:
                continue
            o = by_id[oid]
            osp = space_positions(o, 0, len(o) - cont_len - 10)
            if not osp:
                continue
            j = rng.choice(osp)
            s = word_cut(o[j:j + cont_len + 30], cont_len)
            if alpha_ratio(s) >= 0.5 and len(s) >= 0.7 * cont_len and s != true:
                dist.append(s)
        choices = dist + [true]
        rng.shuffle(choices)
        items.append({"id": f"cont-{len(items)}", "doc": did, "context": ctx, "choices": choices,
                      "label": choices.index(true)})
    return items


STOP = set("""about above after again against because been before being below between both could does doing
down during each few from further have having here into itself just more most once only other over same
should some such than that their theirs them then there these they this those through under until very
were what when where which while whom will with would your yours also must shall used using""".split())


def make_cloze(docs, rng, n=500, ctx_len=400, right_len=60):
    by_id = {d["id"]: d["text"] for d in docs}
    ids = [d["id"] for d in docs if len(d["text"]) > ctx_len + right_len + 50]
    weights = [min(len(by_id[i]), 40000) for i in ids]
    vocab: dict[int, dict[str, set]] = {}
    for d in docs:
        for w in set(re.findall(r"(?<![\w.-])[a-z]{4,12}(?![\w-])", d["text"])):
            vocab.setdefault(len(w), {}).setdefault(w, set()).add(d["id"])
    vocab_l = {k: sorted(v) for k, v in vocab.items()}
    items, tries = [], 0
    while len(items) < n and tries < 50 * n:
        tries += 1
        did = rng.choices(ids, weights)[0]
        t = by_id[did]
        ms = [m for m in re.finditer(r"(?<=\w) ([a-z]{4,12})(?=[ ,.;:)\n])", t[ctx_len:len(t) - right_len])]
        if not ms:
            continue
        m = rng.choice(ms)
        w = m.group(1)
        if w in STOP:
            continue
        i = m.start() + ctx_len
        ctx = t[i - ctx_len:i]
        ctx = ctx[ctx.find(" ") + 1:] if " " in ctx[:80] else ctx
        right = t[i + 1 + len(w):].split("\n", 1)[0]
        right = word_cut(right, right_len)
        if alpha_ratio(ctx) < 0.45:
            continue
        local = t[max(0, i - ctx_len - 200): i + 400]
        pool = [v for L in (len(w) - 1, len(w), len(w) + 1) for v in vocab_l.get(L, [])
                if v != w and v not in STOP and did not in vocab[len(v)][v] and v not in local]
        if len(pool) < 3:
            continue
        dist = rng.sample(pool, 3)
        words = dist + [w]
        rng.shuffle(words)
        choices = [" " + x + right for x in words]
        items.append({"id": f"cloze-{len(items)}", "doc": did, "context": ctx, "choices": choices,
                      "label": words.index(w), "word": w})
    return items


def calib(train_jsonl: Path, out: Path, n_chars: int = 200_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = load(train_jsonl)
    docs = [d for d in docs if alpha_ratio(d["text"]) > 0.5]
    rng.shuffle(docs)
    parts, tot = [], 0
    for d in docs:
        ps = passages(d["text"], 500, 2000)
        if not ps:
            continue
        p = rng.choice(ps)
        parts.append(p)
        tot += len(p) + 2
        if tot >= n_chars:
            break
    out.write_text("\n\n".join(parts) + "\n", encoding="utf-8")


YAML_MC = """# {desc}
# Data: {name}.jsonl beside this file, built by recipes/reference/make_tasks.py from the reference
# corpus' held-out split. Loaded by utils.py in this folder (not by path), so the task works
# from any working directory: TaskManager(include_path="recipes/reference/tasks").
task: {name}
dataset_path: json
custom_dataset: !function utils.load_{name}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

YAML_PPL = """# Perplexity on 200 held-out passages (1-2k chars) of the reference corpus (loglikelihood_rolling).
# Data: brownout_ppl.jsonl beside this file, built by recipes/reference/make_tasks.py.
task: brownout_ppl
dataset_path: json
custom_dataset: !function utils.load_brownout_ppl
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=str(ROOT / ".corpus"))
    args = ap.parse_args(argv)
    corpus = Path(args.corpus)
    held = load(corpus / "heldout.jsonl")
    TASKS.mkdir(parents=True, exist_ok=True)
    sets = {
        "brownout_ppl": make_ppl(held, random.Random(1)),
        "brownout_cont": make_cont(held, random.Random(2)),
        "brownout_cloze": make_cloze(held, random.Random(3)),
    }
    for name, rows in sets.items():
        p = TASKS / f"{name}.jsonl"
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} items, {p.stat().st_size/1e3:.0f} kB, from {len({r['doc'] for r in rows})} docs")
    (TASKS / "brownout_ppl.yaml").write_text(YAML_PPL)
    (TASKS / "brownout_cont.yaml").write_text(YAML_MC.format(
        name="brownout_cont", desc="Pick the true ~120-char continuation of a held-out passage among 4 "
        "(3 drawn from other held-out documents). Chance 25%."))
    (TASKS / "brownout_cloze.yaml").write_text(YAML_MC.format(
        name="brownout_cloze", desc="A masked word among 4 same-length words (3 from other held-out "
        "documents), each scored with the shared rest of the line. Chance 25%."))
    (TASKS / "brownout.yaml").write_text(
        "# Group of the three local Brownout tasks.\ngroup: brownout\ntask:\n  - brownout_ppl\n"
        "  - brownout_cont\n  - brownout_cloze\nmetadata:\n  version: 1.0\n")
    calib(corpus / "train.jsonl", Path(__file__).resolve().parent / "calib.txt")
    print("calib.txt", (Path(__file__).resolve().parent / "calib.txt").stat().st_size)


if __name__ == "__main__":
    main()
