"""Device time of SmartKV's pool positions (kernels.pool_positions: keys' and values' stable argsort of the
packed 2-bit levels, recomputed every decode step) for launch configs (tokens per program / warps). Each config
is checked against torch's stable argsort, then timed as CUDA-graph replays (triton.testing.do_bench_cudagraph:
device time, not the launches' host time, which is ~60 us and hid the kernels below 32K x 8 in plain timing).
GPU only.

    PYTHONPATH=$PWD python benchmarks/bench_positions.py [--sizes 4096x1,32768x8,131072x8] [--configs 1024/4,2048/4]
"""
from __future__ import annotations

import argparse

import torch
import triton

from smartkv.core.policy import pack_levels
from smartkv.kernels import pool_positions
from smartkv.kernels import tuning

H = 8  # KV heads (Llama-3-8B)


def _levels(B: int, T: int, fractions: list[float], gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """(B, H, T) level indices with the same count of each level per row, in random order."""
    counts = [int(T * f) for f in fractions]
    counts[0] += T - sum(counts)
    base = torch.cat([torch.full((c,), i, dtype=torch.uint8) for i, c in enumerate(counts)])
    perm = torch.argsort(torch.rand(B * H, T, generator=gen), dim=-1)
    return base[perm].reshape(B, H, T), counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096x1,4096x8,32768x1,32768x8,131072x8", help="context x batch, ...")
    ap.add_argument("--configs", default="1024/4,2048/4,2048/8,4096/8,512/4",
                    help="tokens per program / warps, ...")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    configs = [tuple(map(int, c.split("/"))) for c in args.configs.split(",")]
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| context x batch | " + " | ".join(f"{b}/{w} (us)" for b, w in configs) + " |")
    print("|---|" + "---|" * len(configs))
    for size in args.sizes.split(","):
        T, B = map(int, size.split("x"))
        lk, ck = _levels(B, T, [0.25, 0.5, 0.25], gen)      # keys: three widths
        lv, cv = _levels(B, T, [0.3, 0.4, 0.2, 0.1], gen)   # values: four
        packed = [pack_levels(lk).cuda(), pack_levels(lv).cuda()]
        expect = torch.stack([torch.argsort(x.cuda(), dim=-1, stable=True).to(torch.int32) for x in (lk, lv)])
        cells = []
        for block, warps in configs:
            tuning.use(tuning.with_changes(tuning.current(), positions={"block": block, "warps": warps}))
            got = pool_positions(packed, T, [ck, cv])
            if not torch.equal(got, expect):
                cells.append("wrong")
                continue
            ms = triton.testing.do_bench_cudagraph(lambda: pool_positions(packed, T, [ck, cv]), rep=100,
                                                   return_mode="median")
            cells.append(f"{ms * 1e3:.1f}")
        print(f"| {T // 1024}K x {B} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
