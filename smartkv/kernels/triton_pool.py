"""Two-pass decode attention over SmartKV's width pools (Triton), never dequantizing the cache to memory.

SmartKV stores a layer's middle tokens in one dense pool per bit width, separately for keys and values: a
token's key may sit in the 4-bit key pool while its value sits in the 2-bit value pool, so one pass cannot
pair a key with its value the way `triton_attn` does. Two passes instead, one launch each over a segment table
(up to 4 pools, each with its tokens' positions, and 2 full-precision runs: the sinks and the recent window;
program ranges per segment are cumulative, and each program finds its segment by comparing with them):

  _scores_kernel - scores q . k of every segment's tokens for every query head of the KV head's group, written
                   straight into the layer's position-ordered logits (B, Hq, T) (pools through their positions,
                   which are ascending, so the writes are near-coalesced);
  (softmax over all positions in torch: (B, Hq, T) fp32, the probabilities SmartKV's importance needs anyway)
  _values_kernel - sum_j p_j v_j with p read from the probabilities at each token's position; one partial
                   output per split of a segment, summed by the caller (pools and full-precision runs apart, so
                   rotated pools can be rotated back alone).

Pools hold packed codes (2/3/4/8 bit, per-token groups; 3-bit rows read as int32 words) and fp16 scales and
zeros, unpacked in registers (CODE_MODE 1 of triton_attn: exact integers); full-precision runs are read as they
are. Tensor-core dots with
fp16 operands and fp32 accumulation. A dot needs 16 columns: full-precision runs pad a group's query heads to 16;
pools' dots have one column per (channel group, head), so their heads pad only to 16 // (D // G) (`_heads`).
The values pass issues each block's loads one block ahead of its arithmetic; its programs are one warp each and
its split size is planned by whole waves of the card (tuning.PoolTuning).
"""
from __future__ import annotations

import itertools

import triton
import triton.language as tl

import torch

from smartkv.core.quant import QTensor
from smartkv.kernels.reference import MAX_FP, MAX_POOLS, MAX_RANGES
from smartkv.kernels import split as _dec
from smartkv.kernels.split import code_words
from smartkv.kernels.launch import cdiv, launch, pow2
from smartkv.kernels.triton_attn import load_words, unpack
from smartkv.kernels.triton_quant import _mean_code
from smartkv.kernels.tuning import current, splits_of


@triton.jit
def _fp_tile(x_ptr, N, bh, t, valid, D: tl.constexpr):
    """(BLOCK_N, D) fp16 rows t of one (batch, KV head) row bh of a full-precision run (B, Hkv, N, D)."""
    row = bh.to(tl.int64) * N
    x = tl.load(x_ptr + row * D + t[:, None] * D + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)
    return x.to(tl.float16)


