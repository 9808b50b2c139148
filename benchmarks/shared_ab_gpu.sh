#!/usr/bin/env bash
# A decode change's A/B where the runner's goal is measured, one device call: shared_gpu.py (the runner's own decode,
# SmolLM2 shape, 8000 + 32 tokens, one process's profiled request, then 1 and 8 processes at once on the GPU) under
# this tree, then under the old one.
#   OLD: a directory holding the old tree's `smartkv` package (git-ignored, carried), e.g.
#     mkdir -p .devbundle/old && git archive <rev> smartkv | tar -x -C .devbundle/old
#   run(command="OLD=.devbundle/old OUT=$OUT bash benchmarks/shared_ab_gpu.sh", carry=[".devbundle/old"])
set -u
OLD=${OLD:?the old tree\'s directory (holding smartkv/)}
OUT=${OUT:-benchmarks/raw/latest}
LAYOUTS=${LAYOUTS:-1:int4,1:smartkv,8:int4,8:smartkv}
mkdir -p "$OUT"
{
nvidia-smi --query-gpu=name --format=csv,noheader
for tree in "$PWD" "$OLD"; do
  echo "== tree $tree"
  PYTHONPATH=$(cd "$tree" && pwd):$PWD/benchmarks timeout 200 python benchmarks/shared_gpu.py --context 8000 --new 32 \
    --repeats 2 --top 6 --layouts "$LAYOUTS" 2>&1 | grep -v -i warn | tail -30
done
} 2>&1 | tee "$OUT/shared_ab.log"
