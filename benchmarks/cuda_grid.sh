#!/usr/bin/env bash
# The GPU measurement of issue 4, as one script for a short device lease.
#
#   bash benchmarks/cuda_grid.sh OUT_DIR [DATA_DIR] [WORKERS]
#
# 1. A sequential slice (one run at a time, no vmap): feed_forward and
#    perturb_class_conditional at 10 and 100 examples per class, set 1.
# 2. The whole MNIST Table 1 grid (6 methods x 9 sizes x 3 sets = 162 runs, 120 epochs,
#    per-epoch validation) with the sets of each cell vmapped and WORKERS processes
#    sharing the GPU.
# Both write CSVs (resumable) and wall times into OUT_DIR; cuda_timing.md sums it up with
# the sequential grid time extrapolated from the slice (per-epoch and per-step costs fitted
# on the slice, applied to the grid's epochs and steps).
set -euo pipefail
OUT=${1:?usage: cuda_grid.sh OUT_DIR [DATA_DIR] [WORKERS]}
DATA=${2:-${LATENT_AUG_DATA:-}}
WORKERS=${3:-4}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DATA_FLAG=()
[ -n "$DATA" ] && DATA_FLAG=(--data-dir "$DATA")
python - <<'PY' | tee "$OUT/device.txt"
import datetime, torch
print(torch.__version__, torch.cuda.get_device_name(), datetime.datetime.utcnow().isoformat() + "Z")
PY
t0=$(date +%s.%N)
python benchmarks/reproduce.py --dataset mnist --methods feed_forward perturb_class_conditional \
    --per-class 10 100 --splits 1 --device cuda --workers 1 --name cuda-sequential-slice \
    --results-dir "$OUT" "${DATA_FLAG[@]}" > "$OUT/sequential.log" 2>&1
t1=$(date +%s.%N)
python benchmarks/reproduce.py --preset table1-mnist --device cuda --vectorize \
    --workers "$WORKERS" --name table1-mnist-cuda --results-dir "$OUT" "${DATA_FLAG[@]}" \
    > "$OUT/grid.log" 2>&1
t2=$(date +%s.%N)
python - "$OUT" "$t0" "$t1" "$t2" "$WORKERS" <<'PY'
import csv, sys
out, t0, t1, t2, workers = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
rows = list(csv.DictReader(open(f"{out}/cuda-sequential-slice.csv")))
# seconds = epochs * a + steps * b per method, fitted on the two sizes of the slice
steps = lambda n: 120 * ((5000 if n == "all" else int(n)) * 10 // 100)
est = 0.0
for m in ("feed_forward", "perturb_class_conditional"):
    r = {x["per_class"]: float(x["seconds"]) for x in rows if x["method"] == m}
    b = (r["100"] - r["10"]) / (steps(100) - steps(10))
    a = r["10"] - b * steps(10)
    sizes = [10, 20, 50, 100, 200, 500, 1000, 2000, "all"]
    # the 6 Table-1 methods: 1 plain (feed_forward) and 5 wrapped, costed like pcc
    n = 1 if m == "feed_forward" else 5
    est += n * 3 * sum(a + b * steps(s) for s in sizes)
text = f"""# MNIST Table 1 on CUDA

- sequential slice (4 runs, one at a time): {t1 - t0:.1f} s
- full grid, 162 runs, vectorized over sets, {workers} workers: {t2 - t1:.1f} s
- sequential full grid, extrapolated from the slice: {est:.0f} s
- speed-up: {est / (t2 - t1):.1f}x
"""
open(f"{out}/cuda_timing.md", "w").write(text)
print(text)
PY
