#!/usr/bin/env bash
# call 5 of 2026-11-29c: O(n) pool positions and 3-bit word loads (b3befc0) against 5e80f7d (.ab/prev), GPU tests
set -u
export PYTHONPATH=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=$PWD/.ab/site:$PWD timeout 150 python -m pytest tests/test_kernels.py tests/test_fused.py tests/test_graphs.py -q -n 8 > "$OUT/pytest.txt" 2>&1
tail -1 "$OUT/pytest.txt"; grep -E "^FAILED|Error" "$OUT/pytest.txt" | head -5
PYTHONPATH=$PWD/.ab/prev timeout 60 python benchmarks/bench_positions.py --sizes 4096x1,32768x1,32768x8,131072x8 --configs 1024/4 > "$OUT/pos_prev.txt" 2>&1; cat "$OUT/pos_prev.txt"
timeout 70 python benchmarks/bench_positions.py --sizes 4096x1,32768x1,32768x8,131072x8 --configs 1024/4,2048/4,512/4,1024/8 > "$OUT/pos_new.txt" 2>&1; cat "$OUT/pos_new.txt"
for v in prev new; do
  if [ $v = prev ]; then PP=$PWD/.ab/prev; else PP=$PWD; fi
  PYTHONPATH=$PP timeout 80 python benchmarks/bench_attention.py --contexts 32768,4096 --batches 8,1 --methods smartkv4-cache --kernel-split --budget-s 70 --out "$OUT/att_$v" > "$OUT/att_$v.log" 2>&1
  echo "== $v"; grep -E "device time|rel err" "$OUT/att_$v.log" | grep smartkv4-cache | sed 's/void.*//' | cut -c1-250
done
