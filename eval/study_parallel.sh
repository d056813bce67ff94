#!/usr/bin/env bash
# The accuracy study (python -m eval.study) as parallel processes, run from the repository root: nine CPU processes
# build the checkpoints (one per way x grouping), then one process per way evaluates them (hot-cold over every
# grouping x merge, then mass and drop for the paper's method and that way's best), then one combined table and plot
# in OUT. Resumable: rerun with the same OUT (and cache) and finished runs are skipped.
#
#   bash eval/study_parallel.sh OUT [eval.study options, e.g. --device cuda --dtype bfloat16]
#   (logs go to $LOGS, default OUT/logs; checkpoints to --cache, default /tmp/brownout-study)
set -u
OUT=$1; shift
PY=${PYTHON:-python3}
LOGS=${LOGS:-$OUT/logs}
mkdir -p "$OUT" "$LOGS"
pids=()
for w in 2 4 8; do
  for g in consecutive frequency similarity; do
    $PY -m eval.study --out "$OUT/w$w" --ways $w --groupings $g --build-only --threads 1 "$@" >"$LOGS/build-$w-$g.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || { echo "a build failed: see $LOGS/build-*.log"; exit 1; }; done
pids=()
for w in 2 4 8; do
  $PY -m eval.study --out "$OUT/w$w" --ways $w --threads 2 "$@" >"$LOGS/eval-$w.log" 2>&1 &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
$PY -m eval.study --combine "$OUT"/w2 "$OUT"/w4 "$OUT"/w8 --out "$OUT" || exit 1
[ $failed = 0 ] || { echo "an evaluation failed or was stopped: see $LOGS/eval-*.log; rerun to resume"; exit 1; }
