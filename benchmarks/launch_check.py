"""The direct-launch path (smartkv.kernels.launch) on a GPU, where it runs (CI has none): the same logits as
Triton's own launches, and the share of launches it took.

A SmolLM2-shaped model (random bf16 weights, `--layers` of its 30 layers) prefills `--context` random tokens and
decodes `--steps` tokens eagerly through each row's cache, once with SMARTKV_DIRECT_LAUNCH=0 (every launch through
Triton's binding) and once with it on; every step's logits must agree (the same compiled kernels on the same
arguments: bitwise, or within --atol where a kernel's atomics order sums differently). The decode steps cross
SmartKV's flushes and ring demotions, so the split, merge, fold, quantize, demotion and move kernels all launch.
Exit status 1 on any difference or when no launch went direct. Output committed as benchmarks/launch_check.out.

    PYTHONPATH=.:benchmarks python benchmarks/launch_check.py
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import smartkv
from bench_runner_step import METHODS, build
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.kernels import launch


def run(model, name: str, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    method, params = METHODS[name]
    cache = smartkv.make_cache(method, model, **params)
    outs = []
    with torch.inference_mode():
        out = model(prompt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            outs.append(out.logits[:, -1].float().cpu())
            tok = out.logits[:, -1:].argmax(-1)
            out = model(tok, **cache_kwargs(model, cache), use_cache=True)
    return outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", default="int4,smartkv (default),smartkv incremental")
    ap.add_argument("--atol", type=float, default=0.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("launch_check: needs a CUDA device")
        return 2
    model = build(False, "cuda", layers=args.layers)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(0))
    bad = 0
    for name in args.rows.split(","):
        os.environ["SMARTKV_DIRECT_LAUNCH"] = "0"
        ref = run(model, name, prompt, args.steps)
        os.environ["SMARTKV_DIRECT_LAUNCH"] = "1"
        launch.STATS.update(direct=0, bound=0)
        got = run(model, name, prompt, args.steps)
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        ok = diff <= args.atol and launch.STATS["direct"] > 0
        bad += not ok
        print(f"{name}: {args.steps} steps, max |logit difference| {diff:.3g}; launches direct "
              f"{launch.STATS['direct']}, through Triton {launch.STATS['bound']}: {'ok' if ok else 'FAILED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
