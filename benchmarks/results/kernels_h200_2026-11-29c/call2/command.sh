#!/usr/bin/env bash
# call 2 of 2026-11-29c: GPU tests (xdist), SmartKV pool values pass (warps, wave-planned splits) vs HEAD copy, merge widths
set -u
export PYTHONPATH=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=$PWD/.ab/site:$PWD timeout 160 python -m pytest tests/test_kernels.py tests/test_fused.py tests/test_graphs.py -q -n 8 > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
PYTHONPATH=$PWD/.ab/old timeout 70 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1 --methods smartkv4-cache --kernel-split --budget-s 60 --out "$OUT/pool_old" > "$OUT/pool_old.log" 2>&1
grep -E "device time|^\| (32K|4K)" "$OUT/pool_old.log" | sed 's/void.*//' | cut -c1-260
timeout 150 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1 --methods smartkv4-cache --kernel-split --budget-s 140 \
   --pool-configs 128/32/4/1024/1/4,128/32/4/1024/1/1,128/32/4/256/1/1,128/32/4/128/1/1,128/32/4/256/1/2 --out "$OUT/pool_new" > "$OUT/pool_new.log" 2>&1
grep -E "device time|^\| (32K|4K)" "$OUT/pool_new.log" | sed 's/void.*//' | cut -c1-260
for t in base merge128; do
  timeout 75 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1,48 --methods int4,int8,smartkv4 --tuning .ab/$t.json --budget-s 62 --out "$OUT/$t" > "$OUT/$t.log" 2>&1
  echo "== $t"; grep -E "^\| (32K|4K) .*(int4|int8|smartkv4|SDPA) \|" "$OUT/$t/bench_attention.md" | grep -v dequant | grep -v flash
done
