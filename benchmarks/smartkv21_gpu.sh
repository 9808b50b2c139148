#!/usr/bin/env bash
# Issue 21 on one H200, one device call (inner limits 565 s in all, under 10 minutes): SmartKV's default (two-pass
# step, incremental re-allocation) against joint classes (one-pass step), a width per block of 16 tokens and int4,
# in the same run:
#   1. the fused (pool kernels), joint (one pass) and graphed SmartKV tests on the GPU, and the CUDA kernel's
#      per-token cases (3-bit and groups of 64 included);
#   2. one layer's re-allocation alone at 32K x 8 (Llama-3-8B attention shape): first allocation, mean and max ms
#      of a re-allocation, peak memory above what the layer holds (benchmarks/profile_realloc.py);
#   3. end-to-end graphed decoding at the Llama-3-8B shape (random bf16 weights), 32K x 8 then 128K x 4: median,
#      mean and max ms a step over 64 steps (4 re-allocation periods at realloc_every=16), re-allocations included.
#   run(command="source .devbundle/py/setup.sh; OUT=$OUT bash benchmarks/smartkv21_gpu.sh")   # files land in $OUT
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
NEW="smartkv (budget 4.25; gap 3) (CUDA graph)"
B16="smartkv block 16 (budget 4.25; gap 3) (CUDA graph)"
timeout 150 python -m pytest tests/test_fused.py tests/test_graphs.py tests/test_cuda_attn.py -q --tb=line \
    -k "smartkv_two_pass or joint or one_pass or across_reallocations or per_token or groups_of_64" > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
timeout 75 python benchmarks/profile_realloc.py --device cuda --context 32768 --batch 8 --rounds 6 --count-syncs --trace 12 \
    --configs token-incremental,token-joint,block16-incremental --json "$OUT/realloc.json" > "$OUT/realloc.txt" 2>&1
grep "^[|<]" "$OUT/realloc.txt" | tail -9
JOINT="smartkv joint (budget 4.25; gap 3) (CUDA graph)"   # 3-bit classes on the CUDA kernels
timeout 170 python benchmarks/bench_e2e.py --context 32768 --batch 8 --rows "int4 (CUDA graph),$NEW,$JOINT,$B16" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 140 --out "$OUT/e2e32k" > "$OUT/e2e32k.log" 2>&1
grep -v "^|" "$OUT/e2e32k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e32k.log" | tail -4
# 128K x 4: each SmartKV fill there takes ~20-80 s, so the default and joint go first
timeout 170 python benchmarks/bench_e2e.py --context 131072 --batch 4 --rows "int4 (CUDA graph),$NEW,$JOINT" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 140 --out "$OUT/e2e128k" > "$OUT/e2e128k.log" 2>&1
grep -v "^|" "$OUT/e2e128k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e128k.log" | tail -4
