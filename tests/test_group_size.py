"""One rule for group_size in every quantizing method: larger than head_dim is clamped to head_dim (one group per
token and head), a group that does not divide head_dim is an error naming both."""
import pytest
import torch

import smartkv
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.models import load_tiny

METHODS = {"int8": {}, "int4": {}, "kivi": {"residual_length": 128}, "smartkv": {}}


def _run(model, method, **params):
    cache = smartkv.make_cache(method, model, **params)
    ids = torch.arange(3, 163).unsqueeze(0)  # 160 tokens: past KIVI's residual window, so keys are quantized
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache)).logits
        logits = model(torch.tensor([[7]]), **cache_kwargs(model, cache)).logits
    return cache, logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_oversized_group_is_clamped_to_head_dim(method):
    model = load_tiny("tiny-llama", seed=0, device="cpu").model  # head_dim 32
    big, big_logits = _run(model, method, group_size=128, **METHODS[method])
    fit, fit_logits = _run(model, method, group_size=32, **METHODS[method])
    assert all(layer.group == 32 for layer in big.layers)
    assert big.memory_report().total_bytes == fit.memory_report().total_bytes
    torch.testing.assert_close(big_logits, fit_logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_group_that_does_not_divide_head_dim_is_an_error(method):
    model = load_tiny("tiny-llama", seed=0, device="cpu", hidden_size=192).model  # 4 heads: head_dim 48
    with pytest.raises(ValueError, match=r"group_size must divide head_dim \(48\) or exceed it, got 32"):
        _run(model, method, group_size=32, **METHODS[method])
