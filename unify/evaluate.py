"""`unify eval`: lm-eval accuracy of a model with united tiers attached, over brownout ratios and policies.

lm-eval's `HFLM` wraps the already loaded model (so BrownoutMoE's ratio can change between runs without reloading);
tasks come from lm-eval's registry plus `recipes/reference/tasks` (local YAML + JSONL, no download). Writes results.json, a
markdown table (results.md) and a plot (results.png: metric versus ratio, one line per checkpoint and policy).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import recipes

from runtime.errors import BrownoutError
from .loading import resolve

TASKS_DIR = recipes.HERE / "reference" / "tasks"
# The metric each task is judged by (lower is better for perplexities); other tasks use acc if present.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def _main_metric(task_result: dict) -> tuple[str, float] | None:
    prefs = ["acc,none", "acc_norm,none", "word_perplexity,none", "exact_match,none"]
    for p in prefs:
        if p in task_result and isinstance(task_result[p], (int, float)):
            return p.split(",")[0], float(task_result[p])
    for k, v in task_result.items():
        if isinstance(v, (int, float)) and not k.endswith("stderr,none") and k != "alias":
            return k.split(",")[0], float(v)
    return None


def _parse_ratios(s: str) -> list[float]:
    try:
        rs = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BrownoutError(f"--ratios must be comma-separated numbers in [0, 1], got {s!r}") from None
    if not rs or any(math.isnan(r) or not 0 <= r <= 1 for r in rs):
        raise BrownoutError(f"--ratios must be comma-separated numbers in [0, 1], got {s!r}")
    return rs


class Evaluator:
    """Holds one loaded model and its lm-eval wrapper; `run()` evaluates the model as it currently is."""

    def __init__(self, model: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                 num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu", dtype: str = "float32"):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = resolve(model)
        self.model_name = model
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
        except Exception as e:
            raise BrownoutError(f"cannot load a tokenizer from {ref.path}: {str(e).splitlines()[0][:160]}") from None
        self.model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype)).to(device).eval()
        # transformers' grouped_mm has only a slow fallback loop on the CPU (eager is ~2.5x faster) and not every torch
        # has a float32 grouped GEMM on CUDA
        if device == "cpu" or dtype == "float32":
            self.model.config._experts_implementation = "eager"
        max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.lm = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size, device=device,
                       max_length=max_length)
        self.task_manager = TaskManager(include_path=str(include_path or TASKS_DIR))
        unknown = [t for t in tasks if t not in self.task_manager.all_tasks]
        if unknown:
            raise BrownoutError(f"unknown lm-eval tasks {unknown}; local tasks: "
                                f"{', '.join(t for t in self.task_manager.all_tasks if t.startswith('brownout'))}")
        self.tasks, self.limit, self.num_fewshot = tasks, limit, num_fewshot
        self._lm_eval = lm_eval

    def run(self) -> dict[str, dict]:
        res = self._lm_eval.simple_evaluate(model=self.lm, tasks=self.tasks, limit=self.limit,
                                            num_fewshot=self.num_fewshot, task_manager=self.task_manager,
                                            log_samples=False, verbosity="ERROR")
        out = {}
        for task, r in res["results"].items():
            m = _main_metric(r)
            if m is not None:
                out[task] = {"metric": m[0], "value": m[1],
                             "all": {k: v for k, v in r.items() if isinstance(v, (int, float))}}
        return out


def evaluate(ev: Evaluator, united: list[str], ratios: list[float], policies: list[str]) -> dict:
    from runtime import BrownoutMoE

    t0 = time.time()
    runs = [{"checkpoint": None, "policy": None, "ratio": 0.0}]
    runs += [{"checkpoint": u, "policy": p, "ratio": r} for u in united for p in policies for r in ratios]
    results = []
    bar = tqdm(runs, desc="lm-eval runs")
    current, bm = None, None
    for run in bar:
        bar.set_postfix_str(f"{Path(run['checkpoint']).name if run['checkpoint'] else 'base'} {run['policy'] or ''} r={run['ratio']:g}")
        if run["checkpoint"] != current:
            if bm is not None:
                bm.detach()
                bm = None
            if run["checkpoint"] is not None:
                bm = BrownoutMoE.attach(ev.model, run["checkpoint"])
            current = run["checkpoint"]
        if bm is not None:
            bm.set_policy(run["policy"])
            bm.set_ratio(run["ratio"])
        meta = bm.checkpoint.meta if bm is not None else {}
        results.append({**run, "way": meta.get("way"), "grouping": meta.get("grouping"), "merge": meta.get("merge"),
                        "tasks": ev.run()})
    if bm is not None:
        bm.detach()
    base = results[0]["tasks"]
    for r in results:
        r["loss_pct"] = _loss_pct(base, r["tasks"])
    return {"model": ev.model_name, "tasks": ev.tasks, "limit": ev.limit, "num_fewshot": ev.num_fewshot,
            "seconds": round(time.time() - t0, 1), "base": base, "runs": results}


def _loss_pct(base: dict, got: dict) -> float | None:
    """Mean relative accuracy loss (%) over the accuracy tasks (perplexity tasks are reported, not averaged)."""
    losses = [100 * (base[t]["value"] - got[t]["value"]) / base[t]["value"] for t in base
              if t in got and not base[t]["metric"].endswith(LOWER_IS_BETTER) and base[t]["value"] > 0]
    return round(sum(losses) / len(losses), 3) if losses else None


def _label(r: dict) -> str:
    if r["checkpoint"] is None:
        return "base"
    return f"{r['grouping']}+{r['merge']} w{r['way']} {r['policy']}"


def write_markdown(report: dict, path: Path) -> None:
    tasks = list(report["base"])
    lines = [f"# Accuracy versus brownout ratio: {report['model']}", "",
             f"lm-eval tasks {', '.join(tasks)}; limit {report['limit']}; few-shot {report['num_fewshot']}. "
             "Loss = mean relative accuracy loss over the accuracy tasks, against the base model.", "",
             "| checkpoint | policy | ratio | " + " | ".join(f"{t} ({report['base'][t]['metric']})" for t in tasks) + " | loss % |",
             "|---|---|---|" + "---|" * len(tasks) + "---|"]
    for r in report["runs"]:
        name = "base" if r["checkpoint"] is None else f"{r['grouping']}+{r['merge']} w{r['way']}"
        vals = " | ".join(f"{r['tasks'][t]['value']:.4g}" if t in r["tasks"] else "-" for t in tasks)
        lines.append(f"| {name} | {r['policy'] or '-'} | {r['ratio']:g} | {vals} | {r['loss_pct'] if r['loss_pct'] is not None else '-'} |")
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["base"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    lines: dict[str, list] = {}
    for r in report["runs"][1:]:
        lines.setdefault(_label(r), []).append(r)
    for ax, t in zip(axes[0], tasks):
        for label, rs in lines.items():
            rs = sorted(rs, key=lambda r: r["ratio"])
            ax.plot([r["ratio"] for r in rs], [r["tasks"][t]["value"] for r in rs], marker="o", label=label)
        ax.axhline(report["base"][t]["value"], color="k", ls=":", lw=1, label="base")
        ax.set_title(t)
        ax.set_xlabel("brownout ratio")
        ax.set_ylabel(report["base"][t]["metric"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(out / "results.json")
    write_markdown(report, out / "results.md")
    plot(report, out / "results.png")


def add_arguments(e) -> None:
    """The `unify eval` flags (the parser itself lives in unify.cli)."""
    e.add_argument("--model", required=True, help="recipe name or local model directory")
    e.add_argument("--united", nargs="+", default=[], help="one or more united checkpoint directories")
    e.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="comma-separated brownout ratios")
    e.add_argument("--policies", default="hot-cold", help="comma-separated runtime policies (hot-cold, mass, drop)")
    e.add_argument("--tasks", default="brownout_ppl,brownout_cont,brownout_cloze", help="comma-separated lm-eval tasks")
    e.add_argument("--include-path", default=None, help="extra lm-eval task folder (default: the bundled recipes/reference/tasks)")
    e.add_argument("--limit", type=int, default=None, help="examples per task (quick runs)")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--out", required=True, help="report directory")


def run_eval_cli(args) -> int:
    ratios = _parse_ratios(args.ratios)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from runtime.policy import POLICIES

    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise BrownoutError(f"unknown policies {bad}; policies: {', '.join(POLICIES)}")
    for u in args.united:
        from runtime.checkpoint import UnitedCheckpoint

        UnitedCheckpoint(u)  # fail early on a bad checkpoint, before loading the model
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ev = Evaluator(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, args.device, args.dtype)
    report = evaluate(ev, args.united, ratios, policies)
    out = Path(args.out)
    write_report(report, out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0
