"""Host microseconds of a decode step's and a flush's Python on any machine: `decode_attention` at the runner's
shape (8K tokens x 1 sequence, head_dim 64, 3 KV heads, 9 query heads) over int4's one segment and over SmartKV's
class segments as an append layer passes them (sinks, classes and ring stable, class rows folding their importance,
the window with its probabilities folded: new each call, as before, and stable with its length on the device), and `kernels.move_rows` over a class's seven tensors, with
every Triton launch stubbed out (nothing is computed: only the host work around the launches is timed). The GPU
host's own Python runs ~1.5-2x slower than this project's CPU; the launches add ~20 us each there (`launch_cost.py`).

    PYTHONPATH=.:benchmarks python benchmarks/host_stubbed.py            # CPU or GPU machine; --profile: cProfile
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import bench_speed_util
import smartkv.kernels as kern
from smartkv.kernels import FoldInto, KVSegment, batched, split
from smartkv.kernels import triton_demote


def us(f, n: int) -> float:
    for _ in range(50):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="cProfile SmartKV's call, costliest 25 by own time")
    args = ap.parse_args()
    bench_speed_util.DEVICE = "cpu"   # made before the launches are stubbed: their codes quantized for real
    g = torch.Generator().manual_seed(0)
    int4 = bench_speed_util.build_segments("int4", 1, 3, 8192, 64, g)
    classes = bench_speed_util.build_segments("smartkv-classes", 1, 3, 8192, 64, g)
    kern.kernels_available = lambda device=None: True
    for mod in (split, batched, triton_demote):
        mod.launch = lambda *a, **k: None

    q = torch.randn(1, 9, 64, dtype=torch.float16)
    *segs, window = bench_speed_util.stable(classes)
    T = window.num_tokens
    probs_out = [None] * len(segs) + [FoldInto(torch.full((1, 3, T), 255, dtype=torch.uint8),
                                               torch.zeros(1, T, dtype=torch.uint8), 3)]
    cseen, lse = torch.zeros(1), torch.zeros(1, 9)
    fold = [None] + [(torch.full((1, 3, s.num_tokens), 255, dtype=torch.uint8), cseen) for s in segs[1:]] + [None]

    def smartkv_step():
        return kern.decode_attention(q, segs + [KVSegment(window.keys, window.values)], 0.125,
                                     return_token_probs=True, probs_out=probs_out, fold=fold, lse_io=lse)

    # the window as append layers pass it: a stable segment over buffers with room, its length on the device
    win = KVSegment(window.keys, window.values, lengths=torch.full((1,), T, dtype=torch.int32), stable=True)

    def smartkv_stable_window():
        return kern.decode_attention(q, segs + [win], 0.125, return_token_probs=True, probs_out=probs_out,
                                     fold=fold, lse_io=lse)
    C = 3000
    xs = [torch.zeros(1, 3, C, F, dtype=dt) for F, dt in ((16, torch.uint8), (1, torch.float16), (1, torch.float16),
                                                         (32, torch.uint8), (1, torch.float16), (1, torch.float16),
                                                         (1, torch.uint8))]
    src, n = torch.arange(C).repeat(1, 3, 1), torch.tensor([C - 5])
    print(f"decode_attention, int4's segment: {us(lambda: kern.decode_attention(q, int4, 0.125), args.calls):.1f} us")
    print(f"decode_attention, SmartKV's {len(segs) + 1} segments with folds: {us(smartkv_step, args.calls):.1f} us "
          f"(the window new each call); {us(smartkv_stable_window, args.calls):.1f} us (the window stable)")
    print(f"move_rows, 7 tensors of {C} rows: {us(lambda: kern.move_rows(xs, src, n), args.calls):.1f} us")
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.calls):
            smartkv_step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
