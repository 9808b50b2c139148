#!/usr/bin/env bash
# A group's host solves asked together (smartkv/core/solves.py, counts.counts_many; issue 21's prefill goal) on one
# GPU, one device call (~6-8 minutes):
#   1. the tests on the GPU: a group's state equals one layer's at a time with the solves together and apart
#      (tests/test_first_group.py), the counts of many profiles at once (tests/test_policy.py), the fused and static
#      append steps;
#   2. the prefill's phases at the runner's shape (SmolLM2, 30 layers, 8000 tokens): groups of 1 and 8, the solves
#      together and apart (SMARTKV_SOLVES_TOGETHER=0,1), two rounds interleaved in one process;
#   3. the runner's own eager loop (8000 + 32 tokens, five requests), int4 and SmartKV's default with the solves
#      apart and together, interleaved in one process.
#   run(command="OUT=$OUT bash benchmarks/solves_gpu.sh")   # outputs in $OUT; summary: solves_gpu.out
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python -m pytest tests/test_first_group.py tests/test_policy.py \
    "tests/test_append.py::test_fused_and_static_steps_equal_the_reference_path" \
    -k "group or layer or many or table or fused or waits or stopped or bad" \
    -q --tb=short -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
timeout 220 python benchmarks/profile_prefill.py --shape smollm2 --layers 30 --context 8000 \
    --rows 'int4,smartkv (budget 4.25; gap 3)' --phases 5 --groups 1,8 --ab SMARTKV_SOLVES_TOGETHER --rounds 2 \
    > "$OUT/prefill.log" 2>&1
cat "$OUT/prefill.log"
timeout 240 python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 5 --modes eager \
    --rows 'int4,smartkv (default)' --ab SMARTKV_SOLVES_TOGETHER --json "$OUT/runner_ab.json" \
    > "$OUT/runner_ab.log" 2>&1
tail -8 "$OUT/runner_ab.log"
} 2>&1 | tee "$OUT/solves_gpu.out"
