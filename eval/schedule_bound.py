"""How far any per-layer schedule can go, from the sensitivity curves alone: a lower bound on the predicted NLL
increase at the uniform ratio's bytes, over the uniform ratio's predicted increase.

With the layers' losses taken as additive (the sum of the single-layer curves, piecewise linear between the measured
ratios), `RatioSchedule.least_loss` is the relaxation of the allocation (greedy over each layer's lower convex hull,
the last segment taken in part on the hull): no per-layer allocation saving as many bytes predicts less. So where
this ratio is above a target, no per-layer allocation meets the target in prediction. Measured, the layers' losses
do not add up, and the study found the joint cost of a skewed allocation above its prediction. The schedule's own
allocation (`at`, no anchors) is listed too: its predicted loss is at or above the bound.

    python -m eval.schedule_bound eval/results/schedule_study.json --out eval/results/schedule_bound.md
    python -m eval.schedule_bound S.json --levels 0.5 0.75          # a `unify sensitivity` file, to the screen
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.schedule import RatioSchedule

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]  # the ratios `unify sensitivity` measures by default


def curves(doc: dict) -> dict[str, dict]:
    """{way or file name: sensitivity dict without its joint anchors} from a schedule study or a sensitivity file."""
    if "per_way" in doc:  # eval/schedule_study.py's JSON: one trimmed sensitivity file per way
        found = {f"way {w}": dict(v["sensitivity"]) for w, v in doc["per_way"].items()}
    else:
        found = {"file": dict(doc)}
    for sens in found.values():
        sens.pop("joint", None)
        sens.setdefault("ratios", GRID)
    return found


def bound_rows(doc: dict, levels) -> list[dict]:
    rows = []
    for name, sens in curves(doc).items():
        s = RatioSchedule.from_dict(sens)
        for level in levels:
            greedy = s.at(level)
            uniform, least = s.predicted_loss(level), s.least_loss(level)
            rows.append({"curves": name, "level": level, "uniform": uniform, "least": least,
                         "least_over_uniform": least / uniform if uniform else float("nan"),
                         "greedy": s.predicted_loss(greedy), "ratios": greedy})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| curves | level | predicted ΔNLL, uniform | lower bound, same bytes | bound / uniform | "
             "schedule (no anchors): predicted ΔNLL | its ratios |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = " ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['curves']} | {r['level']:g} | {r['uniform']:.4f} | {r['least']:.4f} | "
                     f"{r['least_over_uniform']:.2f} | {r['greedy']:.4f} | {ratios} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="eval/schedule_study.py's JSON or a `unify sensitivity` file")
    ap.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--out", help="also write the table, with a header naming its source, to this markdown file")
    args = ap.parse_args(argv)
    try:
        doc = json.loads(Path(args.path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read {args.path}: {e}")
    table = markdown(bound_rows(doc, args.levels))
    print(table)
    if args.out:
        text = ("# Per-layer schedule: a lower bound on any allocation (issue 20)\n\n"
                f"From the sensitivity curves in `{args.path}` (layers taken as additive). Command: "
                f"`python -m eval.schedule_bound {args.path} --out {args.out}`; see eval/schedule_bound.py.\n\n"
                + table + "\n")
        tmp = Path(args.out).with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(args.out)  # whole or not at all


if __name__ == "__main__":
    main()
