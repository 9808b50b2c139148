"""Registered KV-cache methods. Keys are stable: they are stored in results.

    fp16    the reference: keys and values in the model's dtype
    int8    uniform per-token 8-bit, groups of `group_size` channels
    int4    uniform per-token 4-bit
    kivi    KIVI (arXiv:2402.02750): per-channel keys, per-token values, full-precision residual window
    smartkv attention-importance mixed precision (2/3/4/8 bits per token) under a bit budget
"""
from __future__ import annotations

import dataclasses

from smartkv.methods.base import MethodConfig
from smartkv.registry import Registry, did_you_mean

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


# importing the method modules registers them
from smartkv.methods import fp16, kivi, smartkv, uniform  # noqa: E402,F401

__all__ = ["METHODS", "MethodConfig", "list_methods", "make_config", "method_fields", "validate_method"]
