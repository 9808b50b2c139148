"""One contract every registered method passes: builds from defaults, works as `past_key_values` the way
DynamicCache does (greedy, sampled, batch with padding, repeated forward calls, Llama and GPT-2), stores keys and
values within half a quantization step of the exact ones, decodes what dequantize-then-SDPA over its stored tokens
gives, stays within its measured error of fp16, and reports the bytes of the tensors it really holds.

Error bounds are 3x the error measured on these seeded tiny models (CPU, fp32); a quantized method must also stay
above a third of it, so a cache that stops quantizing (or is not read) fails too. A new method adds its measured
errors to the tables (the failure says which)."""
import pytest
import torch
from transformers import DynamicCache

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.models import load_tiny

METHODS = smartkv.list_methods()
# small windows so that every method really quantizes within a short test prompt
SMALL = {"kivi": dict(residual_length=32), "smartkv": dict(budget=4, recent_window=8, realloc_every=8),
         "zipcache": dict(streaming_gap=8), "quanto": dict(residual_length=16), "hqq": dict(residual_length=16)}

# ||logits - fp16 logits|| / ||fp16 logits|| over a left-padded batch's 21 decode positions (test_batch_with_left_padding)
PADDED_REL = {"tiny-llama": {"int8": 0.0015, "int4": 0.027, "kivi": 0.022, "smartkv": 0.055, "zipcache": 0.072,
                             "fp8": 0.0088, "quanto": 0.029, "hqq": 0.030},
              "tiny-gpt2": {"int8": 0.00054, "int4": 0.011, "kivi": 0.0083, "smartkv": 0.020, "zipcache": 0.027,
                            "fp8": 0.0030, "quanto": 0.011, "hqq": 0.011}}
# the same against one full-precision pass, over chunked prefills and decode steps (test_repeated_forward_calls...)
CHUNKED_REL = {"tiny-llama": {"int8": 0.0016, "int4": 0.027, "kivi": 0.017, "smartkv": 0.041, "zipcache": 0.060,
                              "fp8": 0.0070, "quanto": 0.029, "hqq": 0.024},
               "tiny-gpt2": {"int8": 0.00048, "int4": 0.0078, "kivi": 0.0049, "smartkv": 0.014, "zipcache": 0.025,
                             "fp8": 0.0023, "quanto": 0.0077, "hqq": 0.0079}}
# of those 96 positions, how many change their argmax
CHUNKED_FLIPS = {"tiny-llama": {"int8": 0, "int4": 3, "kivi": 1, "smartkv": 9, "zipcache": 5, "fp8": 2, "quanto": 2,
                                "hqq": 4},
                 "tiny-gpt2": {"int8": 0, "int4": 0, "kivi": 0, "smartkv": 0, "zipcache": 0, "fp8": 0, "quanto": 0,
                               "hqq": 0}}
# Layouts this module does not restate: their stored values and bytes are checked against their paper's or
# library's computation in tests/test_baselines.py (named here)
OWN_LAYOUT_TESTS = {"zipcache": "test_keys_are_channel_wise_within_each_set, test_values_follow_the_reference_cstquant",
                    "quanto": "test_generates_what_transformers_quantizedcache_generates",
                    "hqq": "test_generates_what_transformers_quantizedcache_generates"}
# backends whose tensors live in objects of their own library (the walker follows smartkv objects only)
OWN_BYTES_TESTS = {"quanto": "test_quanto_bytes_are_the_backends_tensors",
                   "hqq": "test_hqq_bytes_are_the_backends_tensors"}


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    return load_tiny(request.param, seed=0)


def _prompt(batch=1, length=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, length), generator=g)


def _measured(table: dict, model: str, method: str):
    if method not in table[model]:
        pytest.fail(f"no measured error for {method!r} on {model}: measure it and add it to this module's tables")
    return table[model][method]


def _within_measured(err: float, table: dict, model: str, method: str) -> None:
    expect = _measured(table, model, method)
    assert expect / 3 <= err <= 3 * expect, f"{method} on {model}: {err:.5f}, measured {expect}"


