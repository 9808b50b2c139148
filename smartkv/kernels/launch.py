"""Triton launches without Triton's per-call binding, for calls that would compile to a kernel already launched.

`fn[grid](*args, **meta)` binds every argument and computes its specialization on each call (native calls per
argument, a key string, a dict lookup): ~33 us of host time for the split kernel's 55 arguments on a 2-core
x86 host, and 50-80 us a launch measured on the GPU host, where a decode step of a batch of one is bound by its
host work (BENCHMARKS.md, the runner). `launch` keeps, per kernel and constexpr/option values, the compiled
kernel of each argument specialization it has seen and launches it through the compiled kernel's own launcher
when this call's arguments specialize alike; the first call of each goes through `fn[grid]` (compiling as usual).

Specialization is what Triton keys its compiled kernels on besides constexprs and options: each tensor's dtype
and whether its address is a multiple of 16, each integer's 32/64-bit range, whether it is 1 and whether it is a
multiple of 16 (not for `do_not_specialize` parameters), None, bools and floats by type. The check here is that
or finer (a finer check only sends more calls through `fn[grid]`), so a kernel is never launched on arguments it
was not compiled for. Triton 3.3 to 3.9 launch a compiled kernel alike (`CompiledKernel.run` taking every bound
argument: read in 3.3, 3.4, 3.5, 3.6 and 3.9); elsewhere, under the interpreter, with a launch hook set
(profilers) or SMARTKV_DIRECT_LAUNCH=0, every call goes through `fn[grid]`."""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import sys

import torch

try:
    import triton
    from triton import knobs
    from triton.runtime.driver import driver
    _VERSION_OK = (3, 3) <= tuple(int(x) for x in triton.__version__.split(".")[:2]) <= (3, 9)
    _JIT = triton.runtime.jit.JITFunction
except Exception:   # no Triton, or one without knobs (before 3.3): nothing to launch directly
    _VERSION_OK, _JIT = False, type(None)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints, for grids and splits: `triton.cdiv` and `triton.next_power_of_2` are constexpr
    functions, whose Python calls unwrap their arguments (~3 us each on the GPU host, a dozen a decode step's
    layer), and a step of a batch of one is bound by its host work."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), of a host int (`cdiv`)."""
    return 1 << max(0, (n - 1).bit_length())


# Keyed by id(fn), each entry holding fn itself (checked, so a reused id never matches): a JITFunction hashes in
# Python (its cache key), four times a launch when the dicts were keyed by fn.
_LAYOUTS: dict = {}   # (id(fn), device, argument types, *meta items) -> _Layout
_CALLS: dict = {}     # (id(fn), positional arguments) -> (fn, whether they can go direct, runtime names)
_PARAMS: dict = {}    # fn -> per parameter (is constexpr, specializes its value, specializes its alignment)
_RUNTIME: dict = {}   # fn -> names of its non-constexpr parameters
MAX_KERNELS = 64      # specializations kept per layout (the pool kernels see dozens): past that, the oldest goes
STATS = {"direct": 0, "bound": 0}
_I32 = (-2 ** 31, 2 ** 31)


def enabled() -> bool:
    return _VERSION_OK and os.environ.get("SMARTKV_DIRECT_LAUNCH", "1") != "0"


def _params(fn) -> list | None:
    """Per parameter of a JIT function: (constexpr, value specialized, alignment specialized); None when its
    parameters are not described as Triton 3.3-3.9 describe them."""
    if fn not in _PARAMS:
        try:
            _PARAMS[fn] = [(bool(p.is_constexpr), not p.do_not_specialize,
                            not (p.do_not_specialize or p.do_not_specialize_on_alignment)) for p in fn.params]
            _RUNTIME[fn] = frozenset(p.name for p in fn.params if not p.is_constexpr)
        except AttributeError:
            _PARAMS[fn] = None
    return _PARAMS[fn]


