"""The cache keyword: `cache=` or `past_key_values=`, whichever the installed transformers' models take, chosen in
one place (smartkv.cache.hf_compat.cache_kwargs). pyproject turns transformers' FutureWarning about
`past_key_values` into an error, so any call that still used the old name fails here and everywhere else."""
from __future__ import annotations

import inspect
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import smartkv
from smartkv.bench.run.generation import decode
from smartkv.cache.hf_compat import cache_arg, cache_kwargs
from smartkv.models import load_tiny

ROOT = Path(__file__).resolve().parents[1]


class _OldModel(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=None):
        return past_key_values


class _NewModel(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
        return cache


def test_the_keyword_follows_the_model_signature():
    assert cache_kwargs(_OldModel(), "c") == {"past_key_values": "c"}
    assert cache_kwargs(_NewModel(), "c") == {"cache": "c"}
    for kind in ("tiny-llama", "tiny-gpt2"):
        model = load_tiny(kind).model
        params = inspect.signature(type(model).forward).parameters
        assert cache_arg(model) in params
        assert cache_arg(model) == ("cache" if "cache" in params else "past_key_values")


def test_forward_generate_and_the_runner_never_use_a_deprecated_name():
    tiny = load_tiny("tiny-llama")
    ids = torch.randint(3, 200, (1, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = smartkv.make_cache("int4", tiny.model)
        with torch.inference_mode():
            tiny.model(ids, **cache_kwargs(tiny.model, cache), use_cache=True)
            tiny.model.generate(ids, **cache_kwargs(tiny.model, smartkv.make_cache("kivi", tiny.model)),
                                max_new_tokens=3, do_sample=False)
        decode(tiny.model, ids[0].tolist(), smartkv.make_cache("fp16", tiny.model), 3)
    deprecated = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert deprecated == []


def test_no_source_names_the_old_keyword_in_a_call():
    """Every call goes through cache_kwargs, so a transformers that drops `past_key_values` breaks nothing."""
    offenders = []
    for folder in ("smartkv", "benchmarks", "tests", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("hf_compat.py", Path(__file__).name):
                continue
            text = path.read_text()
            for hit in re.finditer(r"[(,]\s*past_key_values\s*=", text):  # a keyword argument, not prose
                offenders.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, hit.end()) + 1}")
    assert offenders == []


def test_pytest_config_fails_on_the_deprecation_instead_of_hiding_it():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    rules = config["filterwarnings"]
    assert not [r for r in rules if r.startswith("ignore") and "past_key_values" in r]
    assert "error:.*past_key_values.*:FutureWarning" in rules
    tiny = load_tiny("tiny-llama")
    if cache_arg(tiny.model) != "cache":
        pytest.skip("this transformers takes past_key_values: it has nothing to deprecate")
    with pytest.raises(FutureWarning, match="past_key_values"):  # the rule is in force in this very session
        tiny.model(torch.tensor([[5, 6, 7]]), past_key_values=smartkv.make_cache("fp16", tiny.model))