def test_registry_names_are_stable():
    optional = {"quanto", "hqq"}  # registered only where their backend package is installed
    assert set(METHODS) - optional == {"fp16", "int8", "int4", "kivi", "smartkv", "zipcache", "fp8"}


@pytest.mark.parametrize("method", METHODS)
def test_builds_from_defaults_and_generates_greedy(tiny, method):
    ids = _prompt()
    cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
    out = tiny.model.generate(ids, **cache_kwargs(tiny.model, cache), max_new_tokens=24, do_sample=False)
    assert out.shape == (1, 80 + 24)
    assert cache.get_seq_length() == 80 + 23  # the last generated token is never fed back
    if method == "fp16":  # random tiny models are chaotic: only the reference is compared token for token
        ref = tiny.model.generate(ids, **cache_kwargs(tiny.model, DynamicCache()), max_new_tokens=24, do_sample=False)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_sampled_generation_is_seeded(tiny, method):
    ids = _prompt(seed=1)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
        outs.append(tiny.model.generate(ids, **cache_kwargs(tiny.model, cache), max_new_tokens=16, do_sample=True,
                                        top_k=50, temperature=1.0))
    assert torch.equal(outs[0], outs[1])


def _decode_logits(model, cache, ids, mask, steps):
    """Prefill `ids`, then feed `steps` fixed tokens one at a time; logits of every step (B, steps + 1, V)."""
    def step(x, mask):  # positions from the mask, as generate() does (GPT-2 has absolute positions)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -x.shape[1]:]
        return model(x, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache), use_cache=True).logits

    with torch.inference_mode():
        out = [step(ids, mask)[:, -1:]]
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            out.append(step(torch.full((ids.shape[0], 1), 10 + t), mask))
    return torch.cat(out, 1)


@pytest.mark.parametrize("method", METHODS)
def test_batch_with_left_padding(tiny, method):
    """A left-padded row decodes like the same row alone (fp16 exactly); quantized methods stay within their
    measured error of fp16."""
    short, long = _prompt(length=60, seed=2), _prompt(length=72, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1), long], 0)
    mask = torch.ones_like(batch)
    mask[0, :12] = 0
    params = SMALL.get(method, {})
    got = _decode_logits(tiny.model, smartkv.make_cache(method, tiny.model, **params), batch, mask, 20)
    ref = _decode_logits(tiny.model, smartkv.make_cache("fp16", tiny.model), batch, mask, 20)
    if method == "fp16":
        alone = _decode_logits(tiny.model, smartkv.make_cache("fp16", tiny.model), short,
                               torch.ones_like(short), 20)
        assert torch.allclose(got[0], alone[0], atol=1e-4)
    else:
        _within_measured(((got - ref).norm() / ref.norm()).item(), PADDED_REL, tiny.name, method)


@pytest.mark.parametrize("method", METHODS)
def test_repeated_forward_calls_read_the_cache(tiny, method):
    """Prefill in two chunks, then step token by token: logits within the method's measured error of one
    full-precision pass, and the argmax moves at no more positions than measured."""
    ids = _prompt(length=96, seed=4)
    with torch.inference_mode():
        ref = tiny.model(ids).logits
        cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
        parts = [tiny.model(ids[:, :40], **cache_kwargs(tiny.model, cache), use_cache=True).logits,
                 tiny.model(ids[:, 40:64], **cache_kwargs(tiny.model, cache), use_cache=True).logits]
        for t in range(64, 96):
            parts.append(tiny.model(ids[:, t:t + 1], **cache_kwargs(tiny.model, cache), use_cache=True).logits)
    logits = torch.cat(parts, 1)
    assert cache.get_seq_length() == 96
    if method == "fp16":
        assert (logits - ref).abs().max().item() < 1e-4
        return
    _within_measured(((logits - ref).norm() / ref.norm()).item(), CHUNKED_REL, tiny.name, method)
    flips = int((logits.argmax(-1) != ref.argmax(-1)).sum())
    assert flips <= 3 * _measured(CHUNKED_FLIPS, tiny.name, method) + 1, flips


