"""The fused decode path (Triton kernels, run here through Triton's CPU interpreter) gives what the reference path
(dequantize + SDPA) gives: same greedy tokens, per-step logits within fp16-operand accuracy, same bytes held;
growable buffers keep their contents; a padded batch and a model without the hook are handled."""

import pytest
import torch

pytest.importorskip("triton")  # tests/conftest.py puts Triton in its interpreter on machines without a GPU

import smartkv  # noqa: E402
from smartkv.cache.hf_compat import cache_kwargs  # noqa: E402
import smartkv.cache.layer as cache_mod  # noqa: E402
from smartkv.core.quant import quantize  # noqa: E402
from smartkv.cache import buffers as storage  # noqa: E402
from smartkv.cache.buffers import QBuffer, TokenBuffer  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fused vs reference logits, relative to the largest: fp16 operands on CUDA; the CPU interpreter measured 1.9e-4
LOGIT_BOUND = 5e-3 if DEV == "cuda" else 1e-3
# prompt lengths put a KIVI key-block flush and a value-window flush inside the first decode steps
CASES = {
    "int8": ("int8", {}, 24),
    "int4": ("int4", {}, 24),
    "kivi24": ("kivi", dict(residual_length=32), 31),
    "kivi2-g16": ("kivi", dict(key_bits=2, value_bits=2, group_size=16, residual_length=16), 47),
}


@pytest.fixture
def counted(monkeypatch):
    """Runs the kernels on CPU tensors; counts the fused attention calls."""
    monkeypatch.setattr(cache_mod, "FORCE_KERNELS", True)
    calls = []
    real = cache_mod.decode_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "decode_attention", counting)
    return calls


def _prompt(length, batch=1, seed=0):
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed)).to(DEV)


def _generate(model, method, params, ids, fused: bool, new_tokens=4, **kwargs):
    before = cache_mod.FORCE_KERNELS
    cache_mod.FORCE_KERNELS = fused or DEV == "cuda"
    try:  # restored after: a leaked True would send later tests' CPU caches through the (slow) interpreter
        cache = smartkv.make_cache(method, model, **params, use_kernels=fused or DEV != "cuda")
        with torch.inference_mode():
            out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True, **kwargs)
    finally:
        cache_mod.FORCE_KERNELS = before
    return out.sequences, torch.stack(out.scores), cache


@pytest.mark.parametrize("case", CASES)
def test_fused_decode_equals_reference(tiny_llama, counted, case):
    method, params, length = CASES[case]
    ids = _prompt(length)
    ref_tokens, ref_logits, ref_cache = _generate(tiny_llama, method, params, ids, fused=False)
    n_ref = len(counted)
    tokens, logits, cache = _generate(tiny_llama, method, params, ids, fused=True)
    assert n_ref == 0 and len(counted) == 3 * 2       # 3 decode steps x 2 layers, all fused
    assert torch.equal(tokens, ref_tokens)
    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert err < LOGIT_BOUND, err
    assert cache.memory_report() == ref_cache.memory_report()
    # layer 0's inputs are the embeddings, identical on both paths: the kernels stored the same bytes
    for a, b in zip(cache.layers[0].stored_kv(), ref_cache.layers[0].stored_kv(), strict=True):
        assert torch.equal(a, b)


def test_padded_batch_falls_back_inside_attention(tiny_llama, counted):
    ids = _prompt(24, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                         # left padding in the second row
    ids[1, :5] = 0
    ref_tokens, ref_logits, _ = _generate(tiny_llama, "int4", {}, ids, fused=False, new_tokens=3, attention_mask=mask)
    tokens, logits, _ = _generate(tiny_llama, "int4", {}, ids, fused=True, new_tokens=3, attention_mask=mask)
    assert not counted                                      # the mask sends every step to the reference path
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)


