"""The baselines a reviewer asks for, each against its paper's or library's definition: ZipCache (saliency,
salient split, CSTQuant, streaming), fp8 (e4m3 round trip, bytes) and transformers' QuantizedCache (same outputs
as the library's own cache, bytes of the backend's tensors)."""
from __future__ import annotations

import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.methods.fp8 import E4M3_MAX, fp8_dequantize, fp8_quantize
from smartkv.methods.zipcache import (attention_received, compress_block, decompress_block, pack_bits, probe_rows,
                                      unpack_bits, visible)
from smartkv.models import load_tiny

G = torch.Generator().manual_seed(0)


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


@pytest.fixture(scope="module")
def tiny():
    return load_tiny("tiny-llama", seed=0)


# ---- ZipCache: saliency ----------------------------------------------------------------------------------------

def test_normalised_saliency_is_mean_attention_over_the_queries_that_see_a_token():
    """With every query a probe, mass / seen equals the paper's definition computed from the full matrix:
    sum over queries p >= i of A[p, i] / (number of such p), per KV head (mean over its query heads)."""
    B, Hq, Hkv, T, D = 1, 4, 2, 12, 16
    q, k = _randn(B, Hq, T, D), _randn(B, Hkv, T, D)
    rows = torch.arange(T)
    mass, seen = attention_received(q, k, visible(None, rows, T, T, B), D ** -0.5)
    score = mass / seen[:, None].float()
    kr = k.repeat_interleave(Hq // Hkv, 1)
    logits = (q @ kr.transpose(-1, -2)) * D ** -0.5
    logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    A = logits.softmax(-1)                                                        # (B, Hq, T, T)
    for h in range(Hkv):
        heads = A[0, h * 2:(h + 1) * 2].mean(0)                                   # (T, T)
        for i in range(T):
            want = heads[i:, i].sum() / (T - i)
            assert score[0, h, i] == pytest.approx(want.item(), rel=1e-5)
    assert seen[0].tolist() == list(range(T, 0, -1))


def test_probes_are_half_recent_half_random_and_seeded():
    rows = probe_rows(200, 0.1, torch.Generator().manual_seed(1))
    assert len(rows) == 20 and rows[-10:].tolist() == list(range(190, 200))
    assert (rows[:10] < 190).all() and len(set(rows.tolist())) == 20
    assert torch.equal(rows, probe_rows(200, 0.1, torch.Generator().manual_seed(1)))
    assert not torch.equal(rows, probe_rows(200, 0.1, torch.Generator().manual_seed(2)))
    assert probe_rows(3, 0.1, torch.Generator()).tolist() == [2]          # at least one probe, the last query


def test_probe_rows_read_the_attention_mask_rows():
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 3, :2] = True
    allowed = visible(mask, torch.tensor([3]), 5, 5, 2)
    assert allowed.shape == (2, 1, 1, 5) and allowed[0, 0, 0].tolist() == [True, True, False, False, False]


# ---- ZipCache: the block format --------------------------------------------------------------------------------

def test_salient_tokens_get_the_high_bits():
    B, H, n, D = 2, 2, 40, 32
    k, v = _randn(B, H, n, D), _randn(B, H, n, D)
    scores = torch.rand(B, H, n, generator=G)
    block = compress_block(k, v, scores, 8, 2, 0.25)
    mask = unpack_bits(block.mask, n)
    assert mask.sum(-1).eq(10).all()                                             # round(0.25 * 40) per head
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, scores.topk(10, -1).indices, True))
    kk, vv = decompress_block(block, torch.float32)
    err_k, err_v = (kk - k).abs().amax(-1), (vv - v).abs().amax(-1)               # (B, H, n)
    assert err_k[mask].max() < 0.05 * err_k[~mask].min() * 8                     # 8-bit vs 2-bit
    assert err_v[mask].mean() < 0.05 * err_v[~mask].mean()


def test_keys_are_channel_wise_within_each_set():
    """One scale and zero per channel over the set's tokens: every key within half a step of that channel's range."""
    B, H, n, D = 1, 1, 16, 16
    k = _randn(B, H, n, D) * torch.linspace(0.1, 10, D)                           # channel outliers
    block = compress_block(k, _randn(B, H, n, D), torch.arange(n).float().expand(B, H, n), 4, 4, 0.5)
    kk, _ = decompress_block(block, torch.float32)
    mask = unpack_bits(block.mask, n)[0, 0]
    for sel in (mask, ~mask):
        x, y = k[0, 0, sel], kk[0, 0, sel]                                        # (n_set, D)
        step = (x.amax(0) - x.amin(0)) / 15
        assert ((x - y).abs() <= 0.5 * step * 1.01 + 1e-3).all()
    assert block.keys[0].scale.shape == (1, 1, 1, D)


