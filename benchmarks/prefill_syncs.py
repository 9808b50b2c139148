"""Where a prefill makes the host wait for the GPU: each synchronising CUDA operation of one prefill through a fresh
cache, by the project functions on its Python stack (innermost first). Under a GPU shared by several processes every
wait also waits behind the others' queued work (shared_gpu.py), so a prefill's count of them matters beyond its own
device time.

torch's sync debug mode (`torch.cuda.set_sync_debug_mode`) warns at each operation that synchronises, from inside
it, so the Python stack at the warning is the caller's: a blocking copy to the device counts as one, which a
profiler's list of `cudaStreamSynchronize` events shows without its caller.

    PYTHONPATH=.:benchmarks python benchmarks/prefill_syncs.py --context 8000 --rows 'int4,smartkv (budget 4.25; gap 3)'
    PYTHONPATH=.:benchmarks python benchmarks/prefill_syncs.py --smoke    # CPU: the path (a CPU has no waits)
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from bench_runner_step import build
from profile_prefill import forward, fresh_cache, prefill
from syncs import PACKAGE, device_waits

DEPTH = 3   # project frames named a site


def waits(model, name: str, ids: torch.Tensor) -> Counter:
    """site (its innermost DEPTH project frames) -> synchronising operations over one prefill
    (`profile_prefill.forward`) after a warm-up one."""
    prefill(model, name, ids)
    with device_waits() as found:
        forward(model, ids, fresh_cache(model, name))
    return Counter(" < ".join(f"{f.filename[len(PACKAGE):]}:{f.lineno} {f.name}" for f in reversed(frames[-DEPTH:]))
                   or "(outside smartkv: the model or the benchmark)" for frames in found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--rows", default="int4,smartkv (budget 4.25; gap 3)", help="bench_e2e row names")
    ap.add_argument("--smoke", action="store_true", help="a small model on the CPU, 256 tokens")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    model = build(args.smoke, device)
    ids = torch.randint(0, model.config.vocab_size, (1, 256 if args.smoke else args.context), device=device)
    for name in args.rows.split(","):
        found = waits(model, name, ids)
        print(f"## {name}: {sum(found.values())} synchronising operations")
        for where, n in found.most_common():
            print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
