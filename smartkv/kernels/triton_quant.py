"""Triton quantize-and-pack: the bytes of `smartkv.core.quant.quantize`, one launch per call.

Per-token groups (axis=-1): a program quantizes BLOCK_T tokens x D channels. `quantize_pack_kv` does a layer's
keys and values in one launch (program axis 2 picks which). Per-channel groups (axis=-2): a program quantizes
one block of G tokens x D channels. Rounding matches core exactly: zero = largest fp16 <= min, scale = smallest
fp16 >= (max - zero) / levels, codes = round-half-even((x - zero) / scale) with IEEE division.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from smartkv.core.quant import QTensor, check_bits, check_group, packed_width
from smartkv.kernels.launch import cdiv, launch
from smartkv.kernels.tuning import current


@triton.jit
def _fp16_down(x):
    """Largest fp16 <= x (x fp32), as core._fp16_down."""
    h = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    stepped = tl.where((bits & 0x8000) != 0, bits + 1, tl.where(bits == 0, 0x8001, bits - 1))
    bits = tl.where(h.to(tl.float32) > x, stepped, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_up(x):
    """Smallest fp16 >= x (x >= 0, fp32), as core._fp16_up."""
    h = tl.minimum(tl.maximum(x, 0.0), 65504.0).to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    bits = tl.where(h.to(tl.float32) < x, bits + 1, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _rint_nonneg(y):
    """Round half to even for 0 <= y < 2**22 (torch.round)."""
    r = tl.floor(y + 0.5)
    odd = (r.to(tl.int32) & 1) == 1
    return tl.where(((r - y) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _mean_code(c, seen, more, queries):
    """The importance code (fp32, 0..255) of a mean over seen + queries, from code c of the mean over `seen` (255
    read as 0) and `more` of mass more, as importance_fold_reference: round half to even."""
    mean = tl.where(c == 255, 0.0, tl.exp2(-c / 8))
    mean = (mean * seen + more) / (seen + queries)
    y = -8 * tl.log2(tl.maximum(mean, 2.0 ** -31.875))
    return tl.minimum(_rint_nonneg(tl.maximum(y, 0.0)), 255.0)


@triton.jit
def _codes(x, lo, hi, LEVELS: tl.constexpr):
    """x (..., G) fp32 with its group min/max (..., 1) -> int32 codes, fp16 scale and zero (..., 1)."""
    zero = _fp16_down(lo)
    scale = _fp16_up(tl.div_rn(hi - zero.to(tl.float32), tl.full(hi.shape, LEVELS, tl.float32)))
    s = scale.to(tl.float32)
    y = tl.div_rn(x - zero.to(tl.float32), tl.where(s > 0, s, 1.0))
    c = tl.where(s > 0, _rint_nonneg(y), 0.0)
    c = tl.minimum(tl.maximum(c, 0.0), LEVELS).to(tl.int32)
    return c, scale, zero


@triton.jit
def _store_packed(ptr, row_off, row_mask, codes, BITS: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr):
    """Pack codes (ROWS, D) int32 along D, little-endian, and store them at ptr + row_off[:, None] + byte."""
    if BITS == 8:
        tl.store(ptr + row_off[:, None] + tl.arange(0, D)[None, :], codes.to(tl.uint8), mask=row_mask[:, None])
    elif BITS == 3:
        c3 = tl.reshape(codes, (ROWS, D // 8, 8))
        word = tl.sum(c3 << (3 * tl.arange(0, 8))[None, None, :], axis=2)  # (ROWS, D/8), 24-bit
        off = row_off[:, None] + 3 * tl.arange(0, D // 8)[None, :]
        m = row_mask[:, None]
        tl.store(ptr + off, (word & 0xFF).to(tl.uint8), mask=m)
        tl.store(ptr + off + 1, ((word >> 8) & 0xFF).to(tl.uint8), mask=m)
        tl.store(ptr + off + 2, ((word >> 16) & 0xFF).to(tl.uint8), mask=m)
    else:
        PER: tl.constexpr = 8 // BITS
        c3 = tl.reshape(codes, (ROWS, D // PER, PER))
        byte = tl.sum(c3 << (BITS * tl.arange(0, PER))[None, None, :], axis=2)
        tl.store(ptr + row_off[:, None] + tl.arange(0, D // PER)[None, :], byte.to(tl.uint8),
                 mask=row_mask[:, None])


@triton.jit
def _quant_tok_one(X, C, S, Z, sxb, sxh, sxt, scb, sch, sct, ssb, ssh, sst, b, h, T, start,
                   BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                   ALIGNED: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    xo, co = b * sxb + h * sxh, b * scb + h * sch
    if ALIGNED:  # the batch / head strides are not specialised on (below): say what the host checked instead
        xo, co = tl.multiple_of(xo, 16), tl.multiple_of(co, 16)
    x = tl.load(X + xo + t[:, None] * sxt + tl.arange(0, D)[None, :], mask=tm[:, None], other=0.0)
    g = tl.reshape(x.to(tl.float32), (BLOCK_T, D // G, G))  # (BLOCK_T, D/G, G)
    c, scale, zero = _codes(g, tl.min(g, axis=2)[:, :, None], tl.max(g, axis=2)[:, :, None], (1 << BITS) - 1)
    row = start + t
    _store_packed(C + co, row * sct, tm, tl.reshape(c, (BLOCK_T, D)), BITS, D, BLOCK_T)
    so = b * ssb + h * ssh + row[:, None] * sst + tl.arange(0, D // G)[None, :]
    tl.store(S + so, tl.reshape(scale, (BLOCK_T, D // G)), mask=tm[:, None])
    tl.store(Z + so, tl.reshape(zero, (BLOCK_T, D // G)), mask=tm[:, None])


# Write positions, token counts and the batch / head strides of growable buffers change during a generation: not
# specialised on (Triton would compile again when one becomes 1 or a multiple of 16, mid-generation).
_TOK_DYNAMIC = ["T", "start"] + [f"s{x}{d}{i}" for i in (0, 1) for x in "xcs" for d in "bh"]


@triton.jit(do_not_specialize=_TOK_DYNAMIC)
def _quant_tok_kernel(X0, C0, S0, Z0, X1, C1, S1, Z1,
                      sxb0, sxh0, sxt0, scb0, sch0, sct0, ssb0, ssh0, sst0,
                      sxb1, sxh1, sxt1, scb1, sch1, sct1, ssb1, ssh1, sst1,
                      H, T, start, STARTS, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      BLOCK_T: tl.constexpr, START_PTR: tl.constexpr, ALIGNED: tl.constexpr = False):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    if START_PTR:  # per-sequence write rows from device memory (static decode steps, CUDA graphs)
        start = tl.load(STARTS + b).to(tl.int64)
    if tl.program_id(2) == 0:
        _quant_tok_one(X0, C0, S0, Z0, sxb0, sxh0, sxt0, scb0, sch0, sct0, ssb0, ssh0, sst0, b, h, T, start,
                       BITS, G, D, BLOCK_T, ALIGNED)
    else:
        _quant_tok_one(X1, C1, S1, Z1, sxb1, sxh1, sxt1, scb1, sch1, sct1, ssb1, ssh1, sst1, b, h, T, start,
                       BITS, G, D, BLOCK_T, ALIGNED)


@triton.jit(do_not_specialize=["start"] + [f"s{x}{d}" for x in "xcs" for d in "bh"])
def _quant_chan_kernel(X, C, S, Z, sxb, sxh, sxt, scb, sch, sct, ssb, ssh, sst, H, start,
                       BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    blk, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    t = blk * G + tl.arange(0, G)
    x = tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + tl.arange(0, D)[None, :]).to(tl.float32)  # (G, D)
    c, scale, zero = _codes(x, tl.min(x, axis=0)[None, :], tl.max(x, axis=0)[None, :], (1 << BITS) - 1)
    row = start + t
    _store_packed(C + b * scb + h * sch, row * sct, row >= 0, c, BITS, D, G)
    so = b * ssb + h * ssh + (start // G + blk) * sst + tl.arange(0, D)[None, :]
    tl.store(S + so, scale)
    tl.store(Z + so, zero)


def _empty_like_q(x: torch.Tensor, bits: int, group_size: int, axis: int) -> QTensor:
    B, H, T, D = x.shape
    codes = torch.empty(B, H, T, packed_width(D, bits), dtype=torch.uint8, device=x.device)
    meta = (B, H, T, D // group_size) if axis == -1 else (B, H, T // group_size, D)
    return QTensor(codes, torch.empty(meta, dtype=torch.float16, device=x.device),
                   torch.empty(meta, dtype=torch.float16, device=x.device), bits, group_size, axis)


def _check(x: torch.Tensor, bits: int, group_size: int, axis: int, out: QTensor | None, start: int) -> None:
    check_bits(bits)
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 (per token) or -2 (per channel), got {axis}")
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    check_group(x.shape[axis], group_size, "head_dim" if axis == -1 else "token count")
    if axis == -2 and start % group_size:
        raise ValueError(f"start must be a multiple of group_size ({group_size}) for per-channel groups, "
                         f"got {start}")
    if out is not None:
        if (out.bits, out.group_size, out.axis) != (bits, group_size, axis):
            raise ValueError(f"out is ({out.bits}-bit, group {out.group_size}, axis {out.axis}), asked for "
                             f"({bits}-bit, group {group_size}, axis {axis})")
        if out.codes.shape[-2] < start + x.shape[-2]:
            raise ValueError(f"out holds {out.codes.shape[-2]} tokens, writing [{start}, {start + x.shape[-2]})")


def triton_shapes_ok(x: torch.Tensor, group_size: int) -> bool:
    D = x.shape[-1]
    return D >= 16 and D & (D - 1) == 0 and group_size > 0 and group_size & (group_size - 1) == 0


def _aligned(x: torch.Tensor, q: QTensor) -> bool:
    """Whether the input's and the codes' batch and head strides are multiples of 16 elements (so a (batch, head)
    row starts 16-element aligned and its loads and stores can be vectorised): two compiled variants at most."""
    return all(s % 16 == 0 for s in (*x.stride()[:2], *q.codes.stride()[:2]))


def _meta_strides(q: QTensor):
    return q.codes.stride()[:3] + q.scale.stride()[:3]


def quantize_pack_triton(x: torch.Tensor, bits: int, group_size: int, axis: int = -1,
                         out: QTensor | None = None, start: int = 0) -> QTensor:
    _check(x, bits, group_size, axis, out, start)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, H, T, D = x.shape
    q = out if out is not None else _empty_like_q(x, bits, group_size, axis)
    if out is None:
        start = 0
    if T == 0:
        return q
    if axis == -1:
        BLOCK_T = 32 if D <= 128 else 16
        grid = (cdiv(T, BLOCK_T), B * H, 1)
        args = x.stride()[:3] + _meta_strides(q)
        launch(_quant_tok_kernel, grid, x, q.codes, q.scale, q.zero, x, q.codes, q.scale, q.zero, *args, *args,
               H, T, start, x, BITS=bits, G=group_size, D=D, BLOCK_T=BLOCK_T, START_PTR=False,
               ALIGNED=_aligned(x, q), num_warps=current().quant_warps)
    else:
        launch(_quant_chan_kernel, (T // group_size, B * H), x, q.codes, q.scale, q.zero, *x.stride()[:3],
               *_meta_strides(q), H, start, BITS=bits, G=group_size, D=D,
               num_warps=current().quant_warps)
    return q


def quantize_pack_kv_triton(k: torch.Tensor, v: torch.Tensor, bits: int, group_size: int,
                            out: tuple[QTensor, QTensor] | None = None,
                            start: int | torch.Tensor = 0, single: bool = False) -> tuple[QTensor, QTensor]:
    """start: the first row written, or a (B,) int32 tensor of per-sequence rows read by the kernel (nothing on
    the host depends on its value: a static decode step; rows past `out`'s capacity are the caller's to avoid).
    single: k and v are one tensor and out one buffer (passed twice): written once."""
    if k.shape != v.shape:
        raise ValueError(f"keys and values must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    starts = start if isinstance(start, torch.Tensor) else None
    if starts is not None:
        if out is None or starts.shape != (k.shape[0],) or starts.dtype != torch.int32:
            raise ValueError(f"a tensor start needs out= and shape ({k.shape[0]},) int32, got "
                             f"{tuple(starts.shape)} {starts.dtype}")
        start = 0
    for x, o in zip((k, v), out or (None, None), strict=True):
        _check(x, bits, group_size, -1, o, start)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    B, H, T, D = k.shape
    if out is None:
        out = (_empty_like_q(k, bits, group_size, -1), _empty_like_q(v, bits, group_size, -1))
        start = 0
    qk, qv = out
    if T == 0:
        return qk, qv
    BLOCK_T = 32 if D <= 128 else 16
    grid = (cdiv(T, BLOCK_T), B * H, 1 if single else 2)
    launch(_quant_tok_kernel, grid, k, qk.codes, qk.scale, qk.zero, v, qv.codes, qv.scale, qv.zero,
           *k.stride()[:3], *_meta_strides(qk), *v.stride()[:3], *_meta_strides(qv),
           H, T, start, starts if starts is not None else k, BITS=bits, G=group_size, D=D,
           BLOCK_T=BLOCK_T, START_PTR=starts is not None,
           ALIGNED=_aligned(k, qk) and _aligned(v, qv), num_warps=current().quant_warps)
    return qk, qv