def _half_steps(x: torch.Tensor, bits, group: int, axis: int = -1) -> torch.Tensor:
    """Half the min-max quantization step of each element of x (..., T, D) in groups of `group` channels (axis -1)
    or tokens (axis -2); `bits` an int or per-token widths (..., T)."""
    x = x.float()
    if axis == -2:
        return _half_steps(x.transpose(-1, -2), bits, group).transpose(-1, -2)
    g = x.unflatten(-1, (-1, group))
    levels = 2.0 ** (bits if isinstance(bits, int) else bits.float()[..., None, None]) - 1
    return ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / levels / 2).expand_as(g).flatten(-2)


def _layout_half_steps(method: str, config, layer, k: torch.Tensor, v: torch.Tensor):
    """Half a quantization step of every stored key and value after one prompt of exact keys k and values v
    (B, H, T, D), from each method's documented layout; 0 where a token is kept in full precision."""
    T, D = k.shape[-2:]
    hk, hv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    if method == "fp16":
        return hk, hv
    if method == "fp8":  # e4m3 codes of x / s, s = amax over (token, head) / 448: half an ulp is 2^-4 of a normal
        # value (3 mantissa bits) and 2^-10 * s below 2^-6 * s (subnormals)
        return tuple(x.abs().float() * 2 ** -4 + x.abs().amax(-1, keepdim=True).float() / 448 * 2 ** -10
                     for x in (k, v))
    G = min(config.group_size, D)
    if method in ("int8", "int4"):
        return _half_steps(k, config.bits, G), _half_steps(v, config.bits, G)
    if method == "kivi":  # keys per channel in whole blocks of R tokens, values per token but the last R
        R = config.residual_length
        n_k, n_v = T // R * R, max(T - R, 0)
        hk[..., :n_k, :] = _half_steps(k[..., :n_k, :], config.key_bits, G, axis=-2)
        hv[..., :n_v, :] = _half_steps(v[..., :n_v, :], config.value_bits, G)
        return hk, hv
    if method == "smartkv":  # sinks, then the middle at per-token widths (one per block), then the recent window
        assert config.rotate == "none"
        sinks = min(config.sink_tokens, T)
        n = T - sinks - config.recent_window   # the middle: whole blocks, within half the window of n
        assert layer.n_middle % config.block_tokens == 0
        assert abs(layer.n_middle - n) < config.block_tokens or layer.n_middle == 0 < max(config.realloc_every,
                                                                                           config.block_tokens) - n
        mid = slice(sinks, sinks + layer.n_middle)
        mu, scale = layer.k_mu.float(), layer.k_scale.float()     # keys are normalised per channel, then quantized
        hk[..., mid, :] = _half_steps((k[..., mid, :] - mu) / scale, layer.level_bits("k"), G) * scale
        hv[..., mid, :] = _half_steps(v[..., mid, :], layer.level_bits("v"), G)
        return hk, hv
    pytest.fail(f"no quantization layout for {method!r}: describe it in _layout_half_steps")


@pytest.mark.parametrize("method", METHODS)
def test_stored_values_are_within_half_a_step(tiny, method):
    """After a prompt, every stored key and value is within half a quantization step of the exact one (the fp16
    cache's), at the positions, groups and widths the method's layout puts it. Measured worst: 1.0009 half steps;
    the slack is the fp16 rounding of scales (2^-10 of a step) and of full-precision windows (2^-11 of a value)."""
    if method in OWN_LAYOUT_TESTS:
        pytest.skip(f"{method}'s stored values are checked in tests/test_baselines.py: {OWN_LAYOUT_TESTS[method]}")
    ids = _prompt(batch=2, length=100, seed=5)
    caches = {m: smartkv.make_cache(m, tiny.model, **SMALL.get(m, {})) for m in ("fp16", method)}
    with torch.inference_mode():
        for cache in caches.values():
            tiny.model(ids, **cache_kwargs(tiny.model, cache), use_cache=True)
    cache = caches[method]
    for i, layer in enumerate(cache.layers):
        exact, stored = caches["fp16"].stored_kv(i), cache.stored_kv(i)
        steps = _layout_half_steps(method, cache.method_config, layer, *exact)
        for x, y, half in zip(exact, stored, steps):
            x, y = x.float(), y.float()
            err = (y - x).abs()
            assert (err <= half * (1 + 2 ** -9) + x.abs() * 2 ** -10 + 1e-6 * x.abs().max()).all(), \
                f"layer {i}: {(err / half.clamp_min(1e-12)).max():.3f} half steps"
            if method != "fp16":
                assert (half > 0).any() and err.max() > 0.2 * half.max()   # it did quantize


