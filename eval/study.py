"""The accuracy study on the bundled reference model: every way x grouping x merge, brownout ratio sweep with the
paper's hot-cold policy, then the `mass` and `drop` policies for the paper's method and the best one.

    python -m eval.study --out eval/results [--ways 2,4,8] [--limit N] [--calib-tokens 8192] [--steps 100]
                         [--device cuda --dtype bfloat16]   (or: bash eval/study_parallel.sh OUT ...)

Accuracy = lm-eval (HFLM around the loaded model, BrownoutMoE attached) on the local multiple-choice tasks;
loss = mean relative accuracy loss over those tasks against the model without brownout (%), ± its standard error
(unify.report). Resumable: finished runs are kept in study.json and skipped; checkpoints are cached under --cache.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from unify.report import is_accuracy, loss_pct, loss_pct_stderr, stderr_of

ROOT = Path(__file__).resolve().parents[1]

PAPER = ("consecutive", "distill")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "eval" / "results"))
    ap.add_argument("--cache", default="/tmp/brownout-study")
    ap.add_argument("--ways", default="2,4,8")
    ap.add_argument("--ratios", default="0.25,0.5,0.75,1")
    ap.add_argument("--tasks", default="brownout_cont,brownout_cloze,brownout_ppl",
                    help="accuracy tasks are averaged into the loss; perplexity tasks are reported beside it")
    ap.add_argument("--limit", type=int, default=0, help="documents per task (0 = all)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=100, help="Adam steps of the distill merges")
    ap.add_argument("--groupings", default=None)
    ap.add_argument("--merges", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--policies", default="hot-cold,mass,drop",
                    help="hot-cold runs every grouping x merge; mass and drop run the paper's method and the best "
                         "hot-cold one (which needs every hot-cold run of that way in the state)")
    ap.add_argument("--combine", nargs="+", metavar="DIR",
                    help="merge the study.json of these directories into --out and write the table and plot")
    ap.add_argument("--device", default="cpu", help="where lm-eval runs the model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="float32 runs the PyTorch reference path; bfloat16 on CUDA runs the fused kernel (fast)")
    ap.add_argument("--build-only", action="store_true", help="only build the checkpoints of the selected sweep")
    ap.add_argument("--build-device", default="cpu", help="where calibration and distillation run")
    a = ap.parse_args()
    out = Path(a.out)
    if a.combine:
        return combine([Path(d) for d in a.combine], out)

    import torch

    torch.set_num_threads(a.threads)
    from runtime import BrownoutMoE
    from unify import grouping, merge
    from unify.build import BuildOptions, build
    from unify.evaluate import Evaluator

    cache = Path(a.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    state_file = out / "study.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"runs": []}
    done = {(r["way"], r["grouping"], r["merge"], r["policy"], r["ratio"]) for r in state["runs"]}
    tasks = a.tasks.split(",")
    groupings = a.groupings.split(",") if a.groupings else grouping.names()
    merges = a.merges.split(",") if a.merges else merge.names()

    def save():
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.rename(state_file)

    def ckpt(way, g, m):
        d = cache / f"w{way}-{g}-{m}"
        if not (d / "united.json").exists():
            t = time.time()
            steps = {"steps": a.steps} if "steps" in merge.get(m).param_types() else None  # the distill merges
            build("reference", BuildOptions(out=str(d), way=way, grouping=g, merge=m, calib_tokens=a.calib_tokens,
                                            merge_params=steps, overwrite=True, progress=False,
                                            device=a.build_device))
            print(f"built {d.name} in {time.time() - t:.0f}s", flush=True)
        return d

    if a.build_only:  # e.g. many CPU processes build while the GPU evaluates
        for way in [int(w) for w in a.ways.split(",")]:
            for g in groupings:
                for m in merges:
                    ckpt(way, g, m)
        return
    ev = Evaluator("reference", tasks, limit=a.limit or None, batch_size=a.batch_size, device=a.device,
                   dtype=a.dtype)
    if "base" not in state:
        state["base"] = ev.run()
        state["settings"] = vars(a)
    base = state["base"]
    ratios = [float(r) for r in a.ratios.split(",")]

    def sweep(way, g, m, policy):
        todo = [r for r in ratios if (way, g, m, policy, r) not in done]
        if not todo:
            return
        # float32 runs the semantics-defining reference backend; the fused kernel is bf16/fp16 only
        bm = BrownoutMoE.attach(ev.model, ckpt(way, g, m), policy=policy,
                                backend="reference" if a.dtype == "float32" else "auto")
        try:
            for r in todo:
                bm.set_ratio(r)
                t = time.time()
                res = ev.run()
                row = {"way": way, "grouping": g, "merge": m, "policy": policy, "ratio": r, "tasks": res,
                       "loss_pct": loss_pct(base, res), "loss_pct_stderr": loss_pct_stderr(base, res), "seconds": round(time.time() - t, 1)}
                state["runs"].append(row)
                done.add((way, g, m, policy, r))
                print(json.dumps({k: v for k, v in row.items() if k != "tasks"}), flush=True)
                save()
        finally:
            bm.detach()

    policies = a.policies.split(",")
    for way in [int(w) for w in a.ways.split(",")]:
        if "hot-cold" in policies:
            for g in groupings:
                for m in merges:
                    sweep(way, g, m, "hot-cold")
        others = [p for p in policies if p != "hot-cold"]
        if others:
            for g, m in {PAPER, best_method(state, way, ratios)}:
                for policy in others:
                    sweep(way, g, m, policy)
    save()
    write_md(state, out / "study.md", ratios)
    plot(state, out / "study.png", ratios)


def combine(dirs: list[Path], out: Path):
    """Several partial studies (run in parallel, e.g. one process per way x grouping) -> one state, table, plot."""
    state, seen = None, set()
    for d in dirs:
        if not (d / "study.json").exists():
            print(f"{d}: no study.json, left out")
            continue
        part = json.loads((d / "study.json").read_text())
        if state is None:
            state = {"base": part["base"], "settings": part["settings"], "runs": []}
        elif part["base"] != state["base"]:
            raise SystemExit(f"{d}: base results differ from {dirs[0]}: not the same model, tasks or limit")
        for r in part["runs"]:
            key = (r["way"], r["grouping"], r["merge"], r["policy"], r["ratio"])
            if key not in seen:
                seen.add(key)
                state["runs"].append(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(state, indent=1))
    ratios = sorted({r["ratio"] for r in state["runs"]})
    write_md(state, out / "study.md", ratios)
    plot(state, out / "study.png", ratios)
    print(f"combined {len(state['runs'])} runs from {len(dirs)} directories into {out}")


def _run(state, way, g, m, policy, r):
    for run in state["runs"]:
        if (run["way"], run["grouping"], run["merge"], run["policy"], run["ratio"]) == (way, g, m, policy, r):
            return run
    return None


def _loss(state, way, g, m, policy, r):
    run = _run(state, way, g, m, policy, r)
    return None if run is None else run["loss_pct"]


def best_method(state, way, ratios):
    """Lowest mean loss over ratios >= 0.5 with hot-cold."""
    cands = {(r["grouping"], r["merge"]) for r in state["runs"] if r["way"] == way and r["policy"] == "hot-cold"}
    def score(gm):
        v = [_loss(state, way, *gm, "hot-cold", r) for r in ratios if r >= 0.5]
        return sum(x for x in v if x is not None) / max(1, len(v))
    return min(cands, key=score)


def _stderr_line(base) -> str:
    """lm-eval's standard error of each accuracy task, as a share of its accuracy: differences below ~2x are noise."""
    parts = []
    for t, v in base.items():
        se = stderr_of(v)
        if se is not None and is_accuracy(v) and v["value"] > 0:
            parts.append(f"{t} ±{100 * se / v['value']:.1f}%")
    return ("One standard error of the base accuracy, relative: " + ", ".join(parts) + ".") if parts else ""


