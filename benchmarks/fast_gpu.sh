#!/usr/bin/env bash
# The CUDA decode-attention fast path on the GPU machine, in one device call: its GPU tests (and the graph tests,
# which run it inside captured decode steps), a deliberate mistake in the kernel that the tests must catch, the
# ladder (where the time goes), the kernel table (six sizes, each method also on the Triton kernels, same run)
# and end-to-end rows (graphed fp16 / int8 / int4 at batch 8, 32K; fp16 and int4 graphed at their largest batch
# for an 80 GB card). Five logs under $OUT; the inner limits keep the whole under 520 s.
#   run(command="cd .gpu && OUT=$OUT bash benchmarks/fast_gpu.sh")     # STEPS="tests ladder" for a subset
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/raw/latest}
STEPS=${STEPS:-tests mutation ladder attention e2e}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  if [ -f COMMIT ]; then echo "commit $(cat COMMIT)"; else git log -1 --format="commit %h"; fi; } | tee "$OUT/card.txt"
if [[ " $STEPS " == *" tests "* ]]; then
  timeout ${TEST_S:-100} python -m pytest tests/test_cuda_attn.py tests/test_graphs.py -q -p no:cacheprovider \
      > "$OUT/pytest.txt" 2>&1
  grep -E "passed|failed|error" "$OUT/pytest.txt" | tail -3
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -20
fi
if [[ " $STEPS " == *" mutation "* ]]; then  # the value rows of odd nibbles undone by 8 instead of 16
  rm -rf /tmp/mut && mkdir -p /tmp/mut && cp -r smartkv tests /tmp/mut/
  sed -i 's/VB == 4 ? ((n \& 1) ? 16.f : 1.f)/VB == 4 ? ((n \& 1) ? 8.f : 1.f)/' /tmp/mut/smartkv/kernels/cuda_attn.cu
  echo "mutation applied: $(grep -c '(n & 1) ? 8.f' /tmp/mut/smartkv/kernels/cuda_attn.cu) line(s)" | tee -a "$OUT/pytest.txt"
  (cd /tmp/mut && SMARTKV_CACHE_DIR=/tmp/mutcache PYTHONPATH=/tmp/mut timeout 45 python -m pytest \
      tests/test_cuda_attn.py -q -p no:cacheprovider -k uniform_per_token 2>&1 | tail -1) \
      | sed 's/^/with the mistake: /' | tee -a "$OUT/pytest.txt"
fi
if [[ " $STEPS " == *" ladder "* ]]; then
  timeout ${LADDER_S:-60} python benchmarks/bench_ladder.py --methods ${LADDER_METHODS:-int4,kivi2} \
      --contexts ${LADDER_CONTEXTS:-32768} > "$OUT/ladder.log" 2>&1
  grep -E "^\| |^- " "$OUT/ladder.log" | tail -16
fi
if [[ " $STEPS " == *" attention "* ]]; then
  timeout ${ATT_S:-150} python benchmarks/bench_attention.py --contexts ${CONTEXTS:-4096,32768,131072} \
      --batches ${BATCHES:-1,8} --methods int8,int4,kivi2 --triton-rows --budget-s $(( ${ATT_S:-150} - 25 )) \
      > "$OUT/attention.log" 2>&1
  sed -n '/^### Decode attention/,/^### Quantize/p' "$OUT/attention.log" | grep "^| [0-9]"
  grep -E "spot check" "$OUT/attention.log" | head -4 | cut -c1-200
fi
if [[ " $STEPS " == *" e2e "* ]]; then
  timeout ${E2E_S:-140} python benchmarks/bench_e2e.py \
      --rows "fp16 (CUDA graph),int8 (CUDA graph),int4 (CUDA graph)" \
      --max-rows "fp16 (CUDA graph),int4 (CUDA graph)" --memory-gib 79.2 --steps 16 --warmup 4 \
      --budget-s $(( ${E2E_S:-140} - 60 )) > "$OUT/e2e.log" 2>&1
  grep "^|" "$OUT/e2e.log" | tail -9
fi