@triton.jit
def _pool_load(w_ptr, s_ptr, z_ptr, N, bh, t, valid,
               BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Rows t of one (batch, KV head) row bh of a pool (B, Hkv, N, ...) as they are stored: packed words
    (BLOCK_N, D // PW) (3 bit: 3 bytes per 8 codes, joined into one int32) and their groups' scales and zeros
    (BLOCK_N, D // G) fp32. `unpack(words, ...)` gives the codes."""
    PW: tl.constexpr = 8 if BITS == 3 else 32 // BITS                  # codes per word (3 bit: per 3 bytes)
    WPT: tl.constexpr = (3 * D // 32) if BITS == 3 else D // PW        # int32 words per token
    NGR: tl.constexpr = D // G
    row = bh.to(tl.int64) * N
    w = load_words(w_ptr + row * WPT, t * WPT, valid, BITS, PW, D)
    mo = row * NGR + t[:, None] * NGR + tl.arange(0, NGR)[None, :]
    scale = tl.load(s_ptr + mo, mask=valid[:, None], other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + mo, mask=valid[:, None], other=0.0).to(tl.float32)
    return w, scale, zero


@triton.jit
def _pool_tile(w_ptr, s_ptr, z_ptr, N, bh, t, valid,
               BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows t of a pool as raw codes (BLOCK_N, D) fp16 (exact integers, channel order; BITS 2/3/4/8) and their
    groups' scales and zeros (BLOCK_N, D // G) fp32. The passes apply scales and zeros per (token, group),
    outside the per-element work (as triton_attn does)."""
    PW: tl.constexpr = 8 if BITS == 3 else 32 // BITS
    w, scale, zero = _pool_load(w_ptr, s_ptr, z_ptr, N, bh, t, valid, BITS, G, D)
    return unpack(w, BITS, PW, D, BLOCK_N, 1), scale, zero


@triton.jit
def _seg_pos(pos_ptr, bh, P, t, valid, base, BITS: tl.constexpr):
    """Logit positions of rows t: a pool's through its positions (rows of P in the (B * Hkv, P) positions
    buffer), a full-precision run's contiguous from `base`."""
    if BITS == 16:
        pos = base + t
    else:
        pos = tl.load(pos_ptr + bh.to(tl.int64) * P + t, mask=valid, other=0) + base
    return pos


@triton.jit
def _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w_ptr, s_ptr, z_ptr, pos_ptr, P, N, base, scaling, blk, bh, Hkv,
                NG, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                NGP: tl.constexpr, NGQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of one block of one segment for the query heads of KV head bh % Hkv, stored at their positions of
    the (B, Hq, T) logits: pools with the query in their stored space qp (plus bias), full-precision runs with
    the plain query qf. Queries (B, Hq, D) and bias (B, Hq) contiguous. The group's heads are padded to NGP
    (>= 16, a dot's minimum) for full-precision runs, to NGQ for pools (whose dot has a column per (channel
    group, head): D // G * NGQ >= 16 columns with fewer padded heads)."""
    b = bh // Hkv
    t = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < N
    pos = _seg_pos(pos_ptr, bh, P, t, valid, base, BITS)
    if BITS == 16:
        hq = (bh % Hkv) * NG + tl.arange(0, NGP)                        # query heads of this KV head's group
        hmask = tl.arange(0, NGP) < NG
        row_q = b * Hkv * NG + hq                                       # (b, hq) flattened
        q = tl.load(qf_ptr + row_q[None, :] * D + tl.arange(0, D)[:, None], mask=hmask[None, :], other=0.0)
        s = tl.dot(_fp_tile(w_ptr, N, bh, t, valid, D), q.to(tl.float16))      # (BLOCK_N, NGP) fp32
    else:
        # q . (codes * scale + zero) = sum over groups g of scale_g (q_g . codes_g) + zero_g sum(q_g): one dot of
        # the raw codes with a block-diagonal query, column (g, head) holding the head's query on g's channels
        NGR: tl.constexpr = D // G
        hq = (bh % Hkv) * NG + tl.arange(0, NGQ)
        hmask = tl.arange(0, NGQ) < NG
        row_q = b * Hkv * NG + hq
        q = tl.load(qp_ptr + row_q[None, :] * D + tl.arange(0, D)[:, None], mask=hmask[None, :], other=0.0)
        codes, scale, zero = _pool_tile(w_ptr, s_ptr, z_ptr, N, bh, t, valid, BITS, G, D, BLOCK_N)
        qbd = tl.reshape(tl.broadcast_to(q[:, None, :], (D, NGR, NGQ)), (D, NGR * NGQ))
        own = (tl.arange(0, D)[:, None] // G) == (tl.arange(0, NGR * NGQ)[None, :] // NGQ)
        qbd = tl.where(own, qbd, 0.0).to(tl.float16)
        r = tl.reshape(tl.dot(codes, qbd), (BLOCK_N, NGR, NGQ))
        qsum = tl.sum(tl.reshape(q, (NGR, G, NGQ)), axis=1)                   # (NGR, NGQ)
        s = tl.sum(r * scale[:, :, None] + zero[:, :, None] * qsum[None, :, :], axis=1)
        if HAS_BIAS:
            s += tl.load(bias_ptr + row_q, mask=hmask, other=0.0)[None, :]
    tl.store(out_ptr + row_q[None, :].to(tl.int64) * T + pos[:, None], s * scaling,
             mask=valid[:, None] & hmask[None, :])


@triton.jit
def _seg_values(p_ptr, T, out_ptr, S, w_ptr, s_ptr, z_ptr, pos_ptr, P, N, base, split, first, per_split, bh, Hkv,
                NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                NGP: tl.constexpr, NGQ: tl.constexpr, BLOCK_N: tl.constexpr, FOLD: tl.constexpr):
    """sum_j p_j v_j over split `split - first` (per_split rows) of one segment, for the query heads of KV head
    bh % Hkv, into out[b, hq, split] (out (B, Hq, S, D) fp32; probs (B, Hq, T) contiguous). With FOLD, also
    folds p into those tokens' importance codes (code_ptr (B, Hkv, T) contiguous; r: the observed ranges): every
    token is in exactly one split of one segment, so each is folded once. Heads padded as in _seg_scores."""
    b = bh // Hkv
    lo = (split - first) * per_split
    hi = tl.minimum(lo + per_split, N)
    code_row = code_ptr + bh.to(tl.int64) * T
    if BITS == 16:
        hq = (bh % Hkv) * NG + tl.arange(0, NGP)
        hmask = tl.arange(0, NGP) < NG
        row_q = (b * Hkv * NG + hq).to(tl.int64)
        acc = tl.zeros((NGP, D), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            valid = t < hi
            pos = _seg_pos(pos_ptr, bh, P, t, valid, base, BITS)
            p = tl.load(p_ptr + row_q[:, None] * T + pos[None, :], mask=hmask[:, None] & valid[None, :], other=0.0)
            acc += tl.dot(p.to(tl.float16), _fp_tile(w_ptr, N, bh, t, valid, D))
            if FOLD:
                _fold(code_row, pos, valid, p, NG, r0, r1, r2, r3, r4, r5, r6, r7)
        out = acc
    else:
        # sum_t p_t (codes_t * scale_t + zero_t) on group g's channels = (p * scale_g) @ codes + sum_t p_t zero_t,g:
        # rows (g, head) of acc take p scaled by group g's scales against the raw codes; each channel then reads
        # its own group's row (the segment kernel's values, triton_attn._block)
        NGR: tl.constexpr = D // G
        hq = (bh % Hkv) * NG + tl.arange(0, NGQ)
        hmask = tl.arange(0, NGQ) < NG
        row_q = (b * Hkv * NG + hq).to(tl.int64)
        acc = tl.zeros((NGR * NGQ, D), tl.float32)
        vb = tl.zeros((NGR * NGQ,), tl.float32)
        PW: tl.constexpr = 8 if BITS == 3 else 32 // BITS
        # every load of a block (positions, then the probabilities at them; words, scales, zeros) is issued one
        # block ahead, so its latency (two dependent trips for p) hides behind the previous block's arithmetic
        t = lo + tl.arange(0, BLOCK_N)
        valid = t < hi
        pos = _seg_pos(pos_ptr, bh, P, t, valid, base, BITS)
        p = tl.load(p_ptr + row_q[None, :] * T + pos[:, None], mask=valid[:, None] & hmask[None, :], other=0.0)
        w, scale, zero = _pool_load(w_ptr, s_ptr, z_ptr, N, bh, t, valid, BITS, G, D)
        if FOLD:
            imp = _fold_load(code_row, pos, valid)                        # importance codes of the block
        else:
            imp = tl.zeros((BLOCK_N,), tl.uint8)
        for n0 in range(lo, hi, BLOCK_N):
            t_n = n0 + BLOCK_N + tl.arange(0, BLOCK_N)
            valid_n = t_n < hi
            pos_n = _seg_pos(pos_ptr, bh, P, t_n, valid_n, base, BITS)
            p_n = tl.load(p_ptr + row_q[None, :] * T + pos_n[:, None], mask=valid_n[:, None] & hmask[None, :],
                          other=0.0)
            w_n, scale_n, zero_n = _pool_load(w_ptr, s_ptr, z_ptr, N, bh, t_n, valid_n, BITS, G, D)
            if FOLD:
                imp_n = _fold_load(code_row, pos_n, valid_n)
            codes = unpack(w, BITS, PW, D, BLOCK_N, 1)
            # p * scale in fp16 for the dot: the block's largest scale normalised to 2^14 (no overflow)
            c = 16384.0 / tl.maximum(tl.max(tl.max(scale, axis=1), axis=0), 1e-30)
            pv = tl.reshape(p[:, None, :] * (scale * c)[:, :, None], (BLOCK_N, NGR * NGQ))
            acc += tl.dot(tl.trans(pv.to(tl.float16)), codes) * (1.0 / c)
            vb += tl.sum(tl.reshape(p[:, None, :] * zero[:, :, None], (BLOCK_N, NGR * NGQ)), axis=0)
            if FOLD:
                _fold_loaded(code_row, pos, valid, imp, tl.trans(p), NG, r0, r1, r2, r3, r4, r5, r6, r7)
                imp = imp_n
            valid, pos, p, w, scale, zero = valid_n, pos_n, p_n, w_n, scale_n, zero_n
        acc3 = tl.reshape(acc + vb[:, None], (NGR, NGQ, D))
        own = (tl.arange(0, D)[None, None, :] // G) == tl.arange(0, NGR)[:, None, None]
        out = tl.sum(tl.where(own, acc3, 0.0), axis=0)                          # (NGQ, D)
    tl.store(out_ptr + (row_q[:, None] * S + split) * D + tl.arange(0, D)[None, :], out, mask=hmask[:, None])


# Sizes and positions change as the cache grows: not specialised on (each new divisibility class would compile
# another kernel mid-generation). Segment i: data w (codes as int32 words, bytes at 3 bit, or full-precision
# rows), scales s and zeros z (pools), positions p (pools: this pool's first column of the (B * Hkv, P)
# positions buffer), n rows, a = position base, e = end of its program range (cumulative). The positions
# pointers too: a pool's first column moves with the pools' sizes, and with it the pointer's 16-byte alignment,
# which Triton would otherwise specialise on (a compilation whenever a re-allocation flips one).
_DYNAMIC = ["T", "P"] + [f"{x}{i}" for i in range(6) for x in "npae"]


@triton.jit(do_not_specialize=_DYNAMIC)
def _scores_kernel(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, P, scaling, Hkv, NG,
                   w0, s0, z0, p0, n0, a0, e0,
                   w1, s1, z1, p1, n1, a1, e1,
                   w2, s2, z2, p2, n2, a2, e2,
                   w3, s3, z3, p3, n3, a3, e3,
                   w4, s4, z4, p4, n4, a4, e4,
                   w5, s5, z5, p5, n5, a5, e5,
                   NSEG: tl.constexpr, BITS0: tl.constexpr, BITS1: tl.constexpr, BITS2: tl.constexpr,
                   BITS3: tl.constexpr, BITS4: tl.constexpr, BITS5: tl.constexpr,
                   HAS_BIAS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr,
                   NGQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """First pass: the scores of every segment (up to 4 pools and 2 full-precision runs) in one launch; program
    (blk, bh) scores one BLOCK_N-row block of the segment whose block range holds blk."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    if NSEG > 0:
        if blk < e0:
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w0, s0, z0, p0, P, n0, a0, scaling,
                        blk, bh, Hkv, NG, BITS0, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)
    if NSEG > 1:
        if (blk >= e0) & (blk < e1):
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w1, s1, z1, p1, P, n1, a1, scaling,
                        blk - e0, bh, Hkv, NG, BITS1, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)
    if NSEG > 2:
        if (blk >= e1) & (blk < e2):
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w2, s2, z2, p2, P, n2, a2, scaling,
                        blk - e1, bh, Hkv, NG, BITS2, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)
    if NSEG > 3:
        if (blk >= e2) & (blk < e3):
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w3, s3, z3, p3, P, n3, a3, scaling,
                        blk - e2, bh, Hkv, NG, BITS3, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)
    if NSEG > 4:
        if (blk >= e3) & (blk < e4):
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w4, s4, z4, p4, P, n4, a4, scaling,
                        blk - e3, bh, Hkv, NG, BITS4, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)
    if NSEG > 5:
        if (blk >= e4) & (blk < e5):
            _seg_scores(qp_ptr, qf_ptr, bias_ptr, out_ptr, T, w5, s5, z5, p5, P, n5, a5, scaling,
                        blk - e4, bh, Hkv, NG, BITS5, HAS_BIAS, G, D, NGP, NGQ, BLOCK_N)


@triton.jit(do_not_specialize=_DYNAMIC + ["S", "per_split"] + [f"r{i}" for i in range(8)])
def _values_kernel(p_ptr, T, out_ptr, S, P, per_split, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7,
                   w0, s0, z0, p0, n0, a0, e0,
                   w1, s1, z1, p1, n1, a1, e1,
                   w2, s2, z2, p2, n2, a2, e2,
                   w3, s3, z3, p3, n3, a3, e3,
                   w4, s4, z4, p4, n4, a4, e4,
                   w5, s5, z5, p5, n5, a5, e5,
                   NSEG: tl.constexpr, BITS0: tl.constexpr, BITS1: tl.constexpr, BITS2: tl.constexpr,
                   BITS3: tl.constexpr, BITS4: tl.constexpr, BITS5: tl.constexpr,
                   G: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr, NGQ: tl.constexpr,
                   BLOCK_N: tl.constexpr, FOLD: tl.constexpr, r_end_ptr=None, R_END: tl.constexpr = False):
    """Second pass: probability-weighted values of every segment in one launch; program (split, bh) sums one
    split of the segment whose split range holds it into its own partial output (and with FOLD updates the
    importance codes of its tokens)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    if R_END:  # the last observed range ends where each sequence's query stands (static decode steps)
        r7 = tl.load(r_end_ptr + bh // Hkv)
    if NSEG > 0:
        if split < e0:
            _seg_values(p_ptr, T, out_ptr, S, w0, s0, z0, p0, P, n0, a0, split, 0,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS0, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)
    if NSEG > 1:
        if (split >= e0) & (split < e1):
            _seg_values(p_ptr, T, out_ptr, S, w1, s1, z1, p1, P, n1, a1, split, e0,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS1, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)
    if NSEG > 2:
        if (split >= e1) & (split < e2):
            _seg_values(p_ptr, T, out_ptr, S, w2, s2, z2, p2, P, n2, a2, split, e1,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS2, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)
    if NSEG > 3:
        if (split >= e2) & (split < e3):
            _seg_values(p_ptr, T, out_ptr, S, w3, s3, z3, p3, P, n3, a3, split, e2,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS3, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)
    if NSEG > 4:
        if (split >= e3) & (split < e4):
            _seg_values(p_ptr, T, out_ptr, S, w4, s4, z4, p4, P, n4, a4, split, e3,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS4, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)
    if NSEG > 5:
        if (split >= e4) & (split < e5):
            _seg_values(p_ptr, T, out_ptr, S, w5, s5, z5, p5, P, n5, a5, split, e4,
                        per_split, bh, Hkv, NG, code_ptr, r0, r1, r2, r3, r4, r5, r6, r7, BITS5, G, D, NGP, NGQ,
                        BLOCK_N, FOLD)


@triton.jit
def _block_levels(lv_ptr, sl_k, sl_b, sl_h, n, Hkv, BLOCK: tl.constexpr):
    """Tokens t of block program_id(0) of the row (program_id(1) = b * Hkv + h) of kind program_id(2), their
    2-bit level indices (4 per byte of the packed levels) and whether t < n."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    kind = tl.program_id(2)
    lv = lv_ptr + kind.to(tl.int64) * sl_k + (bh // Hkv).to(tl.int64) * sl_b + (bh % Hkv) * sl_h
    t = blk * BLOCK + tl.arange(0, BLOCK)
    valid = t < n
    byte = tl.load(lv + t // 4, mask=valid, other=0).to(tl.int32)
    return t, (byte >> ((t % 4) * 2)) & 3, valid


@triton.jit(do_not_specialize=["sl_k", "sl_b", "sl_h", "n"])
def _level_counts_kernel(lv_ptr, sl_k, sl_b, sl_h, cnt_ptr, n, Hkv, BLOCK: tl.constexpr):
    """Tokens of each level index in each BLOCK-token block of every row: cnt (K, B * Hkv, blocks, 4) int32."""
    t, idx, valid = _block_levels(lv_ptr, sl_k, sl_b, sl_h, n, Hkv, BLOCK)
    row = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * tl.num_programs(0) \
        + tl.program_id(0)
    lvl = tl.arange(0, 4)
    c = tl.sum(((idx[:, None] == lvl[None, :]) & valid[:, None]).to(tl.int32), axis=0)
    tl.store(cnt_ptr + row * 4 + lvl, c)


@triton.jit(do_not_specialize=["sl_k", "sl_b", "sl_h", "so_k", "so_b", "so_h", "n", "c0", "c1", "c2", "d0", "d1", "d2"])
def _positions_kernel(lv_ptr, sl_k, sl_b, sl_h, cnt_ptr, out_ptr, so_k, so_b, so_h, n, Hkv, c0, c1, c2, d0, d1, d2,
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Stable argsort of the 2-bit level indices of block `blk` of one row: its tokens of level L go to the
    L-th pool's slots after the row's earlier tokens of level L, which it sums from the earlier blocks' counts
    (`_level_counts_kernel`, CHUNK blocks a step): every block of every row in parallel, and of each kind
    (program_id 2: levels[k], out[k]; c the level counts of kind 0, d of kind 1)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    kind = tl.program_id(2)
    t, idx, valid = _block_levels(lv_ptr, sl_k, sl_b, sl_h, n, Hkv, BLOCK)
    out = out_ptr + kind.to(tl.int64) * so_k + (bh // Hkv).to(tl.int64) * so_b + (bh % Hkv) * so_h
    c0 = tl.where(kind == 0, c0, d0)
    c1 = tl.where(kind == 0, c1, d1)
    c2 = tl.where(kind == 0, c2, d2)
    cnt = cnt_ptr + (kind * tl.num_programs(1) + bh).to(tl.int64) * tl.num_programs(0) * 4
    lvl = tl.arange(0, 4)
    acc = tl.zeros([CHUNK, 4], tl.int32)
    for b0 in range(0, blk, CHUNK):
        j = b0 + tl.arange(0, CHUNK)
        acc += tl.load(cnt + j[:, None] * 4 + lvl[None, :], mask=(j < blk)[:, None], other=0)
    before = tl.sum(acc, axis=0)                                   # (4,) the row's tokens of each level before
    r0 = tl.sum(tl.where(lvl == 0, before, 0), 0)
    r1 = tl.sum(tl.where(lvl == 1, before, 0), 0)
    r2 = tl.sum(tl.where(lvl == 2, before, 0), 0)
    r3 = tl.sum(tl.where(lvl == 3, before, 0), 0)
    m0 = (idx == 0) & valid
    m1 = (idx == 1) & valid
    m2 = (idx == 2) & valid
    m3 = (idx == 3) & valid
    tl.store(out + r0 + tl.cumsum(m0.to(tl.int32), 0) - 1, t, mask=m0)
    tl.store(out + c0 + r1 + tl.cumsum(m1.to(tl.int32), 0) - 1, t, mask=m1)
    tl.store(out + c0 + c1 + r2 + tl.cumsum(m2.to(tl.int32), 0) - 1, t, mask=m2)
    tl.store(out + c0 + c1 + c2 + r3 + tl.cumsum(m3.to(tl.int32), 0) - 1, t, mask=m3)


@triton.jit
def _fold(code_ptr, t, valid, p, NG, s0, e0, s1, e1, s2, e2, s3, e3):
    """One decode query's attention p (NGP, BLOCK) over tokens t (query heads of one group) folded into their
    8-bit importance codes at code_ptr + t: mean' = (mean * seen + mass) / (seen + 1), `seen` from the earlier
    queries' position ranges [s_r, e_r)."""
    _fold_loaded(code_ptr, t, valid, _fold_load(code_ptr, t, valid), p, NG, s0, e0, s1, e1, s2, e2, s3, e3)


@triton.jit
def _fold_load(code_ptr, t, valid):
    """The importance codes `_fold` updates (apart, so a loop can load them a block ahead)."""
    return tl.load(code_ptr + t, mask=valid, other=255)


@triton.jit
def _fold_loaded(code_ptr, t, valid, codes, p, NG, s0, e0, s1, e1, s2, e2, s3, e3):
    """`_fold` with the codes at t already loaded (`_fold_load`)."""
    mass = tl.sum(p, 0) / NG
    seen = tl.maximum(e0 - tl.maximum(s0, t), 0) + tl.maximum(e1 - tl.maximum(s1, t), 0)
    seen += tl.maximum(e2 - tl.maximum(s2, t), 0) + tl.maximum(e3 - tl.maximum(s3, t), 0)
    seen = seen.to(tl.float32)
    codes = codes.to(tl.float32)
    mean = tl.where(codes == 255, 0.0, tl.exp2(-codes / 8))
    mean = (mean * seen + mass) / (seen + 1)
    new = -8 * tl.log2(tl.maximum(mean, 2.0 ** -31.875))
    new = tl.minimum(tl.maximum(new + 0.5, 0.0), 255.0)                 # round half up: codes are >= 0
    tl.store(code_ptr + t, new.to(tl.uint8), mask=valid)


@triton.jit(do_not_specialize=["sc_b", "sc_h", "sp_b", "sp_h", "T", "s0", "e0", "s1", "e1", "s2", "e2", "s3", "e3"])
def _importance_kernel(code_ptr, sc_b, sc_h, p_ptr, sp_b, sp_h, T, Hkv, NG,
                       s0, e0, s1, e1, s2, e2, s3, e3, NGP: tl.constexpr, BLOCK: tl.constexpr, r_end_ptr=None,
                       R_END: tl.constexpr = False):
    """`_fold` over all T tokens of every (batch, KV head) row: the query saw them all. R_END: the last range
    ends at r_end_ptr[b] (static decode steps)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    if R_END:
        e3 = tl.load(r_end_ptr + b)
    t = blk * BLOCK + tl.arange(0, BLOCK)
    valid = t < T
    hq = h * NG + tl.arange(0, NGP)
    hmask = tl.arange(0, NGP) < NG
    p = tl.load(p_ptr + b * sp_b + hq[:, None] * sp_h + t[None, :], mask=hmask[:, None] & valid[None, :],
                other=0.0)
    _fold(code_ptr + b * sc_b + h * sc_h, t, valid, p, NG, s0, e0, s1, e1, s2, e2, s3, e3)


@triton.jit(do_not_specialize=["sc_b", "sc_h", "sm_b", "sm_h", "n"])
def _mean_fold_kernel(code_ptr, sc_b, sc_h, m_ptr, sm_b, sm_h, n, Hkv, seen_ptr, ss_b, ss_t, queries, divisor,
                      BLOCK: tl.constexpr):
    """Codes (B, Hkv, n) of a mean over `seen` queries (read on the device: one count, strides 0, or one a
    sequence and token) <- the mean over seen + queries after `mass` / divisor more (as importance_fold_reference:
    round half to even, codes 0..255, 255 read as 0)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    t = blk * BLOCK + tl.arange(0, BLOCK)
    valid = t < n
    cp = code_ptr + b.to(tl.int64) * sc_b + h * sc_h + t
    c = tl.load(cp, mask=valid, other=255).to(tl.float32)
    m = tl.load(m_ptr + b.to(tl.int64) * sm_b + h * sm_h + t, mask=valid, other=0.0)
    s = tl.load(seen_ptr + b.to(tl.int64) * ss_b + t * ss_t, mask=valid, other=0).to(tl.float32)
    tl.store(cp, _mean_code(c, s, m / divisor, queries).to(tl.uint8), mask=valid)


def pool_problem(pool: QTensor) -> str | None:
    """Why these kernels do not take pools shaped like `pool`, None when they do: per-token groups, power-of-two
    head_dim >= 16 and group size. 3-bit pools: head_dim >= 32 (see _block) and at most 2 groups per token: with 4
    or 8, Triton 3.6 fails to compile the passes for sm_90 (an MLIR pass error in TritonGPUOptimizeDotOperands)
    while 2-, 4- and 8-bit pools with 4 and 8 groups compile and pass; benchmarks/check_pool_groups.py tabulates
    it on a GPU. (Gemma 3's head_dim 256 in SmartKV's groups of 64: 4 groups, so its 3-bit pools take torch.)"""
    D, g = pool.shape[-1], pool.group_size
    if pool.axis != -1:
        return "pools must be quantized per token (axis -1)"
    if D < 16 or D & (D - 1) or g & (g - 1):
        return f"head_dim and group size must be powers of two (head_dim >= 16), got {D} and {g}"
    if pool.bits == 3 and (D < 32 or D // min(g, D) > 2):
        return f"3-bit pools need head_dim >= 32 and at most 2 groups per token, got head_dim {D}, group {g}"
    return None


def pool_ok(pool: QTensor) -> bool:
    return pool_problem(pool) is None


def _block(key: str, bits: list) -> int:
    """Tokens per block of a pass: the pool tuning's, at least 32 with a 3-bit segment. Compiled on an H200, 3-bit
    tiles (8 codes per 3 bytes) of 16 tokens, or of head_dim 16, gave wrong sums (relative error ~1) whatever
    the warps, while the interpreter passed them; 32 tokens at head_dim 32, 64 and 128 pass."""
    block = getattr(current().pool, key)
    return max(block, 32) if 3 in bits else block


def _segments(pools, fp) -> tuple[list, list, int]:
    """Kernel arguments (w, s, z, positions, n, base) and BITS of each segment, pools first, and the row stride P
    of the pools' positions (views of one (B, Hkv, P) buffer, or copied into one). Empty segments stay, with
    placeholder pointers of their own dtypes, so that the kernels' signature and constants do not change when a
    pool empties or fills: a new combination would compile the kernels again mid-generation."""
    full = [(pool, pos, base) for pool, pos, base in pools if pool.codes.shape[-2]]
    P = full[0][1].stride(1) if full else 1
    Hkv = full[0][1].shape[1] if full else 1
    if any(pos.stride(0) != Hkv * P or pos.stride(1) != P or pos.stride(2) != 1 for _, pos, _ in full):
        whole = torch.cat([pos for _, pos, _ in pools], -1)
        P, cols = whole.shape[-1], itertools.accumulate([0] + [pos.shape[-1] for _, pos, _ in pools])
        pools = [(pool, whole[..., c:], base) for (pool, _, base), c in zip(pools, cols)]
    args, bits = [], []
    for pool, pos, base in pools:
        n = pool.codes.shape[-2]
        w, sc, z = (t.contiguous() for t in (code_words(pool), pool.scale, pool.zero))
        args.append((w, sc, z, pos, n, base) if n else (*map(_placeholder, (w, sc, z, pos)), 0, base))
        bits.append(pool.bits)
    for x, base in fp:
        n = x.shape[-2]
        x = x.contiguous() if n else _placeholder(x)
        args.append((x, x, x, x, n, base))
        bits.append(16)
    return args, bits, P


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A one-element tensor of t's dtype and device: a valid pointer for an empty segment (never read)."""
    key = (t.device, t.dtype)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = torch.zeros(16, dtype=t.dtype, device=t.device)
    return _PLACEHOLDERS[key]


_PLACEHOLDERS: dict = {}


def _flat(args: list, bits: list, ends: list) -> tuple[list, dict]:
    """Positional segment arguments (padded to 6 with empty copies of the first) and the BITS constexprs."""
    flat = []
    for i in range(MAX_POOLS + MAX_FP):
        w, s, z, p, n, a = args[i] if i < len(args) else (*args[0][:4], 0, 0)
        flat += [w, s, z, p, n, a, ends[i] if i < len(ends) else ends[-1]]
    consts = {f"BITS{i}": bits[i] if i < len(bits) else bits[0] for i in range(MAX_POOLS + MAX_FP)}
    return flat, dict(consts, NSEG=len(args))


def pool_scores_triton(q_pool: torch.Tensor, pools: list, out: torch.Tensor, scaling: float,
                       bias: torch.Tensor | None, q_fp: torch.Tensor | None, fp: list) -> None:
    B, Hq, D = q_pool.shape
    args, bits, P = _segments(pools, fp)  # kernels.pool_scores passes a non-empty segment at least
    Hkv = (pools[0][0].codes if pools else fp[0][0]).shape[1]
    NG = Hq // Hkv
    G = _group(pools)
    block = _block("scores_block", bits)
    ends = list(itertools.accumulate(cdiv(a[4], block) for a in args))
    flat, consts = _flat(args, bits, ends)
    q_pool = q_pool.contiguous()
    q_fp = q_pool if q_fp is None else q_fp.contiguous()
    launch(_scores_kernel, (ends[-1], B * Hkv),
        q_pool, q_fp, q_pool if bias is None else bias.contiguous(), out, out.shape[-1], P,
        scaling, Hkv, NG, *flat, **consts, HAS_BIAS=bias is not None, G=G, D=D, **_heads(NG, D, G),
        BLOCK_N=block, num_warps=current().pool.num_warps)


def pool_values_triton(probs: torch.Tensor, pools: list, fp: list, per_split: int | None,
                       importance: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """With `importance` = (codes (B, Hkv, T) uint8 contiguous, at most MAX_RANGES observed ranges[, range_end]),
    the same launch folds probs into the codes (`importance_update_triton`'s function). With range_end ((B,)
    int32), the last of exactly MAX_RANGES ranges ends at range_end[b] for sequence b, read on the device."""
    B, Hq, T = probs.shape
    args, bits, P = _segments(pools, fp)  # kernels.pool_values passes a non-empty segment at least
    D = (pools[0][0] if pools else fp[0][0]).shape[-1]
    n_pools = sum(b != 16 for b in bits)
    Hkv = (pools[0][0].codes if pools else fp[0][0]).shape[1]
    NG = Hq // Hkv
    G = _group(pools)
    block = _block("values_block", bits)
    warps = current().pool.values_warps
    key = ("pool values", tuple(bits), G, D, block, warps)  # decode._RESIDENT: programs per SM once compiled
    if per_split is None:  # by whole waves of the card (decode's planner), splits of split_tokens at least
        per_split = block * splits_of(tuple(cdiv(a[4], block) for a in args), B * Hkv,
                                      _dec._slots(key, warps, probs.device),
                                      cdiv(current().pool.split_tokens, block))
    per_split = cdiv(max(per_split, 1), block) * block
    splits = [cdiv(a[4], per_split) for a in args]
    ends = list(itertools.accumulate(splits))
    part = torch.empty(B, Hq, ends[-1], D, dtype=torch.float32, device=probs.device)
    flat, consts = _flat(args, bits, ends)
    codes, ranges, end = (tuple(importance) + (None,))[:3] if importance is not None else (part, [], None)
    kern = launch(_values_kernel, (ends[-1], B * Hkv),
        probs.contiguous(), T, part, ends[-1], P, per_split, Hkv, NG, codes, *_range_args(ranges), *flat,
        **consts, G=G, D=D, **_heads(NG, D, G), BLOCK_N=block, FOLD=importance is not None,
        num_warps=warps, **({"r_end_ptr": end, "R_END": True} if end is not None else {}))
    _dec._note_resident(key, kern, warps)
    cut = ends[n_pools - 1] if n_pools else 0
    return part[:, :, :cut].sum(2), part[:, :, cut:].sum(2)


def _heads(NG: int, D: int, G: int) -> dict:
    """Padded query heads per KV head: NGP for full-precision runs (a dot needs 16 columns), NGQ for pools,
    whose dots have D // G columns per head (with the pool tuning's pack_heads; without, NGP as well)."""
    NGP = max(16, pow2(NG))
    NGQ = max(pow2(NG), 16 // max(D // G, 1)) if current().pool.pack_heads else NGP
    return dict(NGP=NGP, NGQ=NGQ)


def _range_args(ranges) -> list[int]:
    """Observed query ranges as MAX_RANGES (start, end) pairs, empty ones padded."""
    return [x for r in ranges for x in r] + [0, 0] * (MAX_RANGES - len(ranges))


def _group(pools) -> int:
    """The pools' group size (one for all: SmartKV quantizes every width with the same groups)."""
    groups = {pool.group_size for pool, _, _ in pools}
    if len(groups) > 1:
        raise ValueError(f"pools of one launch must share a group size, got {sorted(groups)}")
    return groups.pop() if groups else 16


def pool_positions_triton(levels: torch.Tensor, n: int, counts: tuple) -> torch.Tensor:
    """(K, B, H, n) int32 for levels (K, B, H, nbytes) and K <= 2 count tuples: per kind, positions of level 0,
    then level 1, ... (a stable argsort of the unpacked levels), all kinds in one launch."""
    K, B, H = levels.shape[:3]
    positions = current().positions
    c = [(tuple(x) + (0, 0, 0, 0))[:3] for x in counts]
    c = c + c[:1] * (2 - K)
    out = torch.empty(K, B, H, n, dtype=torch.int32, device=levels.device)
    grid = (cdiv(n, positions.block), B * H, K)
    cnt = torch.empty(K, B * H, grid[0], 4, dtype=torch.int32, device=levels.device)
    launch(_level_counts_kernel, grid, levels, *levels.stride()[:3], cnt, n, H, BLOCK=positions.block,
           num_warps=positions.warps)
    launch(_positions_kernel, grid, levels, *levels.stride()[:3], cnt, out, *out.stride()[:3], n, H, *c[0], *c[1],
           BLOCK=positions.block, CHUNK=32, num_warps=positions.warps)
    return out


def importance_update_triton(codes: torch.Tensor, probs: torch.Tensor, ranges: list[tuple[int, int]],
                             range_end: torch.Tensor | None = None) -> None:
    """In place: codes (B, Hkv, T) uint8 updated with probs (B, Hq, T) of one query that saw every token;
    `ranges` (at most MAX_RANGES) are the earlier queries' [start, end); with range_end ((B,) int32), the last of
    exactly MAX_RANGES ranges ends at range_end[b] for sequence b."""
    B, Hkv, T = codes.shape
    Hq = probs.shape[1]
    NG = Hq // Hkv
    BLOCK = 512
    launch(_importance_kernel, (cdiv(T, BLOCK), B * Hkv),
           codes, *codes.stride()[:2], probs, *probs.stride()[:2], T, Hkv, NG, *_range_args(ranges),
           NGP=max(2, pow2(NG)), BLOCK=BLOCK, num_warps=4,
           **({"r_end_ptr": range_end, "R_END": True} if range_end is not None else {}))


def importance_fold_triton(codes: torch.Tensor, mass: torch.Tensor, seen: torch.Tensor, queries: int,
                           divisor: float) -> None:
    B, Hkv, n = codes.shape
    BLOCK = 1024
    ss = (0, 0) if seen.dim() == 1 else seen.stride()
    launch(_mean_fold_kernel, (cdiv(n, BLOCK), B * Hkv),
           codes, *codes.stride()[:2], mass, *mass.stride()[:2], n, Hkv, seen, *ss, float(queries), float(divisor),
           BLOCK=BLOCK, num_warps=4)
