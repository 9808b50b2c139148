"""What one layer's flush costs the host in an eager decode step: the Triton launches and torch operations (each a
kernel launch on a GPU) inside `SmartKVLayer._append_flush`, per layer-flush that did work, filling flushes (the ring
filling: demotions) apart from the rest. Counted on the CPU through Triton's interpreter with the kernels forced on,
so it counts what a CUDA step launches (the interpreter's own torch work inside a launch left out). An eager step is
host-bound at the runner's shape (docs/smartkv.md, What is left 6: the flushing steps are the runner's decode gap),
and a Triton launch costs 50-80 us of host there.

    PYTHONPATH=.:benchmarks python benchmarks/count_flush.py --layers 2 --context 300 --steps 34
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import smartkv  # noqa: E402
import smartkv.cache.layer as cache_layer  # noqa: E402
import smartkv.kernels.launch as launch_mod  # noqa: E402
from bench_runner_step import build  # noqa: E402
from smartkv.cache.hf_compat import cache_kwargs  # noqa: E402
from smartkv.kernels.launch import routed  # noqa: E402
from smartkv.methods.smartkv.layer import SmartKVLayer  # noqa: E402
from syncs import SyncCounter  # noqa: E402


class FlushCount:
    """(filling, launches, torch operations) of each layer-flush that did work, while entered (inside a
    `SyncCounter`, whose operation count it reads)."""

    def __init__(self, counter: SyncCounter):
        self.counter, self.records = counter, []
        self.launches = self.inner = self.depth = 0
        self._launch, self._flush = launch_mod.launch, SmartKVLayer._append_flush

    def _counted(self, fn, grid, *args, **meta):
        outer, ops = not self.depth, self.counter.ops
        self.launches += outer
        self.depth += 1
        try:
            return self._launch(fn, grid, *args, **meta)
        finally:
            self.depth -= 1
            if outer:
                self.inner += self.counter.ops - ops

    def __enter__(self):
        self._routed = routed(self._counted)
        self._routed.__enter__()
        real, rec = self._flush, self

        def flush(layer, *args, **kwargs):
            filling = layer._app is not None and layer._app.plan is not None
            rec.launches = rec.inner = 0
            ops = rec.counter.ops
            try:
                return real(layer, *args, **kwargs)
            finally:
                own = rec.counter.ops - ops - rec.inner
                if rec.launches or own > 3:   # a flush that did work (not the step's checks)
                    rec.records.append((filling, rec.launches, own))
        SmartKVLayer._append_flush = flush
        return self

    def __exit__(self, *exc):
        SmartKVLayer._append_flush = self._flush
        self._routed.__exit__(*exc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=34, help="eager decode steps (a flush every realloc_every)")
    args = ap.parse_args()
    cache_layer.FORCE_KERNELS = True
    model = build(True, "cpu", args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    cache = smartkv.make_cache("smartkv", model, budget=4.25, key_value_gap=3)
    with torch.inference_mode(), SyncCounter("cpu") as counter:
        tok = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        with FlushCount(counter) as fc:
            for _ in range(args.steps):
                tok = model(tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    seen = defaultdict(list)
    for filling, launches, ops in fc.records:
        seen[filling].append((launches, ops))
    for filling, rows in sorted(seen.items(), reverse=True):
        launches, ops = zip(*rows)
        print(f"{'filling flush' if filling else 'flush, ring full'}: {len(rows)} layer-flushes; "
              f"Triton launches each {min(launches)}-{max(launches)}, torch operations each {min(ops)}-{max(ops)}")


if __name__ == "__main__":
    main()
