"""Where a row's peak GPU memory goes: one bench_e2e row (fill, then decode steps) under the CUDA allocator's
memory history, the trace replayed to its peak, the blocks live there grouped by the code that allocated them.

    PYTHONPATH=.:benchmarks python benchmarks/profile_memory.py --batch 16 --out $OUT     # CUDA only

A row's peak above its weights and KV is transient memory (issue 21's largest-batch goal: no peak above what the
cache holds plus one layer's working set). The report lists, for each phase (the fill, then the decode steps), its
allocated peak and its reserved one (what `set_per_process_memory_fraction` caps: with graphs' private pools and
fragmentation, what runs out first) and the sites that allocated the blocks live there (the innermost frames in
smartkv/ or benchmarks/; a reserved segment by the allocation that created it), by live bytes.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch

import bench_e2e

GIB = 2 ** 30
OURS = ("/smartkv/", "/benchmarks/")
EVENTS = {"alloc": ("alloc", "free_completed"), "segment": ("segment_alloc", "segment_free")}   # (up, down)


def site(frames: list[dict], depth: int) -> str:
    """The innermost project frame and up to `depth - 1` project frames above it, innermost first."""
    ours = [f for f in frames if any(p in f["filename"] for p in OURS)]
    if not ours:
        inner = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
        return f"(outside: {Path(inner['filename']).name}:{inner['line']} {inner['name']})"
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:depth])


def replay(trace: list[dict], base: int, key: str, marks: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    """Each phase's peak of allocated (key='alloc') or reserved ('segment') memory: {phase: (bytes, event index)}."""
    up, down = EVENTS[key]
    cur, peaks, start = base, {}, 0
    for name, end in marks:
        peak, at = cur, start - 1
        for i in range(start, end):
            e = trace[i]
            if e["action"] == up:
                cur += e["size"]
                if cur > peak:
                    peak, at = cur, i
            elif e["action"] == down:
                cur -= e["size"]
        peaks[name], start = (peak, at), end
    return peaks


def live_at(trace: list[dict], at: int, key: str) -> dict[int, dict]:
    up, down = EVENTS[key]
    live: dict[int, dict] = {}
    for e in trace[:at + 1]:
        if e["action"] == up:
            live[e["addr"]] = e
        elif e["action"] == down:
            live.pop(e["addr"], None)
    return live


def report(trace: list[dict], base: dict, marks: list[tuple[str, int]], depth: int, top: int) -> list[str]:
    lines = []
    for key, what in (("alloc", "allocated"), ("segment", "reserved")):
        for phase, (peak, at) in replay(trace, base[key], key, marks).items():
            groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
            for e in live_at(trace, at, key).values():
                g = groups[site(e.get("frames", []), depth)]
                g[0] += e["size"]
                g[1] += 1
            traced = sum(g[0] for g in groups.values())
            lines += ["", f"## {what} peak of the {phase}: {peak / GIB:.2f} GiB at event {at} of {len(trace)}; "
                      f"before the trace {base[key] / GIB:.2f} GiB, traced blocks live there {traced / GIB:.2f} GiB",
                      "", "| GiB | blocks | allocated at (innermost project frame first) |", "|---|---|---|"]
            for name, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
                lines.append(f"| {size / GIB:.3f} | {n} | {name} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="smartkv append (budget 4.25; gap 3; fold) (CUDA graph)")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--fill-chunk", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3, help="project frames a site shows")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--max-entries", type=int, default=3_000_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = bench_e2e.build_model(args.layers)
    bench_e2e.free_all()
    torch.cuda.synchronize()
    base = {"alloc": torch.cuda.memory_allocated(), "segment": torch.cuda.memory_reserved()}
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                             max_entries=args.max_entries)
    marks, t0 = [], time.time()
    method, params = bench_e2e.METHODS[args.row]
    cache = bench_e2e.fill(model, method, params, args.batch, args.context, args.steps + args.warmup + 1,
                           args.fill_chunk)
    torch.cuda.synchronize()
    fill_s, fill_peak = time.time() - t0, torch.cuda.max_memory_allocated()
    marks.append(("fill", len(torch.cuda.memory._snapshot()["device_traces"][0])))
    times, captures = bench_e2e.time_steps(model, cache, args.row, args.batch, args.steps, args.warmup)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][0]
    marks.append(("decode", len(trace)))
    kv = cache.memory_report().total_bytes if hasattr(cache, "memory_report") else 0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lines = [f"# {args.row}: {args.context} x {args.batch}, {args.layers} layers, "
             f"{torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"- weights {weights / GIB:.2f} GiB, KV (memory_report) {kv / GIB:.2f} GiB; peak allocated "
             f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB (fill's {fill_peak / GIB:.2f}), reserved "
             f"{torch.cuda.max_memory_reserved() / GIB:.2f} GiB; fill {fill_s:.1f} s; graphs captured {captures}; "
             f"median step {sorted(times)[len(times) // 2]:.2f} ms; trace events {len(trace)}"
             + (" (the ring buffer wrapped: raise --max-entries)" if len(trace) >= args.max_entries else "")]
    lines += report(trace, base, marks, args.depth, args.top)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"memory_{args.batch}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
