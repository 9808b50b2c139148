"""What sharing one GPU does to the runner's decode and prefill: the runner's own `generation.decode` (through
`bench_runner_step.measure`, SmolLM2-135M-shaped, random bf16 weights) in P processes at once, as the runner's
`--workers-per-gpu P` puts P workers on one card, without Ray, the embedded weights or the grid's job mix.

First, in one process, each row's device time a request (torch.profiler: the kernels' and copies' sum, and their
count) against its wall time: a step that is host-bound alone may not be when P processes queue kernels on one
card (time-sliced: one context's kernels at a time). Then each layout of `--layouts` (e.g. `8:int4`, `8:smartkv`,
`4:int4+4:smartkv`) runs its processes together: each warms up on one request, waits for the others, then runs
`--repeats` requests; the medians of every process's requests are printed per row, against int4's in the same
layout.

    PYTHONPATH=.:benchmarks python benchmarks/shared_gpu.py --context 8000 --new 32 --repeats 4      # CUDA
    PYTHONPATH=.:benchmarks python benchmarks/shared_gpu.py --smoke                                 # CPU: the path
"""
from __future__ import annotations

import argparse
import queue
import statistics
import time

import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from bench_runner_step import METHODS, build, measure, prompt_tokens
from profile_step import device_events, kernel_totals

ROWS = {"int4": "int4", "smartkv": "smartkv (default)"}


def parse_layout(text: str) -> list[str]:
    """'4:int4+4:smartkv' -> the row of each process, checked before any work."""
    rows = []
    for part in text.split("+"):
        count, _, row = part.partition(":")
        if not count.isdigit() or not 1 <= int(count) <= 64 or row not in ROWS:
            raise SystemExit(f"--layouts: {part!r} must be COUNT:ROW, COUNT 1-64, ROW one of {', '.join(ROWS)}")
        rows += [row] * int(count)
    return rows


def device_ms(model, row: str, prompt: list[int], new: int) -> dict:
    """One request's wall ms and its kernels' device ms and count (prefill and decode together), profiled after
    one warm-up request."""
    measure(model, ROWS[row], "eager", prompt, new)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        r = measure(model, ROWS[row], "eager", prompt, new)
        wall = (time.perf_counter() - start) * 1e3
    kernels = device_events(prof)
    by_name = kernel_totals((name[:60], us) for name, us in kernels)
    return {"wall": wall, "device": sum(us for _, us in kernels) / 1e3, "kernels": len(kernels), "by_name": by_name,
            "ms_token": r["ms_token"], "prefill_ms": len(prompt) / r["prefill_tok_s"] * 1e3}


def worker(rank: int, rows: list[str], args, barrier, results) -> None:
    try:
        device = "cpu" if args.smoke else "cuda"
        torch.set_num_threads(1)   # as the runner's workers (`--cpus-per-worker 1`)
        model = build(args.smoke, device)
        prompt = prompt_tokens(model, args.context)
        measure(model, ROWS[rows[rank]], "eager", prompt, args.new)   # compilation and the allocator, untimed
        barrier.wait(timeout=args.timeout)
        out = [measure(model, ROWS[rows[rank]], "eager", prompt, args.new) for _ in range(args.repeats)]
    except Exception as exc:   # told to the parent, which stops the layout: no process waits on a dead one
        barrier.abort()
        results.put((rank, f"{type(exc).__name__}: {exc}"))
        return
    results.put((rank, out))


def shared(rows: list[str], args) -> dict:
    """Each row's medians over all its processes' requests, the processes running together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(rows)), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, rows, args, barrier, results)) for i in range(len(rows))]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=args.timeout) for _ in procs)
    except queue.Empty:
        raise SystemExit(f"a layout of {len(rows)} processes gave no result in --timeout {args.timeout:.0f} s")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {i: r for i, r in got.items() if isinstance(r, str)}
    if errors:   # the process that failed, not those its abort of the barrier broke
        i = min(errors, key=lambda j: ("BrokenBarrierError" in errors[j], j))
        raise SystemExit(f"process {i} ({rows[i]}) failed: {errors[i]}")
    out = {}
    for row in dict.fromkeys(rows):
        rs = [r for i, row_i in enumerate(rows) if row_i == row for r in got[i]]
        out[row] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "ms_token")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=8000, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="tokens a request produces")
    ap.add_argument("--repeats", type=int, default=4, help="timed requests a process")
    ap.add_argument("--layouts", default="1:int4,1:smartkv,8:int4,8:smartkv,4:int4+4:smartkv",
                    help="comma-separated layouts, each COUNT:ROW[+COUNT:ROW...]")
    ap.add_argument("--timeout", type=float, default=400, help="seconds a layout may take")
    ap.add_argument("--top", type=int, default=12, help="kernels listed by device time in the profiled request")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, two processes at most")
    args = ap.parse_args()
    if args.context < 16 or args.new < 1 or args.repeats < 1:
        ap.error("--context >= 16, --new >= 1, --repeats >= 1")
    layouts = [(text, parse_layout(text)) for text in args.layouts.split(",") if text]   # "": the profile alone
    if args.smoke:
        args.context, args.new, args.repeats = min(args.context, 256), min(args.new, 20), 1
        layouts = [(t, rows[:2]) for t, rows in layouts[:2]]
    assert set(METHODS) >= set(ROWS.values())
    if not args.smoke:
        model = build(False, "cuda")
        prompt = prompt_tokens(model, args.context)
        print("one process, one request profiled (prefill and decode): wall ms, device ms, kernels")
        for row in ROWS:
            d = device_ms(model, row, prompt, args.new)
            print(f"  {row}: wall {d['wall']:.0f} ms, device {d['device']:.1f} ms in {d['kernels']} kernels; "
                  f"prefill {d['prefill_ms']:.1f} ms, decode {d['ms_token']:.2f} ms a token (under the profiler)")
            for name, (ms, count) in sorted(d["by_name"].items(), key=lambda kv: -kv[1][0])[:args.top]:
                print(f"    {ms:8.2f} ms {count:6d} x  {name}")
        del model
        torch.cuda.empty_cache()
    print(f"{args.context} prompt tokens, {args.new} new, {args.repeats} requests a process; medians")
    print("| layout | row | prefill tok/s | vs int4 | ms a token | vs int4 |")
    print("| --- | --- | --- | --- | --- | --- |")
    alone: dict = {}   # process count -> int4's medians in a layout of int4 alone: the base of a layout without it
    for text, rows in layouts:
        res = shared(rows, args)
        if set(rows) == {"int4"}:
            alone[len(rows)] = res["int4"]
        base = res.get("int4") or alone.get(len(rows))
        for row, r in res.items():
            ratio = [f"{r[k] / base[k]:.2f}x" if base else "" for k in ("prefill_tok_s", "ms_token")]
            print(f"| {text} | {row} | {r['prefill_tok_s']:,.0f} | {ratio[0]} | {r['ms_token']:.2f} | {ratio[1]} |",
                  flush=True)

if __name__ == "__main__":
    main()