def test_model_without_the_hook_gets_a_clear_error(tiny_llama, counted):
    layer = smartkv.make_cache("int8", tiny_llama).layers[0]
    k = torch.randn(1, 2, 4, 32, device=DEV)
    layer.update(k, k)                                     # prefill: reference path
    layer.update(k[..., :1, :], k[..., :1, :])             # fused step; no attention call follows
    with pytest.raises(RuntimeError, match="'smartkv' attention"):
        layer.update(k[..., :1, :], k[..., :1, :])
    cache_mod._active.layer = None


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("axis", [-1, -2])
def test_buffer_growth_keeps_contents(kernels, axis, monkeypatch):
    monkeypatch.setattr(storage, "MIN_GROWTH", 8)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 2, 320, 32, generator=g) * 3).to(DEV)
    buf = QBuffer(4, 16, axis, 2, 2, 32, DEV, kernels=kernels)
    step = 1 if axis == -1 else 16
    chunks = [x[..., :48, :]] + list(x[..., 48:, :].split(step if kernels else 16, -2))
    caps = set()
    for c in chunks[:12 if kernels else None]:              # the interpreter is slow: a few appends suffice
        buf.append(c)
        caps.add(buf.capacity)
    n = buf.n
    ref = quantize(x[..., :n, :].float().cpu(), 4, 16, axis)
    got = buf.view()
    assert len(caps) > 1 or not kernels                    # it grew
    assert torch.equal(got.codes.cpu(), ref.codes) and torch.equal(got.scale.cpu(), ref.scale)
    assert torch.equal(got.zero.cpu(), ref.zero)
    assert buf.slack_bytes == (buf.q.nbytes - got.nbytes)


def test_sliding_window_buffer_keeps_contents():
    buf = TokenBuffer(1, 2, 8, torch.float16, DEV)
    buf.reserve(6)
    seen = []
    for t in range(20):
        x = torch.full((1, 2, 1, 8), float(t), dtype=torch.float16, device=DEV)
        buf.append(x)
        seen.append(t)
        if len(buf) > 4:
            buf.drop_front(1)
            seen.pop(0)
        assert buf.view()[0, 0, :, 0].tolist() == seen
    assert buf.data.shape[-2] == 6                          # slid back instead of growing


def test_reserve_preallocates_and_counts_slack_apart(tiny_llama):
    ids = _prompt(40)
    caches = []
    for reserve in (0, 1024):
        cache = smartkv.make_cache("kivi", tiny_llama, residual_length=32)
        if reserve:
            cache.reserve(reserve)
        with torch.inference_mode():
            tiny_llama(ids, **cache_kwargs(tiny_llama, cache), use_cache=True)
        caches.append(cache)
    assert caches[0].memory_report() == caches[1].memory_report()
    assert caches[1].slack_bytes() > caches[0].slack_bytes()
    assert caches[1].layers[0].qv.capacity == 1024


PER_TOKEN = dict(block_tokens=1, realloc="full", joint=False)   # a width per token and kind, all re-allocated
SMARTKV_CASES = {  # pools of 2..8 bits, keys and values at different widths, rotated and plain stored spaces
    "b2.5-gap1": dict(budget=2.5, key_value_gap=1, group_size=16, recent_window=8, realloc_every=4, **PER_TOKEN),
    "b4-rotate": dict(budget=4, rotate="both", group_size=32, recent_window=8, realloc_every=4, **PER_TOKEN),
    "b6-3bit": dict(budget=6, widths=(3, 8), recent_window=8, realloc_every=4, **PER_TOKEN),
    # blocks of 4 tokens, incremental re-allocation (a block's tokens sit next to each other in its pool)
    "b4.25-block4": dict(budget=4.25, key_value_gap=3, group_size=16, recent_window=8, realloc_every=4,
                         block_tokens=4, realloc="incremental", joint=False),
    "b2.5-block4-full": dict(budget=2.5, key_value_gap=1, group_size=16, recent_window=8, realloc_every=4,
                             block_tokens=4, realloc="full", joint=False),
}


