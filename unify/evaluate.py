"""`unify eval`: lm-eval accuracy of a model with united tiers attached, over brownout ratios and policies.

lm-eval's `HFLM` wraps the already loaded model (so BrownoutMoE's ratio can change between runs without reloading).
Tasks default to the model recipe's `tasks`, found in its `tasks_path` (shipped inside the package, no download);
`--tasks` picks others from lm-eval's registry or from `--include-path`. Every checkpoint is attached and detached once
before anything is evaluated, so a checkpoint of another model fails in seconds. The base model is evaluated once:
ratio 0 with a united tier attached is the base model bit for bit, so its rows reuse that result.
The report (results.json, results.md, results.png) is written by `unify.report`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from runtime.errors import BrownoutError
from .loading import ModelRef, resolve
from .report import row_stats, write_report

DTYPES = ("float32", "bfloat16", "float16")


def _task_entry(result: dict, higher_is_better: dict) -> dict | None:
    """lm-eval's result of one task -> the report entry of its main metric (see unify.report)."""
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    prefs = ["acc,none", "acc_norm,none", "word_perplexity,none", "exact_match,none"]
    key = next((p for p in prefs if p in numbers), None)
    if key is None:
        key = next((k for k in numbers if "," in k and "_stderr," not in k), None)
    if key is None:
        return None
    metric, flt = key.split(",", 1)
    se = numbers.get(f"{metric}_stderr,{flt}")
    hib = higher_is_better.get(metric)
    return {"metric": metric, "value": float(numbers[key]),
            "stderr": float(se) if se is not None and math.isfinite(se) else None,
            "higher_is_better": None if hib is None else bool(hib), "all": numbers}


def _parse_ratios(s: str) -> list[float]:
    try:
        rs = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise BrownoutError(f"--ratios must be comma-separated numbers in [0, 1], got {s!r}") from None
    if not rs or any(math.isnan(r) or not 0 <= r <= 1 for r in rs):
        raise BrownoutError(f"--ratios must be comma-separated numbers in [0, 1], got {s!r}")
    return rs


def resolve_tasks(ref: ModelRef, tasks: list[str] | None, include_path: str | list[str] | None = None
                  ) -> tuple[list[str], list[str]]:
    """(lm-eval task names, task folders): the recipe's tasks unless `tasks` names others; the recipe's tasks_path
    is always searched, `include_path` in addition."""
    recipe = ref.recipe
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    folders = ([str(recipe.tasks_path)] if recipe is not None and recipe.tasks_path is not None else [])
    folders += [str(p) for p in extra]
    if not tasks:
        if recipe is None or not recipe.tasks:
            raise BrownoutError(f"{ref.name} has no recipe tasks; name the lm-eval tasks to run with --tasks")
        tasks = list(recipe.tasks)
    return list(tasks), folders


class Evaluator:
    """Holds one loaded model and its lm-eval wrapper; `run()` evaluates the model as it currently is."""

    def __init__(self, model: str, tasks: list[str] | None = None, include_path: str | list[str] | None = None,
                 limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu",
                 dtype: str = "float32"):
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ref = resolve(model)
        tasks, folders = resolve_tasks(ref, tasks, include_path)
        self.task_manager = TaskManager(include_path=folders or None)
        unknown = [t for t in tasks if t not in self.task_manager.all_tasks]
        if unknown:
            local = sorted(t for t in self.task_manager.all_tasks if t.startswith("brownout"))
            raise BrownoutError(f"unknown lm-eval tasks {unknown}" + (f"; local tasks: {', '.join(local)}" if local else ""))
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
        self.tasks, self.limit, self.num_fewshot = tasks, limit, num_fewshot
        self.n_shot: dict[str, int] = {}  # few-shot count lm-eval used per task (filled by run)
        self.n_docs: dict[str, int] = {}  # documents evaluated per task (filled by run)
        self._lm_eval = lm_eval

    def run(self) -> dict[str, dict]:
        """task -> report entry (metric, value, stderr, higher_is_better, all lm-eval numbers)."""
        res = self._lm_eval.simple_evaluate(model=self.lm, tasks=self.tasks, limit=self.limit,
                                            num_fewshot=self.num_fewshot, task_manager=self.task_manager,
                                            log_samples=False, verbosity="ERROR")
        hib = res.get("higher_is_better", {})
        self.n_shot = {t: int(n) for t, n in res.get("n-shot", {}).items() if t in res["results"]}
        self.n_docs = {t: int(n["effective"]) for t, n in res.get("n-samples", {}).items() if "effective" in n}
        out = {}
        for task, r in res["results"].items():
            entry = _task_entry(r, hib.get(task, {}))
            if entry is not None:
                out[task] = entry
        return out


def check_checkpoints(model, united: list[str]) -> None:
    """Attach and detach each checkpoint: one from another model fails here, in seconds, with the runtime's one-line
    error, before any evaluation."""
    from runtime import BrownoutMoE

    for u in united:
        BrownoutMoE.attach(model, u).detach()


