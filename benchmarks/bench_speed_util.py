"""GPU timing and cache builders shared by the speed benchmarks (CUDA only).

Timing: every measured call goes into one CUDA graph that cycles through several input sets (so the KV
bytes are not served from L2 on the next call); the graph is replayed many times, each replay timed with CUDA
events, and the median replay time divided by the calls it holds is reported.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
from collections.abc import Callable

import torch

from smartkv.core.quant import QTensor, packed_width
from smartkv.kernels import KVSegment, quantize_pack, tuning

L2_BYTES = 50 * 2 ** 20


def sets_for(bytes_per_set: int, min_total: int = 4 * L2_BYTES, max_sets: int = 32) -> int:
    """How many input sets to rotate through so one pass over them is several times the L2."""
    return max(2, min(max_sets, math.ceil(min_total / max(bytes_per_set, 1))))


def time_calls(calls: list[Callable[[], object]], min_time_s: float = 0.25, graph: bool = True) -> float:
    """Median seconds per call over replays of a graph that runs each of `calls` once (eager if graph=False)."""
    for c in calls:  # compile, autotune, allocate
        c()
    torch.cuda.synchronize()
    g = None
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for c in calls:
                    c()
        except RuntimeError:
            g = None
            torch.cuda.synchronize()
    run = g.replay if g is not None else (lambda: [c() for c in calls])
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = max(5, min(200, int(min_time_s / once)))
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2] / len(calls)


def copy_bandwidth(nbytes: int = 2 * 2 ** 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return nbytes / time_calls([lambda: dst.copy_(src)], graph=False)


DEVICE = "cuda"   # where `build_segments` makes its tensors (host_stubbed.py: the CPU)


def _randn(shape, gen) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float16, device=DEVICE, generator=gen)


def quantized(B, H, T, D, bits, group, axis, gen, chunk=8192) -> QTensor:
    """A (B, H, T, D) random tensor quantized and packed chunk by chunk (no fp32 copy of the whole)."""
    meta = (B, H, T, D // group) if axis == -1 else (B, H, T // group, D)
    q = QTensor(torch.empty(B, H, T, packed_width(D, bits), dtype=torch.uint8, device=DEVICE),
                torch.empty(meta, dtype=torch.float16, device=DEVICE),
                torch.empty(meta, dtype=torch.float16, device=DEVICE), bits, group, axis)
    for t0 in range(0, T, chunk):
        n = min(chunk, T - t0)
        quantize_pack(_randn((B, H, n, D), gen) * 2 + 0.5, bits, group, axis, out=q, start=t0)
    return q


SMARTKV_MIX = {8: 0.25, 4: 0.25, 2: 0.5}  # average code width 4 bits


def stable(segs: list[KVSegment]) -> list[KVSegment]:
    """The segments but the last (the window, new each step) marked as passed again call after call (`stable`), as
    an append layer's ordinary step passes them."""
    return [dataclasses.replace(s, stable=True) for s in segs[:-1]] + segs[-1:]


