#!/usr/bin/env bash
# Whole decode steps as CUDA graphs (smartkv.graphs) on the GPU, one device call (inner limits 520 s):
# the graph tests (capture, replay = static steps) and the fused-path tests, then end-to-end decoding at the
# Llama-3-8B shape, 32K x 8, eager against graphed steps (fp16, int8, int4, transformers' StaticCache), and
# each graphed method at its largest batch for an 80 GB card.
#   run(command="OUT=$OUT bash benchmarks/graphs_gpu.sh")      # files land in $OUT
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
timeout 120 python -m pytest tests/test_graphs.py tests/test_fused.py -q > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
timeout 400 python benchmarks/bench_e2e.py \
    --rows "fp16 DynamicCache (flash),int4,fp16 (CUDA graph),int8 (CUDA graph),int4 (CUDA graph),fp16 StaticCache (CUDA graph)" \
    --max-rows "fp16 DynamicCache (flash),fp16 (CUDA graph),int8 (CUDA graph),int4 (CUDA graph)" --memory-gib 79.2 \
    --steps 32 --warmup 8 --budget-s 330 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep -v "^|" "$OUT/e2e.log" | tail -12 | cut -c1-400
grep "^|" "$OUT/e2e.log" | tail -14
