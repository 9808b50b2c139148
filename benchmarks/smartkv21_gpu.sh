#!/usr/bin/env bash
# Issue 21 on one H200, one device call (inner limits 535 s in all, under 9 minutes): SmartKV's old design (a width
# per token, the whole middle re-allocated every 16 tokens: block_tokens=1, realloc=full) against its defaults
# (incremental re-allocation), a width per block of 16 tokens (block_tokens=16) and int4, in the same run:
#   1. the fused (pool kernels) and graphed SmartKV tests on the GPU, per-token/full and block/incremental cases;
#   2. one layer's re-allocation alone at 32K x 8 (Llama-3-8B attention shape): first allocation, mean and max ms
#      of a re-allocation, peak memory above what the layer holds (benchmarks/profile_realloc.py);
#   3. end-to-end graphed decoding at the Llama-3-8B shape (random bf16 weights), 32K x 8 then 128K x 4: median,
#      mean and max ms a step over 64 steps (4 re-allocation periods at realloc_every=16), re-allocations included.
#   run(command="source .devbundle/py/setup.sh; OUT=$OUT bash benchmarks/smartkv21_gpu.sh")   # files land in $OUT
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
OLD="smartkv per-token full (budget 4.25; gap 3) (CUDA graph)"
NEW="smartkv (budget 4.25; gap 3) (CUDA graph)"
B16="smartkv block 16 (budget 4.25; gap 3) (CUDA graph)"
timeout 120 python -m pytest tests/test_fused.py tests/test_graphs.py -q --tb=line -k "smartkv_two_pass or across_reallocations" \
    > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
timeout 75 python benchmarks/profile_realloc.py --device cuda --context 32768 --batch 8 --rounds 6 --count-syncs --trace 12 \
    --configs token-full,token-incremental,block4-incremental,block16-incremental --json "$OUT/realloc.json" > "$OUT/realloc.txt" 2>&1
grep "^[|<]" "$OUT/realloc.txt" | tail -9
timeout 170 python benchmarks/bench_e2e.py --context 32768 --batch 8 --rows "int4 (CUDA graph),$OLD,$NEW,$B16" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 140 --out "$OUT/e2e32k" > "$OUT/e2e32k.log" 2>&1
grep -v "^|" "$OUT/e2e32k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e32k.log" | tail -4
# 128K x 4: the old design's row is in BENCHMARKS.md (2026-12-02); each SmartKV fill there takes ~80 s, so the
# default and block 16 go first
timeout 170 python benchmarks/bench_e2e.py --context 131072 --batch 4 --rows "int4 (CUDA graph),$NEW,$B16" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 140 --out "$OUT/e2e128k" > "$OUT/e2e128k.log" 2>&1
grep -v "^|" "$OUT/e2e128k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e128k.log" | tail -4
