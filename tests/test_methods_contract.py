"""One contract every registered method passes: builds from defaults, works as `past_key_values` the way
DynamicCache does (greedy, sampled, batch with padding, repeated forward calls, Llama and GPT-2), and reports
its memory consistently."""
import pytest
import torch
from transformers import DynamicCache

import smartkv
from smartkv.models import load_tiny

METHODS = smartkv.list_methods()
# small windows so that every method really quantizes within a short test prompt
SMALL = {"kivi": dict(residual_length=32), "smartkv": dict(budget=4, recent_window=8, realloc_every=8)}


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def tiny(request):
    return load_tiny(request.param, seed=0)


def _prompt(batch=1, length=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, length), generator=g)


def test_registry_names_are_stable():
    assert set(METHODS) == {"fp16", "int8", "int4", "kivi", "smartkv"}


@pytest.mark.parametrize("method", METHODS)
def test_builds_from_defaults_and_generates_greedy(tiny, method):
    ids = _prompt()
    cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
    out = tiny.model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert out.shape == (1, 80 + 24)
    assert cache.get_seq_length() == 80 + 23  # the last generated token is never fed back
    if method == "fp16":  # random tiny models are chaotic: only the reference is compared token for token
        ref = tiny.model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=24, do_sample=False)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("method", METHODS)
def test_sampled_generation_is_seeded(tiny, method):
    ids = _prompt(seed=1)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
        outs.append(tiny.model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=True,
                                        top_k=50, temperature=1.0))
    assert torch.equal(outs[0], outs[1])


def _decode_logits(model, cache, ids, mask, steps):
    """Prefill `ids`, then feed `steps` fixed tokens one at a time; logits of every step (B, steps + 1, V)."""
    def step(x, mask):  # positions from the mask, as generate() does (GPT-2 has absolute positions)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -x.shape[1]:]
        return model(x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits

    with torch.inference_mode():
        out = [step(ids, mask)[:, -1:]]
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], 1)
            out.append(step(torch.full((ids.shape[0], 1), 10 + t), mask))
    return torch.cat(out, 1)


@pytest.mark.parametrize("method", METHODS)
def test_batch_with_left_padding(tiny, method):
    """A left-padded row decodes like the same row alone (fp16 exactly), quantized methods stay close to fp16."""
    short, long = _prompt(length=60, seed=2), _prompt(length=72, seed=3)
    batch = torch.cat([torch.cat([torch.zeros(1, 12, dtype=torch.long), short], 1), long], 0)
    mask = torch.ones_like(batch)
    mask[0, :12] = 0
    params = SMALL.get(method, {})
    got = _decode_logits(tiny.model, smartkv.make_cache(method, tiny.model, **params), batch, mask, 20)
    ref = _decode_logits(tiny.model, smartkv.make_cache("fp16", tiny.model), batch, mask, 20)
    assert torch.isfinite(got).all()
    if method == "fp16":
        alone = _decode_logits(tiny.model, smartkv.make_cache("fp16", tiny.model), short,
                               torch.ones_like(short), 20)
        assert torch.allclose(got[0], alone[0], atol=1e-4)
    else:
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.5


@pytest.mark.parametrize("method", METHODS)
def test_repeated_forward_calls_read_the_cache(tiny, method):
    """Prefill in two chunks, then step token by token: logits stay close to one full-precision pass."""
    ids = _prompt(length=96, seed=4)
    with torch.inference_mode():
        ref = tiny.model(ids).logits
        cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
        parts = [tiny.model(ids[:, :40], past_key_values=cache, use_cache=True).logits,
                 tiny.model(ids[:, 40:64], past_key_values=cache, use_cache=True).logits]
        for t in range(64, 96):
            parts.append(tiny.model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    logits = torch.cat(parts, 1)
    assert cache.get_seq_length() == 96
    err = (logits - ref).abs().max().item()
    if method == "fp16":
        assert err < 1e-4
    else:
        assert err < 0.5 * ref.abs().max().item()
        assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5


@pytest.mark.parametrize("method", METHODS)
def test_memory_report_is_consistent(tiny, method):
    ids = _prompt(length=100, seed=5)
    cache = smartkv.make_cache(method, tiny.model, **SMALL.get(method, {}))
    with torch.inference_mode():
        tiny.model(ids, past_key_values=cache, use_cache=True)
    r = cache.memory_report()
    shape = smartkv.models.model_kv_shape(tiny.model)
    assert r.tokens == 100
    assert r.fp16_bytes == 2 * 2 * shape["num_layers"] * shape["num_kv_heads"] * shape["head_dim"] * 100
    assert r.total_bytes == r.payload_bytes + r.metadata_bytes + r.residual_bytes
    assert r.total_ratio == pytest.approx(r.total_bytes / r.fp16_bytes)
    assert r.payload_ratio == pytest.approx(r.avg_bits / 16)
    per_layer = sum(d["payload"] + d["metadata"] + d["residual"] for d in r.per_layer)
    assert per_layer == r.total_bytes
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
