"""SmartKV's batched decode launch under each variant, in one process: what its device time does, where the runner's
shared GPU multiplies it (BENCHMARKS.md `smartkv_shared_h100`). The runner's own decode (`bench_runner_step.measure`,
SmolLM2-135M shape, random bf16 weights), one warm-up and one profiled request a variant, then `--repeats`
unprofiled requests a variant, variants interleaved: the device ms of the attention's launches (the batched kernel,
the merges, the folds), of the whole request and its kernel count, and ms a token.

Variants (ratios against `base`, the defaults; int4's request beside them):
  base          the defaults
  tf32          SMARTKV_BATCH_DOTS=tf32: the batched dots' operands as TF32 (the tensor cores)
  fp32          SMARTKV_BATCH_DOTS=fp32: the batched dots' products in fp32 on the FMA units (before 54cd9cb)
  merge64       the merge in steps of 64 partials (before d7a40ab)
  merge-apart   the merge's launch (a program a query head) and each fold's, apart (as with three folds)
  split512      512 tokens a program whatever the card (before 4963602)

    PYTHONPATH=.:benchmarks python benchmarks/batched_variants.py --context 8000 --new 32     # CUDA, ~1-2 min
    PYTHONPATH=.:benchmarks python benchmarks/batched_variants.py --smoke                    # CPU: the code path
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from unittest import mock

from bench_runner_step import build, measure, prompt_tokens
from shared_gpu import ROWS, device_ms
from smartkv.kernels import batched

ATTENTION = ("_batched_kernel", "_merge_fold_kernel", "_merge_kernel", "_probs_fold_kernel", "_split_kernel")

# name -> (shared_gpu row, a context that sets it up); tables are built per cache, so each request reads its own
VARIANTS = {
    "int4": ("int4", contextlib.nullcontext),
    "base": ("smartkv", contextlib.nullcontext),
    "tf32": ("smartkv", lambda: mock.patch.dict(os.environ, {"SMARTKV_BATCH_DOTS": "tf32"})),
    "fp32": ("smartkv", lambda: mock.patch.dict(os.environ, {"SMARTKV_BATCH_DOTS": "fp32"})),
    "merge64": ("smartkv", lambda: mock.patch.object(batched, "_merge_block", lambda splits, head_dim: 64)),
    "merge-apart": ("smartkv", lambda: mock.patch.object(batched, "merge_fold", lambda *a, **k: None)),
    "split512": ("smartkv", lambda: mock.patch.object(batched, "_group_tps", lambda tokens, rows, block_n, device:
                                                      batched.SPLIT_TOKENS)),
}


def profiled(model, row: str, prompt: list[int], new: int) -> dict:
    """`shared_gpu.device_ms`'s profiled request, with the attention's launches' device ms picked out."""
    d = device_ms(model, row, prompt, new)
    attn = {k: sum(ms for name, (ms, _) in d["by_name"].items() if name.startswith(k)) for k in ATTENTION}
    return {"device": d["device"], "kernels": d["kernels"], "attention": {k: ms for k, ms in attn.items() if ms}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="tokens a request produces")
    ap.add_argument("--repeats", type=int, default=3, help="unprofiled requests a variant (interleaved)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, no profiler")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown[0] if unknown else '(none given)'!r}; allowed: {', '.join(VARIANTS)}")
    if args.context < 16 or args.new < 1 or args.repeats < 1:
        ap.error("--context >= 16, --new >= 1, --repeats >= 1")
    if args.smoke:
        args.context, args.new, args.repeats = min(args.context, 256), min(args.new, 20), 1
    device = "cpu" if args.smoke else "cuda"
    model = build(args.smoke, device)
    prompt = prompt_tokens(model, args.context)
    prof = {}
    if not args.smoke:
        for v in names:
            row, setup = VARIANTS[v]
            with setup():
                prof[v] = profiled(model, row, prompt, args.new)
    tokens: dict = {v: [] for v in names}
    for _ in range(args.repeats):
        for v in names:
            row, setup = VARIANTS[v]
            with setup():
                tokens[v].append(measure(model, ROWS[row], "eager", prompt, args.new)["ms_token"])
    print(f"{args.context} prompt tokens, {args.new} new; device ms of one profiled request, ms a token the median "
          f"of {args.repeats} unprofiled")
    print("| variant | attention device ms (launches) | request device ms (kernels) | ms a token | vs base |")
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(tokens["base"]) if "base" in tokens else None
    for v in names:
        med = statistics.median(tokens[v])
        p = prof.get(v)
        attn = "; ".join(f"{k} {ms:.1f}" for k, ms in p["attention"].items()) if p else "-"
        dev = f"{p['device']:.1f} ({p['kernels']})" if p else "-"
        print(f"| {v} | {attn} | {dev} | {med:.2f} | {f'{med / base:.2f}x' if base else '-'} |", flush=True)


if __name__ == "__main__":
    main()
