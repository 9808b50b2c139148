#!/usr/bin/env bash
# SmartKV's GPU measurements of BENCHMARKS.md in one device call (at most 550 s of inner limits, under the device
# tool's 600 s per call; no model staging):
# the kernel tests, the cache's decode step with the device time of each kernel (and alternative launch
# configs of the pool passes), end-to-end decoding at the Llama-3-8B shape (32K x 8) against fp16 and int4 over
# whole re-allocation periods, and the split of a decode step at 32K x 8 (SmolLM2's shapes, parts synchronised:
# where the re-allocation's time goes).
#   run(command="OUT=$OUT bash benchmarks/smartkv_gpu.sh")      # files land in $OUT
set -u
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
timeout 150 python -m pytest tests/test_kernels.py tests/test_fused.py -q -k "pool or smartkv or importance or positions" \
    > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"
timeout 45 python benchmarks/check_pool_groups.py > "$OUT/groups.txt" 2>&1
grep -c "WRONG\|Error" "$OUT/groups.txt"
timeout 100 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1 --methods smartkv4-cache \
    --pool-configs 64/32/4/1024/1,64/32/4/1024/0,64/64/4/1024/1,64/128/4/1024/1 --kernel-split --budget-s 80 --out "$OUT/attention" \
    > "$OUT/attention.log" 2>&1
grep "smartkv4 cache\|device time" "$OUT/attention.log" | cut -c1-300 | head -20
timeout 170 python benchmarks/bench_e2e.py --rows "fp16 DynamicCache (flash),int4,smartkv (budget 4.25; gap 3),smartkv (budget 4.25; gap 3; realloc 64)" \
    --no-max-batch --steps 64 --warmup 16 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep "^|" "$OUT/e2e.log" | tail -5
timeout 85 python benchmarks/profile_smartkv.py --device cuda --random --context 32000 --batch 8 --tokens 32 \
    > "$OUT/profile32k.txt" 2>&1
tail -16 "$OUT/profile32k.txt"
