"""Fused kernels for quantized KV caches (Triton), each with a torch reference that computes the same function.

    quantize_pack(x, bits, group_size, axis=-1, out=None, start=0) -> QTensor
    quantize_pack_kv(k, v, bits, group_size, out=None, start=0) -> (QTensor, QTensor)     # one launch
    decode_attention(q, segments, scaling, lengths=None, return_token_probs=False, probs_out=None)
    pool_scores(q, pool, positions, out, offset, scaling, bias=None)    # SmartKV's two passes over width pools
    pool_values(probs, pool, positions, offset, splits=1) -> (B, Hq, D) fp32
    pool_positions(levels, n, counts) -> (B, H, n) int32                 # where each pool's tokens sit
    importance_update(codes, probs, ranges)                             # SmartKV's statistics, in place
    kernels_available(device) -> bool

The Triton path runs on CUDA tensors (or any tensors under TRITON_INTERPRET=1); everything else, and shapes the
kernels do not cover (head_dim not a power of two), takes the `*_reference` path. Bytes written by
`quantize_pack` equal `smartkv.quant.core.quantize`'s; `decode_attention` matches the reference to fp16-operand
accuracy (see tests/test_kernels.py for the bounds).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from smartkv.quant.core import QTensor
from smartkv.quant.kernels.reference import (decode_attention_reference, importance_update_reference,
                                             pool_positions_reference, pool_scores_reference,
                                             pool_values_reference, quantize_pack_reference)
from smartkv.quant.kernels.segment import KVSegment, check_inputs

try:
    import triton  # noqa: F401

    from smartkv.quant.kernels import decode as _decode
    from smartkv.quant.kernels import triton_pool as _tp
    from smartkv.quant.kernels import triton_quant as _tq
    HAVE_TRITON = True
except ImportError:  # no Triton on this platform: reference paths only
    HAVE_TRITON = False

__all__ = ["KVSegment", "decode_attention", "decode_attention_reference", "importance_update", "kernels_available",
           "pool_positions", "pool_scores", "pool_values", "quantize_pack", "quantize_pack_kv",
           "quantize_pack_reference"]


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    if not HAVE_TRITON:
        return False
    from triton.runtime.jit import JITFunction
    return not isinstance(_decode.K._split_kernel, JITFunction)


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels run on tensors of `device`: CUDA with Triton, or Triton's interpreter."""
    if not HAVE_TRITON:
        return False
    if interpreting():
        return True
    device = torch.device(device) if device is not None else None
    return device is not None and device.type == "cuda" and os.environ.get("SMARTKV_NO_KERNELS", "") != "1"


def quantize_pack(x: torch.Tensor, bits: int, group_size: int, axis: int = -1, out: QTensor | None = None,
                  start: int = 0) -> QTensor:
    """Quantize x (B, H, T, D) to `bits` in groups of `group_size` along `axis` and pack the codes.

    With `out`, the result is written into out's tokens [start, start + T) (per-channel: start a multiple of
    group_size) and `out` is returned: a preallocated cache is filled without a concatenation.
    """
    if kernels_available(x.device) and _tq.triton_shapes_ok(x, group_size):
        return _tq.quantize_pack_triton(x, bits, group_size, axis, out, start)
    return quantize_pack_reference(x, bits, group_size, axis, out, start)


def quantize_pack_kv(k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int,
                     out: tuple[QTensor, QTensor] | None = None, start: int = 0) -> tuple[QTensor, QTensor]:
    """Keys and values of one layer, per-token groups, in one launch (the append path of int8/int4)."""
    if kernels_available(k.device) and _tq.triton_shapes_ok(k, group_size):
        return _tq.quantize_pack_kv_triton(k, v, bits, group_size, out, start)
    outs = out if out is not None else (None, None)
    return (quantize_pack_reference(k, bits, group_size, -1, outs[0], start),
            quantize_pack_reference(v, bits, group_size, -1, outs[1], start))


