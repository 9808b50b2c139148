"""Two-pass decode attention over SmartKV's width pools (Triton), never dequantizing the cache to memory.

SmartKV stores a layer's middle tokens in one dense pool per bit width, separately for keys and values: a
token's key may sit in the 4-bit key pool while its value sits in the 2-bit value pool, so one pass cannot
pair a key with its value the way `triton_attn` does. Two passes instead:

  pool_scores  - for one key pool: the scores q . k of the pool's tokens for every query head of the KV head's
                 group, written straight into the layer's position-ordered logits (B, Hq, T) through the pool's
                 positions (which are ascending, so the writes are near-coalesced);
  (softmax over all positions in torch: (B, Hq, T) fp32, the probabilities SmartKV's importance needs anyway)
  pool_values  - for one value pool: sum_j p_j v_j with p read from the probabilities through the pool's
                 positions; one partial output per split of the pool, summed by the caller.

Both read packed codes (2/3/4/8 bit, per-token groups) and their fp16 scales and zeros, unpack in registers
(CODE_MODE 1 of triton_attn: exact integers) and use tensor-core dots with fp16 operands and fp32
accumulation. Query heads of a group are padded to 16 columns (the dot's minimum).
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from smartkv.quant.core import QTensor
from smartkv.quant.kernels.decode import _per_word, _pow2, _words
from smartkv.quant.kernels.triton_attn import _load_words, _unpack


@triton.jit
def _dequant_block(words_ptr, s_ptr, z_ptr, w_row, s_row, t, valid, sw_t, ss_t,
                   BITS: tl.constexpr, PW: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N, D) fp16 values of tokens t of one (batch, head) row: codes * scale + zero (in fp32, then fp16)."""
    w = _load_words(words_ptr + w_row, t * sw_t, valid, BITS, PW, D)
    codes = _unpack(w, BITS, PW, D, BLOCK_N, 1).to(tl.float32)        # exact integers, channel order
    grp = tl.arange(0, D) // G
    so = s_row + t[:, None] * ss_t + grp[None, :]
    scale = tl.load(s_ptr + so, mask=valid[:, None], other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + so, mask=valid[:, None], other=0.0).to(tl.float32)
    return (codes * scale + zero).to(tl.float16)


