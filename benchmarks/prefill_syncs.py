"""Where a prefill makes the host wait for the GPU: each synchronisation (and device-to-host copy) of one prefill
through a fresh cache, with the project's innermost function on its Python stack (torch.profiler, with_stack).
Under a GPU shared by several processes every wait also waits behind the others' queued work (shared_gpu.py), so
a prefill's count of them matters beyond its own device time.

    PYTHONPATH=.:benchmarks python benchmarks/prefill_syncs.py --context 8000 --rows 'int4,smartkv (budget 4.25; gap 3)'
    PYTHONPATH=.:benchmarks python benchmarks/prefill_syncs.py --smoke    # CPU: the path (a CPU has no waits)
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from bench_runner_step import build
from profile_prefill import SYNCS, prefill

COPY = "cudaMemcpyAsync"   # listed, not counted as a wait (copies to the device are ones too; one to the host
# is followed by a synchronisation, counted)


def _site(event) -> str:
    """The innermost project function around a profiler event: the stack when the profiler keeps one, else its
    parents (the Python tracer records each call as an event enclosing what it ran)."""
    frames = [f for f in (event.stack or []) if "smartkv/" in f]
    if frames:
        return frames[0].split("smartkv/")[-1]
    parent = event.cpu_parent
    while parent is not None and "smartkv/" not in parent.name:
        parent = parent.cpu_parent
    return "?" if parent is None else parent.name.split("smartkv/")[-1]


def waits(model, name: str, ids: torch.Tensor) -> Counter:
    """(kind, where) -> count over one prefill after a warm-up one (`profile_prefill.prefill`, whose two
    synchronisations around the forward are counted too, as profile_prefill.py counts them), copies included."""
    prefill(model, name, ids)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        prefill(model, name, ids)
    found: Counter = Counter()
    for e in prof.events():
        kind = next((s for s in (*SYNCS, COPY) if s in e.name), None)
        if kind:
            found[(kind, _site(e))] += 1
    return found


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
        print(f"## {name}: {sum(n for (k, _), n in found.items() if k != COPY)} waits")
        for (kind, where), n in found.most_common():
            print(f"  {n:4d}  {kind:22s} {where}")


if __name__ == "__main__":
    main()
