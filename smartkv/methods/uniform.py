"""`int8`, `int4`: uniform per-token quantization of keys and values in groups of `group_size` channels.

Every token is quantized when it is appended (no full-precision window); the tokens of the current call attend
in full precision, every later call reads their codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_group_size
from smartkv.quant import QTensor, cat, dequantize, quantize


class UniformLayer(KVLayer):
    def _init_storage(self) -> None:
        self.qk: QTensor | None = None
        self.qv: QTensor | None = None
        self.group = min(self.config.group_size, self.head_dim)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bits = self.config.bits
        qk = quantize(key_states, bits, self.group, axis=-1)   # codes (B, H, T, D*b/8)
        qv = quantize(value_states, bits, self.group, axis=-1)
        self.qk = qk if self.qk is None else cat([self.qk, qk])
        self.qv = qv if self.qv is None else cat([self.qv, qv])

    def _stored_kv(self):
        return dequantize(self.qk, self.dtype), dequantize(self.qv, self.dtype)

    def _account(self, lb) -> None:
        for q, kind in ((self.qk, "k"), (self.qv, "v")):
            lb.add_codes(q.codes, q.bits, kind)
            lb.add("metadata", q.scale)
            lb.add("metadata", q.zero)


@dataclass(frozen=True)
class Uniform(MethodConfig):
    group_size: int = 32
    bits = 0

    def validate(self) -> None:
        check_group_size(self.group_size)

    def make_layer(self, layer_idx: int):
        return UniformLayer(self, layer_idx)


@register
@dataclass(frozen=True)
class Int8(Uniform):
    """Uniform per-token 8-bit, asymmetric, fp16 scale and zero per group of channels."""
    name = "int8"
    bits = 8


@register
@dataclass(frozen=True)
class Int4(Uniform):
    """Uniform per-token 4-bit, asymmetric, fp16 scale and zero per group of channels."""
    name = "int4"
    bits = 4
