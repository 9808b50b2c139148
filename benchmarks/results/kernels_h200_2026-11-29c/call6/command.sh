#!/usr/bin/env bash
# call 6 of 2026-11-29c: end to end at 32K with this session's kernels (values pass one warp, O(n) positions, 3-bit word loads)
set -u
export PYTHONPATH=$PWD
mkdir -p "$OUT"
timeout 290 python benchmarks/bench_e2e.py --rows "fp16 DynamicCache (flash),smartkv (budget 4.25; gap 3; realloc 64) (CUDA graph),smartkv (budget 4.25; gap 3) (CUDA graph)" \
   --max-rows "fp16 DynamicCache (flash),smartkv (budget 4.25; gap 3; realloc 64) (CUDA graph)" --memory-gib 79.2 \
   --steps 64 --warmup 16 --budget-s 170 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep "^|" "$OUT/e2e.log" | grep -v -- "---" | grep -v "^| method"
