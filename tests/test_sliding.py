"""Hybrid attention (Gemma 3's shape at a 16-token window, random weights): on sliding-window layers every method
holds what DynamicCache holds, `fp16` equals DynamicCache exactly past the window, memory reports compare with
DynamicCache's bytes, and `sliding_layers` says how a method spends memory there."""
import pytest
import torch
from transformers import DynamicCache

import smartkv
from smartkv import cache_kwargs
from smartkv.models import load_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = smartkv.list_methods()
WINDOW = 16
# small windows so that every method really quantizes, re-allocates and forgets within a short test
SMALL = {"kivi": dict(residual_length=8, group_size=8), "smartkv": dict(budget=4, recent_window=4, realloc_every=4),
         "zipcache": dict(streaming_gap=8), "quanto": dict(residual_length=8), "hqq": dict(residual_length=8)}


@pytest.fixture(scope="module")
def gemma():
    return load_tiny("tiny-gemma3", seed=0).model


def _ids(length, seed=0):
    return torch.randint(3, 500, (1, length), generator=torch.Generator().manual_seed(seed))


def _run(model, cache, ids, chunks, steps, on_step=None):
    """Prefill `ids` in `chunks` (lengths), then feed `steps` fixed tokens one at a time; all logits (1, T, V)."""
    out, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(ids[:, start:start + n], **cache_kwargs(model, cache), use_cache=True).logits)
            start += n
            if on_step:
                on_step(cache)
        for t in range(steps):
            out.append(model(torch.tensor([[10 + t]]), **cache_kwargs(model, cache), use_cache=True).logits)
            if on_step:
                on_step(cache)
    return torch.cat(out, 1)


def _nbytes(t):
    return t.numel() * t.element_size()


def test_windows_come_from_the_model(gemma):
    cache = smartkv.make_cache("int4", gemma)
    assert [layer.sliding_window for layer in cache.layers] == [WINDOW] * 5 + [None]
    assert cache.is_sliding == [True] * 5 + [False]


def test_fp16_equals_dynamic_cache_past_the_window(gemma):
    """Generation and the logits of a chunked prefill (chunks longer than the window among them) and of decode
    steps are exactly DynamicCache's, 4x past the window."""
    ids = _ids(50)
    with torch.inference_mode():
        kw = dict(max_new_tokens=24, do_sample=False)
        ref = gemma.generate(ids, **cache_kwargs(gemma, DynamicCache(config=gemma.config)), **kw)
        got = gemma.generate(ids, **cache_kwargs(gemma, smartkv.make_cache("fp16", gemma)), **kw)
    assert torch.equal(got, ref)
    ref_logits = _run(gemma, DynamicCache(config=gemma.config), ids, (20, 7, 23), 20)
    cache = smartkv.make_cache("fp16", gemma)
    assert torch.equal(_run(gemma, cache, ids, (20, 7, 23), 20), ref_logits)
    assert [layer.held for layer in cache.layers] == [WINDOW - 1] * 5 + [70]


@pytest.mark.parametrize("method", METHODS)
def test_sliding_layers_hold_the_window_and_no_more_bytes(gemma, method):
    """At every call, each sliding layer holds at most window - 1 (+ the method's eviction lag) tokens, and no
    more bytes than DynamicCache's layer holds for that many; full layers hold everything. Output stays close to
    fp16's (the window is attended as DynamicCache attends it)."""
    ids = _ids(48, seed=1)
    dyn = DynamicCache(config=gemma.config)
    _run(gemma, dyn, ids, (48,), 40)
    cache = smartkv.make_cache(method, gemma, **SMALL.get(method, {}))
    seen = []

    def check(c):
        for layer in c.layers[:5]:
            assert layer.held <= WINDOW - 1 + layer.eviction_lag
            seen.append(layer.held)
        assert c.layers[5].held == c.get_seq_length()

    logits = _run(gemma, cache, ids, (48,), 40, on_step=check)
    assert max(seen) >= WINDOW - 1   # the window did fill
    ref = _run(gemma, smartkv.make_cache("fp16", gemma), ids, (48,), 40)
    assert torch.isfinite(logits).all()
    assert (logits - ref).norm() / ref.norm() < 0.5
    per_token = {i: (_nbytes(dyn.layers[i].keys) + _nbytes(dyn.layers[i].values)) / (WINDOW - 1) for i in range(5)}
    for i, layer_bytes in enumerate(cache.memory_report().per_layer[:5]):
        held = layer_bytes["payload"] + layer_bytes["metadata"] + layer_bytes["residual"]
        assert held <= per_token[i] * (WINDOW - 1 + cache.layers[i].eviction_lag)


