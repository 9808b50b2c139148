"""Host milliseconds of each eager decode step at the runner's shape (SmolLM2-135M shape, random weights, one
sequence) with every Triton launch stubbed out, so that only the host work around the launches (and the torch
operations, on the CPU) is timed: SmartKV's ordinary steps against its flushing ones, with a group's filling flushes'
demotions stacked (`SMARTKV_STACKED_DEMOTIONS=1`, stacked.py) and each layer's own (0), processes' rounds
interleaved. Runs on any machine (the eager step is host-bound on the GPU's host too, docs/smartkv.md What is left
6); nothing is computed by the kernels, so the cache's contents are meaningless and only the times are read.

    PYTHONPATH=.:benchmarks python benchmarks/flush_host.py --context 1000 --steps 34 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")   # the kernels' Python path on a CPU, their launches stubbed below

import torch  # noqa: E402

import smartkv  # noqa: E402
import smartkv.cache.layer as cache_layer  # noqa: E402
from bench_runner_step import build  # noqa: E402
from smartkv.cache.hf_compat import cache_kwargs  # noqa: E402
from smartkv.kernels.launch import routed  # noqa: E402


def steps_ms(model, ids: torch.Tensor, steps: int) -> list[float]:
    """One request's eager decode steps, host ms each (a prefill first, untimed)."""
    cache = smartkv.make_cache("smartkv", model, budget=4.25, key_value_gap=3)
    out = []
    with torch.inference_mode():
        tok = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            tok = model(tok, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
            out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=34, help="eager steps a request (a flush every realloc_every)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="requests a setting, interleaved; the first untimed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache_layer.FORCE_KERNELS = True
    model = build(True, "cpu", args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    runs: dict = {"0": [], "1": []}
    with routed(lambda fn, grid, *a, **k: None):
        for r in range(args.rounds):
            for flag in (("0", "1") if r % 2 else ("1", "0")):   # each setting first in turn
                os.environ["SMARTKV_STACKED_DEMOTIONS"] = flag
                ms = steps_ms(model, ids, args.steps)
                if r:
                    runs[flag].append(ms)
    for flag, reqs in runs.items():
        common = [t for ms in reqs for t in ms]
        med = statistics.median(common)
        top = [" ".join(f"{i}:{ms[i]:.0f}" for i in sorted(range(len(ms)), key=ms.__getitem__)[-3:]) for ms in reqs]
        means = [statistics.mean(ms) for ms in reqs]
        print(f"SMARTKV_STACKED_DEMOTIONS={flag}: median step {med:.1f} ms; each request's 3 largest (step:ms) "
              f"{'; '.join(top)}; mean a request {' '.join(f'{m:.1f}' for m in means)} ms")


if __name__ == "__main__":
    main()
