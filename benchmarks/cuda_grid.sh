#!/usr/bin/env bash
# The GPU measurement of issues 3 and 4, as one script for a short device lease.
#
#   bash benchmarks/cuda_grid.sh OUT_DIR [DATA_DIR]
#
# Environment: TOTAL_SECONDS (default 560): stage 3 stops in time to write the summary
# within it; RESUME_DIR: a folder holding an earlier call's files (check.txt and the CSVs),
# whose finished stages are skipped and whose grid CSV is resumed; SKIP_CHECK=1 skips stage 1
# (it was checked on an H100 on 2026-11-27; with TOTAL_SECONDS=590 the grid gets ~510 s); DEVICE (default cuda), EPOCHS
# (default 120) and GRID_FLAGS (default "--preset table1-$DATASET") exist for dry runs on CPU;
# PYTHON (default python3); DATASET (default mnist; cifar10 runs CIFAR-10's Table 1 the same
# way -- carry only the CIFAR zip then: it and mnist.npz together exceed a lease's 64 MiB).
#
# 1. graph check: proposed_base (deterministic) at 10 and 20 per class, set 1, 3 epochs,
#    three ways -- lanes with a CUDA graph, lanes eager, one run at a time -- side by side
#    (on DATASET).
#    If the graph capture failed, stage 3 runs eager lanes in 6 worker processes instead.
# 2. sequential slice: feed_forward and perturb_class_conditional at 10 and 100 per class,
#    set 1, 120 epochs, one run at a time (the baseline of the speed-up).
# 3. the whole Table 1 grid of DATASET (6 methods x 9 sizes x 3 sets = 162 runs, 120 epochs,
#    per-epoch validation) in lanes: every run of a method in one trainer, the six trainers
#    round-robin on their own CUDA streams in one process. Resumable: rerun with the CSV in
#    OUT_DIR to finish an interrupted grid.
# Every stage writes its CSV row by row; cuda_timing.md sums up the wall times with the
# sequential grid time extrapolated from the slice (per-epoch and per-step costs fitted on
# the slice, applied to the grid's epochs and steps).
set -uo pipefail
OUT=${1:?usage: cuda_grid.sh OUT_DIR [DATA_DIR]}
DATA=${2:-${LATENT_AUG_DATA:-}}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-120}
TOTAL_SECONDS=${TOTAL_SECONDS:-560}  # the grid stops in time for the summary within this
DATASET=${DATASET:-mnist}
GRID_FLAGS=${GRID_FLAGS:---preset table1-$DATASET}
RESUME_DIR=${RESUME_DIR:-}  # a folder with earlier CSVs: copied in, finished stages skipped
START=$(date +%s)
mkdir -p "$OUT"
WORK=$(mktemp -d)  # logs and side files; only the 7 files below go to OUT (8 come back)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA_FLAG=()
[ -n "$DATA" ] && DATA_FLAG=(--data-dir "$DATA")
RUN=("$PY" benchmarks/reproduce.py --dataset "$DATASET" --device "$DEVICE" "${DATA_FLAG[@]}")
stamp() { date +%s.%N; }

"$PY" - "$DEVICE" <<'PY' | tee "$WORK/device.txt"
import datetime, sys, torch
dev = sys.argv[1]
name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
print(f"torch {torch.__version__}, {name}, {datetime.datetime.now(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}")
PY