def evaluate(ev: Evaluator, united: list[str], ratios: list[float], policies: list[str],
             schedule: str | None = None) -> dict:
    """The base model once, then every checkpoint x policy x ratio; rows at ratio 0 reuse the base result.
    `schedule` (a `unify sensitivity` file of the one checkpoint): also its per-layer ratios at each level in `ratios`,
    with the first policy, as rows "<policy>+schedule" beside the uniform ratio's."""
    from runtime import BrownoutMoE
    from runtime.checkpoint import UnitedCheckpoint

    check_checkpoints(ev.model, united)
    t0 = time.time()
    todo = [(u, p, r) for u in united for p in policies for r in ratios]
    bar = tqdm(total=1 + sum(r != 0 for _, _, r in todo), desc="lm-eval runs")
    bar.set_postfix_str("base")
    base = ev.run()
    bar.update()
    runs = [{"checkpoint": None, "policy": None, "ratio": 0.0, "way": None, "grouping": None, "merge": None,
             "tasks": base, "reuses_base": False, **row_stats(base, base, reuses_base=True)}]
    for u in united:
        meta = UnitedCheckpoint(u).meta
        bm = None
        try:
            for p in policies:
                for r in ratios:
                    row = {"checkpoint": u, "policy": p, "ratio": r, "way": meta.get("way"),
                           "grouping": meta.get("grouping"), "merge": meta.get("merge")}
                    if r == 0:  # no token is cold at ratio 0, whatever the policy: the base model bit for bit
                        runs.append({**row, "tasks": base, "reuses_base": True, **row_stats(base, base, True)})
                        continue
                    bar.set_postfix_str(f"{Path(u).name} {p} r={r:g}")
                    if bm is None:
                        bm = BrownoutMoE.attach(ev.model, u)
                    bm.set_policy(p)
                    bm.set_ratio(r)
                    got = ev.run()
                    bar.update()
                    runs.append({**row, "tasks": got, "reuses_base": False, **row_stats(base, got)})
        finally:
            if bm is not None:
                bm.detach()
    if schedule is not None:
        from .sensitivity import evaluate_schedule

        bar.set_postfix_str("schedule")
        runs += evaluate_schedule(ev, united[0], schedule, ratios, policies[0], base)
    bar.close()
    return {"model": ev.model_name, "tasks": ev.tasks, "limit": ev.limit, "num_fewshot": ev.num_fewshot,
            "n_shot": ev.n_shot, "n_docs": ev.n_docs, "seconds": round(time.time() - t0, 1), "base": base,
            "runs": runs}


def add_arguments(e) -> None:
    """The `unify eval` flags (the parser itself lives in unify.cli)."""
    e.add_argument("--model", required=True, help="recipe name or local model directory")
    e.add_argument("--united", nargs="+", default=[], help="one or more united checkpoint directories")
    e.add_argument("--ratios", default="0,0.25,0.5,0.75,1", help="comma-separated brownout ratios")
    e.add_argument("--policies", default="hot-cold", help="comma-separated runtime policies (hot-cold, mass, drop)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (default: the model recipe's tasks; required without them)")
    e.add_argument("--include-path", default=None,
                   help="an lm-eval task folder searched in addition to the recipe's own tasks")
    e.add_argument("--limit", type=int, default=None, help="examples per task, >= 1 (quick runs; default: all)")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples, >= 0 (default: each task's own)")
    e.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size, >= 1 (default 8)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    e.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    e.add_argument("--schedule", default=None,
                   help="a `unify sensitivity` file of the one --united checkpoint: adds rows with its per-layer "
                   "ratios at each --ratios level (same weight reads as the uniform ratio), beside the uniform rows")
    e.add_argument("--out", required=True, help="report directory")


def check_request(args) -> None:
    """Everything `unify eval` can check before it loads a model or lm-eval: value ranges, device, dtype, the report
    path, and each checkpoint's files and its base model's config against the model's config.json (the weight
    fingerprint is checked once the model is loaded, by attaching)."""
    from runtime.checkpoint import UnitedCheckpoint, config_hash

    from .build import check_device
    from .loading import load_config

    for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                             ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < low:
            raise BrownoutError(f"{flag} {value} is out of range: it must be an integer >= {low}")
    if args.dtype not in DTYPES:
        raise BrownoutError(f"--dtype {args.dtype!r} is not one of {', '.join(DTYPES)}")
    check_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BrownoutError(f"--out {out} is an existing file, not a report directory")
    ref = resolve(args.model)
    want = config_hash(load_config(ref))
    for u in args.united:
        base = UnitedCheckpoint(u).meta["base_model"]  # files, manifest and checksums
        if base.get("config_hash") != want:
            raise BrownoutError(f"{u} was built from another model ({base.get('name')}, {base.get('model_type')}): "
                                f"config differs from {args.model}'s")


def run_eval_cli(args) -> int:
    ratios = _parse_ratios(args.ratios)
    from runtime.policy import check_policy

    policies = [check_policy(p.strip()) for p in args.policies.split(",") if p.strip()]
    if args.united and not policies:
        raise BrownoutError("--policies names no policy")
    if args.schedule is not None:
        if len(args.united) != 1:
            raise BrownoutError("--schedule needs exactly one --united checkpoint")
        if not Path(args.schedule).is_file():
            raise BrownoutError(f"--schedule {args.schedule}: no such file")
    check_request(args)  # before the model and lm-eval load: a wrong checkpoint fails in a second
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    ev = Evaluator(args.model, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, args.device, args.dtype)
    report = evaluate(ev, args.united, ratios, policies, schedule=args.schedule)
    out = Path(args.out)
    write_report(report, out)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0
