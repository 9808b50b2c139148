#!/usr/bin/env bash
# The batched decode launch's device time where the runner's shared GPU multiplies it (issue 21), one device call
# (~6-8 minutes for the default steps), each step's output kept in $OUT as it lands (a step cut short leaves the
# ones before it). STEPS picks among:
#   tests     tests/test_batched.py on the GPU under each SMARTKV_BATCH_DOTS of DOTS_LIST (default tf32x3, fp32,
#             tf32: tf32 misses its bounds);
#   ladder    batched_ladder.py: one call's kernels, rung by rung and setting by setting (device us a call);
#   variants  batched_variants.py: the defaults against the dots' settings and the merge apart from the folds,
#             int4 beside, in one process (the attention launches' device ms, ms a token);
#   shared    shared_gpu.py with eight processes on the GPU, int4 then SmartKV (the grid's setting).
#   run(command="OUT=$OUT bash benchmarks/batched_variants_gpu.sh")
#   run(command="STEPS='tests shared' DOTS_LIST=tf32x3 OUT=$OUT bash benchmarks/batched_variants_gpu.sh")
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
STEPS=" ${STEPS:-tests ladder variants} "
mkdir -p "$OUT"
LOG=$OUT/batched_variants_gpu.out
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$LOG"
if [[ $STEPS == *" tests "* ]]; then
  for dots in ${DOTS_LIST:-tf32x3 fp32 tf32}; do
    echo "== tests/test_batched.py, SMARTKV_BATCH_DOTS=$dots" | tee -a "$LOG"
    SMARTKV_BATCH_DOTS=$dots timeout 150 python -m pytest tests/test_batched.py -q --tb=line -p no:cacheprovider \
        > "$OUT/pytest_$dots.txt" 2>&1
    grep -E "^(FAILED|E )|passed|failed|Error" "$OUT/pytest_$dots.txt" | tail -6 | cut -c1-200 | tee -a "$LOG"
  done
fi
if [[ $STEPS == *" ladder "* ]]; then
  echo "== batched_ladder.py" | tee -a "$LOG"
  timeout 150 python benchmarks/batched_ladder.py 2>&1 | grep -v -i warn | tail -24 | tee -a "$LOG"
fi
if [[ $STEPS == *" variants "* ]]; then
  echo "== batched_variants.py" | tee -a "$LOG"
  timeout 200 python benchmarks/batched_variants.py --context 8000 --new 32 --repeats 3 \
      --variants int4,base,fp32,tf32,merge-apart 2>&1 | grep -v -i warn | tail -10 | tee -a "$LOG"
fi
if [[ $STEPS == *" shared "* ]]; then
  echo "== shared_gpu.py, eight processes" | tee -a "$LOG"
  timeout 150 python benchmarks/shared_gpu.py --context 8000 --new 32 --repeats 2 --top 4 \
      --layouts 8:int4,8:smartkv 2>&1 | grep -v -i warn | tail -16 | tee -a "$LOG"
fi