def _record_specialisations(monkeypatch, module, names, keys: dict | None = None) -> dict:
    """Wraps Triton kernels `names` of `module` to record, per set of compile-time constants, the specialisations
    Triton would key a compiled kernel on (ints: value 1 and divisibility by 16, pointers: 16-byte alignment)."""
    import inspect

    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl")
    import triton.language as tl

    keys = {} if keys is None else keys
    for name in names:
        kernel = getattr(module, name)
        sig = inspect.signature(kernel.fn)
        constexpr = {p for p, v in sig.parameters.items() if v.annotation in (tl.constexpr, "tl.constexpr")}
        dns = getattr(kernel, "do_not_specialize", None)  # a JITFunction's (names or indices); the interpreter's:
        if dns is None:                                    # in the decorator's kwargs
            dns = kernel.kwargs.get("do_not_specialize")
        params = list(sig.parameters)
        dns = {params[p] if isinstance(p, int) else p for p in dns or []}

        class Recorder:
            def __getitem__(self, grid, kernel=kernel, sig=sig, constexpr=constexpr, dns=dns, name=name):
                def launch(*args, **kwargs):
                    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
                    consts = tuple((p, v) for p, v in bound.arguments.items() if p in constexpr)
                    spec = tuple((p, native_specialize_impl(BaseBackend, v, False, p not in dns, p not in dns)[1])
                                 for p, v in bound.arguments.items() if p not in constexpr)
                    keys.setdefault((name, consts), set()).add(spec)
                    return kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(module, name, Recorder())
    return keys


DECODE_KERNELS = (("triton_attn", ("_split_kernel", "_merge_kernel")),
                  ("triton_quant", ("_quant_tok_kernel", "_quant_chan_kernel")))


@pytest.mark.parametrize("method,params,kernels", [
    ("smartkv", dict(budget=4.25, key_value_gap=3, widths=(2, 4, 8), recent_window=8, realloc_every=4,
                     group_size=16, block_tokens=4, joint=False),
     (("triton_pool", ("_scores_kernel", "_values_kernel", "_positions_kernel")),)),
    ("int4", {}, DECODE_KERNELS),
    ("kivi", dict(key_bits=2, value_bits=2, group_size=16, residual_length=16), DECODE_KERNELS),
])
def test_decode_kernels_do_not_recompile_as_the_cache_grows(tiny_llama, monkeypatch, method, params, kernels):
    """Triton compiles a kernel per specialisation of its arguments. Over a generation that grows the cache
    (SmartKV re-allocating, KIVI flushing blocks), every launch with the same compile-time constants must have the
    same specialisation: sizes, offsets and pointers that move as the cache grows (e.g. a pool's first column of
    the positions buffer) are kept out of it, or a decode step could stop for a compilation mid-generation
    (seconds on a GPU)."""
    import importlib

    keys = {}
    for module, names in kernels:
        keys.update(_record_specialisations(monkeypatch, importlib.import_module(f"smartkv.kernels.{module}"),
                                            names, keys))
    _generate(tiny_llama, method, params, _prompt(53), fused=True, new_tokens=20)  # SmartKV without 3-bit pools: at
    launched = {name for name, _ in keys}                                   # head_dim 32 they take the torch path
    assert launched >= {names[0] for _, names in kernels}, launched
    for key, specs in keys.items():
        assert len(specs) == 1, (key[0], [{k: v for k, v in s if any(dict(o)[k] != v for o in specs)} for s in specs])


def test_an_empty_pool_keeps_the_pool_kernels_constants(monkeypatch):
    """A pool that empties or fills (a width unused for a while) passes the same compile-time constants: empty
    segments stay in the launch with placeholder pointers, so no second kernel is compiled."""
    import smartkv.kernels as kern
    from smartkv.kernels import triton_pool

    keys = _record_specialisations(monkeypatch, triton_pool, ("_scores_kernel", "_values_kernel"))
    monkeypatch.setattr(cache_mod, "FORCE_KERNELS", True)
    g = torch.Generator().manual_seed(1)
    B, Hkv, NG, D = 1, 2, 2, 64
    win = torch.randn(B, Hkv, 3, D, generator=g).half().to(DEV)
    for n2 in (0, 6):
        pools = [(quantize(torch.randn(B, Hkv, n, D, generator=g).to(DEV), b, 32), torch.arange(
            n, dtype=torch.int32, device=DEV).expand(B, Hkv, n) + off, 0) for b, n, off in ((2, n2, 0), (4, 5, n2))]
        T = n2 + 5 + 3
        logits = torch.zeros(B, Hkv * NG, T, device=DEV)
        q = torch.randn(B, Hkv * NG, D, generator=g).to(DEV)
        kern.pool_scores(q, pools, logits, 0.125, None, q, [(win[..., :0, :], 0), (win, n2 + 5)])
        kern.pool_values(torch.softmax(logits, -1), pools, [(win[..., :0, :], 0), (win, n2 + 5)])
    assert len(keys) == 2 and all(len(specs) == 1 for specs in keys.values()), keys