if [ -n "$RESUME_DIR" ]; then
    cp "$RESUME_DIR"/check.txt "$RESUME_DIR"/*.csv "$OUT"/ 2>/dev/null
    cp "$OUT/cuda-sequential-slice.csv" "$WORK/" 2>/dev/null
fi

# 1. graph check
t=$(stamp)
[ -n "${SKIP_CHECK:-}" ] && echo "stage 1 skipped (SKIP_CHECK)" > "$OUT/check.txt"
[ -s "$OUT/check.txt" ] || for way in graph eager sequential; do
    flags=(--vectorize lanes)
    [ $way = eager ] && flags+=(--no-cuda-graph)
    [ $way = sequential ] && flags=()
    timeout 150 "${RUN[@]}" --methods proposed_base --per-class 10 20 --splits 1 --epochs 3 \
        --workers 1 --results-dir "$WORK" --name "check-$way" "${flags[@]}" \
        > "$WORK/check-$way.log" 2>&1
    echo "check $way: rc $? $(grep -h 'grid wall time' "$WORK/check-$way.log")"
    cat "$WORK/check-$way.csv"
done | tee "$OUT/check.txt"
echo "stage 1: $(awk "BEGIN{print $(stamp) - $t}") s" | tee -a "$OUT/check.txt"
touch "$WORK/check-graph.log"
WORKERS=1
LANE_FLAGS=()
if grep -q "CUDA graph capture failed\|graph capture failed" "$WORK/check-graph.log" "$OUT/check.txt"; then
    echo "graph capture failed: stage 3 runs eager lanes in 6 workers" | tee -a "$OUT/check.txt"
    WORKERS=6
    LANE_FLAGS=(--no-cuda-graph)
fi

# 2. sequential slice
t0=$(stamp)
[ -s "$WORK/cuda-sequential-slice.csv" ] || timeout 240 "${RUN[@]}" --methods feed_forward perturb_class_conditional --per-class 10 100 \
    --splits 1 --epochs "$EPOCHS" --workers 1 --results-dir "$WORK" --name cuda-sequential-slice \
    > "$WORK/sequential.log" 2>&1
echo "sequential slice rc $?"
cp "$WORK/cuda-sequential-slice.csv" "$OUT/" 2>/dev/null
t1=$(stamp)

# 3. the grid
GRID=("${RUN[@]}" $GRID_FLAGS --epochs "$EPOCHS" --results-dir "$OUT" --name "table1-$DATASET-cuda")
GRID_SECONDS=$((TOTAL_SECONDS - ($(date +%s) - START) - 30))
timeout "$GRID_SECONDS" "${GRID[@]}" --vectorize lanes --workers "$WORKERS" "${LANE_FLAGS[@]}" \
    > "$WORK/grid.log" 2>&1
echo "grid rc $? (124: stopped at GRID_SECONDS=$GRID_SECONDS; rerun to resume)"
t2=$(stamp)
"${GRID[@]}" --report-only > /dev/null 2>&1  # the report of what finished

for f in "$WORK"/*.log; do  # progress bars: last lines only
    echo "== $f"; tr '\r' '\n' < "$f" | grep -v '^ *$' | tail -25
done > "$OUT/logs.txt"
"$PY" - "$OUT" "$t0" "$t1" "$t2" "$WORKERS" "$EPOCHS" "$WORK" "$DATASET" <<'PY'
import csv, sys
from pathlib import Path
out, t0, t1, t2, workers, epochs, work, dataset = sys.argv[1], *map(float, sys.argv[2:5]), *sys.argv[5:9]
epochs = int(epochs)
read = lambda name: list(csv.DictReader(open(f"{out}/{name}.csv"))) if Path(f"{out}/{name}.csv").exists() else []
seq, grid = read("cuda-sequential-slice"), read(f"table1-{dataset}-cuda")
full = {"mnist": 5000, "cifar10": 4000}[dataset]  # training examples per class of 'all'
steps = lambda n: epochs * ((full if n == "all" else int(n)) * 10 // 100)
sizes = [10, 20, 50, 100, 200, 500, 1000, 2000, "all"]
est = 0.0
try:  # seconds = epochs * a + steps * b per method, fitted on the two sizes of the slice
    for m in ("feed_forward", "perturb_class_conditional"):
        r = {x["per_class"]: float(x["seconds"]) for x in seq if x["method"] == m}
        b = (r["100"] - r["10"]) / (steps(100) - steps(10))
        a = r["10"] - b * steps(10)
        n = 1 if m == "feed_forward" else 5  # 1 plain and 5 wrapped methods, wrapped as pcc
        est += n * 3 * sum(a + b * steps(s) for s in sizes)
except KeyError as err:
    est = float("nan")
    print(f"sequential slice incomplete ({err}); no extrapolation")
grid_s = t2 - t1
text = f"""# {dataset} Table 1 on CUDA ({open(f"{work}/device.txt").read().strip()})

- sequential slice ({len(seq)} of 4 runs, one at a time): {t1 - t0:.1f} s
- grid in lanes, {workers} process(es): {len(grid)} of 162 runs finished in {grid_s:.1f} s
- sequential full grid, extrapolated from the slice: {est:.0f} s
- speed-up (complete grid only): {est / grid_s if len(grid) == 162 else float('nan'):.1f}x
"""
open(f"{out}/cuda_timing.md", "w").write(text)
print(text)
PY