def _loss_cell(base, run) -> str:
    if run is None or run["loss_pct"] is None:
        return "-"
    se = run["loss_pct_stderr"] if "loss_pct_stderr" in run else loss_pct_stderr(base, run["tasks"])
    return f"{run['loss_pct']:.2f}" + (f" ± {se:.2f}" if se is not None else "")


def write_md(state, path, ratios):
    base = state["base"]
    ways = sorted({r["way"] for r in state["runs"]})
    L = ["# Accuracy study on the reference model", "",
         "Base model (no brownout): " + ", ".join(f"{t} {v['metric']} {v['value']:.4f}" for t, v in base.items()) +
         f"; lm-eval limit {state['settings']['limit']} per task. Cells: mean relative accuracy loss (%) over the tasks "
         "(negative = better than base), ± its standard error where known; policy hot-cold unless named. "
         + _stderr_line(base), ""]
    for way in ways:
        L += [f"## {way}-way", "", "| grouping + merge | policy | " + " | ".join(f"r={r:g}" for r in ratios) + " | monotone |",
              "|---|---|" + "---|" * len(ratios) + "---|"]
        keys = sorted({(r["grouping"], r["merge"], r["policy"]) for r in state["runs"] if r["way"] == way},
                      key=lambda k: (k[2] != "hot-cold", k))
        for g, m, p in keys:
            vals = [_loss(state, way, g, m, p, r) for r in ratios]
            mono = all(b is not None and a is not None and b >= a - 1e-9 for a, b in zip(vals, vals[1:]))
            tag = " (paper)" if (g, m) == PAPER else ""
            cells = [_loss_cell(base, _run(state, way, g, m, p, r)) for r in ratios]
            L.append(f"| {g} + {m}{tag} | {p} | " + " | ".join(cells) + f" | {'yes' if mono else 'no'} |")
        ppl = [t for t, v in base.items() if not is_accuracy(v)]
        if ppl:
            t = ppl[0]
            L += ["", f"{t} {base[t]['metric']} (base {base[t]['value']:.2f}):", "",
                  "| grouping + merge | policy | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
            for g, m, p in keys:
                vals = [_run(state, way, g, m, p, r) for r in ratios]
                L.append(f"| {g} + {m} | {p} | " + " | ".join(
                    "-" if v is None or t not in v["tasks"] else f"{v['tasks'][t]['value']:.2f}" for v in vals) + " |")
        best = best_method(state, way, ratios)
        goal = []
        for r in ratios:
            if r < 0.5:
                continue
            pb, bb = _loss(state, way, *PAPER, "hot-cold", r), _loss(state, way, *best, "hot-cold", r)
            if pb is not None and bb is not None:
                ok = bb <= 0.4 * pb if pb > 0 else bb <= pb
                goal.append(f"r={r:g}: best {bb:.2f} vs paper {pb:.2f} -> {'met' if ok else 'missed'}")
        L += ["", f"Best method (lowest mean loss at r >= 0.5): **{best[0]} + {best[1]}**. Goal (best <= 0.4 x paper): " + "; ".join(goal), ""]
    path.write_text("\n".join(L) + "\n")


# the paper's reported accuracy loss (%) for its method on Qwen1.5-MoE (PIQA/COPA/CEVAL/OBQA 5-shot), for scale only:
# another model and other tasks
PAPER_REPORTED = {2: {0.5: 2.81, 1.0: 4.70}, 4: {0.5: 4.37, 1.0: 11.53}, 8: {0.5: 3.78, 1.0: 15.77}}


def plot(state, path, ratios):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = sorted({r["way"] for r in state["runs"]})
    fig, axes = plt.subplots(1, len(ways), figsize=(6 * len(ways), 4.5), squeeze=False)
    for ax, way in zip(axes[0], ways):
        best = best_method(state, way, ratios)
        keys = sorted({(r["grouping"], r["merge"], r["policy"]) for r in state["runs"] if r["way"] == way})
        drawn_drop = False
        for g, m, p in keys:
            if p == "drop" and drawn_drop:  # drop reads no united expert: the same curve for every method
                continue
            vals = [(0.0, 0.0)] + [(r, _loss(state, way, g, m, p, r)) for r in ratios]
            vals = [(x, y) for x, y in vals if y is not None]
            if p == "drop":
                drawn_drop = True
                style = dict(color="black", lw=1.5, ls="--", marker="o", label="drop (cold tokens skipped)")
            elif (g, m) in (PAPER, best):
                color = "tab:red" if (g, m) == PAPER else "tab:blue"
                name = f"{g}+{m}" + (" (paper)" if (g, m) == PAPER else " (best)")
                style = dict(color=color, lw=2, ls=":" if p == "mass" else "-", marker="o", label=f"{name} {p}")
            else:
                style = dict(color="grey", lw=0.7, alpha=0.4)
            ax.plot([x for x, _ in vals], [y for _, y in vals], **style)
        rep = PAPER_REPORTED.get(way)
        if rep:
            ax.plot(list(rep), list(rep.values()), "x", color="tab:red", ms=8,
                    label="paper's reported loss (Qwen1.5-MoE, its tasks)")
        ax.set_title(f"{way}-way (grey: other grouping + merge, hot-cold)")
        ax.set_xlabel("brownout ratio")
        ax.set_ylabel("accuracy loss vs base (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
