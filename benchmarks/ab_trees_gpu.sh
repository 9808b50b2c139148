#!/usr/bin/env bash
# A code change's A/B on one GPU, one device call: the prefill's phases at the runner's shape (SmolLM2, 30 layers,
# 8000 tokens) and the runner's eager loop (8000 + 32 tokens, int4 and SmartKV's default), each in its own process
# under the old tree and under this one, rounds interleaved; then the eager decode's steps under this tree
# (profile_eager_steps.py) and the GPU tests of the append layers.
#   OLD: a directory holding the old tree's `smartkv` package (git-ignored, carried), e.g.
#     mkdir -p .devbundle/old && git archive <rev> smartkv | tar -x -C .devbundle/old
#   run(command="OLD=.devbundle/old OUT=$OUT bash benchmarks/ab_trees_gpu.sh", carry=[".devbundle/old"])
set -u
OLD=${OLD:?the old tree\'s directory (holding smartkv/)}
OUT=${OUT:-benchmarks/raw/latest}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
NEW=$PWD
{
nvidia-smi --query-gpu=name --format=csv,noheader
for r in $(seq 1 "$ROUNDS"); do
  for tree in "$OLD" "$NEW"; do
    echo "== round $r, tree $tree: prefill phases"
    (abs=$(cd "$tree" && pwd) && cd /tmp && PYTHONPATH=$abs timeout 60 \
        python -c "import smartkv; print(smartkv.__file__)")
    PYTHONPATH=$tree:$NEW/benchmarks timeout 150 python benchmarks/profile_prefill.py --shape smollm2 --layers 30 \
        --context 8000 --rows 'int4,smartkv (budget 4.25; gap 3)' --phases 5 2>&1 | grep -v Warning | sed -n '/^## smartkv/,$p' | head -20
  done
done
for r in $(seq 1 "$ROUNDS"); do
  for tree in "$OLD" "$NEW"; do
    echo "== round $r, tree $tree: the runner's eager loop"
    PYTHONPATH=$tree:$NEW/benchmarks timeout 150 python benchmarks/bench_runner_step.py --context 8000 --new 32 \
        --repeats 3 --modes eager --rows 'int4,smartkv (default)' 2>&1 | grep -v Warning | tail -5
  done
done
echo "== this tree: eager steps"
PYTHONPATH=$NEW:$NEW/benchmarks timeout 150 python benchmarks/profile_eager_steps.py --new 48 --rounds 2 --top 30 \
    2>&1 | grep -v Warning | tail -45
echo "== this tree: the append layers' GPU tests"
PYTHONPATH=$NEW timeout 150 python -m pytest tests/test_append.py tests/test_first_group.py -q --tb=short \
    -p no:cacheprovider 2>&1 | grep -E "^(FAILED|E )|passed|failed" | tail -8 | cut -c1-200
} 2>&1 | tee "$OUT/ab_trees_gpu.out"
