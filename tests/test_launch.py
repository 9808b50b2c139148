"""kernels.launch: a call goes straight to the compiled kernel only when its arguments specialize as a call that
went through Triton's binding did (same constexprs and options, dtypes, 16-byte alignment, integer classes), with
the constexprs the launcher takes after the arguments; anything else goes through `fn[grid]`. Triton's launcher
needs a GPU, so the JIT function's `run` (what `fn[grid]` calls) and the compiled kernel are stand-ins here; the
GPU check is benchmarks/launch_check.py."""
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import triton.language as tl  # noqa: E402
from smartkv.kernels import launch as L  # noqa: E402


def _kernel(X, n, m, BLOCK: tl.constexpr, FLAG: tl.constexpr = True):
    pass


class _Compiled:
    """A compiled kernel's stand-in: records what its launcher is given."""
    function, packed_metadata = "fn", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_, *args):
        self.log.append(("direct", (gx, gy, gz), stream, args))


@pytest.fixture
def fake(monkeypatch):
    log = []
    fn = JITFunction(_kernel, do_not_specialize=["m"])

    def run(self, *args, grid, warmup, **kwargs):
        log.append(("bound", grid, args, kwargs))
        return _Compiled(log)

    monkeypatch.setattr(JITFunction, "run", run)
    monkeypatch.setattr(L, "_VERSION_OK", True)
    monkeypatch.setattr(L, "driver", SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0,
                                                                             get_current_stream=lambda d: 7)))
    monkeypatch.setattr(L, "_LAYOUTS", {})
    monkeypatch.setattr(L, "_CALLS", {})
    monkeypatch.delenv("SMARTKV_DIRECT_LAUNCH", raising=False)
    return fn, log


def _kinds(log):
    return [entry[0] for entry in log]


def test_a_call_that_specializes_alike_goes_to_the_compiled_kernel_with_its_constexprs(fake):
    fn, log = fake
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(fn, (4,), x, 5, 3, BLOCK=32, num_warps=4)
    y = torch.zeros(64, dtype=torch.float16)   # another tensor, another n and m of the same classes
    L.launch(fn, (2, 3), y, 7, 40, BLOCK=32, num_warps=4)
    assert _kinds(log) == ["bound", "direct"]
    assert log[1][1:] == ((2, 3, 1), 7, (y, 7, 40, 32, True))   # grid padded, the default FLAG after BLOCK


@pytest.mark.parametrize("change", ["misaligned", "dtype", "n_is_1", "n_multiple_of_16", "n_past_int32", "block",
                                    "options", "flag_given"])
def test_a_call_that_may_compile_differently_goes_through_triton(fake, change):
    fn, log = fake
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(fn, (4,), x, 5, 3, BLOCK=32, num_warps=4)
    args, meta = [x, 5, 3], {"BLOCK": 32, "num_warps": 4}
    if change == "misaligned":
        args[0] = x[1:]                      # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.bfloat16)
    elif change == "n_is_1":
        args[1] = 1
    elif change == "n_multiple_of_16":
        args[1] = 48
    elif change == "n_past_int32":
        args[1] = 2 ** 31 + 5
    elif change == "block":
        meta["BLOCK"] = 64
    elif change == "options":
        meta["num_warps"] = 8
    else:
        meta["FLAG"] = False
    L.launch(fn, (4,), *args, **meta)
    assert _kinds(log) == ["bound", "bound"]
    L.launch(fn, (4,), *args, **meta)       # and that specialization, once seen, goes direct too
    assert _kinds(log) == ["bound", "bound", "direct"]
    assert log[-1][3][:3] == tuple(args)


def test_an_unspecialized_argument_may_change_class(fake):
    fn, log = fake
    x = torch.zeros(64, dtype=torch.float16)
    for m in (3, 1, 16, 17):   # `m` is do_not_specialize: 1 and multiples of 16 compile alike
        L.launch(fn, (4,), x, 5, m, BLOCK=32)
    assert _kinds(log) == ["bound", "direct", "direct", "direct"]
    L.launch(fn, (4,), x, 5, 2 ** 40, BLOCK=32)   # but not a 64-bit value
    assert _kinds(log)[-1] == "bound"


def test_hooks_the_switch_and_runtime_keywords_keep_triton_binding(fake, monkeypatch):
    fn, log = fake
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(fn, (4,), x, 5, 3, BLOCK=32)
    monkeypatch.setenv("SMARTKV_DIRECT_LAUNCH", "0")
    L.launch(fn, (4,), x, 5, 3, BLOCK=32)
    monkeypatch.delenv("SMARTKV_DIRECT_LAUNCH")
    chain = knobs.HookChain()
    chain.add(lambda *a: None)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", chain)   # a profiler's hook sees every launch
    L.launch(fn, (4,), x, 5, 3, BLOCK=32)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)   # as Triton before 3.6 keeps one
    L.launch(fn, (4,), x, 5, 3, BLOCK=32)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", knobs.HookChain())
    L.launch(fn, (4,), x, 5, BLOCK=32, m=3)   # a runtime argument by keyword: bound, and no layout kept for it
    assert _kinds(log) == ["bound"] * 5
    assert len(L._LAYOUTS) == 1
    L.launch(fn, lambda meta: (4,), x, 5, 3, BLOCK=32)   # a grid computed from the arguments
    assert _kinds(log) == ["bound"] * 6
    L.launch(fn, (4,), x, 5, 3, BLOCK=32)
    assert _kinds(log)[-1] == "direct"


def test_what_another_function_left_under_the_same_id_is_not_used(fake):
    """The caches are keyed by id(fn) (a JITFunction hashes in Python); an id reused by another function must not
    find the first one's compiled kernels."""
    fn, log = fake
    x = torch.zeros(64, dtype=torch.float16)
    L.launch(fn, (4,), x, 5, 3, BLOCK=32, num_warps=4)
    other = JITFunction(_kernel, do_not_specialize=["m"])
    for cache in (L._LAYOUTS, L._CALLS):   # as if `other` had been given fn's id
        for key in list(cache):
            cache[(id(other), *key[1:])] = cache[key]
    L.launch(other, (4,), x, 5, 3, BLOCK=32, num_warps=4)
    L.launch(other, (4,), x, 5, 3, BLOCK=32, num_warps=4)
    assert _kinds(log) == ["bound", "bound", "direct"]


def test_host_grid_arithmetic_equals_tritons():
    """`cdiv` and `pow2` (host ints, without the constexpr functions' argument unwrapping) answer as
    `triton.cdiv` and `triton.next_power_of_2`."""
    import triton

    from smartkv.kernels.launch import cdiv, pow2

    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 512):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in range(1, 5000):
        assert pow2(n) == triton.next_power_of_2(n)


def test_routed_sends_each_modules_launch_through_the_wrapper_and_restores_it():
    """`routed` (benchmarks/count_flush.py, test_append's launch check) rebinds the `launch` each kernel module bound
    at import, never launch.py's own, and puts back the real one on leaving, also after an error."""
    from smartkv.kernels import triton_demote, triton_quant

    real = L.launch

    def wrapper(*a, **k):
        return None
    with L.routed(wrapper):
        assert triton_demote.launch is wrapper and triton_quant.launch is wrapper and L.launch is real
    assert triton_demote.launch is real and triton_quant.launch is real and L.launch is real
    with pytest.raises(RuntimeError), L.routed(wrapper):
        raise RuntimeError("inside")
    assert triton_demote.launch is real and L.launch is real
