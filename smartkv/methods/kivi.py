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

from smartkv.cache.layer import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, check_int, group_for
from smartkv.core.quant import dequantize
from smartkv.kernels import KVSegment
from smartkv.cache.buffers import QBuffer, TokenBuffer


class KIVILayer(KVLayer):
    def _init_storage(self) -> None:
        self.group = group_for(self.config.group_size, self.head_dim)  # value groups run along head_dim
        R = self.config.residual_length
        self.key_block = R or self.group   # keys are quantized key_block tokens at a time
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        self.qk = QBuffer(self.config.key_bits, self.group, -2, B, H, D, self.device, self.kernels)
        self.qv = QBuffer(self.config.value_bits, self.group, -1, B, H, D, self.device, self.kernels)
        self.k_res = TokenBuffer(B, H, D, self.window_dtype, self.device)  # (B, H, r, D) full precision
        self.v_res = TokenBuffer(B, H, D, self.window_dtype, self.device)  # a sliding window of R tokens
        self.k_res.reserve(self.key_block)
        self.v_res.reserve(2 * R + 2)  # slides back to row 0 once every R + 1 decode steps
        self.flushed = (0, 0)          # keys, values quantized by the last `_store` (see _decode_segments)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        R, W = self.config.residual_length, self.key_block
        k = key_states.to(self.window_dtype)
        if len(self.k_res) + k.shape[-2] < W:
            self.k_res.append(k)
            n_k = 0
        else:  # quantize whole blocks of W; leaves the residual rows in place when the append fills one block
            k_all = torch.cat([self.k_res.view(), k], dim=-2) if len(self.k_res) else k
            n_k = (k_all.shape[-2] // W) * W
            self.qk.append(k_all[..., :n_k, :])
            if k.shape[-2] == 1:
                self.k_res.append(k)   # fills the block just quantized: the decode segment reads it from here
                self.k_res.clear()
            else:
                self.k_res.clear()
                self.k_res.append(k_all[..., n_k:, :])

        v = value_states.to(self.window_dtype)
        if v.shape[-2] == 1:  # decode: the oldest token leaves the window; its row stays for _decode_segments
            self.v_res.append(v)
            n_v = max(len(self.v_res) - R, 0)
            if n_v:
                self.qv.append(self.v_res.view(end=self.v_res.start + n_v))
                self.v_res.drop_front(n_v)
        else:  # a prompt: only the last R tokens ever enter the window buffer
            v_all = torch.cat([self.v_res.view(), v], dim=-2) if len(self.v_res) else v
            n_v = max(v_all.shape[-2] - R, 0)
            if n_v:
                self.qv.append(v_all[..., :n_v, :])
            self.v_res.clear()
            self.v_res.append(v_all[..., n_v:, :])
        self.flushed = (n_k, n_v)

    def _stored_kv(self):
        k_res, v_res = self.k_res.view().to(self.dtype), self.v_res.view().to(self.dtype)
        keys = torch.cat([dequantize(self.qk.view(), self.dtype), k_res], -2) if self.qk.n else k_res
        values = torch.cat([dequantize(self.qv.view(), self.dtype), v_res], -2) if self.qv.n else v_res
        return keys, values

    def _evict(self, count: int) -> int:
        # quantized keys leave in whole per-channel groups; once none is left, residual keys go one by one
        n_q = self.qk.n
        drop = min(count, n_q) // self.group * self.group
        if drop == n_q:
            drop += min(count - n_q, len(self.k_res))
        self.qk.drop_front(min(drop, n_q))
        self.k_res.drop_front(max(drop - n_q, 0))
        v_q = min(drop, self.qv.n)
        self.qv.drop_front(v_q)
        self.v_res.drop_front(drop - v_q)
        return drop

    @property
    def eviction_lag(self) -> int:
        return self.config.group_size - 1

    def _decode_segments(self, key_states, value_states):
        # the state before this step's flush, plus the new token: what the reference path attends over
        n_k, n_v = self.flushed
        k_res = self.k_res.view(0, n_k) if n_k else self.k_res.view()
        v_res = self.v_res.view(self.v_res.start - n_v)
        return [KVSegment(self.qk.view(self.qk.n - n_k), self.qv.view(self.qv.n - n_v), k_res, v_res)]

    def _reserve(self, tokens: int) -> None:
        self.qk.reserve(tokens)
        self.qv.reserve(tokens)

    def _slack_bytes(self) -> int:
        return sum(b.slack_bytes for b in (self.qk, self.qv, self.k_res, self.v_res))

    def _account(self, lb) -> None:
        for q, kind in ((self.qk.view(), "k"), (self.qv.view(), "v")):
            lb.add_codes(q.codes, q.bits, kind)
            lb.add("metadata", q.scale)
            lb.add("metadata", q.zero)
        lb.add("residual", self.k_res.view())
        lb.add("residual", self.v_res.view())


@register
@dataclass(frozen=True)
class KIVI(MethodConfig):
    """KIVI: 2/4 = the original validation table's configuration (payload 0.1875x); 2/2 is KIVI-2."""
    name = "kivi"
    key_bits: int = 2
    value_bits: int = 4
    group_size: int = 32
    residual_length: int = 128
    use_kernels: bool = True   # False: never the Triton kernels (dequantize + SDPA even on CUDA)

    def validate(self) -> None:
        check_choice("key_bits", self.key_bits, (2, 4, 8))
        check_choice("value_bits", self.value_bits, (2, 4, 8))
        check_group_size(self.group_size)
        check_int("residual_length", self.residual_length, 0, 1 << 20)
        if self.residual_length % self.group_size:
            raise ValueError(f"residual_length must be a multiple of group_size ({self.group_size}), "
                             f"got {self.residual_length}")
        check_choice("use_kernels", self.use_kernels, (True, False))

    def make_layer(self, layer_idx: int):
        return KIVILayer(self, layer_idx)
