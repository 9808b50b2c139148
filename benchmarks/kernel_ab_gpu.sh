#!/usr/bin/env bash
# One device call: kernel/graph tests, then decode attention at 32K (batch 8 and 48) for this tree against a
# baseline in the same run, then end to end at the largest batches for 79.2 GiB (fp16 flash eager vs int4
# graphed). The baseline is OLD, a folder holding an earlier copy of the package (e.g. `mkdir -p .ab/old && git
# archive <rev> smartkv | tar -x -C .ab/old`), and/or BASE_TUNING, launch configs (a bench_attention.json)
# applied to this tree. Inner limits keep the total under 570 s so the files come back (with OLD or BASE_TUNING,
# not both, at TEST_S 240). On a fresh H200 tests/test_kernels.py + tests/test_graphs.py take ~155 s (2026-11-29)
# and compiling for the first time can take longer: TEST_S 170 stopped them after 52 of 122 once.
#   run(command="OLD=.ab/old OUT=$OUT bash benchmarks/kernel_ab_gpu.sh")
#   run(command="BASE_TUNING=benchmarks/raw/<run>/base.json OUT=$OUT bash benchmarks/kernel_ab_gpu.sh",
#       carry=["benchmarks/raw/<run>"])      # benchmarks/raw is git-ignored, so it travels only when carried
set -u
OUT=${OUT:-benchmarks/raw/latest}
TESTS=${TESTS:-tests/test_kernels.py}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=$PWD timeout ${TEST_S:-240} python -m pytest $TESTS -q -x > "$OUT/pytest.txt" 2>&1
tail -2 "$OUT/pytest.txt"
ATT="--contexts 32768 --batches 8,48 --methods ${METHODS:-int8,int4,kivi2} --budget-s 55"
if [ -n "${OLD:-}" ]; then
  PYTHONPATH=$PWD/$OLD:$PWD timeout 75 python benchmarks/bench_attention.py $ATT --out "$OUT/old" > "$OUT/old.log" 2>&1
  grep "^| 32K" "$OUT/old.log" | head -16
fi
if [ -n "${BASE_TUNING:-}" ]; then
  PYTHONPATH=$PWD timeout 75 python benchmarks/bench_attention.py $ATT --tuning "$BASE_TUNING" --out "$OUT/base" \
      > "$OUT/base.log" 2>&1
  grep "^| 32K" "$OUT/base.log" | head -16
fi
PYTHONPATH=$PWD timeout 75 python benchmarks/bench_attention.py $ATT --out "$OUT/new" > "$OUT/new.log" 2>&1
grep "^| 32K" "$OUT/new.log" | head -16
PYTHONPATH=$PWD timeout 170 python benchmarks/bench_e2e.py --rows "fp16 DynamicCache (flash),int4 (CUDA graph)" \
    --max-rows "fp16 DynamicCache (flash),int4 (CUDA graph)" --memory-gib 79.2 --steps 24 --warmup 6 \
    --budget-s 150 --out "$OUT/e2e" > "$OUT/e2e.log" 2>&1
grep "^|" "$OUT/e2e.log" | tail -8