class _Layout:
    """The argument positions of one kernel, meta and argument types whose specialization is checked, and the
    compiled kernel of each specialization seen (with the constexpr values the launcher takes after the
    arguments)."""

    def __init__(self, fn, types: tuple, params: list):
        self.fn = fn
        self.ok = all(t in (torch.Tensor, int, float, bool, type(None)) for t in types)
        self.tensors = operator.itemgetter(*[i for i, t in enumerate(types) if t is torch.Tensor], 0, 0)
        self.aligned = operator.itemgetter(*[i for i, t in enumerate(types) if t is torch.Tensor and params[i][2]],
                                           0, 0)
        self.ints = operator.itemgetter(*[i for i, t in enumerate(types) if t is int and params[i][1]], 0, 0)
        self.ranged = operator.itemgetter(*[i for i, t in enumerate(types) if t is int], 0, 0)
        self.kernels: dict = {}
        self.tail: tuple | None = None

    def spec(self, args: tuple) -> tuple:
        """What the compiled kernel depends on besides types, meta and None/bool values (those are fixed by the
        layout's key or checked by Triton's own launcher): a superset of Triton's specialization. The getters
        carry two dummy positions (args[0]) so that each returns a tuple."""
        ranged = self.ranged(args)[:-2]
        return (tuple([t.dtype for t in self.tensors(args)]), tuple([t.data_ptr() % 16 == 0 for t in
                                                                        self.aligned(args)[:-2]]),
                tuple([(v == 1, v % 16 == 0) for v in self.ints(args)[:-2]]),
                not ranged or (_I32[0] <= min(ranged) and max(ranged) < _I32[1]))


def _call_info(fn, n: int) -> tuple:
    """(fn, whether calls with n positional arguments can go direct: none of them a constexpr, runtime names)."""
    params = _params(fn)
    ok = params is not None and n <= len(params) and not any(c for c, _, _ in params[:n])
    return fn, ok, _RUNTIME.get(fn, frozenset())


def _hooked() -> bool:
    """Whether a launch hook is installed (a profiler's): Triton's own path calls it. Triton 3.6+ keeps them in
    a HookChain, empty unless one was added. (Two lookups, no generator: this runs at every launch.)"""
    rt = knobs.runtime
    h = rt.launch_enter_hook
    if h is not None and getattr(h, "calls", True):
        return True
    h = rt.launch_exit_hook
    return h is not None and bool(getattr(h, "calls", True))


def launch(fn, grid: tuple, *args, **meta):
    """`fn[grid](*args, **meta)`: `args` the kernel's non-constexpr parameters in order, `meta` its constexprs
    and launch options (num_warps, ...). Returns what `fn[grid]` returns on the calls it makes, else the
    compiled kernel launched."""
    if not enabled() or callable(grid) or not isinstance(fn, _JIT):
        return fn[grid](*args, **meta)
    call = _CALLS.get((id(fn), len(args)))
    if call is None or call[0] is not fn:
        call = _CALLS[(id(fn), len(args))] = _call_info(fn, len(args))
    if (not call[1]
            or not call[2].isdisjoint(meta)   # a runtime argument by keyword: not part of a layout's key
            or _hooked()):
        return fn[grid](*args, **meta)
    device = driver.active.get_current_device()
    types = tuple(map(type, args))
    try:
        key = (id(fn), device, types, *meta.items())
        layout = _LAYOUTS.get(key)
    except TypeError:   # an unhashable meta value
        return fn[grid](*args, **meta)
    if layout is None or layout.fn is not fn:
        layout = _LAYOUTS[key] = _Layout(fn, types, _params(fn))
    if not layout.ok:   # an argument kind not checked here (a tuple, a descriptor)
        return fn[grid](*args, **meta)
    spec = layout.spec(args)
    k = layout.kernels.get(spec)
    if k is not None:
        k.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
              driver.active.get_current_stream(device), k.function, k.packed_metadata, None, None, None,
              *args, *layout.tail)
        STATS["direct"] += 1
        return k
    kernel = fn[grid](*args, **meta)
    STATS["bound"] += 1
    rest = fn.params[len(args):]   # constexprs only, each given in meta or defaulted, else not kept
    if kernel is None or any(not p.is_constexpr or (p.name not in meta and p.default is inspect.Parameter.empty)
                             for p in rest):
        return kernel
    if hasattr(kernel, "result"):
        kernel = kernel.result()
    layout.tail = tuple(meta[p.name] if p.name in meta else p.default for p in rest)
    layout.kernels[spec] = kernel
    while len(layout.kernels) > MAX_KERNELS:
        layout.kernels.pop(next(iter(layout.kernels)))
    return kernel


@contextlib.contextmanager
def routed(wrapper):
    """Every project module's `launch` (each bound it at import) replaced by `wrapper` while inside, restored on
    leaving: to count or check the launches a piece of code makes (benchmarks/count_flush.py, the tests) without a
    hook in `launch` itself, which every eager step calls."""
    real, here = launch, sys.modules[__name__]   # this module keeps its own: `launch` is read from it on leaving
    mods = [m for m in list(sys.modules.values()) if m is not here
            and getattr(m, "__name__", "").startswith("smartkv") and getattr(m, "launch", None) is real]
    for m in mods:
        m.launch = wrapper
    try:
        yield
    finally:
        for m in mods:
            m.launch = real
