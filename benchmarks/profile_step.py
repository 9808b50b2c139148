"""Where a decode step's device time goes, kernel by kernel: the rung of the ladder below bench_e2e's "ms a step".

A Llama-3-8B-shaped model (random bf16 weights, `--layers` of them: per-layer costs do not depend on the count)
with each row's cache filled to `--context` x `--batch` as bench_e2e fills it, then `--steps` static decode steps
(what a CUDA graph replays: the same kernels, launched eagerly) under torch.profiler. Printed per row: device ms
a step and kernels a step, split into the steps that flush (SmartKV's `realloc="append"` variant) and the rest,
and the `--top` kernels by device time with their launches a step.

    PYTHONPATH=.:benchmarks python benchmarks/profile_step.py --context 32768 --batch 8 --layers 4   # CUDA only
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_e2e import METHODS, build_model, fill
from smartkv.cache.graphs import GraphDecoder

ROWS = "int4 (CUDA graph),smartkv append (budget 4.25; gap 3) (CUDA graph)"


def device_events(prof) -> list[tuple[str, float]]:
    """(name, device us) of every kernel, copy and fill the profiled region ran."""
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_totals(events) -> dict[str, tuple[float, int]]:
    """Name -> (device ms, launches) over (name, device us) pairs such as `device_events`'."""
    out: dict = {}
    for name, us in events:
        ms, count = out.get(name, (0.0, 0))
        out[name] = (ms + us / 1e3, count + 1)
    return out


def run(model, name: str, args) -> None:
    method, params = METHODS[name]
    cache = fill(model, method, params, args.batch, args.context, args.steps + args.warmup + 1,
                 chunk=args.fill_chunk)
    dec = GraphDecoder(model, cache, max_length=int(cache.get_seq_length()) + args.steps + args.warmup + 1,
                       mode="static")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.steps + args.warmup), device="cuda")
    per: dict = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))   # step kind -> kernel -> [launches, us]
    steps: dict = defaultdict(int)
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            variant = cache.static_variant() if hasattr(cache, "static_variant") else ()
            kind = "flushing steps" if any(v is not None for v in variant) else "common steps"
            if i < args.warmup:
                dec.step(ids[:, i:i + 1])
                continue
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:   # one step at a time: no attribution
                dec.step(ids[:, i:i + 1])
                torch.cuda.synchronize()
            steps[kind] += 1
            for k, us in device_events(prof):
                per[kind][k][0] += 1
                per[kind][k][1] += us
    print(f"\n## {name}: {args.context} x {args.batch}, {args.layers} layers", flush=True)
    for kind, ks in sorted(per.items()):
        n = steps[kind]
        total = sum(us for _, us in ks.values()) / n
        launches = sum(c for c, _ in ks.values()) / n
        print(f"{kind}: {n}, device {total / 1e3:.3f} ms a step, {launches:.0f} kernels a step "
              f"({total / args.layers:.0f} us and {launches / args.layers:.1f} kernels a layer)")
        for k, (c, us) in sorted(ks.items(), key=lambda kv: -kv[1][1])[:args.top]:
            print(f"  {us / n:9.1f} us  {c / n:6.1f}x  {k[:110]}")
    dec.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=32, help="profiled steps (SmartKV flushes every 16)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--top", type=int, default=25, help="kernels listed per step kind")
    ap.add_argument("--rows", default=ROWS, help="comma-separated bench_e2e row names")
    ap.add_argument("--fill-chunk", type=int, default=2048,
                    help="tokens a fill chunk (the context: one-shot, as a prefill leaves it; append's ring then "
                         "fills while decoding)")
    args = ap.parse_args()
    model = build_model(args.layers)
    for name in args.rows.split(","):
        run(model, name, args)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
