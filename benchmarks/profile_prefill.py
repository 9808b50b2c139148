"""Where a prefill's time goes: wall time against device time, host syncs, and the host functions that lead.

A Llama-3-8B-shaped model (random bf16 weights, `--layers` of them) prefills `--context` random tokens x `--batch`
in one forward through each row's cache (as the runner prefills a prompt), twice: the first call warms up
(kernel compilation, allocator), the second is measured. Printed per row: wall ms and ms a layer against the
first row's (int4 by default), device ms (the kernels' and copies' sum under torch.profiler), device-to-host
copies and synchronisations (each one a point where the GPU drains while the host waits), and the `--top` host
functions of the project by cumulative time (cProfile over the same call). Wall well above device time means the
prefill is host-bound: the functions listed are where to look.

    PYTHONPATH=.:benchmarks python benchmarks/profile_prefill.py --context 8192 --layers 4          # CUDA
    PYTHONPATH=.:benchmarks python benchmarks/profile_prefill.py --smoke --context 512 --layers 2   # CPU check
    PYTHONPATH=.:benchmarks python benchmarks/profile_prefill.py --shape smollm2 --layers 30       # the runner's
    PYTHONPATH=.:benchmarks python benchmarks/profile_prefill.py --shape smollm2 --layers 30 --context 8000 \
        --rows 'int4,smartkv (budget 4.25; gap 3)' --phases 5    # host ms a layer in each SmartKV phase

`--phases N`: N timed prefills a row instead of the profilers, each of SmartKV's first-allocation phases timed by
wall clock around its method (no profiler's overhead; phases nest, so each is cumulative). A host-bound prefill's
wall time in a phase is its host time plus any wait for the device inside it.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import bench_e2e
import smartkv
from bench_e2e import METHODS, build_model
from bench_runner_step import ab_setting
from bench_runner_step import build as build_smollm2
from profile_step import device_events, kernel_totals
from smartkv.cache.hf_compat import cache_kwargs

ROWS = ("int4,smartkv (budget 4.25; gap 3),smartkv append (budget 4.25; gap 3) (CUDA graph),"
        "smartkv append (budget 4.25; gap 3; fold) (CUDA graph)")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fresh_cache(model, name: str):
    """A new cache of bench row `name` for `model`."""
    method, params = METHODS[name]
    return smartkv.make_cache(method, model, **params)


def forward(model, ids: torch.Tensor, cache) -> None:
    """One prefill of `ids` through `cache`, as the runner prefills."""
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)


def prefill(model, name: str, ids: torch.Tensor) -> float:
    """Seconds of one prefill of `ids` through a fresh cache of row `name`, synchronised."""
    cache = fresh_cache(model, name)
    sync()
    start = time.perf_counter()
    forward(model, ids, cache)
    sync()
    return time.perf_counter() - start


PHASES = {   # owner module -> the methods or functions timed by --phases (a name a tree lacks is skipped, so that
    # an A/B of two trees runs one script)
    "smartkv.methods.smartkv.layer:SmartKVLayer": ("attend", "_observe", "_flush", "_fit_key_norm", "_weights",
                                                   "_append_begin", "_demote_begin", "update", "_first_prepare",
                                                   "_append_stats"),
    # the host solves run as generators in lock step (`solve_asks`: the solves with the placements they end in;
    # `counts_many`: their counts); `prepare`, `place`: a group's device work and placement (first.py, place.py)
    "smartkv.methods.smartkv.first": ("observe", "prepare", "solve_asks", "place"),
    "smartkv.core.solves": ("counts_many",),
    "smartkv.methods.smartkv.append": ("rank_profile", "ranked", "quantize_pack"),
    "smartkv.methods.smartkv.place": ("quantize_pack",),
}


def timed_phases() -> Counter:
    """Wrap each PHASES entry to add its wall seconds to the returned counter (for this process)."""
    import importlib
    spent: Counter = Counter()
    for where, names in PHASES.items():
        module, _, cls = where.partition(":")
        try:
            owner = importlib.import_module(module)
        except ImportError:
            continue
        owner = getattr(owner, cls) if cls else owner
        for name in (name for name in names if hasattr(owner, name)):
            def wrap(f, name=name):
                @functools.wraps(f)
                def timed(*args, **kwargs):
                    start = time.perf_counter()
                    try:
                        return f(*args, **kwargs)
                    finally:
                        spent[name] += time.perf_counter() - start
                return timed
            setattr(owner, name, wrap(getattr(owner, name)))
    return spent


def run_phases(model, name: str, ids: torch.Tensor, layers: int, repeats: int, spent: Counter,
               base: float | None, label: str = "") -> float:
    """Median wall of `repeats` prefills after two warm-ups, and each phase's mean ms a layer over them."""
    for _ in range(2):
        prefill(model, name, ids)
    spent.clear()
    walls = [prefill(model, name, ids) for _ in range(repeats)]
    wall = statistics.median(walls)
    vs = f" ({wall / base:.2f}x the first row's)" if base else ""
    print(f"\n## {label or name}: {ids.shape[1]} x {ids.shape[0]}, {layers} layers\n"
          f"wall median {wall * 1e3:.1f} ms{vs}, {wall * 1e3 / layers:.2f} ms a layer; each "
          f"{', '.join(f'{w * 1e3:.1f}' for w in walls)}", flush=True)
    for phase, sec in spent.most_common():
        print(f"  {sec * 1e3 / repeats / layers:7.3f} ms a layer  {phase}")
    return wall


