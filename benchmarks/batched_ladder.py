"""Where a batch-of-one SmartKV decode call's device time goes, rung by rung (issue 21): the bytes' time at the
card's bandwidth, int4's whole attention call over as many tokens (its specialised split kernel and merge), then
SmartKV's call (the batched launch, then the merge with the ring's and window's folds) under each setting of the
batched launch: warps, tokens a block, tokens a program, the dots' operands.

The layout is SmartKV's at 8,000 + 1 tokens of SmolLM2-135M (3 KV heads of 9 query heads, head_dim 64, read from
the runner's cache: four fp sinks, classes of 2,011 keys 4-bit / values 2-bit, 2,506 4/3 and 3,511 8/3, a ring of
256 8/3 and a window of 48 fp tokens), built from random values scaled by `--context`. Each setting's kernels are
timed by the profiler over `--calls` calls after a warm-up (device us a call, the kernels' own time: the host's is
not in it).

    PYTHONPATH=.:benchmarks python benchmarks/batched_ladder.py              # CUDA, ~1 min
    PYTHONPATH=.:benchmarks python benchmarks/batched_ladder.py --smoke      # CPU (TRITON_INTERPRET=1): the path
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from profile_step import device_events
from smartkv import kernels as kern
from smartkv.core.quant import quantize
from smartkv.kernels import KVSegment, batched

LAYOUT = [(4, None, None), (2011, 4, 2), (2506, 4, 3), (3511, 8, 3), (256, 8, 3), (48, None, None)]  # 8,336 tokens
HBM_GBS = {"H100": 3350, "H200": 4800}   # the card's memory bandwidth, GB/s (its data sheet)


def layout(scale: float, device: str, B: int = 1, H: int = 3, D: int = 64, group: int = 32):
    """SmartKV's decode segments (sinks, classes, ring, window) with normalised keys, and the ring's and window's
    fold targets; the token counts of LAYOUT times `scale`."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(B, H, 1, D, generator=g).half().to(device)
    sd = (torch.randn(B, H, 1, D, generator=g).abs() + 0.5).half().to(device)
    segs = []
    for i, (n, kb, vb) in enumerate(LAYOUT):
        n = max(1, round(n * scale))
        k, v = (torch.randn(B, H, n, D, generator=g).to(device) for _ in range(2))
        if kb is None:
            segs.append(KVSegment(k.bfloat16(), v.bfloat16(), stable=i == 0))
        else:
            segs.append(KVSegment(quantize(k, kb, group), quantize(v, vb, group), key_scale=sd, key_shift=mu,
                                  stable=True))
    folds = [kern.FoldInto(torch.randint(0, 256, (B, H, s.num_tokens), generator=g, dtype=torch.uint8).to(device),
                           torch.randint(0, 250, (B, s.num_tokens), generator=g, dtype=torch.uint8).to(device), 3)
             for s in segs[-2:]]
    return segs, folds


def nbytes(segs) -> int:
    total = 0
    for s in segs:
        for part in (s.keys, s.values):
            total += sum(t.numel() * t.element_size() for t in ((part.codes, part.scale, part.zero)
                                                                 if hasattr(part, "codes") else (part,)))
    return total


def device_us(fn, calls: int) -> dict:
    """Kernel name -> device us a call, over `calls` calls after two untimed ones."""
    for _ in range(2):
        fn()
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by = defaultdict(float)
    for name, us in device_events(prof):
        by[name[:40]] += us / calls
    return dict(by)


def setting(warps=None, block_n=None, tps=None, dots=None, stages=None):
    """A context in which tables are built anew with the batched launch's warps, block, tokens a program, dots and
    software-pipelining stages (Triton's num_stages: its default 3 unless set)."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.dict(batched._GROUPS, clear=True))
    if dots:
        stack.enter_context(mock.patch.dict(os.environ, {"SMARTKV_BATCH_DOTS": dots}))
    if tps:
        stack.enter_context(mock.patch.object(batched, "_group_tps", lambda *a, **k: tps))
    if warps or block_n or stages:
        build = batched.group

        def group(*a, **k):
            g = build(*a, **k)
            if g is not None:
                g.meta.update({k: v for k, v in (("num_warps", warps), ("BLOCK_N", block_n), ("num_stages", stages))
                               if v})
            return g
        stack.enter_context(mock.patch.object(batched, "group", group))
    return stack


# the defaults (tf32x3 dots, a loop step of 32 tokens at head_dim 64), then one setting changed at a time
SETTINGS = [dict()] + [dict(dots=d) for d in ("fp32", "tf32")] + [dict(warps=w) for w in (2, 8)] + \
    [dict(block_n=n) for n in (16, 64)] + [dict(tps=t) for t in (64, 256)] + [dict(stages=s) for s in (1, 2, 4)] + \
    [dict(dots="fp32", block_n=64)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50, help="profiled calls a setting")
    ap.add_argument("--scale", type=float, default=1.0, help="the layout's token counts times this")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny layout, two settings: the code path")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    scale, settings = (0.02, SETTINGS[:2]) if args.smoke else (args.scale, SETTINGS)
    segs, folds = layout(scale, device)
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    tokens = sum(s.num_tokens for s in segs)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    gbs = next((v for k, v in HBM_GBS.items() if k in card), None)
    print(f"{card}; {tokens} tokens, batch 1, 3 KV heads, 9 query heads, head_dim 64; device us a call")
    if gbs:
        print(f"| bytes at the card's bandwidth | {nbytes(segs) / gbs / 1e3:.2f} | ({nbytes(segs) / 1e6:.2f} MB) |")
    k = torch.randn(1, 3, tokens, 64, device=device)
    uniform = [KVSegment(quantize(k, 4, 32), quantize(k, 4, 32))]
    probs_out = [None] * (len(segs) - 2) + folds
    rows = [("int4, one segment", contextlib.nullcontext, lambda: kern.decode_attention(q, uniform, 0.125))]
    rows += [(", ".join(f"{k}={v}" for k, v in s.items()) or "smartkv defaults", lambda s=s: setting(**s),
              lambda: kern.decode_attention(q, segs, 0.125, return_token_probs=True, probs_out=probs_out))
             for s in settings]
    print("| rung | total | kernels |\n| --- | --- | --- |")
    for name, context, call in rows:
        with context():
            got = device_us(call, args.calls)
        parts = "; ".join(f"{k} {v:.1f}" for k, v in sorted(got.items(), key=lambda kv: -kv[1])[:4])
        print(f"| {name} | {sum(got.values()):.1f} | {parts} |", flush=True)


if __name__ == "__main__":
    main()
