#!/usr/bin/env python3
"""Assemble the reference model's corpus from Debian documentation packages.

Reproducible: the packages are fetched with ``apt-get download`` (pinned versions, falling back to
the archive's candidate with a warning), unpacked with ``dpkg -x`` into a cache folder (nothing is
installed), and every file is turned into plain text with the standard library alone (HTML parser,
roff and POD strippers). One file is one document. Documents are split into ``train`` and
``heldout`` by a hash of their source path (about 3% held out), so the split does not depend on
the order in which files are read, and exact duplicates are dropped (first in sorted order wins).

Output (``--out``, default ``.corpus/``, ignored by git):
    train.jsonl, heldout.jsonl   one {"id", "source", "text"} per line
    stats.json                   per package: version, license, documents, characters

Usage:
    python recipes/reference/make_corpus.py [--out .corpus] [--cache .corpus/debs] [--sources-md recipes/reference/SOURCES.md]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

HELDOUT_PERCENT = 3
MIN_CHARS = 200

# package -> (pinned version, license summary, [(path regex, format)])
PACKAGES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "python3.11-doc": ("3.11.2-6+deb12u9", "PSF-2.0 (Python Software Foundation License)",
                       [(r"/html/_sources/.*\.rst\.txt$", "text")]),
    "linux-doc-6.1": ("6.1.192-2", "GPL-2 (kernel documentation; some files GPL-2+/dual BSD)",
                      [(r"/html/_sources/.*\.txt$", "text")]),
    "git-doc": ("1:2.39.5-0+deb12u3", "GPL-2", [(r"/usr/share/doc/git-doc/[^/]+\.txt$", "text")]),
    "perl-doc": ("5.36.0-7+deb12u4", "GPL-1+ or Artistic", [(r"/pod/.*\.pod$", "pod")]),
    "postgresql-doc-15": ("15.20-0+deb12u1", "PostgreSQL License (BSD-style)",
                          [(r"/html/.*\.html$", "html")]),
    "manpages": ("6.03-2", "Linux-man-pages-copyleft / GPL-2+ / BSD (per page)",
                 [(r"/share/man/man\d/[^/]+\.gz$", "roff")]),
    "manpages-dev": ("6.03-2", "Linux-man-pages-copyleft / GPL-2+ / BSD (per page)",
                     [(r"/share/man/man\d/[^/]+\.gz$", "roff")]),
    "glibc-doc": ("2.36-9+deb12u14", "LGPL-2.1+ (man pages)", [(r"/share/man/man\d/[^/]+\.gz$", "roff")]),
    "gnu-standards": ("2022.03.23-0.1", "GFDL-1.3 (no invariant sections)", [(r"\.text\.gz$", "text")]),
    "debian-reference-en": ("2.100", "GPL-2+", [(r"/ch\d+\.en\.html$", "html")]),
    "debian-policy": ("4.6.2.0", "GPL-2+", [(r"/policy\.html/.*\.html$", "html")]),
    "developers-reference": ("12.18", "GPL-2", [(r"/developers-reference/.*\.html$", "html")]),
    "maint-guide": ("1.2.53", "GPL-2+", [(r"/maint-guide/.*\.en\.html$", "html")]),
    "bash-doc": ("5.2.15-2", "GPL-3+", [(r"/doc/bash/bashref\.html$", "html"),
                                        (r"/doc/bash/bash\.html$", "html")]),
    "vim-runtime": ("2:9.0.1378-2+deb12u2", "Vim license (GPL-compatible)", [(r"/vim/vim\d+/doc/[^/]+\.txt$", "text")]),
    "python-django-doc": ("3:3.2.25-0+deb12u7", "BSD-3-Clause", [(r"/python-django-doc/html/(?!genindex|py-modindex|search).*\.html$", "html")]),
    "sphinx-doc": ("5.3.0-4", "BSD-2-clause", [(r"/html/_sources/.*\.txt$", "text")]),
    "cmake-doc": ("3.25.1-1", "BSD-3-Clause", [(r"/html/_sources/.*\.txt$", "text")]),
    "zsh-doc": ("5.9-4", "zsh license (MIT-like)", [(r"/zsh-common/html/.*\.html$", "html")]),
}


# ---------------------------------------------------------------- converters
class _HTMLText(HTMLParser):
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "h1", "h2", "h3",
             "h4", "h5", "h6", "pre", "blockquote", "section", "hr", "title", "td", "th"}
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n\n" if tag in {"p", "pre", "h1", "h2", "h3", "h4", "table", "dl"} else "\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(raw: str) -> str:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    lines = [ln.strip() if not ln.startswith("    ") else ln.rstrip() for ln in "".join(p.out).split("\n")]
    return "\n".join(lines)


_ROFF_ESC = [
    (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\\*(\[[^\]]*\]|\(..|.)", ""), (r"\\\((em|en)", "--"),
    (r"\\\(aq", "'"), (r"\\\((lq|rq|dq)", '"'), (r"\\\((oq|cq)", "'"), (r"\\\(bu", "*"),
    (r"\\\(co", "(C)"), (r"\\\(mu", "x"), (r"\\\(ti", "~"), (r"\\\(ha", "^"), (r"\\\(rs", "\\\\"),
    (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""), (r"\\[-]", "-"), (r"\\e", "\\\\"), (r"\\[&|^%c]", ""),
    (r"\\ ", " "), (r"\\~", " "), (r"\\0", " "), (r"\\s[-+]?\d", ""), (r"\\\.", "."),
]


def _roff_inline(s: str) -> str:
    for pat, rep in _ROFF_ESC:
        s = re.sub(pat, rep, s)
    return s


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_to_text(raw: str) -> str:
    out: list[str] = []
    for line in raw.split("\n"):
        if line.startswith(".\\\"") or line.startswith("'\\\"") or line.startswith('.\\"'):
            continue
        if line.startswith(".") or line.startswith("'"):
            m = re.match(r"[.'](\S+)\s*(.*)", line)
            if not m:
                continue
            mac, rest = m.group(1), m.group(2)
            if mac in ("SH", "SS"):
                out.append("\n" + _roff_inline(" ".join(_macro_args(rest))) + "\n")
            elif mac in ("B", "I", "SM", "SB"):
                out.append(_roff_inline(" ".join(_macro_args(rest))))
            elif mac in ("BR", "RB", "IR", "RI", "BI", "IB"):
                out.append(_roff_inline("".join(_macro_args(rest))))
            elif mac in ("PP", "LP", "P", "sp", "TP", "HP"):
                out.append("")
            elif mac == "IP":
                args = _macro_args(rest)
                out.append("")
                if args:
                    out.append(_roff_inline(args[0]))
            elif mac in ("TH", "so"):
                if mac == "so":
                    return ""
            continue
        out.append(_roff_inline(line))
    return "\n".join(out)


def pod_to_text(raw: str) -> str:
    out: list[str] = []
    skip = False
    for line in raw.split("\n"):
        if line.startswith("="):
            cmd = line.split()[0] if line.split() else "="
            if cmd == "=begin":
                skip = True
            elif cmd == "=end":
                skip = False
            elif cmd.startswith("=head") or cmd == "=item":
                out.append(line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else "")
            continue
        if not skip:
            out.append(line)
    s = "\n".join(out)
    s = re.sub(r"E<lt>", "<", s)
    s = re.sub(r"E<gt>", ">", s)
    for _ in range(3):  # nested formatting codes, innermost first
        s = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", s)
        s = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", s)
        s = re.sub(r"[BICFLSXZE]<([^<>]*)>", r"\1", s)
    return s


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "".join(ch for ch in text if ch == "\n" or ch.isprintable())
    text = "\n".join(ln.rstrip() for ln in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def read_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


CONVERT = {"text": lambda s: s, "html": html_to_text, "roff": roff_to_text, "pod": pod_to_text}


# ---------------------------------------------------------------- packages
def fetch(pkg: str, version: str, cache: Path) -> tuple[Path, str]:
    """Download and unpack one package; return (root, version actually used)."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "x" / pkg
    stamp = root / ".version"
    if stamp.exists():
        return root, stamp.read_text().strip()
    got = version
    r = subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=cache, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"warning: {pkg}={version} unavailable ({r.stderr.strip()[-120:]}); using the candidate",
              file=sys.stderr)
        subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True, capture_output=True)
        pol = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True).stdout
        got = re.search(r"Candidate:\s*(\S+)", pol).group(1)
    debs = sorted(cache.glob(f"{pkg}_*.deb"))
    if not debs:
        raise SystemExit(f"no .deb for {pkg} in {cache}")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
    stamp.write_text(got + "\n")
    return root, got


