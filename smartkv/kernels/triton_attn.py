"""Triton split-K decode attention over packed KV codes (int8/int4/KIVI/SmartKV pools), never dequantizing
the cache to memory.

One launch per segment: program (split, b * kv_heads + h) handles `tokens_per_split` tokens of one KV head for
all G query heads of its group, writes a normalised partial output and its log-sum-exp; one merge launch
combines every split of every segment (Flash-Decoding). Optionally the split kernel writes each token's scaled
score and a third launch turns them into probabilities summed over the group's query heads.

Scales stay out of the inner loop (perf_anchors 1.4):
  per-token keys  - one tensor-core dot of the codes against a block-diagonal query (D, X*NGP), column (x, h)
                    holding q_h on the channels of group x only, gives every group's partial dot; the scale and
                    zero are applied per (token, group): s_t = sum_x scale_tx * R_t(x,h) + zero_tx * sum_{c in x} q_hc.
  per-channel keys (KIVI) - the block covers X groups of G tokens; column (x, h) holds q_h * scale_x, so
                    one dot gives every group's scaled score; each token keeps the column of its own group.
  per-token values - probabilities times the value scale, P'(x,h) = p_h * scale_x * vnorm, against the raw
                    codes; the accumulator row (x, h) is right for channels of group x, picked at the end; zeros
                    enter as sum_t p_h * zero_tx. vnorm, one power of two per run of tokens (_vnorm), keeps
                    P' inside fp16 and lets the value dots accumulate in place; the accumulator is converted
                    to and from those units once per run.
Codes become fp16 by bit tricks, not conversions (CODE_MODE 1: 0x6400 | c is 1024 + c, minus 1024 exact;
CODE_MODE 0: the code's bits read as an fp16 subnormal, c * 2^-24; CODE_MODE 2: as 0 but two codes per
shift-and-mask, 16 bits apart, so each fp16x2 register comes from one word op and the tile's columns are a
fixed permutation of the channels inside each word, `_chan_of`; CODE_MODE 3 (default): as 2, but shifting by
whole bytes only, so a code reads as c * 2^(j * bits) * 2^-24 with j its place in the byte; the query's
channels are divided by 2^(j * bits) once (per-channel keys: the scaled query's, per block), and the value
accumulator's channels likewise, `_code_scale`).
"""
from __future__ import annotations

import triton
import triton.language as tl

from smartkv.kernels.triton_quant import _mean_code
from smartkv.kernels.tuning import CHAN, FP, TOK  # noqa: E402,F401  (key layouts, named once)