@pytest.mark.parametrize("method", METHODS)
def test_decode_equals_dequantize_then_sdpa(tiny, method):
    """Each decode step gives the logits the model gives over a DynamicCache holding the method's stored keys and
    values, dequantized, across KIVI's key-block flush (64 tokens) and SmartKV's re-allocations. Measured worst:
    3.7e-7 of the largest logit (SmartKV's own decode attention; 0 for the methods that return SDPA's)."""
    ids = _prompt(batch=2, length=60, seed=6)
    cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
    worst = 0.0
    with torch.inference_mode():
        tiny.model(ids, **cache_kwargs(tiny.model, cache), use_cache=True)
        for t in range(12):
            ref_cache = DynamicCache()
            for i in range(len(cache.layers)):
                ref_cache.update(*(x.clone() for x in cache.stored_kv(i)), i)
            x = torch.full((2, 1), 20 + t)
            got = tiny.model(x, **cache_kwargs(tiny.model, cache), use_cache=True).logits
            ref = tiny.model(x, **cache_kwargs(tiny.model, ref_cache), use_cache=True).logits
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    assert cache.get_seq_length() == 72
    assert worst < 2e-6, worst


@pytest.mark.parametrize("when", ["prompt", "decode"])
@pytest.mark.parametrize("method", METHODS)
def test_memory_report_counts_the_bytes_held(tiny, method, when, held):
    """total_bytes + slack_bytes() is every byte of every tensor the cache holds (found by walking its objects,
    not listed by hand), after a prompt and after decode steps."""
    if method in OWN_BYTES_TESTS:
        pytest.skip(f"{method}'s bytes are checked in tests/test_baselines.py: {OWN_BYTES_TESTS[method]}")
    ids = _prompt(batch=2, length=100, seed=5)
    cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
    with torch.inference_mode():
        tiny.model(ids, **cache_kwargs(tiny.model, cache), use_cache=True)
        for t in range(20 if when == "decode" else 0):
            tiny.model(torch.full((2, 1), 30 + t), **cache_kwargs(tiny.model, cache), use_cache=True)
    r = cache.memory_report()
    tensors = held(cache)
    assert sum(tensors.values()) == r.total_bytes + cache.slack_bytes(), tensors
    shape = smartkv.models.model_kv_shape(tiny.model)
    assert r.tokens == ids.shape[1] + (20 if when == "decode" else 0)
    assert r.fp16_bytes == 2 * 2 * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * r.tokens
    if method != "fp16":
        assert r.total_ratio < 1.0 and r.metadata_bytes > 0


@pytest.mark.parametrize("method,params,name", [
    ("int4", {"group_size": 33}, "group_size"),
    ("int8", {"bits": 4}, "bits"),
    ("kivi", {"key_bits": 3}, "key_bits"),
    ("kivi", {"residual_length": 40}, "residual_length"),
    ("kivi", {"residual_lenght": 32}, "residual_length"),   # did-you-mean
    ("smartkv", {"budget": 0}, "budget"),
    ("smartkv", {"budget": 9}, "budget"),
    ("smartkv", {"budget": "four"}, "budget"),
    ("smartkv", {"widths": [2, 5]}, "widths"),
    ("smartkv", {"sink_tokens": -1}, "sink_tokens"),
    ("int4", {"sliding_layers": "bf16"}, "sliding_layers"),
])
def test_bad_parameters_name_the_parameter(method, params, name):
    with pytest.raises(ValueError, match=name):
        smartkv.make_config(method, **params)


def test_unknown_method_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'kivi'"):
        smartkv.make_config("kiwi")
