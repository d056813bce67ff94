"""Per-layer ratio schedule against the uniform ratio, on the bundled reference model.

For each way: build a united checkpoint, measure its per-layer sensitivity on held-out calibration text
(`unify.sensitivity`), then at each level evaluate the uniform ratio `level` and `RatioSchedule.at(level)` on data
neither the build nor the sensitivity saw:

- held-out token NLL / perplexity on the `brownout_ppl` passages (disjoint 512-token windows);
- the expert-weight bytes each forward batch reads (distinct slabs through `runtime.policy.remap` and `slabs_read`,
  counted on the routing of that very forward, in batches of the same shape the sensitivity counted);
- `brownout_cont` and `brownout_cloze` accuracy through lm-eval (`--limit` documents each), with standard errors.

The schedule is the one `unify sensitivity` writes by default: single-layer curves plus joint anchors searched on
the calibration text (runtime.schedule, "Joint anchors"). Beside it, the plain single-layer greedy (the same file
without its anchors) is evaluated for held-out NLL and reads only, to show what the joint search changed.

    python -m eval.schedule_study --out eval/results            # writes schedule_study.{json,md,png}

Checkpoints and sensitivity files go to --work and are reused when present (delete them to rebuild).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import recipes
from runtime import BrownoutMoE
from runtime.policy import remap, slabs_read
from runtime.schedule import RatioSchedule
from unify.build import BuildOptions, build
from unify.calibration import tokenize
from unify.evaluate import Evaluator
from unify.sensitivity import sensitivity, slab_bytes, token_nll, write_json

MC_TASKS = ["brownout_cont", "brownout_cloze"]
TARGET_LEVELS = (0.5, 0.75)
TARGET_FACTOR = 0.7  # the schedule's NLL increase must be at most this share of the uniform ratio's
READS_TOLERANCE = 0.02


class ReadCounter:
    """Counts the expert-weight bytes each forward reads in the united layers, at the ratios they are set to."""

    def __init__(self, bm: BrownoutMoE):
        self.bm = bm
        self.bytes = 0.0
        self.handles = []
        for i, st in bm.layers.items():
            experts = bm.moe[i].experts
            per_slab = slab_bytes(experts, bm.moe[i].layout.native_keys())
            self.handles.append(experts.register_forward_pre_hook(
                lambda m, a, kw, st=st, per_slab=per_slab: self._count(st, per_slab, list(a) + list(kw.values())),
                with_kwargs=True))

    def _count(self, st, per_slab: int, vals) -> None:
        idx, w = vals[1], vals[2]
        ids = remap(idx, w, st.expert_to_group, st.num_groups, st.ratio.value, st.policy).ids
        self.bytes += float(slabs_read(ids, st.num_experts + st.num_groups)) * per_slab

    def reset(self) -> None:
        self.bytes = 0.0

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def held_out_nll(model, batches: list[torch.Tensor], counter: ReadCounter | None = None) -> dict:
    """Mean token NLL over the batches, and the mean expert-weight bytes read per forward batch."""
    if counter is not None:
        counter.reset()
    total, n = 0.0, 0
    for ids in batches:
        total += float(token_nll(model(input_ids=ids, use_cache=False).logits, ids))
        n += ids.shape[0] * (ids.shape[1] - 1)
    out = {"nll": total / n, "ppl": math.exp(total / n), "tokens": n}
    if counter is not None:
        out["read_bytes_per_batch"] = counter.bytes / len(batches)
    return out


def mc_entry(tasks: dict) -> dict:
    return {t: {"acc": e["value"], "stderr": e["stderr"]} for t, e in tasks.items()}


def run(args) -> dict:
    t0 = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    levels = [float(x) for x in args.levels.split(",")]
    ways = [int(x) for x in args.ways.split(",")]
    recipe = recipes.load("reference")

    ev = Evaluator("reference", MC_TASKS, limit=args.limit, batch_size=args.lm_eval_batch)
    model = ev.model
    texts = [json.loads(line)["text"] for line in open(recipe.tasks_path / "brownout_ppl.jsonl")]
    ids = tokenize(texts, recipe.path, model.config.vocab_size, args.ppl_tokens, args.seq_len)
    batches = list(torch.split(ids, args.batch_size))
    print(f"held-out perplexity set: {ids.numel()} tokens in {len(batches)} batches of {args.batch_size} x {args.seq_len}")

    report = {"model": "reference", "ways": ways, "levels": levels, "grouping": args.grouping, "merge": args.merge,
              "policy": "hot-cold", "limit": args.limit, "mc_tasks": MC_TASKS,
              "read_unit": f"one forward batch of {args.batch_size} x {args.seq_len} tokens",
              "ppl_data": f"brownout_ppl passages, {ids.numel()} tokens, disjoint {args.seq_len}-token windows",
              "sensitivity_tokens": args.sens_tokens, "target": {"levels": list(TARGET_LEVELS), "factor": TARGET_FACTOR,
                                                                 "reads_tolerance": READS_TOLERANCE},
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": __import__("transformers").__version__},
              "command": args.command, "per_way": {}}

    base = held_out_nll(model, batches)
    base_mc = mc_entry(ev.run()) if args.limit != 0 else {}
    report["base"] = {**base, "mc": base_mc}
    print(f"base: nll {base['nll']:.4f} ppl {base['ppl']:.2f} mc {base_mc}")

    for way in ways:
        united = work / f"ref-w{way}-{args.grouping}-{args.merge}"
        tb = time.time()
        if not (united / "united.json").exists():
            build("reference", BuildOptions(out=str(united), way=way, grouping=args.grouping, merge=args.merge,
                                            progress=False))
        build_s = round(time.time() - tb, 1)
        sens_path = work / f"sensitivity-w{way}.json"
        if not sens_path.exists():
            write_json(sensitivity("reference", united, tokens=args.sens_tokens, seq_len=args.seq_len,
                                   batch_size=args.batch_size, joint_rounds=args.joint_rounds, progress=False),
                       sens_path)
        sens = json.loads(sens_path.read_text())
        sched = RatioSchedule.from_dict(sens)
        greedy = RatioSchedule.from_dict({k: v for k, v in sens.items() if k != "joint"})
        entry = {"united": str(united), "build_seconds": build_s, "sensitivity_seconds": sens["seconds"],
                 "sensitivity": {"base_nll": sens["base_nll"], "held_out": sens["held_out"],
                                 "layers": {k: {"nll_increase": v["nll_increase"], "saved_bytes": v["saved_bytes"]}
                                            for k, v in sens["layers"].items()},
                                 "joint": sens.get("joint")},
                 "levels": []}
        bm = BrownoutMoE.attach(model, united)
        counter = ReadCounter(bm)
        try:
            sched.check_layers(bm.layers)
            entry["base_read_bytes_per_batch"] = held_out_nll(model, batches, counter)["read_bytes_per_batch"]
            for level in levels:
                row = {"level": level}
                for kind in ("uniform", "schedule", "greedy"):
                    if kind == "greedy" and not args.compare_greedy:
                        continue
                    ratios = {"uniform": [level] * len(bm.layers), "schedule": sched.at(level),
                              "greedy": greedy.at(level)}[kind]
                    same = next((k for k in ("uniform", "schedule") if k in row and ratios == row[k]["ratios"]), None)
                    if same is not None:
                        row[kind] = {**row[same], "same_as": same}
                        continue
                    bm.set_ratio(ratios)
                    res = held_out_nll(model, batches, counter)
                    res["ratios"] = [round(r, 4) for r in ratios]
                    res["nll_increase"] = res["nll"] - base["nll"]
                    res["predicted_nll_increase"] = sched.predicted_loss(ratios)
                    res["predicted_saved_bytes"] = sched.saved_bytes(ratios)
                    if args.limit != 0 and kind != "greedy":
                        res["mc"] = mc_entry(ev.run())
                    row[kind] = res
                    print(f"way {way} level {level:g} {kind}: dNLL {res['nll_increase']:.4f} "
                          f"(predicted {res['predicted_nll_increase']:.4f}) reads {res['read_bytes_per_batch']:.4g} "
                          f"mc {res.get('mc')} ratios {res['ratios']}", flush=True)
                u, s = row["uniform"], row["schedule"]
                row["nll_increase_ratio"] = s["nll_increase"] / u["nll_increase"] if u["nll_increase"] > 0 else None
                row["reads_diff"] = s["read_bytes_per_batch"] / u["read_bytes_per_batch"] - 1
                if "greedy" in row:
                    g = row["greedy"]
                    row["greedy_nll_increase_ratio"] = (g["nll_increase"] / u["nll_increase"]
                                                        if u["nll_increase"] > 0 else None)
                    row["greedy_reads_diff"] = g["read_bytes_per_batch"] / u["read_bytes_per_batch"] - 1
                entry["levels"].append(row)
        finally:
            counter.close()
            bm.detach()
        report["per_way"][str(way)] = entry
        report["seconds"] = round(time.time() - t0, 1)
        write_json(report, Path(args.out) / "schedule_study.json")  # partial results survive an interrupted run
    report["target_met"] = all(
        r["nll_increase_ratio"] is not None and r["nll_increase_ratio"] <= TARGET_FACTOR
        and abs(r["reads_diff"]) <= READS_TOLERANCE
        for e in report["per_way"].values() for r in e["levels"] if r["level"] in TARGET_LEVELS)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def _acc(res: dict, task: str) -> str:
    m = res.get("mc", {}).get(task)
    return "-" if m is None else f"{m['acc']:.3f} ± {m['stderr']:.3f}"


def write_markdown(report: dict, path: Path) -> None:
    b = report["base"]
    lines = ["# Per-layer ratio schedule against the uniform ratio (reference model)", "",
             f"- united experts: {report['grouping']} + {report['merge']}, ways {', '.join(map(str, report['ways']))}, "
             f"policy {report['policy']}",
             f"- sensitivity: {report['sensitivity_tokens']} tokens of held-out calibration text (reference calib.txt "
             "past the tokens the build read); evaluation: data neither saw",
             f"- held-out NLL: {report['ppl_data']}; base NLL {b['nll']:.4f} (token perplexity {b['ppl']:.2f})",
             f"- weight reads: expert bytes read per {report['read_unit']}, at the ratios set",
             f"- multiple choice: lm-eval, {report['limit']} documents per task, ± one standard error; base "
             + ", ".join(f"{t} {_acc(b, t)}" for t in report["mc_tasks"]),
             f"- target: at levels {', '.join(map(str, report['target']['levels']))} the schedule's NLL increase <= "
             f"{report['target']['factor']}x the uniform ratio's at every way, reads within "
             f"{100 * report['target']['reads_tolerance']:.0f}%: **{'met' if report.get('target_met') else 'not met'}**",
             "",
             "| way | level | ΔNLL uniform | ΔNLL schedule | schedule / uniform | single-layer greedy / uniform "
             "(its reads vs uniform) | reads uniform (MB) | reads schedule vs uniform | ppl uniform | ppl schedule | "
             "cont uniform | cont schedule | cloze uniform | cloze schedule | schedule's ratios |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for way, e in report["per_way"].items():
        for r in e["levels"]:
            u, s = r["uniform"], r["schedule"]
            q, gq = r["nll_increase_ratio"], r.get("greedy_nll_increase_ratio")
            greedy = "-" if gq is None else f"{gq:.2f} ({100 * r['greedy_reads_diff']:+.1f}%)"
            lines.append(
                f"| {way} | {r['level']:g} | {u['nll_increase']:.4f} | {s['nll_increase']:.4f} | "
                f"{'-' if q is None else f'{q:.2f}'}{' (same)' if s.get('same_as') else ''} | {greedy} | "
                f"{u['read_bytes_per_batch'] / 1e6:.2f} | {100 * r['reads_diff']:+.2f}% | {u['ppl']:.2f} | "
                f"{s['ppl']:.2f} | {_acc(u, 'brownout_cont')} | {_acc(s, 'brownout_cont')} | "
                f"{_acc(u, 'brownout_cloze')} | {_acc(s, 'brownout_cloze')} | "
                f"{' '.join(f'{x:.2f}' for x in s['ratios'])} |")
    lines += ["", "\"single-layer greedy\": the same sensitivity file without its joint anchors (the allocation that "
              "minimises the sum of single-layer curves), held-out NLL and reads only.", "",
              "Joint anchors, as `unify sensitivity` found them on the calibration text (ΔNLL there, joint):", "",
              "| way | level | uniform | best start candidate | anchor | anchor / uniform | reads vs uniform | anchor ratios |",
              "|---|---|---|---|---|---|---|---|"]
    for way, e in report["per_way"].items():
        j = e["sensitivity"].get("joint") or {}
        for k, lv in enumerate(j.get("levels", [])):
            uj, aj = j["uniform_nll_increase"][k], j["nll_increase"][k]
            lines.append(f"| {way} | {lv:g} | {uj:.4f} | {j['start_nll_increase'][k]:.4f} | {aj:.4f} | "
                         f"{aj / uj:.2f} | {100 * j['reads_vs_uniform'][k]:+.2f}% | "
                         f"{' '.join(f'{x:.2f}' for x in j['ratios'][k])} |")
    lines += ["", "Per-layer sensitivity (NLL increase with only that layer at ratio 1; at ratio 0.5 in brackets):", "",
              "| way | " + " | ".join(f"layer {k}" for k in next(iter(report["per_way"].values()))["sensitivity"]["layers"])
              + " |", "|---|" + "---|" * len(next(iter(report["per_way"].values()))["sensitivity"]["layers"])]
    for way, e in report["per_way"].items():
        cells = [f"{v['nll_increase'][-1]:.3f} ({v['nll_increase'][len(v['nll_increase']) // 2]:.3f})"
                 for v in e["sensitivity"]["layers"].values()]
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {report['machine']}; {report['seconds']} s in all.", "", f"Command: `{report['command']}`"]
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = list(report["per_way"])
    fig, axes = plt.subplots(2, len(ways), figsize=(4.3 * len(ways), 7), squeeze=False)
    for c, way in enumerate(ways):
        rows = report["per_way"][way]["levels"]
        lv = [r["level"] for r in rows]
        ax = axes[0][c]
        for kind, style in (("uniform", "o-"), ("schedule", "s-")):
            ax.plot([0] + lv, [0] + [r[kind]["nll_increase"] for r in rows], style, label=kind)
        ax.plot([0] + lv, [0] + [TARGET_FACTOR * r["uniform"]["nll_increase"] for r in rows], "k:", lw=1,
                label=f"{TARGET_FACTOR}x uniform")
        ax.set_title(f"{way}-way: held-out NLL increase")
        ax.set_xlabel("level (uniform ratio with the same weight reads)")
        ax.set_ylabel("ΔNLL (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][c]
        for task, color in zip(report["mc_tasks"], ("C0", "C2")):
            for kind, style, dx in (("uniform", "o-", -0.006), ("schedule", "s--", 0.006)):
                ys = [r[kind].get("mc", {}).get(task) for r in rows]
                if any(y is None for y in ys):
                    continue
                ax.errorbar([x + dx for x in lv], [y["acc"] for y in ys], yerr=[y["stderr"] for y in ys], fmt=style,
                            color=color, ms=4, capsize=2, label=f"{task} {kind}")
            b = report["base"].get("mc", {}).get(task)
            if b:
                ax.axhline(b["acc"], color=color, ls=":", lw=1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{way}-way: multiple choice (± 1 s.e.; dotted: base)")
        ax.set_xlabel("level")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="eval/results", help="folder for schedule_study.{json,md,png}")
    p.add_argument("--work", default="/tmp/brownout-schedule-study", help="united checkpoints and sensitivity files")
    p.add_argument("--ways", default="2,4,8")
    p.add_argument("--grouping", default="frequency")
    p.add_argument("--merge", default="distill-routed")
    p.add_argument("--levels", default="0.25,0.5,0.75,1")
    p.add_argument("--sens-tokens", type=int, default=16384, help="held-out calibration tokens for the sensitivity")
    p.add_argument("--joint-rounds", type=int, default=2, help="exchange rounds per joint anchor (unify sensitivity)")
    p.add_argument("--no-compare-greedy", dest="compare_greedy", action="store_false",
                   help="skip the single-layer greedy's held-out NLL")
    p.add_argument("--ppl-tokens", type=int, default=10**9, help="brownout_ppl tokens evaluated (default: all)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward: also the unit of weight reads")
    p.add_argument("--limit", type=int, default=250, help="lm-eval documents per multiple-choice task (0: skip them)")
    p.add_argument("--lm-eval-batch", type=int, default=16)
    args = p.parse_args(argv)
    args.command = "python -m eval.schedule_study " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args)
    out = Path(args.out)
    write_json(report, out / "schedule_study.json")
    write_markdown(report, out / "schedule_study.md")
    plot(report, out / "schedule_study.png")
    print(f"wrote {out / 'schedule_study.json'}, .md, .png; target {'met' if report['target_met'] else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