@pytest.mark.parametrize("method", METHODS)
def test_sliding_bytes_do_not_grow_with_the_sequence(gemma, method):
    """Sliding layers' bytes after 8 windows of tokens are what they were after 4 (the same point of the
    method's cycle); the full layer's grow."""
    cache = smartkv.make_cache(method, gemma, **SMALL.get(method, {}))
    sizes = []
    _run(gemma, cache, _ids(32, seed=2), (32,), 8 * WINDOW - 32,
         on_step=lambda c: sizes.append([d["payload"] + d["metadata"] + d["residual"]
                                         for d in c.memory_report().per_layer]))
    # sizes[j]: after 32 + j tokens; two spans of 2 windows, each a multiple of every period in SMALL
    early, late = sizes[2 * WINDOW:4 * WINDOW], sizes[4 * WINDOW:6 * WINDOW]
    slack = 1.02 if method == "smartkv" else 1.0   # its width counts follow the tokens' weights: near, not equal
    for i in range(5):
        assert max(s[i] for s in late) <= slack * max(s[i] for s in early), (method, i)
    assert sizes[-1][5] > sizes[4 * WINDOW][5]


def test_memory_report_compares_with_dynamic_cache():
    """fp16_bytes is DynamicCache's bytes at 16 bits for the same tokens (in a bf16 model, exactly its nbytes);
    the fp16 method holds exactly that; a quantized one less."""
    model = load_tiny("tiny-gemma3", seed=0, dtype=torch.bfloat16).model
    ids = _ids(40, seed=3)
    dyn = DynamicCache(config=model.config)
    _run(model, dyn, ids, (40,), 9)
    dyn_bytes = sum(_nbytes(layer.keys) + _nbytes(layer.values) for layer in dyn.layers)
    full_length = 2 * 2 * 6 * 256 * 49   # what a full-length cache on every layer would hold
    for method, exact in (("fp16", True), ("int4", False)):
        cache = smartkv.make_cache(method, model)
        _run(model, cache, ids, (40,), 9)
        report = cache.memory_report()
        assert report.fp16_bytes == dyn_bytes < full_length
        assert (report.total_bytes == dyn_bytes) if exact else (report.total_bytes < 0.4 * dyn_bytes)


def test_sliding_layers_fp16_keeps_them_as_dynamic_cache(gemma):
    """sliding_layers="fp16": the sliding layers are DynamicCache's (same tensors), the budget goes to the full
    layer only; the default quantizes them like the others."""
    ids = _ids(40, seed=4)
    dyn = DynamicCache(config=gemma.config)
    _run(gemma, dyn, ids, (40,), 6)
    split = smartkv.make_cache("int4", gemma, sliding_layers="fp16")
    _run(gemma, split, ids, (40,), 6)
    quantized = smartkv.make_cache("int4", gemma)
    _run(gemma, quantized, ids, (40,), 6)
    for i in range(5):
        k, v = split.stored_kv(i)
        assert torch.equal(k, dyn.layers[i].keys) and torch.equal(v, dyn.layers[i].values)
    total = lambda c, i: sum(c.memory_report().per_layer[i][x] for x in ("payload", "metadata", "residual"))  # noqa
    assert total(split, 5) == total(quantized, 5)
    assert all(total(quantized, i) < 0.4 * total(split, i) for i in range(5))
    assert split.method_config.label() == "int4(sliding_layers=fp16)"


def test_static_steps_refuse_sliding_layers(gemma):
    cache = smartkv.make_cache("fp16", gemma)
    assert "sliding-window layers" in cache.static_problem()


def test_a_bad_window_is_refused():
    layer = smartkv.make_config("int4").build_layer(0)
    with pytest.raises(ValueError, match="sliding_window"):
        layer.set_sliding_window(1)


def test_attention_analysis_reads_a_hybrid_model(gemma):
    """smartkv.analysis on one KV head and sliding layers: each layer's attention at its own positions, SmartKV's
    bits right-aligned (NaN where a sliding layer forgot the middle), every statistic finite."""
    from smartkv.analysis import analyze_attention, summary_table
    from smartkv.models import TinyTokenizer

    res = analyze_attention(gemma, TinyTokenizer(), ctx=40, decode=8, smartkv_params=SMALL["smartkv"])
    assert res.windows == [WINDOW] * 5 + [None]
    assert res.entropy_bits.shape == (6, 4) and torch.isfinite(res.entropy_bits).all()
    assert res.sink_share[:5].max() == 0 < res.sink_share[5].min()   # the sinks left every window
    assert res.bits_k[:5].isnan().any() and not res.bits_k[5].isnan().any()
    assert "nan" not in summary_table(res)


def test_smartkv_blocks_on_a_hybrid_model(gemma):
    """`block_tokens` applies to full-attention layers (one width per block there); sliding layers forget token by
    token at the window's edge, so they keep per-token widths: a prompt and decode steps far past the
    window run, the sliding layers hold the window, the full layer's widths come in whole blocks."""
    ids = _ids(61, seed=2)
    cache = smartkv.make_cache("smartkv", gemma, budget=4, recent_window=4, realloc_every=4, block_tokens=4)
    logits = _run(gemma, cache, ids, (37, 24), 23)
    assert torch.isfinite(logits).all()
    full = cache.layers[-1]
    assert full.sliding_window is None and full.block_tokens == 4 and full.n_middle % 4 == 0
    for kind in ("k", "v"):
        bits = full.level_bits(kind)
        assert (bits.reshape(*bits.shape[:2], -1, 4) == bits[..., ::4, None]).all()
    for layer in cache.layers[:-1]:
        assert layer.block_tokens == 1 and layer.held <= WINDOW - 1 + layer.eviction_lag