@triton.jit
def _chan_of(f, BITS: tl.constexpr, PW: tl.constexpr, CODE_MODE: tl.constexpr):
    """Channel held by column f of an unpacked tile: channel order, except in CODE_MODE 2 and 3 where each
    word's columns are (0, PW/2, 1, PW/2 + 1, ...)."""
    if CODE_MODE >= 2 and BITS != 16 and BITS != 3:
        c = (f // PW) * PW + (f % PW) // 2 + (f % 2) * (PW // 2)
    else:
        c = f
    return c


@triton.jit
def load_words(ptr, row_off, row_mask, BITS: tl.constexpr, PW: tl.constexpr, D: tl.constexpr):
    """(BLOCK_N, D / PW) int32 words of PW codes each; ptr is int32*. At 3 bits a token's codes are 3 bytes per 8
    codes (3D / 32 words, D a multiple of 32): each 3 loaded words hold 4 such groups, returned one per word in
    its low 24 bits (three word loads per 32 codes, not three byte loads per 8)."""
    if BITS == 3:
        off = row_off[:, None] + 3 * tl.arange(0, D // 32)[None, :]
        m = row_mask[:, None]
        w0 = tl.load(ptr + off, mask=m, other=0)
        w1 = tl.load(ptr + off + 1, mask=m, other=0)
        w2 = tl.load(ptr + off + 2, mask=m, other=0)
        g0 = w0 & 0xFFFFFF                                       # bytes 0-2 of the 12
        g1 = ((w0 >> 24) & 0xFF) | ((w1 & 0xFFFF) << 8)          # bytes 3-5
        g2 = ((w1 >> 16) & 0xFFFF) | ((w2 & 0xFF) << 16)         # bytes 6-8
        g3 = (w2 >> 8) & 0xFFFFFF                                # bytes 9-11
        w = tl.reshape(tl.join(tl.join(g0, g2), tl.join(g1, g3)), (row_off.shape[0], D // 8))  # g0 g1 g2 g3
    else:
        w = tl.load(ptr + row_off[:, None] + tl.arange(0, D // PW)[None, :], mask=row_mask[:, None], other=0)
    return w


@triton.jit
def _code(words, k: tl.constexpr, BITS: tl.constexpr, CODE_MODE: tl.constexpr):
    """Code k of every word, as fp16 (exact integer for CODE_MODE 1, integer * 2^-24 otherwise)."""
    c = (words >> (k * BITS)) & ((1 << BITS) - 1)
    if CODE_MODE == 1:
        h = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:
        h = c.to(tl.int16).to(tl.float16, bitcast=True)
    return h


@triton.jit
def _nat4(w, k0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr, CODE_MODE: tl.constexpr):
    """Codes k0, k0+st, k0+2st, k0+3st joined so that flattening the two new minor axes gives that order."""
    return tl.join(tl.join(_code(w, k0, BITS, CODE_MODE), _code(w, k0 + 2 * st, BITS, CODE_MODE)),
                   tl.join(_code(w, k0 + st, BITS, CODE_MODE), _code(w, k0 + 3 * st, BITS, CODE_MODE)))


@triton.jit
def _nat8(w, k0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr, CODE_MODE: tl.constexpr):
    return tl.join(_nat4(w, k0, 2 * st, BITS, CODE_MODE), _nat4(w, k0 + st, 2 * st, BITS, CODE_MODE))


@triton.jit
def _code_scale(f, BITS: tl.constexpr, PW: tl.constexpr, CODE_MODE: tl.constexpr):
    """What column f of an unpacked tile holds per unit of code, times 2^24: 1, except in CODE_MODE 3 where a
    code sitting j places into its byte (j = k mod 8/BITS, k its pair in the word) reads as code * 2^(j*BITS)
    (see _half)."""
    if CODE_MODE == 3 and BITS != 16 and BITS != 3:
        k = ((f % PW) // 2) % (8 // BITS)
        r = tl.exp2((k * BITS).to(tl.float32))
    else:
        r = tl.full(f.shape, 1.0, tl.float32)
    return r


@triton.jit
def _half(words, k: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr, CODE_MODE: tl.constexpr = 2):
    """Code k (HI=0) or k + 16/BITS (HI=1) of every word as an fp16 subnormal (code * 2^-24); both come from
    one shift-and-mask of the word, so the pair is already the fp16x2 register the tensor core reads.
    CODE_MODE 3 shifts by whole bytes only and masks the code where it sits in its byte, so it reads as
    code * 2^(j*BITS) * 2^-24 (j its place in the byte, still a subnormal): the words of a byte pair share one
    shift, and callers undo 2^(j*BITS) per channel (_code_scale) outside the loop."""
    if CODE_MODE == 3:
        j: tl.constexpr = k % (8 // BITS)
        m3: tl.constexpr = (((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)) << (j * BITS)
        h2 = (words >> ((k // (8 // BITS)) * 8)) & m3
    else:
        m: tl.constexpr = ((1 << BITS) - 1) | (((1 << BITS) - 1) << 16)
        h2 = (words >> (k * BITS)) & m
    if HI:
        h2 = h2 >> 16
    return h2.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _half_nat4(w, k0: tl.constexpr, st: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr, CM: tl.constexpr):
    return tl.join(tl.join(_half(w, k0, BITS, HI, CM), _half(w, k0 + 2 * st, BITS, HI, CM)),
                   tl.join(_half(w, k0 + st, BITS, HI, CM), _half(w, k0 + 3 * st, BITS, HI, CM)))


@triton.jit
def _half_tile(w, PW: tl.constexpr, BITS: tl.constexpr, HI: tl.constexpr, CM: tl.constexpr):
    """Codes k (+ 16/BITS if HI) for k < PW/2, joined in k order."""
    if PW == 4:
        h = tl.join(_half(w, 0, BITS, HI, CM), _half(w, 1, BITS, HI, CM))
    elif PW == 8:
        h = _half_nat4(w, 0, 1, BITS, HI, CM)
    else:
        h = tl.join(_half_nat4(w, 0, 2, BITS, HI, CM), _half_nat4(w, 1, 2, BITS, HI, CM))
    return h


@triton.jit
def unpack(words, BITS: tl.constexpr, PW: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            CODE_MODE: tl.constexpr):
    """words (BLOCK_N, D/PW) -> (BLOCK_N, D) fp16 codes in channel order (word w holds codes w*PW .. w*PW+PW-1,
    code w*PW + k at bit k*BITS). Built by nested joins so each thread keeps a word's codes in its own
    registers (a 3-D shift-and-reshape lets Triton spread them over lanes and go through shared memory)."""
    if CODE_MODE >= 2 and BITS != 3:  # pairs (k, k + PW/2) adjacent: see _chan_of
        h = tl.join(_half_tile(words, PW, BITS, 0, CODE_MODE), _half_tile(words, PW, BITS, 1, CODE_MODE))
    elif PW == 4:
        h = _nat4(words, 0, 1, BITS, CODE_MODE)
    elif PW == 8:
        h = _nat8(words, 0, 1, BITS, CODE_MODE)
    else:
        h = tl.join(_nat8(words, 0, 2, BITS, CODE_MODE), _nat8(words, 1, 2, BITS, CODE_MODE))
    return tl.reshape(h, (BLOCK_N, D))


@triton.jit
def _data(t, valid, kq_ptr, skqt, kr_ptr, skrt, k_off, vq_ptr, svqt, vr_ptr, svrt, v_off, chK, chV,
          K_KIND: tl.constexpr, V_KIND: tl.constexpr, K_BITS: tl.constexpr, K_PW: tl.constexpr,
          V_BITS: tl.constexpr, V_PW: tl.constexpr, D: tl.constexpr):
    """Key and value data of tokens t: packed words, or full-precision rows (residual windows start at k_off /
    v_off)."""
    if K_KIND == 0:
        kx = tl.load(kr_ptr + (t - k_off)[:, None] * skrt + chK[None, :], mask=valid[:, None], other=0.0)
    else:
        kx = load_words(kq_ptr, t * skqt, valid, K_BITS, K_PW, D)
    if V_KIND == 0:
        vx = tl.load(vr_ptr + (t - v_off)[:, None] * svrt + chV[None, :], mask=valid[:, None], other=0.0)
    else:
        vx = load_words(vq_ptr, t * svqt, valid, V_BITS, V_PW, D)
    return kx, vx


@triton.jit
def _fetch(n0, lo, hi, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt, TK, k_off,
           vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off, chK, chV,
           K_KIND: tl.constexpr, V_KIND: tl.constexpr, K_BITS: tl.constexpr, K_PW: tl.constexpr,
           K_G: tl.constexpr, K_NGRP: tl.constexpr, V_BITS: tl.constexpr, V_PW: tl.constexpr,
           V_NGRP: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr, XK: tl.constexpr, XV: tl.constexpr,
           BLOCK_N: tl.constexpr, CODE_MODE: tl.constexpr, WORDS: tl.constexpr, SVK: tl.constexpr,
           SVV: tl.constexpr):
    """Global loads of one block: (key data, value data, key meta x2, value meta x2). Data (packed words or
    full-precision tiles) only when WORDS, else a placeholder (the block loads it). Issued a block ahead of
    use in the main loop, so the scales' latency hides behind the previous block's arithmetic."""
    INV: tl.constexpr = 1.0 if CODE_MODE == 1 else 16777216.0
    t = n0 + tl.arange(0, BLOCK_N)
    valid = (t >= lo) & (t < hi)
    xk = tl.arange(0, XK)
    xv = tl.arange(0, XV)
    kx = tl.zeros((1,), tl.int32)
    vx = tl.zeros((1,), tl.int32)
    if K_KIND == 1:
        so = tl.multiple_of(t[:, None] * skst, (1, SVK)) + xk[None, :]
        sm = valid[:, None] & (xk[None, :] < K_NGRP)
        km0 = tl.load(ks_ptr + so, mask=sm, other=0.0).to(tl.float32) * INV
        km1 = tl.load(kz_ptr + so, mask=sm, other=0.0).to(tl.float32)
    elif K_KIND == 2:
        grow = n0 // K_G + tl.arange(0, XK * NGP) // NGP                      # scale row of column (x, h)
        so = grow[None, :] * skst + chK[:, None]                              # (D, XK*NGP)
        sm = (grow < TK // K_G)[None, :]
        km0 = tl.load(ks_ptr + so, mask=sm, other=0.0).to(tl.float32)
        km1 = tl.load(kz_ptr + so, mask=sm, other=0.0).to(tl.float32)
    else:
        km0 = tl.zeros((1,), tl.float32)
        km1 = tl.zeros((1,), tl.float32)
    if V_KIND == 1:
        so = tl.multiple_of(t[:, None] * svst, (1, SVV)) + xv[None, :]
        sm = valid[:, None] & (xv[None, :] < V_NGRP)
        vm0 = tl.load(vs_ptr + so, mask=sm, other=0.0).to(tl.float32)
        vm1 = tl.load(vz_ptr + so, mask=sm, other=0.0).to(tl.float32)
    else:
        vm0 = tl.zeros((1,), tl.float32)
        vm1 = tl.zeros((1,), tl.float32)
    if WORDS:
        kx, vx = _data(t, valid, kq_ptr, skqt, kr_ptr, skrt, k_off, vq_ptr, svqt, vr_ptr, svrt, v_off, chK, chV,
                       K_KIND, V_KIND, K_BITS, K_PW, V_BITS, V_PW, D)
    return kx, vx, km0, km1, vm0, vm1


@triton.jit
def _scores(n0, lo, hi, kx, km0, km1, q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, qk_scale, NG,
            K_KIND: tl.constexpr, K_G: tl.constexpr, K_BITS: tl.constexpr, K_PW: tl.constexpr, D: tl.constexpr,
            NGP: tl.constexpr, XK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KAFF: tl.constexpr,
            STORE_SCORES: tl.constexpr, CODE_MODE: tl.constexpr):
    """Scaled scores (BLOCK_N, NGP) of one block's keys (kx, km* from _fetch); -inf outside [lo, hi)."""
    INV: tl.constexpr = 1.0 if CODE_MODE == 1 else 16777216.0
    t = n0 + tl.arange(0, BLOCK_N)
    valid = (t >= lo) & (t < hi)
    xk = tl.arange(0, XK)
    if K_KIND == 1:  # per-token groups: km0 = scale * INV, km1 = zero, (BLOCK_N, XK)
        kc = unpack(kx, K_BITS, K_PW, D, BLOCK_N, CODE_MODE)
        r = tl.reshape(tl.dot(kc, qbd16), (BLOCK_N, XK, NGP))
        s = tl.sum(r * km0[:, :, None] + km1[:, :, None] * qsum[None, :, :], axis=1)
    elif K_KIND == 2:  # per-channel groups of K_G tokens, XK groups per block: km0/km1 (D, XK*NGP)
        kc = unpack(kx, K_BITS, K_PW, D, BLOCK_N, CODE_MODE)
        if CODE_MODE == 3:  # the key tile reads code * 2^(j*BITS): undo it on the scaled query's channels
            ics = 1.0 / _code_scale(tl.arange(0, D), K_BITS, K_PW, CODE_MODE)
            qs16 = (qrep * km0 * ics[:, None]).to(tl.float16)
        else:
            qs16 = (qrep * km0).to(tl.float16)
        bias = tl.sum(qrep * km1, axis=0)
        r = tl.dot(kc, qs16) * INV + bias[None, :]
        r = tl.reshape(r, (BLOCK_N, XK, NGP))
        own = ((t - n0) // K_G)[:, None, None] == xk[None, :, None]
        s = tl.sum(tl.where(own, r, 0.0), axis=1)
    else:  # full precision; every column group x holds the whole query, any one will do
        r = tl.reshape(tl.dot(kx.to(tl.float16), q16), (BLOCK_N, XK, NGP))
        s = tl.max(r, axis=1)
    if HAS_KAFF:
        s = s + qaff[None, :]
    s = s * qk_scale
    hh = tl.arange(0, NGP)
    if STORE_SCORES == 1:
        tl.store(sc_ptr + hh[None, :] * ssch + t[:, None], s, mask=valid[:, None] & (hh[None, :] < NG))
    elif STORE_SCORES == 2:   # folded here: sc_ptr the tokens' importance codes, ssch their count of queries
        _fold_mass(sc_ptr + t, valid, tl.sum(tl.where(valid[:, None] & (hh[None, :] < NG), tl.exp2(s), 0.0), 1),
                   ssch, NG)
    return tl.where(valid[:, None], s, float("-inf"))


@triton.jit
def _fold_mass(cp, valid, mass, seen, NG):
    """Importance codes at cp (a mean over `seen` queries, `encode_importance`) <- the mean after one more query
    that gave the tokens `mass` summed over its NG heads (as kernels.importance_fold: round half to even)."""
    c = tl.load(cp, mask=valid, other=255).to(tl.float32)
    tl.store(cp, _mean_code(c, seen, mass / NG, 1).to(tl.uint8), mask=valid)


@triton.jit
def _softmax(s, m_i, l_i):
    """Online softmax over one block's scores: (new max, new sum, rescale of what came before, p)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[None, :])
    return m_new, l_i * alpha + tl.sum(p, axis=0), alpha, p


@triton.jit
def _values(acc, vb, alpha, p, vx, vm0, vm1, vnorm, V_KIND: tl.constexpr, V_BITS: tl.constexpr,
            V_PW: tl.constexpr, D: tl.constexpr, NGP: tl.constexpr, XV: tl.constexpr, BLOCK_N: tl.constexpr,
            CODE_MODE: tl.constexpr):
    """acc * alpha + p . values of one block (vx, vm* from _fetch)."""
    alpha_v = tl.reshape(tl.broadcast_to(alpha[None, :], (XV, NGP)), (XV * NGP,))
    acc = acc * alpha_v[:, None]
    vb = vb * alpha_v
    if V_KIND == 1:  # vm0 = scale, vm1 = zero, (BLOCK_N, XV)
        vc = unpack(vx, V_BITS, V_PW, D, BLOCK_N, CODE_MODE)
        # p * scale * vnorm in fp16 for the dot (_vnorm: no overflow); acc is in units of vnorm / INV here
        pv = tl.reshape(p[:, None, :] * (vm0 * vnorm)[:, :, None], (BLOCK_N, XV * NGP))
        acc = tl.dot(tl.trans(pv.to(tl.float16)), vc, acc)
        vb += tl.sum(tl.reshape(p[:, None, :] * vm1[:, :, None], (BLOCK_N, XV * NGP)), axis=0)
    else:
        pv = tl.reshape(tl.broadcast_to(p[:, None, :], (BLOCK_N, XV, NGP)), (BLOCK_N, XV * NGP))
        acc += tl.dot(tl.trans(pv.to(tl.float16)), vx.to(tl.float16))
    return acc, vb


@triton.jit
def _block(n0, lo, hi, m_i, l_i, acc, vb, kx, vx, km0, km1, vm0, vm1,
           kq_ptr, skqt, kr_ptr, skrt, k_off, vq_ptr, svqt, vr_ptr, svrt, v_off,
           q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, vnorm,
           K_KIND: tl.constexpr, V_KIND: tl.constexpr,
           K_BITS: tl.constexpr, K_PW: tl.constexpr, K_G: tl.constexpr,
           V_BITS: tl.constexpr, V_PW: tl.constexpr,
           D: tl.constexpr, NGP: tl.constexpr, XK: tl.constexpr, XV: tl.constexpr, BLOCK_N: tl.constexpr,
           HAS_KAFF: tl.constexpr, STORE_SCORES: tl.constexpr, CODE_MODE: tl.constexpr, WORDS: tl.constexpr):
    """One block of BLOCK_N tokens: scores, online softmax, values. kx/vx/km*/vm* come from _fetch (the words
    only when WORDS; otherwise they are loaded here)."""
    t = n0 + tl.arange(0, BLOCK_N)
    valid = (t >= lo) & (t < hi)
    if not WORDS:
        kx, vx = _data(t, valid, kq_ptr, skqt, kr_ptr, skrt, k_off, vq_ptr, svqt, vr_ptr, svrt, v_off, chK, chV,
                       K_KIND, V_KIND, K_BITS, K_PW, V_BITS, V_PW, D)
    s = _scores(n0, lo, hi, kx, km0, km1, q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, qk_scale, NG, K_KIND, K_G,
                K_BITS, K_PW, D, NGP, XK, BLOCK_N, HAS_KAFF, STORE_SCORES, CODE_MODE)
    m_new, l_i, alpha, p = _softmax(s, m_i, l_i)
    acc, vb = _values(acc, vb, alpha, p, vx, vm0, vm1, vnorm, V_KIND, V_BITS, V_PW, D, NGP, XV, BLOCK_N,
                      CODE_MODE)
    return m_new, l_i, acc, vb


@triton.jit
def _run(lo, hi, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt, TK, k_off,
         vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off,
         q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG,
         K_KIND: tl.constexpr, V_KIND: tl.constexpr, K_BITS: tl.constexpr, K_PW: tl.constexpr, K_G: tl.constexpr,
         K_NGRP: tl.constexpr, V_BITS: tl.constexpr, V_PW: tl.constexpr, V_NGRP: tl.constexpr,
         D: tl.constexpr, NGP: tl.constexpr, XK: tl.constexpr, XV: tl.constexpr, BLOCK_N: tl.constexpr,
         HAS_KAFF: tl.constexpr, STORE_SCORES: tl.constexpr, CODE_MODE: tl.constexpr, PREFETCH: tl.constexpr,
         SVK: tl.constexpr = 1, SVV: tl.constexpr = 1):
    """Tokens [lo, hi) in blocks aligned to BLOCK_N. PREFETCH 1: each block's scales are loaded one block
    ahead; 2: its code words too; 0: everything at use; 3: software-pipelined, block i's values computed after
    block i+1's loads are issued and next to its scores (two independent chains per iteration)."""
    WORDS: tl.constexpr = PREFETCH == 2
    vnorm = 1.0
    if V_KIND == 1:  # quantized values accumulate in units of vnorm / INV per channel (_vnorm, _code_scale)
        INV: tl.constexpr = 1.0 if CODE_MODE == 1 else 16777216.0
        vnorm = _vnorm(vs_ptr, svst, lo, hi, V_NGRP, XV, SVV)
        units = vnorm / INV * _code_scale(tl.arange(0, D), V_BITS, V_PW, CODE_MODE)
        acc = acc * units[None, :]
    n_first = (lo // BLOCK_N) * BLOCK_N
    kx, vx, km0, km1, vm0, vm1 = _fetch(n_first, lo, hi, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt, TK,
                                        k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off, chK, chV,
                                        K_KIND, V_KIND, K_BITS, K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP,
                                        XK, XV, BLOCK_N, CODE_MODE, WORDS or PREFETCH == 3, SVK, SVV)
    if PREFETCH == 3:  # software-pipelined: block i's values after block i+1's loads and with its scores
        s = _scores(n_first, lo, hi, kx, km0, km1, q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, qk_scale, NG,
                    K_KIND, K_G, K_BITS, K_PW, D, NGP, XK, BLOCK_N, HAS_KAFF, STORE_SCORES, CODE_MODE)
        m_i, l_i, alpha, p = _softmax(s, m_i, l_i)
        for n0 in range(n_first + BLOCK_N, hi, BLOCK_N):
            nkx, nvx, nkm0, nkm1, nvm0, nvm1 = _fetch(n0, lo, hi, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt,
                                                      TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt,
                                                      v_off, chK, chV, K_KIND, V_KIND, K_BITS, K_PW, K_G, K_NGRP,
                                                      V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N, CODE_MODE,
                                                      True, SVK, SVV)
            acc, vb = _values(acc, vb, alpha, p, vx, vm0, vm1, vnorm, V_KIND, V_BITS, V_PW, D, NGP, XV, BLOCK_N,
                              CODE_MODE)
            s = _scores(n0, lo, hi, nkx, nkm0, nkm1, q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, qk_scale, NG,
                        K_KIND, K_G, K_BITS, K_PW, D, NGP, XK, BLOCK_N, HAS_KAFF, STORE_SCORES, CODE_MODE)
            m_i, l_i, alpha, p = _softmax(s, m_i, l_i)
            vx, vm0, vm1 = nvx, nvm0, nvm1
        acc, vb = _values(acc, vb, alpha, p, vx, vm0, vm1, vnorm, V_KIND, V_BITS, V_PW, D, NGP, XV, BLOCK_N,
                          CODE_MODE)
    else:
        for n0 in range(n_first, hi, BLOCK_N):
            if PREFETCH > 0:
                nkx, nvx, nkm0, nkm1, nvm0, nvm1 = _fetch(n0 + BLOCK_N, lo, hi, kq_ptr, ks_ptr, kz_ptr, skqt, skst,
                                                          kr_ptr, skrt, TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt,
                                                          svst, vr_ptr, svrt, v_off, chK, chV, K_KIND, V_KIND,
                                                          K_BITS, K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP,
                                                          XK, XV, BLOCK_N, CODE_MODE, WORDS, SVK, SVV)
            else:
                kx, vx, km0, km1, vm0, vm1 = _fetch(n0, lo, hi, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt,
                                                    TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt,
                                                    v_off, chK, chV, K_KIND, V_KIND, K_BITS, K_PW, K_G, K_NGRP,
                                                    V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N, CODE_MODE, WORDS,
                                                    SVK, SVV)
            m_i, l_i, acc, vb = _block(n0, lo, hi, m_i, l_i, acc, vb, kx, vx, km0, km1, vm0, vm1,
                                       kq_ptr, skqt, kr_ptr, skrt, k_off, vq_ptr, svqt, vr_ptr, svrt, v_off,
                                       q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, vnorm,
                                       K_KIND, V_KIND, K_BITS, K_PW, K_G, V_BITS, V_PW, D, NGP, XK, XV, BLOCK_N,
                                       HAS_KAFF, STORE_SCORES, CODE_MODE, WORDS)
            if PREFETCH > 0:
                kx, vx, km0, km1, vm0, vm1 = nkx, nvx, nkm0, nkm1, nvm0, nvm1
    if V_KIND == 1:
        acc = acc / units[None, :]
    return m_i, l_i, acc, vb


@triton.jit
def _vnorm(vs_ptr, svst, lo, hi, V_NGRP: tl.constexpr, XV: tl.constexpr, SVV: tl.constexpr):
    """2^k, the largest power of two with (largest value scale of tokens [lo, hi)) * 2^k <= 2^14, at most 2^60:
    p * scale * 2^k neither overflows fp16 nor needlessly underflows, and one factor for the whole range lets
    the value dots accumulate in place (a power of two: converting the accumulator is exact)."""
    CH: tl.constexpr = 256
    xv = tl.arange(0, XV)
    mx = tl.zeros((CH, XV), tl.float16)
    for n0 in range(lo, hi, CH):
        t = n0 + tl.arange(0, CH)
        so = tl.multiple_of(t[:, None] * svst, (1, SVV)) + xv[None, :]
        sc = tl.load(vs_ptr + so, mask=(t < hi)[:, None] & (xv < V_NGRP)[None, :], other=0.0)
        mx = tl.maximum(mx, tl.abs(sc))
    k = tl.floor(tl.log2(16384.0 / tl.maximum(tl.max(tl.max(mx, axis=1), axis=0).to(tl.float32), 1e-30)))
    return tl.exp2(tl.minimum(k, 60.0))


# Not specialised on: what moves as the cache grows (lengths, offsets, tokens per split) and the strides of the
# per-split and per-token buffers, which scale with the split count S or the token count (S = 1 or a multiple of
# 16 would compile another kernel mid-generation).
@triton.jit(do_not_specialize=["seg_offset", "T_SEG", "TK", "TV", "split0", "TPS", "slb", "slh", "sscb", "ssch"])
def _split_kernel(
        Q, sqb, sqh,
        KQ, KS, KZ, skqb, skqh, skqt, sksb, sksh, skst,
        KR, skrb, skrh, skrt,
        VQ, VS, VZ, svqb, svqh, svqt, svsb, svsh, svst,
        VR, svrb, svrh, svrt,
        KA, KB, skab, skah,
        LEN, seg_offset, T_SEG, TK, TV,
        OP, LP, sob, soh, sos, slb, slh, split0,
        SC, sscb, ssch, SEEN, LPREV,
        qk_scale, TPS, H_KV, NG,
        D: tl.constexpr, NGP: tl.constexpr, XK: tl.constexpr, XV: tl.constexpr,
        K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_PW: tl.constexpr, K_G: tl.constexpr, K_NGRP: tl.constexpr,
        V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_PW: tl.constexpr, V_G: tl.constexpr, V_NGRP: tl.constexpr,
        HAS_KRES: tl.constexpr, HAS_VRES: tl.constexpr, HAS_LEN: tl.constexpr, HAS_KAFF: tl.constexpr,
        STORE_SCORES: tl.constexpr, BLOCK_N: tl.constexpr, CODE_MODE: tl.constexpr, PREFETCH: tl.constexpr,
        RES_LAST: tl.constexpr = False, SVEC_K: tl.constexpr = 1, SVEC_V: tl.constexpr = 1):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)  # offsets in int64: a (32, 8, 128K, 128) fp16 cache has 2^32 elements
    hk = (bh % H_KV).to(tl.int64)
    seq_len = T_SEG
    if HAS_LEN:
        seq_len = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int32) - seg_offset, 0), T_SEG)
    if RES_LAST:  # the residual (one token) is each sequence's last valid token (KVSegment.residual_last)
        TK = tl.maximum(seq_len - 1, 0)
        TV = TK
    s0 = split * TPS
    s1 = tl.minimum(s0 + TPS, seq_len)

    # ---- the group's queries, as a (D, XK*NGP) operand in the key tile's channel order
    f = tl.arange(0, D)
    chK = _chan_of(f, K_BITS, K_PW, CODE_MODE)
    chV = _chan_of(f, V_BITS, V_PW, CODE_MODE)
    col = tl.arange(0, XK * NGP)
    ch = col % NGP
    qrep = tl.load(Q + b * sqb + (hk * NG + ch)[None, :] * sqh + chK[:, None], mask=(ch < NG)[None, :],
                   other=0.0).to(tl.float32)
    qaff = tl.zeros((NGP,), tl.float32)
    if HAS_KAFF:
        ka = tl.load(KA + b * skab + hk * skah + chK).to(tl.float32)
        kb = tl.load(KB + b * skab + hk * skah + chK).to(tl.float32)
        qaff = tl.max(tl.reshape(tl.sum(qrep * kb[:, None], axis=0), (XK, NGP)), axis=0)
        qrep = qrep * ka[:, None]
    q16 = qrep.to(tl.float16)
    qbd16 = tl.where((chK // K_G)[:, None] == (col // NGP)[None, :], q16, 0.0)
    qsum = tl.reshape(tl.sum(qbd16.to(tl.float32), axis=0), (XK, NGP))
    if CODE_MODE == 3 and K_KIND == 1:  # the key tile reads code * 2^(j*BITS): undo it on the query's channels
        qbd16 = (qbd16.to(tl.float32) / _code_scale(f, K_BITS, K_PW, CODE_MODE)[:, None]).to(tl.float16)

    m_i = tl.full((NGP,), -1.0e30, tl.float32)
    l_i = tl.zeros((NGP,), tl.float32)
    acc = tl.zeros((XV * NGP, D), tl.float32)
    vb = tl.zeros((XV * NGP,), tl.float32)

    kq_ptr = KQ + b * skqb + hk * skqh
    ks_ptr = KS + b * sksb + hk * sksh
    kz_ptr = KZ + b * sksb + hk * sksh
    kr_ptr = KR + b * skrb + hk * skrh
    vq_ptr = VQ + b * svqb + hk * svqh
    vs_ptr = VS + b * svsb + hk * svsh
    vz_ptr = VZ + b * svsb + hk * svsh
    vr_ptr = VR + b * svrb + hk * svrh
    hh = tl.arange(0, NGP)
    lp = tl.zeros((NGP,), tl.float32)
    AFF: tl.constexpr = HAS_KAFF or STORE_SCORES == 2   # the scores' per-head term: the key shift's, less lp
    if STORE_SCORES == 2:   # importance folded in this pass, from the previous query's log2-sum-exp per head
        sc_ptr = SC + b * sscb + hk * ssch     # the (sequence, KV head) row of the tokens' importance codes
        ssch = tl.load(SEEN).to(tl.float32)    # the queries they have seen (one count)
        lp = tl.load(LPREV + (b * H_KV + hk) * NG + hh, mask=hh < NG, other=0.0)
        lp = tl.where(lp > -1.0e30, lp, 0.0)
        qaff = qaff - lp / qk_scale            # scores less lp: exp2 of a score is its probability then
    else:
        sc_ptr = SC + b * sscb + hk * NG * ssch

    k_off = 0
    if HAS_KRES:
        k_off = TK
    v_off = 0
    if HAS_VRES:
        v_off = TV
    # phase A: keys and values both as K_KIND / V_KIND (quantized unless the segment is full precision)
    TA = tl.minimum(TK, TV)
    m_i, l_i, acc, vb = _run(s0, tl.minimum(s1, TA), m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr,
                             skrt, TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off, q16, qbd16,
                             qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, K_KIND, V_KIND, K_BITS, K_PW,
                             K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N, AFF, STORE_SCORES,
                             CODE_MODE, PREFETCH, SVEC_K, SVEC_V)
    # phase B: one of keys / values quantized, the other full precision (KIVI's windows); C: both full
    if HAS_KRES or HAS_VRES:
        TB = tl.maximum(TK, TV)
        loB = tl.maximum(s0, TA)
        hiB = tl.minimum(s1, TB)
        if HAS_KRES and HAS_VRES:
            if TK < TV:
                m_i, l_i, acc, vb = _run(loB, hiB, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr,
                                         skrt, TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off,
                                         q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, 0,
                                         V_KIND, K_BITS, K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK, XV,
                                         BLOCK_N, AFF, STORE_SCORES, CODE_MODE, 0)
            else:
                m_i, l_i, acc, vb = _run(loB, hiB, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr,
                                         skrt, TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off,
                                         q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG,
                                         K_KIND, 0, K_BITS, K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK,
                                         XV, BLOCK_N, AFF, STORE_SCORES, CODE_MODE, 0)
            m_i, l_i, acc, vb = _run(tl.maximum(s0, TB), s1, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst,
                                     kr_ptr, skrt, TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt,
                                     v_off, q16, qbd16, qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, 0,
                                     0, K_BITS, K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N,
                                     AFF, STORE_SCORES, CODE_MODE, 0)
        elif HAS_KRES:
            m_i, l_i, acc, vb = _run(loB, hiB, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt,
                                     TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off, q16, qbd16,
                                     qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, 0, V_KIND, K_BITS,
                                     K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N, AFF,
                                     STORE_SCORES, CODE_MODE, 0)
        else:
            m_i, l_i, acc, vb = _run(loB, hiB, m_i, l_i, acc, vb, kq_ptr, ks_ptr, kz_ptr, skqt, skst, kr_ptr, skrt,
                                     TK, k_off, vq_ptr, vs_ptr, vz_ptr, svqt, svst, vr_ptr, svrt, v_off, q16, qbd16,
                                     qrep, qsum, qaff, sc_ptr, ssch, chK, chV, qk_scale, NG, K_KIND, 0, K_BITS,
                                     K_PW, K_G, K_NGRP, V_BITS, V_PW, V_NGRP, D, NGP, XK, XV, BLOCK_N, AFF,
                                     STORE_SCORES, CODE_MODE, 0)

    # ---- pick, for each channel, the accumulator row of its value group; normalise; store
    acc3 = tl.reshape(acc, (XV, NGP, D)) + tl.reshape(vb, (XV, NGP))[:, :, None]
    own = (chV // V_G)[None, None, :] == tl.arange(0, XV)[:, None, None]
    o = tl.sum(tl.where(own, acc3, 0.0), axis=0)                             # (NGP, D)
    has = l_i > 0
    o = o / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + lp + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    hq = hk * NG + hh
    tl.store(OP + b * sob + hq[:, None] * soh + (split0 + split) * sos + chV[None, :], o,
             mask=(hh < NG)[:, None])
    tl.store(LP + b * slb + hq * slh + split0 + split, lse, mask=hh < NG)


@triton.jit
def merge_head(OP, LP, b, h, S, sob, soh, sos, slb, slh, D: tl.constexpr, BLOCK_S: tl.constexpr):
    """(output (D,) fp32, log2-sum-exp) of query head h of sequence b from its S partials."""
    so = tl.arange(0, BLOCK_S)
    f = tl.arange(0, D)
    m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)
    for s0 in range(0, S, BLOCK_S):
        lse = tl.load(LP + b * slb + h * slh + s0 + so, mask=s0 + so < S, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse, axis=0))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros((D,), tl.float32)
    den = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
    for s0 in range(0, S, BLOCK_S):
        sm = s0 + so < S
        lse = tl.load(LP + b * slb + h * slh + s0 + so, mask=sm, other=float("-inf"))
        w = tl.exp2(lse - m_safe)
        o = tl.load(OP + b * sob + h * soh + (s0 + so)[:, None] * sos + f[None, :], mask=sm[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, axis=0)
        den += tl.sum(w, axis=0)
    return acc / tl.where(den > 0, den, 1.0), tl.where(den > 0, m_safe + tl.log2(tl.where(den > 0, den, 1.0)),
                                                        float("-inf"))


@triton.jit
def merge_lse(LP, b, hq, heads, S, slb, slh, BLOCK_S: tl.constexpr):
    """(len(hq),) fp32: the log2-sum-exp over S splits of query heads hq (where `heads`) of sequence b, as
    `merge_head` works it out (to rounding: a tile of heads reduced at once)."""
    so = tl.arange(0, BLOCK_S)
    m = tl.max(tl.full((hq.shape[0], BLOCK_S), float("-inf"), tl.float32), axis=1)
    for s0 in range(0, S, BLOCK_S):
        x = tl.load(LP + b * slb + hq[:, None] * slh + s0 + so[None, :], mask=heads[:, None] & (s0 + so < S)[None, :],
                    other=float("-inf"))
        m = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.zeros((hq.shape[0], BLOCK_S), tl.float32), axis=1)
    for s0 in range(0, S, BLOCK_S):
        x = tl.load(LP + b * slb + hq[:, None] * slh + s0 + so[None, :], mask=heads[:, None] & (s0 + so < S)[None, :],
                    other=float("-inf"))
        den += tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
    return tl.where(den > 0, m_safe + tl.log2(tl.where(den > 0, den, 1.0)), float("-inf"))


@triton.jit(do_not_specialize=["S", "slb", "slh"])
def _merge_kernel(OP, LP, Out, LSE, S, sob, soh, sos, slb, slh, sxb, sxh, H_Q,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H_Q).to(tl.int64)
    h = (pid % H_Q).to(tl.int64)
    out, lse = merge_head(OP, LP, b, h, S, sob, soh, sos, slb, slh, D, BLOCK_S)
    tl.store(Out + b * sxb + h * sxh + tl.arange(0, D), out.to(Out.dtype.element_ty))
    if STORE_LSE:
        tl.store(LSE + pid, lse)


@triton.jit
def _group_probs(SC, sscb, ssch, LSE, b, hk, t, seq_len, H_KV, NG, NGP: tl.constexpr):
    """(BLOCK_T,) fp32: tokens t's probabilities summed over KV head hk's query heads (0 at t >= seq_len), from
    their log2 scores and the call's log2-sum-exp."""
    hh = tl.arange(0, NGP)
    return _probs_of(SC, sscb, ssch, tl.load(LSE + b * H_KV * NG + hk * NG + hh, mask=hh < NG, other=0.0), b, hk,
                     t, seq_len, NG, NGP)


@triton.jit
def _probs_of(SC, sscb, ssch, lse, b, hk, t, seq_len, NG, NGP: tl.constexpr):
    """`_group_probs` with the group's (NGP,) log2-sum-exps given."""
    hh = tl.arange(0, NGP)
    hq = hk * NG + hh
    m = (hh < NG)[:, None] & (t < seq_len)[None, :]
    s = tl.load(SC + b * sscb + hq[:, None] * ssch + t[None, :], mask=m, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # no valid token: every p is masked to 0 below
    return tl.sum(tl.where(m, tl.exp2(s - lse[:, None]), 0.0), axis=0)


@triton.jit
def _seq_len(LEN, b, seg_offset, T_SEG, HAS_LEN: tl.constexpr):
    seq_len = T_SEG
    if HAS_LEN:
        seq_len = tl.minimum(tl.maximum(tl.load(LEN + b).to(tl.int32) - seg_offset, 0), T_SEG)
    return seq_len


@triton.jit(do_not_specialize=["seg_offset", "T_SEG", "sscb", "ssch", "spb", "sph"])
def _probs_kernel(SC, sscb, ssch, LSE, PO, spb, sph, LEN, seg_offset, T_SEG, H_KV, NG,
                  NGP: tl.constexpr, BLOCK_T: tl.constexpr, HAS_LEN: tl.constexpr, ACCUMULATE: tl.constexpr):
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = (bh % H_KV).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    prob = _group_probs(SC, sscb, ssch, LSE, b, hk, t, _seq_len(LEN, b, seg_offset, T_SEG, HAS_LEN), H_KV, NG, NGP)
    po = PO + b * spb + hk * sph + t
    if ACCUMULATE:
        prob += tl.load(po, mask=t < T_SEG, other=0.0)
    tl.store(po, prob, mask=t < T_SEG)


@triton.jit(do_not_specialize=["seg_offset", "T_SEG", "sscb", "ssch", "scb", "sch", "ssb"])
def _probs_fold_kernel(SC, sscb, ssch, LSE, CODES, scb, sch, SEEN, ssb, divisor, LEN, seg_offset, T_SEG, H_KV, NG,
                       NGP: tl.constexpr, BLOCK_T: tl.constexpr, HAS_LEN: tl.constexpr):
    """`kernels.FoldInto`: the probabilities `_probs_kernel` stores folded into importance codes (B, H_KV, T) as
    one more query over SEEN's counts (B, T) uint8, which then gain one for each valid token, saturating at 255.
    One program a block of tokens and sequence, over all its KV heads: they share the counts."""
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    fold_block(SC, sscb, ssch, LSE, CODES, scb, sch, SEEN, ssb, divisor, b, t,
               _seq_len(LEN, b, seg_offset, T_SEG, HAS_LEN), T_SEG, H_KV, NG, NGP)


@triton.jit
def fold_block(SC, sscb, ssch, LSE, CODES, scb, sch, SEEN, ssb, divisor, b, t, seq_len, T_SEG, H_KV, NG,
               NGP: tl.constexpr, S=1, slb=0, slh=0, BLOCK_S: tl.constexpr = 0):
    """Tokens t of sequence b: their probabilities folded into their codes over every KV head, counts advanced.
    The call's log2-sum-exps are LSE's (B, Hq), or with BLOCK_S > 0 worked out from the S split partials' at LSE
    (b, h, split strides slb, slh: `merge_lse`), so a fold need not wait for the merge's stores."""
    sp = SEEN + b * ssb + t
    seen = tl.load(sp, mask=t < T_SEG, other=0)
    for hk in range(H_KV):
        if BLOCK_S > 0:
            hh = tl.arange(0, NGP)
            prob = _probs_of(SC, sscb, ssch, merge_lse(LSE, b, hk * NG + hh, hh < NG, S, slb, slh, BLOCK_S), b, hk, t,
                             seq_len, NG, NGP)
        else:
            prob = _group_probs(SC, sscb, ssch, LSE, b, hk, t, seq_len, H_KV, NG, NGP)
        cp = CODES + b * scb + hk * sch + t
        c = tl.load(cp, mask=t < T_SEG, other=255).to(tl.float32)
        tl.store(cp, _mean_code(c, seen.to(tl.float32), prob / divisor, 1).to(tl.uint8), mask=t < T_SEG)
    tl.store(sp, tl.where((t < seq_len) & (seen < 255), seen + 1, seen).to(tl.uint8), mask=t < T_SEG)
