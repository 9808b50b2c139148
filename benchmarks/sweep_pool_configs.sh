#!/usr/bin/env bash
# Device time of the SmartKV cache step (kernel split) at 32K x 8 for each launch config of the pool passes,
# one bench_attention.py run per config (its kernel split times the first config only). ~40 s a config.
#   run(command="OUT=$OUT bash benchmarks/sweep_pool_configs.sh")
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
i=0
for cfg in 64/32/4/1024 64/64/4/1024 64/32/8/1024 64/64/8/1024 32/32/4/1024 128/32/4/1024 64/32/4/512 64/32/4/2048; do
  i=$((i+1))
  timeout 42 python benchmarks/bench_attention.py --contexts 32768 --batches 8 --methods smartkv4-cache \
      --pool-configs $cfg --kernel-split --budget-s 30 --out "$OUT/$i" > "$OUT/$i.log" 2>&1
  echo "$cfg: $(grep 'device time' "$OUT/$i.log" | sed 's/void.*//' | cut -c40-200)"
done