def decode_attention(q: torch.Tensor, segments: Sequence[KVSegment], scaling: float,
                     lengths: torch.Tensor | None = None, return_token_probs: bool = False,
                     probs_out: Sequence[torch.Tensor] | None = None):
    """Attention of one new query token per sequence over the cached segments, read in place.

    q: (B, Hq, D) or (B, Hq, 1, D); Hq = kv_heads * group (GQA). segments: the cache's runs of tokens (their
    order matters only for `lengths`). lengths: (B,) int, valid tokens per sequence counted over the segments
    in order (a segment's own `lengths` overrides). Returns the output in q's shape and dtype; with
    `return_token_probs`, also a list with one (B, kv_heads, T_seg) fp32 tensor per segment: each token's
    attention probability summed over the query heads of its group (added into `probs_out` when given, so a
    cache can accumulate importance without another pass).
    """
    check_inputs(q, segments)
    if kernels_available(q.device) and _decode.triton_ok(q, segments):
        return _decode.decode_attention_triton(q, segments, scaling, lengths, return_token_probs, probs_out)
    return decode_attention_reference(q, segments, scaling, lengths, return_token_probs, probs_out)


def pool_scores(q: torch.Tensor, pool: QTensor, positions: torch.Tensor, out: torch.Tensor, offset: int,
                scaling: float, bias: torch.Tensor | None = None) -> None:
    """Scores of one width pool written into position-ordered logits (SmartKV's first decode pass).

    q: (B, Hq, D) (already in the pool's stored space); pool: per-token QTensor (B, Hkv, N, D); positions:
    (B, Hkv, N) int, each pool token's position; out: (B, Hq, T) fp32. Sets
    out[b, hq, offset + positions[b, hq // G, j]] = scaling * (q[b, hq] . pool[b, hq // G, j] + bias[b, hq]).
    """
    if pool.codes.shape[-2] == 0:
        return None
    if kernels_available(q.device) and _tp.pool_ok(pool):
        return _tp.pool_scores_triton(q, pool, positions, out, offset, scaling, bias)
    return pool_scores_reference(q, pool, positions, out, offset, scaling, bias)


def pool_values(probs: torch.Tensor, pool: QTensor, positions: torch.Tensor, offset: int,
                splits: int = 1) -> torch.Tensor:
    """sum_j probs[b, hq, offset + positions[b, hq // G, j]] * pool[b, hq // G, j]: (B, Hq, D) fp32 (SmartKV's
    second decode pass; `splits` divides each row's tokens over that many programs)."""
    if pool.codes.shape[-2] == 0:
        return probs.new_zeros(probs.shape[0], probs.shape[1], pool.shape[-1], dtype=torch.float32)
    if kernels_available(probs.device) and _tp.pool_ok(pool):
        return _tp.pool_values_triton(probs, pool, positions, offset, splits)
    return pool_values_reference(probs, pool, positions, offset, splits)


def pool_positions(levels: torch.Tensor, n: int, counts: Sequence[int]) -> torch.Tensor:
    """Positions (B, H, n) int32 of the tokens of each width pool, pool after pool, each in position order: a
    stable argsort of the 2-bit level indices `levels` (B, H, ceil8(n) / 4) packed uint8 (policy.pack_levels).
    `counts` = tokens per level index (every row has the same; at most 4 levels)."""
    if len(counts) > 4 or sum(counts) != n:
        raise ValueError(f"counts must be at most 4 tokens-per-level numbers summing to n={n}, got {list(counts)}")
    if n and kernels_available(levels.device):
        return _tp.pool_positions_triton(levels, n, tuple(counts))
    return pool_positions_reference(levels, n, tuple(counts))


def importance_update(codes: torch.Tensor, probs: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> None:
    """Fold one decode query's attention into SmartKV's importance codes, in place (smartkv.importance).

    codes: (B, Hkv, T) uint8 (`encode_importance` of the mean attention each token received); probs: (B, Hq, T)
    fp32, the query's attention over all T tokens; ranges: the [start, end) positions of the queries observed
    before, from which each token's count of observers is derived."""
    ranges = [tuple(map(int, r)) for r in ranges]
    if kernels_available(codes.device) and len(ranges) <= _tp.MAX_RANGES and codes.shape[-1]:
        return _tp.importance_update_triton(codes, probs, ranges)
    return importance_update_reference(codes, probs, ranges)
