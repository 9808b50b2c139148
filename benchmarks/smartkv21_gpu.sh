#!/usr/bin/env bash
# Issue 21 on one H200, one device call (inner limits 570 s in all, under 10 minutes): SmartKV's realloc="append"
# (a ring, then classes appended at each flush, two captured graphs) against the default re-allocating design
# (per-kind widths, incremental re-allocation every 16 tokens) and int4, in the same run:
#   1. the CUDA kernel tests and the graphed and fused SmartKV tests on the GPU (graph replays across flushes,
#      window-only probabilities, the demotion's kernels);
#   2. end-to-end graphed decoding at the Llama-3-8B shape (random bf16 weights), 32K x 8 then 128K x 4: median,
#      mean and max ms a step over 64 steps after 16 warm-up steps (flushes and re-allocations included).
#   ONESHOT=1: instead of 2, int4 and append (its class rows' importance exact, then folded in the pass) after a
#      one-shot fill (the ring fills while decoding), 320 steps after 16, split at step 256 (BENCHMARKS.md runs J,
#      K; 250 s a shape: run it with NOTESTS=1, which skips 1, or ONLY32K=1, which keeps the first shape).
#   ONLYTESTS=1: 1 alone (TESTS_S: its limit in seconds, 200 by default: the whole list takes about 300).
#   run(command="source .devbundle/py/setup.sh; OUT=$OUT bash benchmarks/smartkv21_gpu.sh")   # files land in $OUT
set -u
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/raw/latest}
mkdir -p "$OUT"
NEW="smartkv append (budget 4.25; gap 3) (CUDA graph)"
FOLD="smartkv append (budget 4.25; gap 3; fold) (CUDA graph)"
OLD="smartkv incremental (budget 4.25; gap 3) (CUDA graph)"
[ "${NOTESTS:-0}" = 1 ] || timeout "${TESTS_S:-200}" python -m pytest tests/test_cuda_attn.py tests/test_graphs.py tests/test_fused.py \
    tests/test_append.py tests/test_kernels.py tests/test_demote_kernels.py -q --tb=short -p no:cacheprovider \
    -k "cuda_attn or graph_replays or \
    across_reallocations or joint or one_pass or probabilities or append or merge_plan or importance_fold or \
    move_rows or runners or demotion or requantize or list_of_tensors or folded or previous" \
    > "$OUT/pytest.txt" 2>&1
grep -E "^(FAILED|E )|passed|failed" "$OUT/pytest.txt" | tail -8 | cut -c1-200
[ "${ONLYTESTS:-0}" = 1 ] && exit 0
if [ "${ONESHOT:-0}" = 1 ]; then
    shapes=("32768 8" "131072 4"); [ "${ONLY32K:-0}" = 1 ] && shapes=("32768 8")
    for shape in "${shapes[@]}"; do
        set -- $shape
        timeout 250 python benchmarks/bench_e2e.py --context $1 --batch $2 --fill-chunk $1 --rows "int4 (CUDA graph),$NEW,$FOLD" \
            --no-max-batch --steps 320 --warmup 16 --out "$OUT/oneshot$1" > "$OUT/oneshot$1.log" 2>&1
        python - "$OUT/oneshot$1/bench_e2e.json" <<'PY'
import json, statistics as st, sys
for r in json.load(open(sys.argv[1])):
    t = r["step_ms_all"]
    parts = " | ".join(f"steps {a + 1}-{a + len(x)}: median {st.median(x):.2f} mean {st.mean(x):.2f} max {max(x):.1f}"
                       for a, x in ((0, t[:256]), (256, t[256:])) if x)
    print(f"{r['name']}: captures {r['captures']} | {parts}")
PY
    done
    exit 0
fi
timeout 170 python benchmarks/bench_e2e.py --context 32768 --batch 8 --rows "int4 (CUDA graph),$NEW,$OLD" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 140 --out "$OUT/e2e32k" > "$OUT/e2e32k.log" 2>&1
grep -v "^|" "$OUT/e2e32k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e32k.log" | tail -3
[ "${ONLY32K:-0}" = 1 ] || timeout 200 python benchmarks/bench_e2e.py --context 131072 --batch 4 --rows "int4 (CUDA graph),$NEW,$OLD" \
    --no-max-batch --steps 64 --warmup 16 --budget-s 170 --out "$OUT/e2e128k" > "$OUT/e2e128k.log" 2>&1
grep -v "^|" "$OUT/e2e128k.log" | grep -i "fail\|error\|skipped" | tail -5 | cut -c1-300
grep "^|" "$OUT/e2e128k.log" | tail -3
