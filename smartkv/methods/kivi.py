"""`kivi`: KIVI, Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024
(arXiv:2402.02750; reference code jy-yuan/KIVI, models/llama_kivi.py).

Keys: per channel, groups of `group_size` consecutive tokens. Values: per token, groups of `group_size` channels.
Streaming residual, as in the reference code:
  keys   - prefill quantizes the first floor(T/R)*R tokens, the rest stay full precision; while decoding, new
           keys go to the residual and the whole R-block is quantized when it reaches R (R % G == 0).
  values - all but the last R tokens are quantized; while decoding, once the window exceeds R the oldest token
           is quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, check_int
from smartkv.quant import QTensor, cat, dequantize, quantize


class KIVILayer(KVLayer):
    def _init_storage(self) -> None:
        self.qk: QTensor | None = None
        self.qv: QTensor | None = None
        empty = torch.empty(self.batch_size, self.num_heads, 0, self.head_dim, dtype=self.window_dtype,
                            device=self.device)
        self.k_res, self.v_res = empty, empty.clone()   # (B, H, r, D) full precision
        self.group = self.config.group_size
        if self.head_dim % self.group:  # value groups run along head_dim
            raise ValueError(f"group_size must divide head_dim ({self.head_dim}), got {self.group}")

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        R = self.config.residual_length
        k_res = torch.cat([self.k_res, key_states.to(self.window_dtype)], dim=-2)
        n_flush = (k_res.shape[-2] // R) * R if R else k_res.shape[-2] - k_res.shape[-2] % self.group
        if n_flush:
            qk = quantize(k_res[..., :n_flush, :], self.config.key_bits, self.group, axis=-2)
            self.qk = qk if self.qk is None else cat([self.qk, qk])
            k_res = k_res[..., n_flush:, :]
        self.k_res = k_res.contiguous()

        v_res = torch.cat([self.v_res, value_states.to(self.window_dtype)], dim=-2)
        n_flush = max(v_res.shape[-2] - R, 0)
        if n_flush:
            qv = quantize(v_res[..., :n_flush, :], self.config.value_bits, self.group, axis=-1)
            self.qv = qv if self.qv is None else cat([self.qv, qv])
            v_res = v_res[..., n_flush:, :]
        self.v_res = v_res.contiguous()

    def _stored_kv(self):
        k_res, v_res = self.k_res.to(self.dtype), self.v_res.to(self.dtype)
        keys = k_res if self.qk is None else torch.cat([dequantize(self.qk, self.dtype), k_res], -2)
        values = v_res if self.qv is None else torch.cat([dequantize(self.qv, self.dtype), v_res], -2)
        return keys, values

    def _account(self, lb) -> None:
        for q, kind in ((self.qk, "k"), (self.qv, "v")):
            if q is not None:
                lb.add_codes(q.codes, q.bits, kind)
                lb.add("metadata", q.scale)
                lb.add("metadata", q.zero)
        lb.add("residual", self.k_res)
        lb.add("residual", self.v_res)


@register
@dataclass(frozen=True)
class KIVI(MethodConfig):
    """KIVI: 2/4 = the original validation table's configuration (payload 0.1875x); 2/2 is KIVI-2."""
    name = "kivi"
    key_bits: int = 2
    value_bits: int = 4
    group_size: int = 32
    residual_length: int = 128

    def validate(self) -> None:
        check_choice("key_bits", self.key_bits, (2, 4, 8))
        check_choice("value_bits", self.value_bits, (2, 4, 8))
        check_group_size(self.group_size)
        check_int("residual_length", self.residual_length, 0, 1 << 20)
        if self.residual_length % self.group_size:
            raise ValueError(f"residual_length must be a multiple of group_size ({self.group_size}), "
                             f"got {self.residual_length}")

    def make_layer(self, layer_idx: int):
        return KIVILayer(self, layer_idx)
