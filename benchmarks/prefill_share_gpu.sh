#!/usr/bin/env bash
# Where SmartKV's prefill goes when eight processes share one GPU (issue 21's runner goal: prefill >= 0.5x int4's
# tokens/s in the grid, 8 workers a GPU), one device call (~7 minutes):
#   1. one process, the runner's shape (SmolLM2, 30 layers, 8000 tokens): device ms and the kernels by device time,
#      int4 against SmartKV's default (profile_prefill.py, torch.profiler);
#   2. the same prefill's phases at first-allocation groups of 8 and 30 layers, two rounds interleaved;
#   3. shared_gpu.py: 8 processes of int4, then 8 of SmartKV, the runner's own request loop (8000 + 32 tokens),
#      at groups of 8 and of 30 layers (SMARTKV_FIRST_GROUP).
#   run(command="OUT=$OUT bash benchmarks/prefill_share_gpu.sh")   # outputs in $OUT; summary: prefill_share_gpu.out
#   SHARED_GROUPS='8': step 3 at groups of 8 only (~5 minutes in all)
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name --format=csv,noheader
git log -1 --format='%h %ad' --date=iso 2>/dev/null
timeout 100 python benchmarks/profile_prefill.py --shape smollm2 --layers 30 --context 8000 \
    --rows 'int4,smartkv (budget 4.25; gap 3)' --top 30 > "$OUT/prefill_profile.log" 2>&1
cat "$OUT/prefill_profile.log"
timeout 100 python benchmarks/profile_prefill.py --shape smollm2 --layers 30 --context 8000 \
    --rows 'int4,smartkv (budget 4.25; gap 3)' --phases 5 --groups 8,30 --rounds 2 > "$OUT/prefill_phases.log" 2>&1
grep -E "^##|wall|ms a layer  (attend|_flush|solve_asks|place|observe|prepare|update)$" "$OUT/prefill_phases.log"
for g in ${SHARED_GROUPS:-8 30}; do
    SMARTKV_FIRST_GROUP=$g timeout 150 python benchmarks/shared_gpu.py --context 8000 --new 32 --repeats 2 \
        --layouts '8:int4,8:smartkv' --top 20 --timeout 65 > "$OUT/shared_g$g.log" 2>&1
    echo "### shared_gpu.py, SMARTKV_FIRST_GROUP=$g"; cat "$OUT/shared_g$g.log"
done
} 2>&1 | tee "$OUT/prefill_share_gpu.out"
