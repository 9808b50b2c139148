"""`int8`, `int4`: uniform per-token quantization of keys and values in groups of `group_size` channels.

Every token is quantized when it is appended (no full-precision window); the tokens of the current call attend
in full precision, every later call reads their codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache.layer import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, group_for
from smartkv.core.quant import dequantize
from smartkv.kernels import KVSegment, quantize_pack_kv
from smartkv.cache.buffers import QBuffer, append_kv


class UniformLayer(KVLayer):
    static_capable = True

    def _init_storage(self) -> None:
        self.group = group_for(self.config.group_size, self.head_dim)
        shape = (self.batch_size, self.num_heads, self.head_dim)
        self.qk = QBuffer(self.config.bits, self.group, -1, *shape, self.device, self.kernels)  # (B, H, T, D*b/8)
        self.qv = QBuffer(self.config.bits, self.group, -1, *shape, self.device, self.kernels)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        append_kv(self.qk, self.qv, key_states, value_states)

    def _stored_kv(self):
        return dequantize(self.qk.view(), self.dtype), dequantize(self.qv.view(), self.dtype)

    def _evict(self, count: int) -> int:
        self.qk.drop_front(count)
        self.qv.drop_front(count)
        return count

    def _decode_segments(self, key_states, value_states):
        n = self.seq_len  # tokens stored before this step; the new one attends unquantized
        return [KVSegment(self.qk.view(n), self.qv.view(n), key_residual=key_states, value_residual=value_states)]

    def _static_store(self, key_states, value_states, state) -> None:
        quantize_pack_kv(key_states, value_states, self.qk.bits, self.qk.group, out=(self.qk.q, self.qv.q),
                         start=state.pos)

    def _static_segments(self, key_states, value_states, state):
        return [KVSegment(self.qk.q, self.qv.q, key_residual=key_states, value_residual=value_states,
                          lengths=state.lengths, residual_last=True)]

    def _advance(self, tokens: int) -> bool:
        if self.qk.n + tokens > self.qk.capacity:
            raise RuntimeError(f"static steps ran past the reserved {self.qk.capacity} tokens")
        self.qk.n += tokens
        self.qv.n += tokens
        return False

    def _reserve(self, tokens: int) -> None:
        self.qk.reserve(tokens)
        self.qv.reserve(tokens)

    def _slack_bytes(self) -> int:
        return self.qk.slack_bytes + self.qv.slack_bytes

    def _account(self, lb) -> None:
        for q, kind in ((self.qk.view(), "k"), (self.qv.view(), "v")):
            lb.add_codes(q.codes, q.bits, kind)
            lb.add("metadata", q.scale)
            lb.add("metadata", q.zero)


@dataclass(frozen=True)
class Uniform(MethodConfig):
    group_size: int = 32
    use_kernels: bool = True   # False: never the Triton kernels (dequantize + SDPA even on CUDA)
    bits = 0

    def validate(self) -> None:
        check_group_size(self.group_size)
        check_choice("use_kernels", self.use_kernels, (True, False))

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
