#!/usr/bin/env bash
# call 3 of 2026-11-29c: new defaults (one-warp values pass, wave-planned splits, few-program merges): GPU tests,
# decode attention table with the SmartKV cache split by kernel, end to end at 32K x 8 (fp16 flash eager vs SmartKV graphed)
set -u
export PYTHONPATH=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=$PWD/.ab/site:$PWD timeout 150 python -m pytest tests/test_kernels.py tests/test_fused.py tests/test_graphs.py -q -n 8 > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"
timeout 110 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1,48 --methods int4,int8,smartkv4,smartkv4-cache --kernel-split --budget-s 100 --out "$OUT/att" > "$OUT/att.log" 2>&1
grep -E "device time" "$OUT/att.log" | sed 's/void.*//' | cut -c1-250
grep -E "^\| (32K|4K) .*(int4|int8|smartkv4|SDPA) \|" "$OUT/att/bench_attention.md" | grep -v -E "dequant|flash|eager"
timeout 260 python benchmarks/bench_e2e.py --rows "fp16 DynamicCache (flash),smartkv (budget 4.25; gap 3; realloc 64) (CUDA graph),smartkv (budget 4.25; gap 3) (CUDA graph)" \
   --no-max-batch --steps 64 --warmup 16 --budget-s 240 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep "^|" "$OUT/e2e.log" | tail -5
