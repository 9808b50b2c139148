"""`fp8`: keys and values as float8 e4m3 codes with one scale per (token, KV head), the way serving engines
store KV (vLLM / SGLang / TensorRT-LLM `kv_cache_dtype="fp8_e4m3"`; there the scale is per tensor or per head,
calibrated; here it is dynamic per token and head, so no calibration set is needed and no value clips).

code = e4m3(x / s) with s = amax(|x| over the head's channels) / 448 (448 = the largest finite e4m3), rounded up
to fp16 so that |x / s| <= 448 holds for the stored scale. Payload 8 bits an element (payload_ratio 0.5) plus one
fp16 scale per token and head (16 / head_dim bits an element). Every token is quantized when it is appended; the
tokens of the current call attend in full precision, later calls read the codes (as `int8` does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache.buffers import TokenBuffer
from smartkv.cache.layer import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig

E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (e4m3 codes (..., D), fp16 scales (..., 1)); x ~= codes * scale."""
    amax = x.float().abs().amax(-1, keepdim=True)
    scale = (amax / E4M3_MAX).clamp_min(2.0 ** -24).half()             # smallest fp16 subnormal: no zero scale
    scale = torch.where(scale.float() * E4M3_MAX < amax, torch.nextafter(scale, torch.full_like(scale, 1.0)), scale)
    codes = (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float()).to(dtype)


class FP8Layer(KVLayer):
    def _init_storage(self) -> None:
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        self.codes = [TokenBuffer(B, H, D, E4M3, self.device) for _ in "kv"]            # (B, H, T, D) e4m3
        self.scales = [TokenBuffer(B, H, 1, torch.float16, self.device) for _ in "kv"]  # (B, H, T, 1)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for codes, scales, x in zip(self.codes, self.scales, (key_states, value_states), strict=True):
            c, s = fp8_quantize(x)
            codes.append(c)
            scales.append(s)

    def _stored_kv(self):
        k, v = (fp8_dequantize(c.view(), s.view(), self.dtype) for c, s in zip(self.codes, self.scales, strict=True))
        return k, v

    def _evict(self, count: int) -> int:
        for buf in (*self.codes, *self.scales):   # per token: any count leaves at once
            buf.drop_front(count)
        return count

    def _reserve(self, tokens: int) -> None:
        for buf in (*self.codes, *self.scales):
            buf.reserve(tokens)

    def _slack_bytes(self) -> int:
        return sum(buf.slack_bytes for buf in (*self.codes, *self.scales))

    def _account(self, lb) -> None:
        for codes, scales, kind in zip(self.codes, self.scales, "kv", strict=True):
            lb.add_codes(codes.view(), 8, kind)
            lb.add("metadata", scales.view())


@register
@dataclass(frozen=True)
class FP8(MethodConfig):
    """float8 e4m3 keys and values, one fp16 scale per token and KV head (no parameters)."""
    name = "fp8"

    def make_layer(self, layer_idx: int):
        return FP8Layer(self, layer_idx)
