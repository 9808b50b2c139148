"""Registered KV-cache methods. Keys are stable: they are stored in results.

    fp16    the reference: keys and values in the model's dtype
    int8    uniform per-token 8-bit, groups of `group_size` channels
    int4    uniform per-token 4-bit
    kivi    KIVI (arXiv:2402.02750): per-channel keys, per-token values, full-precision residual window
    smartkv attention-importance mixed precision (2/3/4/8 bits per token) under a bit budget
    zipcache ZipCache (arXiv:2405.14256): normalised-attention saliency from probe queries, salient tokens at
            high bits, the rest at low bits; channel-wise keys, channel-separable token-wise values
    fp8     float8 e4m3 codes with one scale per token and KV head, as serving engines store KV
    quanto  transformers' QuantizedCache with optimum-quanto (registered when optimum-quanto is installed)
    hqq     transformers' QuantizedCache with HQQ (registered when hqq is installed)
"""
from __future__ import annotations

import dataclasses

from smartkv.cache.hf_compat import model_kv_shape, sliding_windows, use_attention
from smartkv.cache.layer import ATTENTION_NAME, SmartKVCache
from smartkv.methods.base import MethodConfig
from smartkv.core.registry import Registry, did_you_mean

METHODS: Registry[type[MethodConfig]] = Registry("method")


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    METHODS.register(cls.name)(cls)
    return cls


def list_methods() -> list[str]:
    return METHODS.names()


def method_fields(name: str) -> dict:
    """Parameter name -> default of a method."""
    cls = METHODS.get(name)
    return {f.name: f.default for f in dataclasses.fields(cls)}


def make_config(name: str, **params) -> MethodConfig:
    """A validated config; ValueError names unknown parameters (with did-you-mean) or bad values."""
    cls = METHODS.get(name)
    allowed = method_fields(name)
    for key in params:
        if key not in allowed:
            raise ValueError(f"unknown parameter {key!r} for method {name!r}{did_you_mean(key, allowed)}; "
                             f"allowed: {', '.join(allowed) or '(none)'}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        return cls(**params)
    except TypeError as exc:  # wrong type for a field that validate() could not even reach
        raise ValueError(f"bad parameters for method {name!r}: {exc}") from None


def validate_method(name: str, params: dict | None = None) -> None:
    make_config(name, **(params or {}))


def make_cache(method: str | MethodConfig, model=None, num_layers: int | None = None, **params) -> SmartKVCache:
    """Build the cache of a registered method for `model` (or for `num_layers` layers, without a model).

    `smartkv.make_cache("kivi", model, key_bits=2)` -> a Cache to pass as `cache=` (`past_key_values=` before
    transformers 5.2x; `smartkv.cache_kwargs` picks); `method` may also be a config from `make_config` (built once,
    reused). Unknown methods or parameters raise ValueError naming what is allowed. Switches the model's attention
    to the "smartkv" hook,
    which is plain SDPA for methods that do not need it.
    """
    if isinstance(method, MethodConfig):
        if params:
            raise ValueError(f"make_cache takes a config or a method name with parameters, not both; got "
                             f"{method.name!r} and {sorted(params)}")
        config = method
    else:
        config = make_config(method, **params)
    windows = None
    if model is not None:
        num_layers = model_kv_shape(model)["num_layers"]
        windows = sliding_windows(model, num_layers)   # hybrid models: the layers DynamicCache keeps a window of
        use_attention(model, ATTENTION_NAME)
    if num_layers is None:
        raise ValueError("make_cache needs a model or num_layers")
    return SmartKVCache(config, num_layers, attention_hooked=model is not None, sliding_windows=windows)


# importing the method modules registers them
from smartkv.methods import fp16, kivi, smartkv, uniform  # noqa: E402,F401
from smartkv.methods import fp8, hf_quantized, zipcache  # noqa: E402,F401

__all__ = ["METHODS", "MethodConfig", "list_methods", "make_cache", "make_config", "method_fields", "validate_method"]
