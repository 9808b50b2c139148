#!/usr/bin/env bash
# The batched decode launch (kernels.batched, issue 21's runner goal) on one GPU, one device call (~6-9 minutes):
#   1. its tests and the kernels' fold and merge tests on the GPU (tests/test_batched.py: every width in one launch
#      against the reference, the folds in the merge's launch, the table kept and rebuilt);
#   2. the runner's own eager loop (SmolLM2 shape, random weights, 8000 + 32 tokens), int4 and SmartKV's default
#      with SMARTKV_BATCH_SEGMENTS=0 and 1 interleaved in one process (bench_runner_step.py --ab);
#   3. host and wall us a decode_attention call (launch_cost.py), at the runner's shape and at MAX_ROWS shapes.
#   run(command="OUT=$OUT bash benchmarks/batched_gpu.sh")   # the outputs land in $OUT; summary: batched_gpu.out
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python -m pytest tests/test_batched.py tests/test_kernels.py -q --tb=short -p no:cacheprovider \
    -k "batched or fold or probabilities or mixed or merge" > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
timeout 200 python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 3 --modes eager \
    --rows 'int4,smartkv (default)' --ab SMARTKV_BATCH_SEGMENTS --json "$OUT/runner_ab.json" > "$OUT/runner_ab.log" 2>&1
tail -8 "$OUT/runner_ab.log"
timeout 50 python benchmarks/launch_cost.py > "$OUT/launch_cost.log" 2>&1
cat "$OUT/launch_cost.log"
} 2>&1 | tee "$OUT/batched_gpu.out"