# Arguments that change as the cache grows are not specialised on (each new divisibility class would compile
# another kernel mid-generation).
@triton.jit(do_not_specialize=["sw_b", "sw_h", "ss_b", "ss_h", "sp_b", "sp_h", "so_b", "so_h", "N", "offset"])
def _scores_kernel(q_ptr, sq_b, sq_h, bias_ptr, sb_b,
                   w_ptr, sw_b, sw_h, sw_t, s_ptr, ss_b, ss_h, ss_t, z_ptr,
                   pos_ptr, sp_b, sp_h, out_ptr, so_b, so_h,
                   N, offset, scaling, Hkv, NG,
                   BITS: tl.constexpr, PW: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr,
                   BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    t = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < N
    hq = h * NG + tl.arange(0, NGP)                                     # query heads of this KV head's group
    hmask = tl.arange(0, NGP) < NG
    q = tl.load(q_ptr + b * sq_b + hq[None, :] * sq_h + tl.arange(0, D)[:, None], mask=hmask[None, :],
                other=0.0).to(tl.float16)                               # (D, NGP)
    k = _dequant_block(w_ptr, s_ptr, z_ptr, b * sw_b + h * sw_h, b * ss_b + h * ss_h, t, valid, sw_t, ss_t,
                       BITS, PW, G, D, BLOCK_N)
    s = tl.dot(k, q)                                                    # (BLOCK_N, NGP) fp32
    if HAS_BIAS:
        s += tl.load(bias_ptr + b * sb_b + hq, mask=hmask, other=0.0)[None, :]
    pos = tl.load(pos_ptr + b * sp_b + h * sp_h + t, mask=valid, other=0) + offset
    tl.store(out_ptr + b * so_b + hq[None, :] * so_h + pos[:, None], s * scaling,
             mask=valid[:, None] & hmask[None, :])


@triton.jit(do_not_specialize=["sp_b", "sp_h", "sw_b", "sw_h", "ss_b", "ss_h", "spo_b", "spo_h", "N", "offset",
                               "tokens_per_split"])
def _values_kernel(p_ptr, sp_b, sp_h, w_ptr, sw_b, sw_h, sw_t, s_ptr, ss_b, ss_h, ss_t, z_ptr,
                   pos_ptr, spo_b, spo_h, out_ptr, so_b, so_h, so_s,
                   N, offset, tokens_per_split, Hkv, NG,
                   BITS: tl.constexpr, PW: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    hq = h * NG + tl.arange(0, NGP)
    hmask = tl.arange(0, NGP) < NG
    acc = tl.zeros((NGP, D), tl.float32)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, N)
    for n0 in range(lo, hi, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        valid = t < hi
        pos = tl.load(pos_ptr + b * spo_b + h * spo_h + t, mask=valid, other=0) + offset
        p = tl.load(p_ptr + b * sp_b + hq[:, None] * sp_h + pos[None, :], mask=hmask[:, None] & valid[None, :],
                    other=0.0)                                          # (NGP, BLOCK_N) fp32
        v = _dequant_block(w_ptr, s_ptr, z_ptr, b * sw_b + h * sw_h, b * ss_b + h * ss_h, t, valid, sw_t,
                           ss_t, BITS, PW, G, D, BLOCK_N)
        acc += tl.dot(p.to(tl.float16), v)
    tl.store(out_ptr + b * so_b + hq[:, None] * so_h + split * so_s + tl.arange(0, D)[None, :], acc,
             mask=hmask[:, None])


@triton.jit(do_not_specialize=["sl_b", "sl_h", "so_b", "so_h", "n", "c0", "c1", "c2"])
def _positions_kernel(lv_ptr, sl_b, sl_h, out_ptr, so_b, so_h, n, Hkv, c0, c1, c2, BLOCK: tl.constexpr):
    """Stable argsort of one row's 2-bit level indices: positions of level 0 in order, then level 1, ..."""
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    lv = lv_ptr + b * sl_b + h * sl_h
    out = out_ptr + b * so_b + h * so_h
    r0 = 0
    r1 = 0
    r2 = 0
    r3 = 0
    for t0 in range(0, n, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        valid = t < n
        byte = tl.load(lv + t // 4, mask=valid, other=0).to(tl.int32)
        idx = (byte >> ((t % 4) * 2)) & 3
        m0 = (idx == 0) & valid
        m1 = (idx == 1) & valid
        m2 = (idx == 2) & valid
        m3 = (idx == 3) & valid
        tl.store(out + r0 + tl.cumsum(m0.to(tl.int32), 0) - 1, t, mask=m0)
        tl.store(out + c0 + r1 + tl.cumsum(m1.to(tl.int32), 0) - 1, t, mask=m1)
        tl.store(out + c0 + c1 + r2 + tl.cumsum(m2.to(tl.int32), 0) - 1, t, mask=m2)
        tl.store(out + c0 + c1 + c2 + r3 + tl.cumsum(m3.to(tl.int32), 0) - 1, t, mask=m3)
        r0 += tl.sum(m0.to(tl.int32), 0)
        r1 += tl.sum(m1.to(tl.int32), 0)
        r2 += tl.sum(m2.to(tl.int32), 0)
        r3 += tl.sum(m3.to(tl.int32), 0)


@triton.jit(do_not_specialize=["sc_b", "sc_h", "sp_b", "sp_h", "T", "s0", "e0", "s1", "e1", "s2", "e2", "s3", "e3"])
def _importance_kernel(code_ptr, sc_b, sc_h, p_ptr, sp_b, sp_h, T, Hkv, NG,
                       s0, e0, s1, e1, s2, e2, s3, e3, NGP: tl.constexpr, BLOCK: tl.constexpr):
    """One decode query's attention folded into the 8-bit importance codes of every token it saw (all T):
    mean' = (mean * seen + mass) / (seen + 1), seen from the earlier queries' position ranges [s_r, e_r)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    t = blk * BLOCK + tl.arange(0, BLOCK)
    valid = t < T
    hq = h * NG + tl.arange(0, NGP)
    hmask = tl.arange(0, NGP) < NG
    p = tl.load(p_ptr + b * sp_b + hq[:, None] * sp_h + t[None, :], mask=hmask[:, None] & valid[None, :],
                other=0.0)
    mass = tl.sum(p, 0) / NG
    seen = tl.maximum(e0 - tl.maximum(s0, t), 0) + tl.maximum(e1 - tl.maximum(s1, t), 0)
    seen += tl.maximum(e2 - tl.maximum(s2, t), 0) + tl.maximum(e3 - tl.maximum(s3, t), 0)
    seen = seen.to(tl.float32)
    codes = tl.load(code_ptr + b * sc_b + h * sc_h + t, mask=valid, other=255).to(tl.float32)
    mean = tl.where(codes == 255, 0.0, tl.exp2(-codes / 8))
    mean = (mean * seen + mass) / (seen + 1)
    new = -8 * tl.log2(tl.maximum(mean, 2.0 ** -31.875))
    new = tl.minimum(tl.maximum(new + 0.5, 0.0), 255.0)                 # round half up: codes are >= 0
    tl.store(code_ptr + b * sc_b + h * sc_h + t, new.to(tl.uint8), mask=valid)


BLOCK_N = 32
MAX_RANGES = 4  # _importance_kernel's observed query ranges


def pool_ok(pool: QTensor) -> bool:
    """Shapes these kernels handle: per-token groups, power-of-two head_dim >= 16 and group size."""
    D = pool.shape[-1]
    if pool.bits == 3 and D < 64:  # compiled 3-bit tiles below 8 words per row failed the fp64 check on an H200
        return False
    return D >= 16 and not D & (D - 1) and pool.axis == -1 and not pool.group_size & (pool.group_size - 1)


def pool_scores_triton(q: torch.Tensor, pool: QTensor, positions: torch.Tensor, out: torch.Tensor, offset: int,
                       scaling: float, bias: torch.Tensor | None = None) -> None:
    B, Hq, D = q.shape
    Hkv, N = pool.codes.shape[1], pool.codes.shape[2]
    NG = Hq // Hkv
    w = _words(pool)
    if q.stride(-1) != 1:
        q = q.contiguous()
    _scores_kernel[(triton.cdiv(N, BLOCK_N), B * Hkv)](
        q, q.stride(0), q.stride(1), bias if bias is not None else q, bias.stride(0) if bias is not None else 0,
        w, *w.stride()[:3], pool.scale, *pool.scale.stride()[:3], pool.zero,
        positions, *positions.stride()[:2], out, *out.stride()[:2],
        N, offset, scaling, Hkv, NG,
        BITS=pool.bits, PW=_per_word(pool.bits), G=pool.group_size, D=D, NGP=max(16, _pow2(NG)),
        BLOCK_N=BLOCK_N, HAS_BIAS=bias is not None, num_warps=4)


def pool_values_triton(probs: torch.Tensor, pool: QTensor, positions: torch.Tensor, offset: int,
                       splits: int) -> torch.Tensor:
    B, Hq, _ = probs.shape
    Hkv, N, D = pool.codes.shape[1], pool.codes.shape[2], pool.shape[-1]
    NG = Hq // Hkv
    per_split = triton.cdiv(triton.cdiv(N, max(splits, 1)), BLOCK_N) * BLOCK_N
    S = max(1, triton.cdiv(N, per_split))
    part = torch.empty(B, Hq, S, D, dtype=torch.float32, device=probs.device)
    w = _words(pool)
    _values_kernel[(S, B * Hkv)](
        probs, *probs.stride()[:2], w, *w.stride()[:3], pool.scale, *pool.scale.stride()[:3], pool.zero,
        positions, *positions.stride()[:2], part, *part.stride()[:3],
        N, offset, per_split, Hkv, NG,
        BITS=pool.bits, PW=_per_word(pool.bits), G=pool.group_size, D=D, NGP=max(16, _pow2(NG)),
        BLOCK_N=BLOCK_N, num_warps=4)
    return part.sum(2)


def pool_positions_triton(levels: torch.Tensor, n: int, counts: tuple[int, ...]) -> torch.Tensor:
    """(B, H, n) int32: positions of level 0, then level 1, ... (a stable argsort of the unpacked levels)."""
    B, H = levels.shape[:2]
    c = (tuple(counts) + (0, 0, 0, 0))[:4]
    out = torch.empty(B, H, n, dtype=torch.int32, device=levels.device)
    _positions_kernel[(B * H,)](levels, *levels.stride()[:2], out, *out.stride()[:2], n, H, c[0], c[1], c[2],
                                BLOCK=1024, num_warps=4)
    return out


def importance_update_triton(codes: torch.Tensor, probs: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """In place: codes (B, Hkv, T) uint8 updated with probs (B, Hq, T) of one query that saw every token;
    `ranges` (at most MAX_RANGES) are the earlier queries' [start, end)."""
    B, Hkv, T = codes.shape
    Hq = probs.shape[1]
    NG = Hq // Hkv
    flat = [x for r in ranges for x in r] + [0, 0] * (MAX_RANGES - len(ranges))
    BLOCK = 512
    _importance_kernel[(triton.cdiv(T, BLOCK), B * Hkv)](
        codes, *codes.stride()[:2], probs, *probs.stride()[:2], T, Hkv, NG, *flat,
        NGP=max(2, _pow2(NG)), BLOCK=BLOCK, num_warps=4)