@pytest.mark.parametrize("case", SMARTKV_CASES)
def test_smartkv_two_pass_decode_equals_reference(tiny_llama, monkeypatch, case):
    """SmartKV's fused decode (scores over key pools, softmax, values over value pools) gives the reference
    path's tokens, logits and importance, and stores the same bytes; a re-allocation happens mid-decode."""
    from smartkv.methods.smartkv import attention as smartkv_mod  # the module whose pool_scores `attend` calls

    from smartkv.methods.smartkv import realloc as realloc_mod   # re-allocations quantize through the kernel

    calls, quantized = [], []
    real, real_q = smartkv_mod.pool_scores, realloc_mod.quantize_pack
    monkeypatch.setattr(smartkv_mod, "pool_scores",
                        lambda *a, **k: calls.extend(p.bits for p, _, _ in a[1] if p.codes.shape[-2]) or real(*a, **k))
    monkeypatch.setattr(realloc_mod, "quantize_pack", lambda *a, **k: quantized.append(a[1]) or real_q(*a, **k))
    params = SMARTKV_CASES[case]
    ids = _prompt(61)
    ref_tokens, ref_logits, ref_cache = _generate(tiny_llama, "smartkv", params, ids, fused=False, new_tokens=6)
    assert not calls and not quantized
    tokens, logits, cache = _generate(tiny_llama, "smartkv", params, ids, fused=True, new_tokens=6)
    widths = {b for layer in cache.layers for b in layer.pools["k"]} | {
        b for layer in cache.layers for b in layer.pools["v"]}
    assert len(widths) >= 2 and set(calls) <= widths and len(calls) >= 5 * 2   # every decode step, both layers
    assert set(quantized) <= widths and len(quantized) >= 2 * 2             # the prompt's allocation, both layers
    assert torch.equal(tokens, ref_tokens)
    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert err < LOGIT_BOUND, err
    assert cache.memory_report() == ref_cache.memory_report()
    for layer, ref in zip(cache.layers, ref_cache.layers, strict=True):
        assert layer.n_middle == ref.n_middle > 61 - 4 - 8 - 4
        for kind in ("k", "v"):
            assert torch.equal(layer.levels[kind], ref.levels[kind])
            assert layer.pools[kind].keys() == ref.pools[kind].keys()
            for b, pool in layer.pools[kind].items():       # the same bytes, quantized by the kernel or by torch
                assert all(torch.equal(getattr(pool, f).cpu(), getattr(ref.pools[kind][b], f).cpu())
                           for f in ("codes", "scale", "zero")), (kind, b)
        imp = (layer.importance.int() - ref.importance.int()).abs()
        assert imp.max() <= 1                                # 8-bit log codes of near-equal probabilities


JOINT_CASES = {  # joint=True re-allocating: class-major pools, read in one pass; rotated pools take two passes
    "b4.25-gap3": dict(budget=4.25, key_value_gap=3, group_size=16, recent_window=8, realloc_every=4, joint=True,
                       realloc="incremental"),
    "b2.4-block4": dict(budget=2.4, key_value_gap=1, group_size=16, recent_window=8, realloc_every=4, block_tokens=4,
                        joint=True),
    "b4-rotate": dict(budget=4, key_value_gap=2, rotate="both", group_size=32, recent_window=8, realloc_every=4,
                      joint=True),
}


