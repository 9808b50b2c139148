#!/usr/bin/env bash
# The batched decode launch's device time where the runner's shared GPU multiplies it (issue 21), one device call
# (~7-9 minutes), each step's output kept in $OUT as it lands (a step cut short leaves the ones before it):
#   1. tests/test_batched.py on the GPU, with the dots in fp32 and with SMARTKV_BATCH_TF32=1 (its bound then);
#   2. batched_variants.py: the defaults against TF32 operands, the merge's step of 64, the merge apart from the
#      folds and the old 512-token splits, int4 beside, in one process (the attention launches' device ms, ms a
#      token);
#   3. shared_gpu.py with eight processes on the GPU, int4 then SmartKV (the grid's setting).
#   run(command="OUT=$OUT bash benchmarks/batched_variants_gpu.sh")
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
LOG=$OUT/batched_variants_gpu.out
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$LOG"
for tf32 in 0 1; do
  echo "== tests/test_batched.py, SMARTKV_BATCH_TF32=$tf32" | tee -a "$LOG"
  SMARTKV_BATCH_TF32=$tf32 timeout 150 python -m pytest tests/test_batched.py -q --tb=line -p no:cacheprovider \
      > "$OUT/pytest_tf32_$tf32.txt" 2>&1
  grep -E "^(FAILED|E )|passed|failed|Error" "$OUT/pytest_tf32_$tf32.txt" | tail -6 | cut -c1-200 | tee -a "$LOG"
done
echo "== batched_variants.py" | tee -a "$LOG"
timeout 220 python benchmarks/batched_variants.py --context 8000 --new 32 --repeats 3 2>&1 | grep -v -i warn \
    | tail -12 | tee -a "$LOG"
echo "== shared_gpu.py, eight processes" | tee -a "$LOG"
timeout 150 python benchmarks/shared_gpu.py --context 8000 --new 32 --repeats 2 --top 4 --layouts 8:int4,8:smartkv \
    2>&1 | grep -v -i warn | tail -16 | tee -a "$LOG"
