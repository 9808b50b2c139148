"""One split-K decode launch over many segments of any widths (`kernels.batched`): the eager step of a small batch.

`triton_attn._split_kernel` is specialised per segment (widths, groups, layouts as constexprs), so a call over
SmartKV's sinks, classes and ring is one launch a segment, and at a batch of one each launch costs more host time
than its work takes on the card. Here a segment is a row of a descriptor table on the device (its kinds, widths,
group sizes, pointers and strides as int64) and a program finds its row through a map of splits, so one compiled
kernel serves every mix of widths. Codes are read from the packed byte stream (code j at bit j * bits, `core.quant`'s
layout for 2, 3, 4 and 8 bits) and dequantized in fp32; the dots run on the tensor cores (the scores as three TF32
products, to fp32's accuracy, no fp16 range limit; `kernels.batched._precision`): slower per byte than the
specialised tiles, which is why `kernels.batched` takes it only below a size.

A program is (split, sequence x KV head) as in `_split_kernel` and writes the same normalised partial output and
log2-sum-exp, so the merge is shared; scores are stored (STORE 1) or folded into importance codes with the previous
query's normaliser (STORE 2) as there.
"""
from __future__ import annotations

import triton
import triton.language as tl

from smartkv.kernels.triton_attn import _fold_mass, _seq_len, _softmax, fold_block, merge_head

# descriptor fields, one int64 each (kernels.batched builds the rows in this order); constexprs, so the kernels
# below read them by name
(F_KKIND, F_KBITS, F_KG, F_VKIND, F_VBITS, F_VG, F_AFF, F_LEN, F_STORE, F_T, F_TPS, F_START, F_SEGOFF,
 F_KQ, F_KS, F_KZ, F_SKQB, F_SKQH, F_SKQT, F_SKSB, F_SKSH, F_SKST,
 F_VQ, F_VS, F_VZ, F_SVQB, F_SVQH, F_SVQT, F_SVSB, F_SVSH, F_SVST,
 F_KA, F_KB, F_SKAB, F_SKAH, F_LENP, F_SC, F_SSCB, F_SSCH, F_SEEN) = (tl.constexpr(i) for i in range(40))
NF = tl.constexpr(40)


@triton.jit
def _field(d, i):
    return tl.load(d + i)


@triton.jit
def _side(d, bits, group, F_PTR, F_SB, F_SPTR, F_SSB, b, hk, f, FPT: tl.constexpr):
    """A side's (keys' or values') fields, read once before the token loop (the loop reads none): the row pointer
    of a full-precision side and the code pointer of a quantized one (its pointer at b, hk either way: F_PTR,
    strides from F_SB), the token stride, the scale and zero pointers (F_SPTR, F_SPTR + 1, strides from F_SSB) and
    their token stride, and each channel's byte, shift and scale column in a token's codes."""
    off = b * _field(d, F_SB) + hk * _field(d, F_SB + 1)
    rows = _field(d, F_PTR).to(tl.pointer_type(FPT)) + off
    codes = _field(d, F_PTR).to(tl.pointer_type(tl.uint8)) + off
    soff = b * _field(d, F_SSB) + hk * _field(d, F_SSB + 1)
    sp = _field(d, F_SPTR).to(tl.pointer_type(tl.float16)) + soff
    zp = _field(d, F_SPTR + 1).to(tl.pointer_type(tl.float16)) + soff
    nb = bits.to(tl.int32)
    bit = f * nb
    return rows, codes, _field(d, F_SB + 2), sp, zp, _field(d, F_SSB + 2), nb, bit >> 3, bit & 7, \
        f // tl.maximum(group.to(tl.int32), 1)


