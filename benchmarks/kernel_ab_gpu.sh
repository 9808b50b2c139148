#!/usr/bin/env bash
# One device call: the kernel tests, then decode attention at 32K (batch 8 and 48) for this tree and, when
# OLD names a folder holding an earlier copy of the package (e.g. `git archive <rev> smartkv | tar -x -C .ab/old`),
# for that copy in the same run; then end to end at the largest batches for 79.2 GiB (fp16 flash eager vs int4
# graphed). Inner limits keep the total under 570 s so the files come back.
#   run(command="OLD=.ab/old OUT=$OUT bash benchmarks/kernel_ab_gpu.sh")
set -u
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=$PWD timeout 170 python -m pytest tests/test_kernels.py -q -x > "$OUT/pytest.txt" 2>&1
tail -2 "$OUT/pytest.txt"
ATT="--contexts 32768 --batches 8,48 --methods int8,int4,kivi2 --budget-s 55"
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$PWD/$OLD:$PWD timeout 75 python benchmarks/bench_attention.py $ATT --out "$OUT/old" > "$OUT/old.log" 2>&1
  grep "^|" "$OUT/old.log" | head -16
fi
PYTHONPATH=$PWD timeout 75 python benchmarks/bench_attention.py $ATT --out "$OUT/new" > "$OUT/new.log" 2>&1
grep "^|" "$OUT/new.log" | head -16
SMARTKV_KERNEL_CODE_MODE=2 PYTHONPATH=$PWD timeout 75 python benchmarks/bench_attention.py $ATT --out "$OUT/mode2" \
    > "$OUT/mode2.log" 2>&1
grep "^|" "$OUT/mode2.log" | head -16
PYTHONPATH=$PWD timeout 170 python benchmarks/bench_e2e.py --rows "fp16 DynamicCache (flash),int4 (CUDA graph)" \
    --max-rows "fp16 DynamicCache (flash),int4 (CUDA graph)" --memory-gib 79.2 --steps 24 --warmup 6 \
    --budget-s 150 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep "^|" "$OUT/e2e.log" | tail -8
