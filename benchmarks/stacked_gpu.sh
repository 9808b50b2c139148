#!/usr/bin/env bash
# The stacked demotions (smartkv/methods/smartkv/stacked.py: a group's filling flushes' demotions once over every
# layer's rows) on one GPU, against each layer's own at its flush (SMARTKV_STACKED_DEMOTIONS=0, the same state),
# in parts that each fit one device call (the staging calls of ../shared/device/README.md carry them):
#   PART=tests  the GPU tests of the stack, the group and the append layers; the runner's eager loop (SmolLM2 shape,
#               random weights, 8000 + 32 tokens, int4 and SmartKV's default) with the setting at 0 and 1 interleaved
#               request by request, each row's last request step by step
#   PART=shared shared_gpu.py: the runner's decode in 8 processes at once on the GPU, at each setting
#   PART=diag   where the two paths part on the GPU (stacked_diag.py: the test's logits and state at the ring's last
#               filling flush, the same path twice, an allocation moved, each module's output at that step)
#   PART=batch  the largest batch at 32K (graphed, allocator held to 79 GiB; graphed steps do not stack, so this
#               checks the first allocation's byte bound at the defaults)
#   run(command="source .devbundle/model/a/setup.sh; PART=tests OUT=$OUT bash benchmarks/stacked_gpu.sh",
#       carry=[".devbundle/model/a"])
set -u
OUT=${OUT:-benchmarks/raw/latest}
PART=${PART:?tests, shared, diag or batch}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
{
nvidia-smi --query-gpu=name --format=csv,noheader
git log -1 --format='%h %s' 2>/dev/null | cut -c1-100
case $PART in
tests)
  echo "== GPU tests"
  timeout 220 python -m pytest tests/test_stacked.py tests/test_first_group.py tests/test_append.py -q --tb=short \
      -p no:cacheprovider 2>&1 | grep -E "^(FAILED|E )|passed|failed" | tail -8 | cut -c1-200
  echo "== the runner's eager loop, SMARTKV_STACKED_DEMOTIONS 0 / 1"
  timeout 200 python benchmarks/bench_runner_step.py --context 8000 --new 32 --repeats 4 --modes eager \
      --rows 'int4,smartkv (default)' --ab SMARTKV_STACKED_DEMOTIONS --steps 2>&1 | grep -v Warning | tail -16
  ;;
shared)
  for v in 0 1; do
    echo "== 8 processes at once, SMARTKV_STACKED_DEMOTIONS=$v"
    SMARTKV_STACKED_DEMOTIONS=$v timeout 250 python benchmarks/shared_gpu.py --context 8000 --new 32 --repeats 2 \
        --top 4 --layouts 8:int4,8:smartkv 2>&1 | grep -v -i warn | tail -14
  done
  ;;
diag)
  echo "== where the paths part"
  timeout 250 python benchmarks/stacked_diag.py 1:0:31 1:0:32 1:1:32 0:0:32 0:0@31:32 1:0@31:32 --outputs 31 2>&1 \
      | grep -v -i warn | tail -10
  ;;
batch)
  echo "== largest batch at 32K"
  rows='int4 (CUDA graph),smartkv (budget 4.25; gap 3) (CUDA graph)'
  timeout 500 python benchmarks/bench_e2e.py --context 32768 --batch 8 --rows "$rows" --max-rows "$rows" \
      --memory-gib 79 --steps 32 --warmup 24 2>&1 | grep -v Warning | tail -20
  ;;
esac
} 2>&1 | tee "$OUT/stacked_gpu_$PART.out"