@triton.jit
def _tile(kind, rows, codes, st, sp, zp, sst, nb, byte, shift, col, t, valid, f, D: tl.constexpr):
    """(BLOCK_N, D) fp32 keys or values of tokens t: a full-precision row (kind 0) or per-token groups of `nb`-bit
    codes dequantized, code * scale + zero (kind 1), through a side's `_side`."""
    if kind == 0:
        x = tl.load(rows + t[:, None] * st + f[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    else:
        cp = codes + t[:, None] * st
        lo = tl.load(cp + byte[None, :], mask=valid[:, None], other=0).to(tl.int32)
        if nb == 3:   # only 3-bit codes cross a byte: the others read one byte a code
            hi = tl.load(cp + byte[None, :] + 1, mask=valid[:, None] & (byte + 1 < (D * nb) // 8)[None, :],
                         other=0).to(tl.int32)
            lo = lo | (hi << 8)
        code = (lo >> shift[None, :]) & ((1 << nb) - 1)
        so = t[:, None] * sst + col[None, :]
        s = tl.load(sp + so, mask=valid[:, None], other=0.0).to(tl.float32)
        z = tl.load(zp + so, mask=valid[:, None], other=0.0).to(tl.float32)
        x = code.to(tl.float32) * s + z
    return x


@triton.jit(do_not_specialize=["NS", "split0", "sob", "soh", "sos", "slb", "slh", "sscb", "ssch"])
def _batched_kernel(Q, sqb, sqh, DESC, MAP, NS, TAIL, OP, LP, sob, soh, sos, slb, slh, split0, SC, sscb, ssch,
                    LPREV, qk_scale, H_KV, NG, D: tl.constexpr, QN: tl.constexpr, BLOCK_N: tl.constexpr,
                    FPT: tl.constexpr, AFT: tl.constexpr, LENT: tl.constexpr, PREC_S: tl.constexpr = "ieee",
                    PREC_V: tl.constexpr = "ieee"):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = (bh % H_KV).to(tl.int64)
    if pid < NS:   # a row of the kept table, through the map of its splits
        d = DESC + tl.load(MAP + pid).to(tl.int64) * NF
    else:          # the call's own last row (its first split is NS)
        d = TAIL
    kkind, kbits, kg = _field(d, F_KKIND), _field(d, F_KBITS), _field(d, F_KG)
    vkind, vbits, vg = _field(d, F_VKIND), _field(d, F_VBITS), _field(d, F_VG)
    store = _field(d, F_STORE)
    seq_len = _field(d, F_T).to(tl.int32)
    if _field(d, F_LEN) != 0:   # the segment's valid tokens per sequence
        n = tl.load(_field(d, F_LENP).to(tl.pointer_type(LENT)) + b).to(tl.int32) - _field(d, F_SEGOFF).to(tl.int32)
        seq_len = tl.minimum(tl.maximum(n, 0), seq_len)
    tps = _field(d, F_TPS).to(tl.int32)
    s0 = (pid - _field(d, F_START).to(tl.int32)) * tps
    s1 = tl.minimum(s0 + tps, seq_len)

    f = tl.arange(0, D)
    hh = tl.arange(0, QN)
    heads = hh < NG
    q = tl.load(Q + b * sqb + (hk * NG + hh)[None, :] * sqh + f[:, None], mask=heads[None, :],
                other=0.0).to(tl.float32)                                                 # (D, QN)
    qaff = tl.zeros((QN,), tl.float32)
    if _field(d, F_AFF) != 0:   # stored keys are (k - shift) / scale: q * scale against them, plus q . shift
        aoff = b * _field(d, F_SKAB) + hk * _field(d, F_SKAH)
        ka = tl.load(_field(d, F_KA).to(tl.pointer_type(AFT)) + aoff + f).to(tl.float32)
        kb = tl.load(_field(d, F_KB).to(tl.pointer_type(AFT)) + aoff + f).to(tl.float32)
        qaff = tl.sum(q * kb[:, None], axis=0)
        q = q * ka[:, None]
    # STORE 1: scores at SC's column offset F_SC; STORE 2: importance codes at F_SC folded with the previous
    # query's log2-sum-exp per head (the scores less it), their count of queries at F_SEEN
    sc_scores = SC + b * sscb + (hk * NG + hh) * ssch + _field(d, F_SC)
    cp = _field(d, F_SC).to(tl.pointer_type(tl.uint8)) + b * _field(d, F_SSCB) + hk * _field(d, F_SSCH)
    folds = store == 2
    seen = tl.load(_field(d, F_SEEN).to(tl.pointer_type(tl.float32)), mask=folds, other=0.0)
    lp = tl.load(LPREV + (b * H_KV + hk) * NG + hh, mask=heads, other=0.0)   # (any fp32 >= B x Hq when no fold)
    lp = tl.where(folds & (lp > -1.0e30), lp, 0.0)
    qaff = qaff - lp / qk_scale

    krows, kcodes, kst, ksp, kzp, ksst, knb, kbyte, kshift, kcol = _side(d, kbits, kg, F_KQ, F_SKQB, F_KS, F_SKSB,
                                                                          b, hk, f, FPT)
    vrows, vcodes, vst, vsp, vzp, vsst, vnb, vbyte, vshift, vcol = _side(d, vbits, vg, F_VQ, F_SVQB, F_VS, F_SVSB,
                                                                          b, hk, f, FPT)
    m_i = tl.full((QN,), -1.0e30, tl.float32)
    l_i = tl.zeros((QN,), tl.float32)
    acc = tl.zeros((QN, D), tl.float32)
    for n0 in range(s0, s1, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        valid = t < s1
        k = _tile(kkind, krows, kcodes, kst, ksp, kzp, ksst, knb, kbyte, kshift, kcol, t, valid, f, D)
        s = (tl.dot(k, q, input_precision=PREC_S) + qaff[None, :]) * qk_scale           # (BLOCK_N, QN)
        if store == 1:
            tl.store(sc_scores[None, :] + t[:, None], s, mask=valid[:, None] & heads[None, :])
        elif store == 2:
            _fold_mass(cp + t, valid, tl.sum(tl.where(valid[:, None] & heads[None, :], tl.exp2(s), 0.0), axis=1),
                       seen, NG)
        m_i, l_i, alpha, p = _softmax(tl.where(valid[:, None], s, float("-inf")), m_i, l_i)
        v = _tile(vkind, vrows, vcodes, vst, vsp, vzp, vsst, vnb, vbyte, vshift, vcol, t, valid, f, D)
        acc = acc * alpha[:, None] + tl.dot(tl.trans(p), v, input_precision=PREC_V)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + lp + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    hq = hk * NG + hh
    tl.store(OP + b * sob + hq[:, None] * soh + (split0 + pid) * sos + f[None, :], o, mask=heads[:, None])
    tl.store(LP + b * slb + hq * slh + split0 + pid, lse, mask=heads)


@triton.jit(do_not_specialize=["S", "slb", "slh", "sscb0", "ssch0", "off0", "T0", "sscb1", "ssch1", "off1", "T1"])
def _merge_fold_kernel(OP, LP, Out, LSE, S, sob, soh, sos, slb, slh, sxb, sxh, H_KV, NG,
                       SC0, sscb0, ssch0, C0, scb0, sch0, SEEN0, ssb0, div0, LEN0, off0, T0,
                       SC1, sscb1, ssch1, C1, scb1, sch1, SEEN1, ssb1, div1, LEN1, off1, T1,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, NGP: tl.constexpr, BLOCK_T: tl.constexpr,
                       HAS_LEN0: tl.constexpr, HAS_LEN1: tl.constexpr):
    """The merge of every split of a small call and up to two `FoldInto` segments' folds in one launch of
    (sequence, query head or block of a fold's tokens) programs: a head's program merges its splits as
    `_merge_kernel` does (its log2-sum-exp kept in LSE); a block's works out the log2-sum-exps from the partials'
    (`merge_lse`: no program waits for another's stores) and folds its tokens' probabilities from the stored scores
    into their codes over every KV head (`_probs_fold_kernel`'s). At a batch of one the programs are few and each is a
    chain of dependent loads, so they run side by side rather than one after another."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    H_Q = H_KV * NG
    n0 = tl.cdiv(T0, BLOCK_T)
    if p < H_Q:
        out, lse = merge_head(OP, LP, b, p, S, sob, soh, sos, slb, slh, D, BLOCK_S)
        tl.store(Out + b * sxb + p * sxh + tl.arange(0, D), out.to(Out.dtype.element_ty))
        tl.store(LSE + b * H_Q + p, lse)
    elif p < H_Q + n0:
        t = (p - H_Q) * BLOCK_T + tl.arange(0, BLOCK_T)
        fold_block(SC0, sscb0, ssch0, LP, C0, scb0, sch0, SEEN0, ssb0, div0, b, t,
                   _seq_len(LEN0, b, off0, T0, HAS_LEN0), T0, H_KV, NG, NGP, S, slb, slh, BLOCK_S)
    else:
        t = (p - H_Q - n0) * BLOCK_T + tl.arange(0, BLOCK_T)
        fold_block(SC1, sscb1, ssch1, LP, C1, scb1, sch1, SEEN1, ssb1, div1, b, t,
                   _seq_len(LEN1, b, off1, T1, HAS_LEN1), T1, H_KV, NG, NGP, S, slb, slh, BLOCK_S)
