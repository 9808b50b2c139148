#!/usr/bin/env bash
# Whole decode steps as CUDA graphs (smartkv.cache.graphs) on the GPU, one device call (inner limits 530 s):
# the graph tests (capture, replay = static steps, SmartKV across re-allocations) and the fused-path tests, then
# end-to-end decoding at the Llama-3-8B shape, 32K x 8: eager against graphed steps for fp16, int4 and SmartKV
# (whose graphs are captured again after each re-allocation; 64 steps = 4 periods at realloc_every=16).
#   run(command="OUT=$OUT bash benchmarks/graphs_gpu.sh")      # files land in $OUT
# Largest batches (80 GB sizing), as measured for BENCHMARKS.md: add --max-rows "fp16 DynamicCache (flash),fp16
# (CUDA graph),int8 (CUDA graph),int4 (CUDA graph)" --memory-gib 79.2 and drop --no-max-batch.
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
timeout 130 python -m pytest tests/test_graphs.py tests/test_fused.py -q > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
timeout 400 python benchmarks/bench_e2e.py \
    --rows "fp16 DynamicCache (flash),int4 (CUDA graph),smartkv (budget 4.25; gap 3),smartkv (budget 4.25; gap 3) (CUDA graph),smartkv (budget 4.25; gap 3; realloc 64),smartkv (budget 4.25; gap 3; realloc 64) (CUDA graph),fp16 (CUDA graph)" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 360 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep -v "^|" "$OUT/e2e.log" | tail -10 | cut -c1-400
grep "^|" "$OUT/e2e.log" | tail -9
