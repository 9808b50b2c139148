#!/usr/bin/env bash
# Issue 21's runner goal read where the issue reads it: the runner's own speed grid (jobs/smartkv_speed.yaml: fp16,
# int4 and SmartKV's default at int4's bytes, passkey and needle at 4K and 8K tokens, 8 workers on one GPU), RUNS
# times back to back (the grid's ratio moved 1.14-1.49x between runs of one tree), each run's per-sample medians
# against int4 (runner_medians.py). Needs the staged model and Ray (../shared/device/README.md: carry
# .devbundle/model/a, then .devbundle/model/b, then this call with .devbundle/py). A run takes ~2-3 minutes.
#   run(command="source .devbundle/py/setup.sh && RUNS=3 OUT=$OUT bash benchmarks/runner_grid_gpu.sh",
#       carry=[".devbundle/py"])
#   SETTINGS='SMARTKV_FIRST_GROUP=8 SMARTKV_FIRST_GROUP=30': each run also steps through these environment settings
#   (one grid each, the workers inherit it; NAME=V,NAME2=W sets two at once), interleaved
set -u
OUT=${OUT:-benchmarks/raw/latest}
RUNS=${RUNS:-2}
mkdir -p "$OUT"
LOG=$OUT/runner_grid_gpu.out
{ nvidia-smi --query-gpu=name --format=csv,noheader
  git log -1 --format='%h %s' 2>/dev/null | cut -c1-100; } | tee "$LOG"
if [ -z "${SMARTKV_SMOLLM2_GGUF:-}" ]; then
  echo "runner_grid_gpu.sh: SMARTKV_SMOLLM2_GGUF is not set: stage the model first (../shared/device/README.md)" >&2
  exit 2
fi
for i in $(seq 1 "$RUNS"); do
  for setting in ${SETTINGS:-default}; do   # settings interleaved within a run: their ratios share its card
    tag=run$i${SETTINGS:+_$(echo "$setting" | tr '=,' '-+')}   # a file name the device call brings back
    echo "== grid run $i of $RUNS${SETTINGS:+, $setting}" | tee -a "$LOG"
    (if [ "$setting" != default ]; then for kv in ${setting//,/ }; do export "${kv?}"; done; fi
     timeout 280 python -m smartkv.bench.cli submit --grid jobs/smartkv_speed.yaml --out "$OUT/$tag" --no-progress \
         --workers-per-gpu 8 > "$OUT/submit_$tag.log" 2>&1)
    grep -E "^(ran|time:)" "$OUT/submit_$tag.log" | tee -a "$LOG"
    timeout 60 python benchmarks/runner_medians.py "$OUT/$tag" --baseline int4 2>&1 | tee -a "$LOG"
  done
done