def test_values_follow_the_reference_cstquant():
    """CSTQuant as ThisisBillhe/ZipCache computes it (channel scale sqrt(max |v|), then per-token min-max),
    one KV head so that per-token groups coincide: our reconstruction stays within one reference step of it."""
    n, D, bits = 24, 32, 4
    v = _randn(1, 1, n, D) * torch.linspace(0.2, 6, D)
    block = compress_block(_randn(1, 1, n, D), v, torch.zeros(1, 1, n), bits, bits, 1.0)
    _, ours = decompress_block(block, torch.float32)
    c = v.abs().amax(-2, keepdim=True).sqrt()                                     # the reference's channel_scale
    x = v / c
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    step = (mx - mn) / (2 ** bits - 1)
    ref = (torch.round((x - mn) / step) * step + mn) * c
    assert ((ours - v).abs() <= 0.5 * step * c * 1.01 + 1e-3).all()              # the round-trip bound
    assert ((ours - ref).abs() <= step * c * 1.01 + 1e-3).all()
    assert (ours - ref).abs().mean() < 0.05 * (step * c).mean()                   # same codes almost everywhere
    assert block.values[0].scale.shape == (1, 1, n, 1)


def test_bit_map_round_trip():
    m = torch.rand(3, 2, 19, generator=G) > 0.5
    assert torch.equal(unpack_bits(pack_bits(m), 19), m) and pack_bits(m).shape == (3, 2, 3)


# ---- ZipCache in a model ---------------------------------------------------------------------------------------

def test_streaming_compresses_every_gap_tokens(tiny):
    ids = torch.randint(3, 500, (1, 50), generator=G)
    cache = smartkv.make_cache("zipcache", tiny.model, streaming_gap=8, salient_ratio=0.5)
    with torch.inference_mode():
        tiny.model.generate(ids, **cache_kwargs(tiny.model, cache), max_new_tokens=30, do_sample=False)
    layer = cache.layers[0]
    assert [b.n for b in layer.blocks] == [50, 8, 8, 8] and len(layer.win_k) == 79 - 74
    for b in layer.blocks:
        assert unpack_bits(b.mask, b.n).sum(-1).eq(round(0.5 * b.n)).all()
    r = cache.memory_report()
    assert r.avg_bits == pytest.approx(3.0, abs=0.01)                             # half 4-bit, half 2-bit
    assert r.residual_bytes == 2 * len(cache.layers) * 2 * 5 * layer.head_dim * 2  # k+v, fp16 window of 5


def test_prompt_saliency_comes_from_the_attention_hook(tiny):
    """A prompt compressed with the attention observed differs from the no-query fallback (recency)."""
    ids = torch.randint(3, 500, (1, 64), generator=G)
    cache = smartkv.make_cache("zipcache", tiny.model, probe_ratio=1.0)
    with torch.inference_mode():
        tiny.model(ids, **cache_kwargs(tiny.model, cache), use_cache=True)
    hooked = unpack_bits(cache.layers[1].blocks[0].mask, 64)
    recency = torch.zeros_like(hooked)
    recency[..., -round(0.6 * 64):] = True
    assert not torch.equal(hooked, recency)


def test_zipcache_bad_parameters_name_them():
    for params, name in (({"high_bits": 5}, "high_bits"), ({"low_bits": 8}, "low_bits"),
                         ({"salient_ratio": 1.5}, "salient_ratio"), ({"probe_ratio": 0}, "probe_ratio"),
                         ({"streaming_gap": 0}, "streaming_gap")):
        with pytest.raises(ValueError, match=name):
            smartkv.make_config("zipcache", **params)


# ---- fp8 ----------------------------------------------------------------------------------------------------------

