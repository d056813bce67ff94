"""The `unify eval` report as a reader sees it: accuracy with its standard error, the loss against the base model with
its own standard error, which rows cannot be told apart from the base, and a plot whose axes do not exaggerate.

A report is plain data (it is also results.json):
    {"model", "tasks", "limit", "num_fewshot", "n_shot": {task: int}, "n_docs": {task: int}, "seconds",
     "base": {task: entry}, "runs": [row, ...]}
    entry = {"metric", "value", "stderr" (None when lm-eval gives none), "higher_is_better", "all": {lm-eval key: number}}
    row = {"checkpoint", "policy", "ratio", "way", "grouping", "merge", "tasks": {task: entry}, "reuses_base",
           "loss_pct", "loss_pct_stderr", "within_noise"}
The first row is the base model (checkpoint None). A row with `reuses_base` is a checkpoint at ratio 0: the model with
the united tier attached at ratio 0 is the base model bit for bit, so the base result stands for it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

# Metrics where lower is better, for entries written without lm-eval's own higher_is_better flag.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
# A difference from the base within this many combined standard errors on every accuracy task is called noise.
NOISE_SIGMAS = 2.0


def is_accuracy(entry: dict) -> bool:
    """A higher-is-better metric (accuracy, exact match): these are averaged into the loss; perplexities are not."""
    hib = entry.get("higher_is_better")
    return bool(hib) if hib is not None else not entry["metric"].endswith(LOWER_IS_BETTER)


def stderr_of(entry: dict) -> float | None:
    se = entry.get("stderr")
    if se is None:  # entries written before the stderr field: lm-eval's own key, kept under "all"
        se = entry.get("all", {}).get(f"{entry['metric']}_stderr,none")
    return float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None


def _accuracy_pairs(base: dict, got: dict) -> list[tuple[dict, dict]]:
    return [(base[t], got[t]) for t in base if t in got and is_accuracy(base[t]) and base[t]["value"] > 0]


def loss_pct(base: dict, got: dict) -> float | None:
    """Mean relative accuracy loss (%) over the accuracy tasks against the base (perplexity tasks are reported, not
    averaged); negative means better than the base."""
    losses = [100 * (b["value"] - g["value"]) / b["value"] for b, g in _accuracy_pairs(base, got)]
    return round(sum(losses) / len(losses), 3) if losses else None


def loss_pct_stderr(base: dict, got: dict) -> float | None:
    """Standard error of `loss_pct`, by first-order propagation (the delta method).

    Per task, loss_i = 100 (b - g) / b with b, g the base and row accuracies; its partial derivatives are -100/b in g
    and 100 g / b^2 in b, so var_i = (100 / b)^2 (se_g^2 + (g / b)^2 se_b^2), treating the two runs as independent.
    They ran on the same documents, whose shared difficulty cancels in the difference, so this overstates the error:
    it is a conservative bound. Tasks use disjoint documents, so the mean over k tasks has variance sum(var_i) / k^2.
    None when a task has no standard error.
    """
    pairs = _accuracy_pairs(base, got)
    if not pairs:
        return None
    var = 0.0
    for b, g in pairs:
        se_b, se_g = stderr_of(b), stderr_of(g)
        if se_b is None or se_g is None:
            return None
        var += (100 / b["value"]) ** 2 * (se_g ** 2 + (g["value"] / b["value"]) ** 2 * se_b ** 2)
    return round(math.sqrt(var) / len(pairs), 3)


def within_noise(base: dict, got: dict, sigmas: float = NOISE_SIGMAS) -> bool | None:
    """True when on every accuracy task |row - base| <= sigmas * sqrt(se_base^2 + se_row^2); None when that cannot
    be said (no accuracy task, or one without a standard error). Conservative for the same reason as loss_pct_stderr."""
    pairs = _accuracy_pairs(base, got)
    if not pairs:
        return None
    for b, g in pairs:
        se_b, se_g = stderr_of(b), stderr_of(g)
        if se_b is None or se_g is None:
            return None
        if abs(g["value"] - b["value"]) > sigmas * math.hypot(se_b, se_g):
            return False
    return True


def row_stats(base: dict, got: dict, reuses_base: bool = False) -> dict:
    """The per-row summary fields of a report row."""
    if reuses_base:  # the same numbers as the base, not a second sample of them: no difference to test
        return {"loss_pct": 0.0, "loss_pct_stderr": 0.0, "within_noise": None}
    return {"loss_pct": loss_pct(base, got), "loss_pct_stderr": loss_pct_stderr(base, got),
            "within_noise": within_noise(base, got)}


def y_axis(values: list[float], errors: list[float | None], higher_is_better: bool) -> tuple[float, float, bool]:
    """(bottom, top, log scale) for one task's panel.

    Accuracy-like metrics (higher is better, in [0, 1]) get the whole 0..1 scale, so a change of one question out of
    forty is drawn as the small step it is. Lower-is-better metrics (perplexities) get a log axis spanning at least a
    factor of four around the data. Anything else: a linear axis that includes 0.
    """
    lows = [v - (e or 0.0) for v, e in zip(values, errors)]
    highs = [v + (e or 0.0) for v, e in zip(values, errors)]
    if higher_is_better and all(0 <= v <= 1 for v in values):
        return 0.0, max(1.0, max(highs, default=1.0)), False
    if not higher_is_better and values and min(values) > 0:
        return min(values) / 2, max(values) * 2, True
    bottom, top = min(0.0, min(lows, default=0.0)), max(0.0, max(highs, default=0.0))
    return bottom, top * 1.05 if top > bottom else bottom + 1.0, False


def _fmt(value: float, se: float | None, digits: int | None = None) -> str:
    if se is None:
        return f"{value:.4g}" if digits is None else f"{value:.{digits}f}"
    if digits is None:
        digits = 3 if abs(value) < 10 else 1
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def _label(r: dict) -> str:
    if r["checkpoint"] is None:
        return "base"
    return f"{r['grouping']}+{r['merge']} w{r['way']} ({Path(r['checkpoint']).name})"


def _fewshot_text(report: dict) -> str:
    shots = report.get("n_shot") or {}
    used = sorted(set(shots.values()))
    if report.get("num_fewshot") is None:
        if len(used) == 1:
            return f"{used[0]} (task default)"
        if used:
            return ", ".join(f"{t} {n}" for t, n in shots.items()) + " (task defaults)"
        return "0 (task default)"
    return str(report["num_fewshot"])


def _limit_text(report: dict) -> str:
    docs, limit = report.get("n_docs") or {}, report.get("limit")
    counted = f" ({', '.join(f'{t} {n}' for t, n in docs.items())} documents)"
    if limit is None:
        return "none: every document" + (counted if docs else "")
    short = any(n != limit for n in docs.values())  # a task with fewer documents than the limit
    return f"{limit} documents per task" + (counted if short else "")


def _note(r: dict) -> str:
    if r["checkpoint"] is None:
        return "base"
    if r.get("reuses_base"):
        return "= base"
    return "within noise" if r.get("within_noise") else ""


def write_markdown(report: dict, path: Path) -> None:
    base = report["base"]
    tasks = list(base)
    lines = [f"# Accuracy versus brownout ratio: {report['model']}", "",
             f"- tasks: {', '.join(tasks)}",
             f"- limit: {_limit_text(report)}",
             f"- few-shot: {_fewshot_text(report)}", "",
             "Each cell is lm-eval's value ± one standard error (perplexities have none). "
             "Loss % is the mean relative accuracy loss over the accuracy tasks against the base model (negative: "
             "better than the base), ± its standard error propagated from the tasks' standard errors. "
             "\"= base\": ratio 0 with a united tier attached is the base model bit for bit, so the base result is "
             "shown and not evaluated again. "
             f"\"within noise\": on every accuracy task the difference from the base is at most {NOISE_SIGMAS:g} "
             "combined standard errors, so at this number of documents the row cannot be told apart from the base "
             "model.", "",
             "| checkpoint | policy | ratio | " + " | ".join(f"{t} ({base[t]['metric']})" for t in tasks)
             + " | loss % | note |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    shown_base_rows: set[str] = set()
    for r in report["runs"]:
        policy = r["policy"] or "-"
        if r.get("reuses_base"):  # policies differ only for cold tokens, and there are none at ratio 0: one row
            if r["checkpoint"] in shown_base_rows:
                continue
            shown_base_rows.add(r["checkpoint"])
            policy = "any"
        vals = " | ".join(_fmt(r["tasks"][t]["value"], stderr_of(r["tasks"][t])) if t in r["tasks"] else "-"
                          for t in tasks)
        stats = row_stats(base, r["tasks"], bool(r.get("reuses_base")))
        if r["checkpoint"] is None or stats["loss_pct"] is None:
            loss = "-"
        elif r.get("reuses_base"):
            loss = "0"
        else:
            loss = _fmt(stats["loss_pct"], stats["loss_pct_stderr"], digits=1)
        name = "base" if r["checkpoint"] is None else _label(r)
        lines.append(f"| {name} | {policy} | {r['ratio']:g} | {vals} | {loss} | {_note({**r, **stats})} |")
    path.write_text("\n".join(lines) + "\n")


def figure(report: dict):
    """One panel per task: value versus ratio, one line per checkpoint and policy, error bars of one standard error;
    the base as a dotted line with its ±1 standard error band. Returns the matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = report["base"]
    tasks = list(base)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    lines: dict[str, list] = {}
    for r in report["runs"]:
        if r["checkpoint"] is not None:
            lines.setdefault(f"{_label(r)} {r['policy']}", []).append(r)
    for ax, t in zip(axes[0], tasks):
        b, se_b = base[t]["value"], stderr_of(base[t])
        values, errors = [b], [se_b]
        for label, rs in lines.items():
            rs = sorted((r for r in rs if t in r["tasks"]), key=lambda r: r["ratio"])
            ys = [r["tasks"][t]["value"] for r in rs]
            es = [stderr_of(r["tasks"][t]) for r in rs]
            values += ys
            errors += es
            yerr = [e or 0.0 for e in es] if any(e is not None for e in es) else None
            ax.errorbar([r["ratio"] for r in rs], ys, yerr=yerr, marker="o", ms=4, capsize=3, label=label)
        ax.axhline(b, color="k", ls=":", lw=1, label="base" + (" ± 1 s.e." if se_b is not None else ""))
        if se_b is not None:
            ax.axhspan(b - se_b, b + se_b, color="k", alpha=0.08, lw=0)
        lo, hi, log = y_axis(values, errors, is_accuracy(base[t]))
        if log:
            from matplotlib.ticker import LogFormatter

            ax.set_yscale("log")
            ax.set_ylim(lo, hi)
            for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                set_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))  # 200, not 2x10^2
        else:  # a small margin, so points and error caps on the limits stay visible
            ax.set_ylim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        ax.set_title(t)
        ax.set_xlabel("brownout ratio")
        ax.set_ylabel(base[t]["metric"] + (" (log scale)" if log else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("error bars: one standard error", fontsize=8)
    fig.tight_layout()
    return fig


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(report)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out / "results.json")
    write_markdown(report, out / "results.md")
    plot(report, out / "results.png")
