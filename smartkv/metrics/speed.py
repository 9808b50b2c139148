"""Timing and memory: wall-clock milliseconds that wait for the GPU, peak allocated memory, tokens per second.

CUDA runs asynchronously, so a timer that does not synchronise measures the launch, not the work; `Timer` and
`time_ms` synchronise the device before starting and before stopping the clock.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _is_cuda(device) -> bool:
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


def synchronize(device=None) -> None:
    """Wait for queued CUDA work (no-op on CPU). `device=None` syncs the current CUDA device if there is one."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as t: ...` then `t.ms`: elapsed milliseconds, synchronised on CUDA devices."""

    def __init__(self, device=None):
        self.device = device
        self.ms = float("nan")

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.ms = (time.perf_counter() - self._start) * 1000.0


def time_ms(fn: Callable[[], object], repeats: int = 1, warmup: int = 0, device=None) -> float:
    """Median milliseconds of `fn()` over `repeats` runs, after `warmup` untimed runs."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.ms)
    return statistics.median(times)


def reset_peak_memory(device=None) -> None:
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device=None) -> int | None:
    """Peak bytes allocated by torch on a CUDA device since the last reset; None on CPU (not tracked)."""
    if not _is_cuda(device):
        return None
    return int(torch.cuda.max_memory_allocated(device))


def tokens_per_s(num_tokens: int, elapsed_ms: float) -> float:
    """Throughput; nan for a zero or negative duration."""
    return num_tokens / (elapsed_ms / 1000.0) if elapsed_ms > 0 else float("nan")