def device_summary(prof) -> tuple[float, int, int]:
    """(device ms, device-to-host copies, host synchronisations) of a profiled region."""
    dev_us, d2h, syncs = 0.0, 0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            dev_us += e.time_range.elapsed_us()
            d2h += "DtoH" in e.name
        elif any(s in e.name for s in SYNCS):
            syncs += 1
    return dev_us / 1e3, d2h, syncs


def kernel_top(prof, top: int) -> list[str]:
    """The device's kernels, copies and fills by summed time (launches, us): under a shared GPU, device time is
    what the other processes wait behind."""
    rows = sorted(kernel_totals(device_events(prof)).items(), key=lambda kv: -kv[1][0])[:top]
    return [f"  {ms:8.2f} ms  {n:6d}x  {name[:90]}" for name, (ms, n) in rows]


def host_top(pr: cProfile.Profile, top: int) -> list[str]:
    """The project's functions by cumulative seconds (what the host spends under them)."""
    stats = pstats.Stats(pr).stats
    rows = [(ct, nc, f"{path.split('smartkv/')[-1]}:{line}({fn})")
            for (path, line, fn), (_, nc, _, ct, _) in stats.items() if "/smartkv/" in path]
    return [f"  {ct * 1e3:8.1f} ms  {nc:6d}x  {where}" for ct, nc, where in sorted(rows, reverse=True)[:top]]


def run(model, name: str, ids: torch.Tensor, layers: int, base: float | None, top: int, label: str = "") -> float:
    prefill(model, name, ids)   # warm-up: compilation, allocator, autotuning
    wall = prefill(model, name, ids)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        prefill(model, name, ids)
    dev_ms, d2h, syncs = device_summary(prof)
    pr = cProfile.Profile()
    pr.enable()
    prefill(model, name, ids)
    pr.disable()
    vs = f" ({wall / base:.2f}x the first row's)" if base else ""
    print(f"\n## {label or name}: {ids.shape[1]} x {ids.shape[0]}, {layers} layers\n"
          f"wall {wall * 1e3:.1f} ms{vs}, {wall * 1e3 / layers:.2f} ms a layer; device {dev_ms:.1f} ms; "
          f"{d2h} device-to-host copies, {syncs} synchronisations", flush=True)
    print("\n".join(host_top(pr, top)), flush=True)
    if torch.cuda.is_available():
        print("  device kernels:\n" + "\n".join(kernel_top(prof, top)), flush=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--top", type=int, default=15, help="host functions listed per row")
    ap.add_argument("--rows", default=ROWS, help="comma-separated bench_e2e row names; the first is the base")
    ap.add_argument("--smoke", action="store_true", help="a small model (CPU: the same code path in seconds)")
    ap.add_argument("--phases", type=int, default=0, metavar="N",
                    help="N timed prefills a row, host ms a layer in each SmartKV phase (no profilers)")
    ap.add_argument("--shape", choices=("llama3-8b", "smollm2"), default="llama3-8b",
                    help="smollm2: the runner's model (SmolLM2-135M's shape, --layers of its 30)")
    ap.add_argument("--groups", default="", help="comma-separated SMARTKV_FIRST_GROUP values, each row run at "
                    "each (an A/B of the first allocation's group; empty: the environment's)")
    ap.add_argument("--ab", metavar="VAR[=A,B]", help="each row with the environment variable VAR at each value "
                    "(0 and 1 unless named), after any --groups setting: an A/B in one process")
    ap.add_argument("--rounds", type=int, default=1, help="the rows (and settings) again, interleaved")
    args = ap.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if not all(g.isdigit() and 1 <= int(g) <= 1024 for g in groups):
        ap.error(f"--groups: integers from 1 to 1024, got {args.groups!r}")
    # SmartKV's first allocation: layers a group holds (first.py, read at make_cache), then the --ab variable
    settings = [[("SMARTKV_FIRST_GROUP", g)] for g in groups] or [[]]
    if args.ab:
        var, values = ab_setting(args.ab)
        if not var or not values or not all(values):
            ap.error(f"--ab: VAR or VAR=A,B, got {args.ab!r}")
        settings = [s + [(var, v)] for s in settings for v in values]
    unknown = [r for r in names if r not in METHODS]
    if unknown:
        ap.error(f"--rows: unknown row {unknown[0]!r}; allowed: {', '.join(METHODS)}")
    if args.smoke:
        bench_e2e.DEV = "cpu"
    if args.shape == "smollm2":   # the runner's prefill: 3 KV heads of 64, where per-layer host work weighs most
        model = build_smollm2(args.smoke, bench_e2e.DEV, args.layers)
    else:
        model = build_model(args.layers, smoke=args.smoke)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device=model.device)
    base, spent = None, timed_phases() if args.phases else None
    for _ in range(args.rounds):
        for name in names:
            for setting in settings:
                os.environ.update(setting)
                label = f"{name} [{', '.join(f'{k}={v}' for k, v in setting)}]" if setting else name
                if args.phases:
                    wall = run_phases(model, name, ids, args.layers, args.phases, spent, base, label)
                else:
                    wall = run(model, name, ids, args.layers, base, args.top, label)
                base = base or wall


if __name__ == "__main__":
    main()
