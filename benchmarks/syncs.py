"""Count the operations that make the host wait for a CUDA device, on any device (a CPU run counts what the same
code would wait for on a GPU): reading a value (`item`, `bool`, `int`), transfers to host memory (`tolist`,
`numpy`, `cpu`), and ops whose output size depends on the data (`nonzero`, boolean-mask indexing, `unique`,
`masked_select`, `repeat_interleave` without `output_size`). A step with N of these waits N times for the
GPU to drain, and under a GPU shared by several processes each wait also waits for the others' work.

Only operations on tensors of `device` count: on a GPU that is exact; on the CPU every tensor is on the device,
so host-side bookkeeping that a GPU run keeps on the host anyway counts too (an upper bound).

    with SyncCounter(device="cuda") as c:
        layer._flush()
    print(c.total, c.by_kind.most_common(5))
"""
from __future__ import annotations

import collections
import contextlib
import os
import traceback
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import smartkv

# Tensor methods that leave the device without a dispatched op of their own on CPU tensors
HOST_READS = {"tolist", "numpy", "cpu"}
DATA_SIZED = {"aten.nonzero", "aten.masked_select", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim",
              "aten._local_scalar_dense"}


# Ops that launch no kernel besides views (`OpOverload.is_view`): allocations and metadata
NO_LAUNCH = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
             "aten.lift_fresh", "aten._unsafe_view", "aten.sym_size", "aten.sym_stride", "aten.sym_numel"}


PACKAGE = os.path.dirname(smartkv.__file__) + os.sep


def project_frames() -> list:
    """The current Python stack's frames in the smartkv package, outermost first (by its directory: a checkout's
    path may hold "smartkv/" too)."""
    return [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]


@contextlib.contextmanager
def device_waits():
    """Yields a list that gets, for each synchronising CUDA operation run inside, its caller's `project_frames`:
    torch's sync debug mode warns from inside each such operation, so the stack at the warning is the caller's (a
    blocking copy to the device counts too, which SyncCounter's host reads do not see). Other warnings are shown as
    usual; off CUDA nothing is recorded (and a CPU build has no CUDA to ask)."""
    found: list = []
    debug = torch.cuda.is_available()
    with warnings.catch_warnings():   # restores showwarning on leaving
        shown = warnings.showwarning

        def record(message, category, *args, **kwargs):
            if "synchroniz" in str(message):
                found.append(project_frames())
            else:
                shown(message, category, *args, **kwargs)
        warnings.simplefilter("always")
        warnings.showwarning = record
        if debug:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode("default")


def _on(device_type: str, args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == device_type for a in args)


class _Functions(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS and _on(self.counter.device_type, args[:1]):
            self.counter._add(name)
        return func(*args, **(kwargs or {}))


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        on = _on(self.counter.device_type, args[:1])
        device = kwargs.get("device")   # factories (zeros, arange, full) name theirs; other ops take their input's
        factory = device is not None and torch.device(device).type == self.counter.device_type
        if (on or factory) and not func.is_view and name not in NO_LAUNCH:
            self.counter.ops += 1
        if not on:
            return func(*args, **kwargs)
        if name in DATA_SIZED:
            self.counter._add("item" if name == "aten._local_scalar_dense" else name.removeprefix("aten."))
        elif name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else []) if i is not None):
            self.counter._add("boolean index")
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and func.__name__ != "self_int":
            self.counter._add("repeat_interleave")
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager: `total` host waits and `by_kind` / `by_site` counters (site: the innermost smartkv frame);
    `ops`: the dispatched operations that do work (not views or allocations), each at least one kernel launch on a
    GPU, so a CPU run counts what an eager CUDA run pays per launch."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device_type = torch.device(device).type
        self.by_kind: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()
        self.ops = 0
        self._modes = (_Functions(self), _Dispatch(self))

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _add(self, kind: str) -> None:
        self.by_kind[kind] += 1
        site = next((f"{f.filename.rsplit('smartkv/', 1)[-1]}:{f.lineno} {f.name}"
                     for f in reversed(project_frames())), "?")
        self.by_site[site] += 1

    def __enter__(self) -> "SyncCounter":
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
