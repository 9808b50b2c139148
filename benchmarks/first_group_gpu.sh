#!/usr/bin/env bash
# SmartKV's first allocation by groups of layers (smartkv/methods/smartkv/first.py, issue 21's prefill goal) on
# one GPU, one device call (~5-8 minutes):
#   1. its tests on the GPU (tests/test_first_group.py: a group's state, decode and bytes equal one layer's at a
#      time, the fused kernels decoding) and the append tests of the fused and static steps;
#   2. the prefill's phases at the runner's shape (SmolLM2, 30 layers, 8000 tokens), groups of 1 and 8, two rounds
#      interleaved (profile_prefill.py --groups);
#   3. the runner's own eager loop (8000 + 32 tokens), int4 and SmartKV's default at groups of 1 and 8 interleaved
#      in one process (bench_runner_step.py --ab), then with the append window passed as a new segment each step
#      and as a stable one (SMARTKV_STABLE_WINDOW=0,1; the batched decode tests first).
#   run(command="OUT=$OUT bash benchmarks/first_group_gpu.sh")   # outputs in $OUT; summary: first_group_gpu.out
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python -m pytest tests/test_first_group.py "tests/test_append.py::test_fused_and_static_steps_equal_the_reference_path" \
    "tests/test_append.py::test_the_window_is_one_stable_segment_with_the_same_results" \
    -q --tb=short -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
timeout 200 python benchmarks/profile_prefill.py --shape smollm2 --layers 30 --context 8000 \
    --rows 'int4,smartkv (budget 4.25; gap 3)' --phases 5 --groups 1,8 --rounds 2 > "$OUT/prefill.log" 2>&1
cat "$OUT/prefill.log"
timeout 200 python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 3 --modes eager \
    --rows 'int4,smartkv (default)' --ab SMARTKV_FIRST_GROUP=1,8 --json "$OUT/runner_ab.json" > "$OUT/runner_ab.log" 2>&1
tail -8 "$OUT/runner_ab.log"
timeout 150 python -m pytest tests/test_batched.py -q --tb=short -p no:cacheprovider > "$OUT/pytest_batched.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest_batched.txt" | tail -8 | cut -c1-200
timeout 200 python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 3 --modes eager \
    --rows 'int4,smartkv (default)' --ab SMARTKV_STABLE_WINDOW --json "$OUT/window_ab.json" > "$OUT/window_ab.log" 2>&1
tail -8 "$OUT/window_ab.log"
} 2>&1 | tee "$OUT/first_group_gpu.out"
