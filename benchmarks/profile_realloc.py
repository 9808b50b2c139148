"""SmartKV's re-allocation alone, on one synthetic layer (Llama-3-8B's attention shape: 8 KV heads, head_dim 128):
the first allocation over the prompt, then `--rounds` re-allocations of `realloc_every` new tokens each, with
importance codes redrawn before each (heavy-tailed, as attention is), for several configurations side by side.

    python benchmarks/profile_realloc.py --context 8192,32768 --batch 1,2          # CPU
    python benchmarks/profile_realloc.py --device cuda --context 32768 --batch 8

Per configuration: ms of the first allocation (the prompt's), mean and max ms of a re-allocation (over `--rounds`
rounds that re-allocated: a block flush waits for whole blocks, so some rounds of new tokens re-allocate nothing;
how many rounds a re-allocation took is reported beside), and the peak
memory above what the layer holds before it (CUDA: the allocator's peak; CPU: the process's peak resident set,
reset before each re-allocation through /proc/self/clear_refs), with the layer's bytes for scale. `--count-syncs`
adds, from one more untimed round, the host waits of a re-allocation (benchmarks/syncs.py: what the same code
waits for on a GPU, counted on any device) and the sites with the most, and its dispatched ops (each a kernel
launch on a GPU: an eager re-allocation there is launch-bound, so this counts its host cost on any machine); `--trace N`
prints torch.profiler's N costliest operations of one more re-allocation (host and device time), the ladder's
next rung below "one layer's re-allocation".
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from smartkv.cache.layer import KVLayer
from smartkv.methods import make_cache

CONFIGS = {  # name -> smartkv parameters (per-kind widths unless "joint")
    "token-full": dict(block_tokens=1, realloc="full", joint=False),
    "block16-full": dict(block_tokens=16, realloc="full", joint=False),
    "block16-incremental": dict(block_tokens=16, realloc="incremental", joint=False),
    "token-incremental": dict(block_tokens=1, realloc="incremental", joint=False),
    "token-joint": dict(block_tokens=1, realloc="incremental", joint=True),
    "block4-incremental": dict(block_tokens=4, realloc="incremental", joint=False),
}


def _rss_peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: peak resident, VmRSS: resident), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _counted(manager, run):
    """`manager` (a counter or profiler context) after `run()` ran inside it."""
    with manager as m:
        run()
    return m


def _layer_bytes(layer) -> int:
    lb = layer.layer_bytes()
    return int(lb.payload + lb.metadata + lb.residual)


def profile(params: dict, batch: int, context: int, rounds: int, device, seed: int = 0,
            count_syncs: bool = False, trace: int = 0) -> dict:
    cache = make_cache("smartkv", num_layers=1, **params)
    layer = cache.layers[0]
    g = torch.Generator(device=device).manual_seed(seed)
    H, D = 8, 128

    def kv(n):
        return (torch.randn(batch, H, n, D, device=device, generator=g, dtype=torch.float16),
                torch.randn(batch, H, n, D, device=device, generator=g, dtype=torch.float16))

    def redraw_importance():  # codes of -8 log2(p): heavy-tailed attention, a few tokens much above the rest
        u = torch.rand(layer.importance.shape, device=device, generator=g)
        layer.importance = (8 * (8 + 12 * u.pow(0.3))).clamp(0, 254).to(torch.uint8)

    def store(k, v):  # without the flush SmartKV's append runs after storing: each flush is timed on its own
        KVLayer.append(layer, k, v)

    with torch.inference_mode():
        store(*kv(context))
        redraw_importance()
        _sync(device)
        start = time.perf_counter()
        layer._flush()
        _sync(device)
        first_ms = (time.perf_counter() - start) * 1e3
        times, peaks = [], []
        step = layer._flush_at()

        def next_round():  # the tokens and importance of one more re-allocation
            store(*kv(step))
            redraw_importance()
            _sync(device)

        def reallocating_round(run):
            """`run()`'s result in the first round of new tokens that re-allocates (a block flush waits for whole
            blocks, so a round may re-allocate nothing), and how many rounds that took (at most 8)."""
            for tries in range(1, 9):
                next_round()
                before = layer.n_middle
                out = run()
                if layer.n_middle != before:
                    return out, tries
            raise RuntimeError("no re-allocation in 8 rounds of new tokens")

        def timed_flush():  # (ms, bytes above what was allocated before) of one _flush
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            else:
                _rss_peak_reset()
                base = _status_bytes("VmRSS")
            start = time.perf_counter()
            layer._flush()
            _sync(device)
            ms = (time.perf_counter() - start) * 1e3
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status_bytes("VmHWM")
            return ms, max(0, peak - base)

        taken = 0
        for _ in range(rounds):
            (ms, extra), tries = reallocating_round(timed_flush)
            times.append(ms)
            peaks.append(extra)
            taken += tries
        syncs = {}
        if count_syncs:
            from syncs import SyncCounter

            c = reallocating_round(lambda: _counted(SyncCounter(device), layer._flush))[0]
            syncs = dict(realloc_syncs=c.total, realloc_ops=c.ops, realloc_sync_sites=c.by_site.most_common(6))
        if trace:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            prof = reallocating_round(lambda: _counted(torch_profile(activities=kinds),
                                                       lambda: (layer._flush(), _sync(device))))[0]
            for key in ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else []):
                print(prof.key_averages().table(sort_by=key, row_limit=trace), flush=True)
    held = _layer_bytes(layer)
    return dict(batch=batch, context=context, first_ms=first_ms, mean_ms=statistics.fmean(times),
                max_ms=max(times), rounds_a_realloc=taken / rounds,
                peak_extra_mib=max(peaks) / 2 ** 20, held_mib=held / 2 ** 20,
                middle=layer.n_middle, **syncs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", default="8192,32768", help="prompt tokens, comma-separated")
    p.add_argument("--batch", default="1,2", help="sequences, comma-separated")
    p.add_argument("--rounds", type=int, default=8, help="re-allocations timed after the first allocation")
    p.add_argument("--base", default="budget=4.25,key_value_gap=3", help="smartkv parameters of every row, k=v,...")
    p.add_argument("--configs", default="token-full,block16-full,block16-incremental", help="rows (names of CONFIGS), comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--count-syncs", action="store_true", help="also count a re-allocation's host waits")
    p.add_argument("--trace", type=int, default=0, help="print the N costliest ops of one more re-allocation")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    base = {k: (float(v) if "." in v else int(v) if v.isdigit() else v)
            for k, v in (item.split("=") for item in filter(None, a.base.split(",")))}
    rows = []
    print("| config | batch | context | first allocation ms | re-allocation mean ms | max ms | rounds a re-allocation | "
          "peak extra MiB | layer MiB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for context in map(int, a.context.split(",")):
        for batch in map(int, a.batch.split(",")):
            for name in a.configs.split(","):
                r = dict(config=name, **profile(dict(base, **CONFIGS[name]), batch, context, a.rounds, device,
                                                count_syncs=a.count_syncs, trace=a.trace))
                rows.append(r)
                print(f"| {name} | {batch} | {context} | {r['first_ms']:.0f} | {r['mean_ms']:.1f} | "
                      f"{r['max_ms']:.1f} | {r['rounds_a_realloc']:.1f} | {r['peak_extra_mib']:.1f} | "
                      f"{r['held_mib']:.1f} |", flush=True)
                if a.count_syncs:
                    print(f"<!-- {name}: {r['realloc_ops']} dispatched ops (kernel launches on a GPU) and "
                          f"{r['realloc_syncs']} host waits a re-allocation; waits most at "
                          + "; ".join(f"{site} x{n}" for site, n in r["realloc_sync_sites"]) + " -->", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