def test_fp8_round_trip_is_e4m3_accurate():
    x = _randn(2, 3, 50, 64, scale=5.0)
    codes, scale = fp8_quantize(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float16 and scale.shape == (2, 3, 50, 1)
    assert (x.abs().amax(-1, keepdim=True) / scale.float() <= E4M3_MAX).all()     # nothing clips
    y = fp8_dequantize(codes, scale, torch.float32)
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; absolute 2^-9 * scale below them
    assert ((y - x).abs() <= x.abs() * 2 ** -4 + scale.float() * 2 ** -9).all()


def test_fp8_bytes(tiny):
    cache = smartkv.make_cache("fp8", tiny.model)
    with torch.inference_mode():
        tiny.model(torch.randint(3, 500, (1, 40), generator=G), **cache_kwargs(tiny.model, cache), use_cache=True)
    r = cache.memory_report()
    D = cache.layers[0].head_dim
    assert r.payload_ratio == 0.5 and r.avg_bits == 8.0
    assert r.total_ratio == pytest.approx((8 + 16 / D) / 16)


# ---- transformers' QuantizedCache --------------------------------------------------------------------------------

BACKENDS = [b for b in ("quanto", "hqq") if b in smartkv.list_methods()]  # registered when installed


@pytest.mark.parametrize("backend", BACKENDS)
def test_generates_what_transformers_quantizedcache_generates(tiny, backend):
    from transformers import QuantizedCache

    ids = torch.randint(3, 500, (1, 70), generator=G)
    ours = smartkv.make_cache(backend, tiny.model, residual_length=16)
    with torch.inference_mode():
        out = tiny.model.generate(ids, **cache_kwargs(tiny.model, ours), max_new_tokens=40, do_sample=False)
        theirs = QuantizedCache(backend=backend, config=tiny.model.config, residual_length=16)
        ref = tiny.model.generate(ids, **cache_kwargs(tiny.model, theirs), max_new_tokens=40, do_sample=False)
    assert torch.equal(out, ref)
    r = ours.memory_report()
    assert r.avg_bits == 4.0 and r.residual_bytes > 0 and 0.25 < r.total_ratio < 0.6


@pytest.mark.skipif("quanto" not in BACKENDS, reason="optimum-quanto not installed (pip install smartkv[quanto])")
def test_quanto_bytes_are_the_backends_tensors(tiny):
    cache = smartkv.make_cache("quanto", tiny.model, nbits=2)
    with torch.inference_mode():
        tiny.model(torch.randint(3, 500, (1, 64), generator=G), **cache_kwargs(tiny.model, cache), use_cache=True)
    layer = cache.layers[0]
    qk = layer.inner._quantized_keys
    B, H, T, D = 1, layer.num_heads, 64, layer.head_dim
    assert qk._data._data.numel() == B * H * T * D * 2 // 8                       # 2-bit codes, packed
    lb = layer.layer_bytes()
    meta = sum(t.numel() * t.element_size() for q in (qk, layer.inner._quantized_values) for t in (q._scale, q._shift))
    assert lb.metadata == meta and lb.payload == 2 * B * H * T * D * 2 // 8 and lb.residual == 0


@pytest.mark.skipif("hqq" not in BACKENDS, reason="hqq not installed (pip install smartkv[hqq])")
def test_hqq_bytes_are_the_backends_tensors(tiny):
    cache = smartkv.make_cache("hqq", tiny.model, nbits=3)
    with torch.inference_mode():
        tiny.model(torch.randint(3, 500, (1, 64), generator=G), **cache_kwargs(tiny.model, cache), use_cache=True)
    layer = cache.layers[0]
    (codes, meta), (vcodes, vmeta) = layer.inner._quantized_keys, layer.inner._quantized_values
    lb = layer.layer_bytes()
    assert lb.payload == codes.numel() * codes.element_size() + vcodes.numel() * vcodes.element_size()
    assert lb.metadata == sum(m[k].numel() * m[k].element_size() for m in (meta, vmeta) for k in ("scale", "zero"))
    assert layer.layer_bytes().k_bits / layer.layer_bytes().k_elements == 3


def test_fp8_zipcache_always_registered():
    assert {"zipcache", "fp8"} <= set(smartkv.list_methods())


def test_a_grid_names_the_new_baselines(tmp_path):
    from smartkv.bench.spec.grid import GridError, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("name: b\nmodels: [tiny-llama]\nmethods:\n  zipcache: {salient_ratio: [0.4, 0.6]}\n  fp8: {}\n"
                    "prompt_sets:\n  prose-ppl: {length: 128, num_samples: 2, part: evaluation}\n")
    jobs = load_grid(grid).jobs
    assert sorted(j["method"]["label"] for j in jobs) == ["fp8", "zipcache", "zipcache(salient_ratio=0.4)"]
    assert {j["prompt_set"]["options"]["part"] for j in jobs} == {"evaluation"}
    grid.write_text(grid.read_text().replace("salient_ratio: [0.4, 0.6]", "salient_ratio: 2"))
    with pytest.raises(GridError, match="salient_ratio"):
        load_grid(grid)