@pytest.mark.parametrize("case", JOINT_CASES)
def test_smartkv_joint_decode_equals_reference(tiny_llama, monkeypatch, case):
    """joint=True: the one-pass step (decode_attention over [sinks, one segment a class, window], token
    probabilities folded through the classes' positions) and, with rotation, the two passes over class-major pools
    give the reference path's tokens, logits, stored bytes and importance; re-allocations happen mid-decode."""
    from smartkv.methods.smartkv import attention as two_pass_mod, onepass as one_pass_mod

    one, two = [], []
    real_one, real_two = one_pass_mod.decode_attention, two_pass_mod.pool_scores
    monkeypatch.setattr(one_pass_mod, "decode_attention", lambda *a, **k: one.append(len(a[1])) or real_one(*a, **k))
    monkeypatch.setattr(two_pass_mod, "pool_scores", lambda *a, **k: two.append(1) or real_two(*a, **k))
    params = JOINT_CASES[case]
    ids = _prompt(61)
    ref_tokens, ref_logits, ref_cache = _generate(tiny_llama, "smartkv", params, ids, fused=False, new_tokens=6)
    assert not one and not two
    tokens, logits, cache = _generate(tiny_llama, "smartkv", params, ids, fused=True, new_tokens=6)
    if "rotate" in case:
        assert not one and len(two) >= 5 * 2
    else:   # every decode step of both layers, over sinks, window and at least two classes
        assert not two and len(one) >= 5 * 2 and min(one) >= 4
    assert torch.equal(tokens, ref_tokens)
    err = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert err < LOGIT_BOUND, err
    assert cache.memory_report() == ref_cache.memory_report()
    for layer, ref in zip(cache.layers, ref_cache.layers, strict=True):
        assert layer._class_major and layer._classes == ref._classes
        for kind in ("k", "v"):
            assert torch.equal(layer.levels[kind], ref.levels[kind])
            assert torch.equal(layer._middle_part(kind), ref._middle_part(kind))
        imp = (layer.importance.int() - ref.importance.int()).abs()
        assert imp.max() <= 1                                # 8-bit log codes of near-equal probabilities


def test_one_pass_folds_each_class_at_its_positions():
    """The one-pass step's importance fold, alone: on a layer no query has seen yet (each fold's mean is that query's
    probability), one step gives the codes the two-pass step gives, token for token; folding the classes in their
    storage order instead of at their positions fails this."""
    import copy

    from smartkv.methods import make_cache

    g = torch.Generator().manual_seed(3)
    layer = make_cache("smartkv", num_layers=1, joint=True, budget=4.25, key_value_gap=3, group_size=16,
                       recent_window=8, realloc_every=4, realloc="incremental").layers[0]
    k, v = (torch.randn(2, 2, 300, 32, generator=g) * 2 for _ in range(2))
    layer.append(k, v)
    layer.importance = torch.randint(0, 120, layer.importance.shape, generator=g, dtype=torch.uint8)
    layer._flush()
    assert layer._one_pass() and len(layer._classes) >= 3
    layer.importance = torch.full_like(layer.importance, 255)   # unseen: the fold writes the probabilities
    layer.observed = layer.observed[:0]
    two = copy.deepcopy(layer)
    two._one_pass = lambda: False                                # the two passes over the same class-major pools
    q = torch.randn(2, 4, 1, 32, generator=g)
    out1, _ = layer._fused_decode(q, 32 ** -0.5, observe=True)
    out2, _ = two._fused_decode(q, 32 ** -0.5, observe=True)
    assert ((out1 - out2).norm() / out2.norm()).item() < 1e-3
    seen = layer.importance[..., layer.sink_k.shape[-2]:-layer.win_k.shape[-2]]
    assert (seen < 255).all() and seen.float().std() > 10        # every middle probability landed, all different
    assert (layer.importance.int() - two.importance.int()).abs().max() <= 1
    assert torch.equal(layer.observed, two.observed)