def doc_split(doc_id: str) -> str:
    h = int(hashlib.sha1(("brownout-ref:" + doc_id).encode()).hexdigest()[:8], 16)
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".corpus")
    ap.add_argument("--cache", default=None, help="where .debs are downloaded and unpacked (default OUT/debs)")
    ap.add_argument("--sources-md", default=None, help="also write this SOURCES.md")
    ap.add_argument("--only", nargs="*", default=None, help="restrict to these packages")
    args = ap.parse_args(argv)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "debs"
    out.mkdir(parents=True, exist_ok=True)

    seen: set[str] = set()
    stats: dict[str, dict] = {}
    files = {s: open(out / f"{s}.jsonl", "w", encoding="utf-8") for s in ("train", "heldout")}
    for pkg, (version, lic, rules) in PACKAGES.items():
        if args.only and pkg not in args.only:
            continue
        root, got = fetch(pkg, version, cache)
        st = stats[pkg] = {"version": got, "license": lic, "train_docs": 0, "heldout_docs": 0,
                           "train_chars": 0, "heldout_chars": 0}
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        for p in paths:
            rel = "/" + p.relative_to(root).as_posix()
            fmt = next((f for rx, f in rules if re.search(rx, rel)), None)
            if fmt is None:
                continue
            text = clean(CONVERT[fmt](read_file(p)))
            if len(text) < MIN_CHARS:
                continue
            digest = hashlib.sha1(text.encode()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            doc_id = f"{pkg}:{rel}"
            split = doc_split(doc_id)
            files[split].write(json.dumps({"id": doc_id, "source": pkg, "text": text}, ensure_ascii=False) + "\n")
            st[f"{split}_docs"] += 1
            st[f"{split}_chars"] += len(text)
        print(f"{pkg:22s} {got:22s} train {st['train_docs']:6d} docs {st['train_chars']/1e6:7.2f}M chars"
              f" | heldout {st['heldout_docs']:4d} docs {st['heldout_chars']/1e6:5.2f}M", flush=True)
    for f in files.values():
        f.close()
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    tot = {k: sum(s[k] for s in stats.values()) for k in ("train_docs", "heldout_docs", "train_chars", "heldout_chars")}
    print(f"total: train {tot['train_docs']} docs {tot['train_chars']/1e6:.1f}M chars; "
          f"heldout {tot['heldout_docs']} docs {tot['heldout_chars']/1e6:.2f}M chars")
    if args.sources_md:
        write_sources_md(Path(args.sources_md), stats, tot)


def write_sources_md(path: Path, stats: dict, tot: dict) -> None:
    lines = [
        "# Reference corpus: sources and licenses",
        "",
        "Generated by `python recipes/reference/make_corpus.py --sources-md recipes/reference/SOURCES.md`.",
        "All packages come from Debian 12 (bookworm) `main`, i.e. they meet the Debian Free Software",
        "Guidelines. Each package's full copyright statement is `usr/share/doc/<package>/copyright`",
        "inside its .deb (unpacked under the cache folder by the script). Documents are whole files;",
        f"{HELDOUT_PERCENT}% of them (by a SHA-1 of `package:path`) form the held-out split that training never sees.",
        "",
        "| package | version | license | train docs | train chars | held-out docs | held-out chars |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for pkg, s in stats.items():
        lines.append(f"| {pkg} | {s['version']} | {s['license']} | {s['train_docs']} | {s['train_chars']:,} | "
                     f"{s['heldout_docs']} | {s['heldout_chars']:,} |")
    lines.append(f"| **total** | | | {tot['train_docs']} | {tot['train_chars']:,} | {tot['heldout_docs']} | "
                 f"{tot['heldout_chars']:,} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
