"""Host (Python) time of a decode step next to its whole time, per method, at the Llama-3-8B shape on CUDA, and a
cProfile of SmartKV's steps: whether a method's step waits on the GPU or on Python, and where the Python goes.

    python benchmarks/profile_host.py --context 32768 --batch 8            # on a CUDA machine (random weights)
    python benchmarks/profile_host.py --smoke --context 512 --batch 2      # CPU, tiny shapes: the code path only
    python benchmarks/profile_host.py --shape smollm2 --layers 30 --context 8192 --batch 1 \
        --rows 'int4,smartkv append (budget 4.25; gap 3; fold) (CUDA graph)'   # the runner's eager step

"host ms" is the time `model(...)` takes to return (kernels are queued, not waited for); "step ms" adds the wait
for the device. A step whose host ms is close to its step ms is bound by Python and launches, not by the GPU.
Rows are bench_e2e row names (steps here are eager whatever the name says); every SmartKV row gets its own
cProfile. With `--realloc` SmartKV's rows re-allocate every that many steps (1024 keeps re-allocations out of the
measured steps); without it each row keeps its own period and the median step is a common one.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e as E  # noqa: E402
from bench_speed_util import parse_with_cuda  # noqa: E402
from smartkv.cache.hf_compat import cache_kwargs  # noqa: E402

ROWS = "fp16 DynamicCache (flash),int4,smartkv (budget 4.25; gap 3)"


def steps(model, cache, batch: int, n: int, flash: bool, prof: cProfile.Profile | None = None):
    """(host ms, step ms) of n decode steps."""
    ids = torch.randint(0, model.config.vocab_size, (batch, n), device=E.DEV)
    ctx = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) if flash
           else contextlib.nullcontext())
    out = []
    with torch.inference_mode(), ctx:
        for i in range(n):
            if E.DEV == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            model(ids[:, i:i + 1], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            if prof:
                prof.disable()
            t1 = time.perf_counter()
            if E.DEV == "cuda":
                torch.cuda.synchronize()
            out.append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--realloc", type=int, default=None, help="SmartKV's realloc_every (default: each row's own)")
    ap.add_argument("--top", type=int, default=40, help="cProfile rows to print")
    ap.add_argument("--rows", default=ROWS, help="comma-separated bench_e2e row names")
    ap.add_argument("--shape", choices=("llama3-8b", "smollm2"), default="llama3-8b",
                    help="smollm2: the runner's model (SmolLM2-135M's shape, --layers of its 30)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    args, override = parse_with_cuda(ap)
    with override:
        run(args, ap)


def run(args, ap) -> None:
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in E.METHODS]
    if unknown:
        ap.error(f"--rows: unknown row {unknown[0]!r}; allowed: {', '.join(E.METHODS)}")
    if args.smoke:
        E.DEV = "cpu"
    if args.shape == "smollm2":
        from bench_runner_step import build as build_smollm2
        model = build_smollm2(args.smoke, E.DEV, args.layers)
    else:
        model = E.build_model(args.layers, args.smoke)
    print(f"device {E.DEV}, {args.shape} shape, context {args.context}, batch {args.batch}, {args.layers} layers")
    print("| method | host ms / step (median step) | step ms | host share | mean host ms | mean step ms | max step ms |"
          "\n|---|---|---|---|---|---|---|")
    profiles = []
    for name in names:
        method, params = E.METHODS[name]
        if method == "smartkv" and args.realloc:
            params = dict(params, realloc_every=args.realloc)
        cache = E.fill(model, method, params, args.batch, args.context, args.steps + args.warmup + 8)
        flash = name.endswith("(flash)")
        steps(model, cache, args.batch, args.warmup, flash)
        prof = cProfile.Profile() if method == "smartkv" else None
        got = sorted(steps(model, cache, args.batch, args.steps, flash, prof), key=lambda x: x[1])
        host, step = got[len(got) // 2]
        mean_host, mean_step = (sum(x[i] for x in got) / len(got) for i in (0, 1))
        print(f"| {name} | {host:.1f} | {step:.1f} | {host / step:.0%} | {mean_host:.1f} | {mean_step:.1f} | "
              f"{got[-1][1]:.1f} |", flush=True)
        if prof:
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(args.top)
            st.sort_stats("cumtime").print_stats(args.top)
            profiles.append((name, buf.getvalue()))
        del cache
        E.free_all()
    for name, text in profiles:
        print(f"\ncProfile of {args.steps} steps of {name} (host time only):")
        print(text)


if __name__ == "__main__":
    main()