def build_segments(method: str, B: int, H: int, T: int, D: int, gen, group: int = 32,
                   residual: int = 128) -> list[KVSegment]:
    """Cache contents of one layer for `method` at context T (steady state while decoding)."""
    if method == "fp16":
        return [KVSegment(_randn((B, H, T, D), gen), _randn((B, H, T, D), gen))]
    if method in ("int8", "int4"):
        bits = 8 if method == "int8" else 4
        return [KVSegment(quantized(B, H, T, D, bits, group, -1, gen), quantized(B, H, T, D, bits, group, -1, gen))]
    if method.startswith("kivi"):
        kb, vb = (2, 2) if method == "kivi2" else (2, 4)
        tk = max(0, (T - residual // 2) // residual * residual)  # keys flush R-token blocks
        tv = max(0, T - residual)                                # values keep the last R tokens
        return [KVSegment(quantized(B, H, tk, D, kb, group, -2, gen), quantized(B, H, tv, D, vb, group, -1, gen),
                          _randn((B, H, T - tk, D), gen), _randn((B, H, T - tv, D), gen))]
    if method == "smartkv4":
        sinks, window = 4, 32
        middle = T - sinks - window
        counts = {b: int(middle * f) for b, f in SMARTKV_MIX.items()}
        counts[2] += middle - sum(counts.values())
        mu = _randn((B, H, 1, D), gen)
        sd = _randn((B, H, 1, D), gen).abs() + 0.5
        segs = [KVSegment(_randn((B, H, sinks, D), gen), _randn((B, H, sinks, D), gen))]
        for bits, n in counts.items():
            segs.append(KVSegment(quantized(B, H, n, D, bits, group, -1, gen),
                                  quantized(B, H, n, D, bits, group, -1, gen), key_scale=sd, key_shift=mu))
        segs.append(KVSegment(_randn((B, H, window, D), gen), _randn((B, H, window, D), gen)))
        return segs
    if method.startswith("smartkv-classes"):
        return _class_segments(method, B, H, T, D, gen)
    raise ValueError(f"method must be one of fp16, int8, int4, kivi2, kivi24, smartkv4, smartkv-classes, "
                     f"smartkv-classes-g32, got {method!r}")


def class_staircase(middle: int, budget: float = 4.25, gap: float = 3.0, widths=(2, 3, 4, 8),
                    seed: int = 0) -> list[tuple[int, int, int]]:
    """(key bits, value bits, tokens) of each joint class a SmartKV row holds when keys and values are placed by
    one ranking (the allocator's shared weights): the keys' and values' width counts for `budget` / `gap`
    (policy.counts_for on a heavy-tailed profile, as attention is), merged along the ranking (classes.staircase).
    Every row has the same classes, so each is one dense segment the uniform kernels read in one pass."""
    from smartkv.core.classes import staircase
    from smartkv.core.policy import counts_for, kv_budgets

    g = torch.Generator().manual_seed(seed)
    profile = torch.sort(torch.exp(1.5 * torch.randn(middle, generator=g, dtype=torch.float64)) ** 2,
                         descending=True).values
    return staircase(*(counts_for(profile, b, widths) for b in kv_budgets(budget, gap, widths)))


def _class_segments(method: str, B, H, T, D, gen) -> list[KVSegment]:
    """SmartKV stored as joint (key width, value width) classes: sinks, one segment a class (normalised keys),
    the window. SmartKV's groups of 64 and widths 2/3/4/8; `-g32`: groups of 32 and widths 2/4/8; `-w248`:
    groups of 64 and widths 2/4/8 (the CUDA path reads both of those, not 3-bit codes)."""
    group = 32 if method.endswith("-g32") else 64
    widths = (2, 4, 8) if method.endswith(("-g32", "-w248")) else (2, 3, 4, 8)
    sinks, window = 4, 32
    mu = _randn((B, H, 1, D), gen)
    sd = _randn((B, H, 1, D), gen).abs() + 0.5
    segs = [KVSegment(_randn((B, H, sinks, D), gen), _randn((B, H, sinks, D), gen))]
    for kb, vb, n in class_staircase(T - sinks - window, widths=widths):
        segs.append(KVSegment(quantized(B, H, n, D, kb, group, -1, gen), quantized(B, H, n, D, vb, group, -1, gen),
                              key_scale=sd, key_shift=mu))
    segs.append(KVSegment(_randn((B, H, window, D), gen), _randn((B, H, window, D), gen)))
    return segs


def segments_bytes(segments: list[KVSegment]) -> int:
    return sum(s.nbytes for s in segments)


def apply_tuning(path: str) -> dict:
    """Make the launch configs of a bench_attention.json (its "tuning": what its sweep kept) the active table."""
    from smartkv.kernels import tuning

    with open(path) as f:
        configs = json.load(f)["tuning"]
    split = {ast.literal_eval(key): tuning.Tuning(**fields) for key, fields in configs.items()}
    tuning.use(tuning.with_changes(tuning.current(), split=split))
    return configs


def cuda_override(spec: str | None):
    """`tuning.override` of the CUDA path's launch choices from a command line's "field=int,field=int" (None or
    empty: the card's table). A field CudaTuning lacks, or a value that is not an integer, is a ValueError naming it."""
    fields = [f.name for f in dataclasses.fields(tuning.CudaTuning)]
    changes = {}
    for item in filter(None, (spec or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in fields:
            raise ValueError(f"--cuda: unknown field {key.strip()!r}; allowed: {', '.join(fields)}")
        try:
            changes[key.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--cuda: {key.strip()} must be an integer, got {value!r}") from None
    return tuning.override(cuda=changes)


def parse_with_cuda(ap):
    """`ap`'s arguments with `--cuda FIELD=INT,...` added, and the `cuda_override` they ask for (a bad spec: the
    parser's error, before any work)."""
    ap.add_argument("--cuda", default=None, metavar="FIELD=INT,...",
                    help="the CUDA path's launch choices changed (tuning.CudaTuning: min_tokens, warps, ...)")
    args = ap.parse_args()
    try:
        return args, cuda_override(args.cuda)
    except ValueError as exc:
        ap.error(str(exc))
