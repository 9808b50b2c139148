"""Where an eager decode's time goes at the runner's shape: each decode step's wall ms for int4 and SmartKV's default
(the steps that flush stand out), then, for SmartKV, the host functions that lead inside its flushes (cProfile over
`_append_flush`, the ordinary steps' flush: the filling flushes' demotions while the ring fills, the mix's placement
after). One process, one request at a time, rounds interleaved; the runner's grid puts eight of these on one GPU.

    PYTHONPATH=.:benchmarks python benchmarks/profile_eager_steps.py                          # CUDA, SmolLM2 shape
    PYTHONPATH=.:benchmarks python benchmarks/profile_eager_steps.py --smoke --context 300    # CPU: the code path
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import smartkv
from bench_runner_step import build
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.methods.smartkv.layer import SmartKVLayer

ROWS = {"int4": ("int4", {}), "smartkv (default)": ("smartkv", dict(budget=4.25, key_value_gap=3))}


class FlushProfile:
    """cProfile and wall time inside `SmartKVLayer._append_flush` while `on`."""

    def __init__(self):
        self.prof, self.on, self.seconds, self.calls = cProfile.Profile(), False, 0.0, 0
        inner = SmartKVLayer._append_flush

        def timed(layer, *args):
            if not self.on:
                return inner(layer, *args)
            start = time.perf_counter()
            self.prof.enable()
            try:
                return inner(layer, *args)
            finally:
                self.prof.disable()
                self.seconds += time.perf_counter() - start
                self.calls += 1
        SmartKVLayer._append_flush = timed


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def steps_ms(model, row: str, ids: torch.Tensor, new: int, flush: FlushProfile | None,
             profiled: dict | None = None) -> list[float]:
    """Each decode step's wall ms (synchronised) of one request through a fresh cache of `row`; `profiled`: step
    index -> a cProfile.Profile to run over that step."""
    method, params = ROWS[row]
    cache = smartkv.make_cache(method, model, **params)
    out = []
    with torch.inference_mode():
        logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1:].argmax(-1)
        sync(ids.device.type)
        if flush is not None:
            flush.on = True
        for i in range(new):
            prof = (profiled or {}).get(i)
            start = time.perf_counter()
            if prof is not None:   # one profiler at a time (Python 3.12): the flushes' pauses for this step
                if flush is not None:
                    flush.on = False
                prof.enable()
            logits = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)
            sync(ids.device.type)
            if prof is not None:
                prof.disable()
                if flush is not None:
                    flush.on = True
            out.append((time.perf_counter() - start) * 1e3)
        if flush is not None:
            flush.on = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--new", type=int, default=48, help="decode steps a request")
    ap.add_argument("--layers", type=int, default=None, help="the first LAYERS of the model's (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="int4 and SmartKV interleaved; the last round profiled")
    ap.add_argument("--top", type=int, default=25, help="host functions listed")
    ap.add_argument("--smoke", action="store_true", help="a small model on the CPU")
    ap.add_argument("--cprofile-steps", default="", help="comma-separated decode steps (from 0) of SmartKV's last "
                    "round to cProfile each (e.g. 0,16: the first step and the one after the first flush)")
    args = ap.parse_args()
    try:
        picked = sorted({int(x) for x in args.cprofile_steps.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--cprofile-steps: comma-separated integers, got {args.cprofile_steps!r}")
    if args.context < 16 or args.new < 1 or args.rounds < 1:
        ap.error("--context >= 16, --new >= 1, --rounds >= 1")
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    model = build(args.smoke, device, args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=device)
    flush = FlushProfile()
    for r in range(args.rounds):
        for row in ROWS:
            last = r == args.rounds - 1 and row != "int4"
            profiled = {i: cProfile.Profile() for i in picked} if last else None
            st = steps_ms(model, row, ids, args.new, flush if last else None, profiled)
            srt = sorted(st)
            print(f"round {r} {row}: median {srt[len(srt) // 2]:.2f} ms, mean {sum(st) / len(st):.2f}; steps: "
                  + " ".join(f"{x:.0f}" for x in st))
            for i, prof in (profiled or {}).items():
                print(f"\nSmartKV's decode step {i} ({st[i]:.1f} ms, under cProfile), leading functions:")
                pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    print(f"\nSmartKV's flushes in the last round: {flush.calls} calls (layers x flushing steps), "
          f"{flush.seconds * 1e3:.1f} ms in all, cProfile's leading functions:")
    pstats.Stats(flush.prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
