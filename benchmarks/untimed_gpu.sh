#!/usr/bin/env bash
# One device call that times what was built after the last GPU run of 2026-11-29 and is opt-in until timed:
# code mode 3 for KIVI's per-channel keys and wider merges of many splits (batch 1), and runs the GPU tests of
# the commits made without a GPU (no specialisation on split-count strides, WIDE tunings, merge configs).
# Each sweep checks every variant against the fp32 reference before it may win; the winners are only printed:
# defaults change in decode.TUNING by hand, with the numbers in BENCHMARKS.md.
#   run(command="OUT=$OUT bash benchmarks/untimed_gpu.sh")
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout 230 python -m pytest tests/test_kernels.py tests/test_fused.py -q -x > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"
timeout 100 python benchmarks/bench_attention.py --sweep --contexts 32768 --batches 8 --methods kivi2 \
    --budget-s 85 --out "$OUT/kivi" > "$OUT/kivi.log" 2>&1
grep -E "^\| (kivi2|\*\*kivi2)" "$OUT/kivi.log"
timeout 150 python benchmarks/bench_attention.py --sweep --sweep-batch 1 --contexts 32768,4096 --batches 1 \
    --methods int4,smartkv4 --budget-s 135 --out "$OUT/b1" > "$OUT/b1.log" 2>&1
grep -E "^\| (int4|\*\*int4|32K|4K)" "$OUT/b1.log" | sort -u
