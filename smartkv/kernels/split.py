"""Launching the split-K decode attention kernels (triton_attn) for a list of segments."""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smartkv.core.quant import QTensor
from smartkv.kernels import batched
from smartkv.kernels import triton_attn as K
from smartkv.kernels.launch import cdiv, launch, pow2
from smartkv.kernels.segment import FoldInto, KVSegment, check_inputs  # noqa: F401
from smartkv.kernels.tuning import Tuning, _splits, programs_per_sm, split_tuning
from smartkv.kernels.tuning import sm_count as _sm_count
from smartkv.kernels.tuning import current as current_tuning

LOG2E = 1.4426950408889634


LAST_KERNELS: dict = {}  # (K kind, key bits, V bits) -> last compiled split kernel (registers, spills: benchmarks)


_RESIDENT: dict = {}  # (K kind, key bits, V bits, tuning) -> programs of that split kernel resident per SM


def _resident_key(kind: int, kbits: int, vbits: int, tune: Tuning) -> tuple:
    return kind, kbits, vbits, tuple(vars(tune).values())  # a dataclass's fields keep their order


def _slots(key: tuple, num_warps: int, device) -> int:
    """Programs of the kernel recorded under `key` that the card runs at once: its programs per SM once it has
    been launched (`_note_resident`), before that `programs_per_sm`."""
    return _RESIDENT.get(key, programs_per_sm(num_warps)) * _sm_count(device)


def _note_resident(key: tuple, kern, num_warps: int) -> None:
    """Record how many programs of the kernel just launched for `key` one SM holds at once, from its registers
    and shared memory (H100/H200: 64K registers, 228 KB shared, 64 warps, 32 programs)."""
    n_regs = getattr(kern, "n_regs", 0) if kern is not None else 0
    if key in _RESIDENT or not n_regs:
        return
    regs = -(-n_regs // 8) * 8 * 32 * num_warps
    shared = max(getattr(kern.metadata, "shared", 0), 1)
    _RESIDENT[key] = max(1, min(65536 // regs, (228 * 1024) // shared, 64 // num_warps, 32))


def code_words(q: QTensor) -> torch.Tensor:
    """Codes as int32 words (3 bit: 3 bytes per 8 codes, read as words: head_dim a multiple of 32); a view when
    the layout allows."""
    try:
        return q.codes.view(torch.int32)
    except RuntimeError:
        return q.codes.contiguous().view(torch.int32)


def per_word(bits: int) -> int:
    return 8 if bits == 3 else 32 // bits


@dataclass
class _Side:
    """One of keys / values of a segment, flattened into kernel arguments."""
    kind: int
    bits: int
    group: int
    ngrp: int
    quant: tuple            # (codes/words, scale, zero)
    quant_strides: tuple    # (codes b, h, t, scale b, h, t)
    fp: torch.Tensor
    fp_strides: tuple
    n_quant: int            # tokens held by the quantized part (all of them when there is no residual)
    has_res: bool
    svec: int = 1           # per-token scales: a row's NGRP fp16 start at multiples of svec (vector loads)


def _side(part, residual: torch.Tensor | None, n_tokens: int, D: int) -> _Side:
    if isinstance(part, QTensor):
        words = code_words(part)
        kind = K.CHAN if part.axis == -2 else K.TOK
        fp = residual if residual is not None else part.scale  # any tensor when there is no residual
        fps = residual.stride()[:3] if residual is not None else (0, 0, 0)
        ngrp = D // part.group_size if kind == K.TOK else 1
        n_quant = part.codes.shape[-2] if residual is not None else n_tokens
        svec = ngrp if kind == K.TOK and ngrp in (2, 4, 8) and part.scale.stride(2) % ngrp == 0 else 1
        return _Side(kind, part.bits, part.group_size, ngrp, (words, part.scale, part.zero),
                     words.stride()[:3] + part.scale.stride()[:3], fp, fps, n_quant, residual is not None, svec)
    if part.stride(-1) != 1:
        part = part.contiguous()
    return _Side(K.FP, 16, D, 1, (part, part, part), (0,) * 6, part, part.stride()[:3], n_tokens, False)


@dataclass
class _Launch:
    index: int              # the segment's place in the call's list
    k: _Side
    v: _Side
    block_n: int
    xk: int
    xv: int
    tps: int
    n_splits: int
    offset: int
    tuning: Tuning
    resident_key: tuple | None = None  # the whole-wave planner's key into _RESIDENT (None: programs_per_sm)
    args: tuple = ()        # the split kernel's arguments that are the segment's own sides'
    affine: tuple | None = None  # its key affine's (scale, shift, 2 strides); None: the segment has none
    meta: dict | None = None  # its constexprs and options fixed by the plan (HAS_LEN, STORE_SCORES: by the call)

    def bind(self, seg: KVSegment, D: int, NGP: int) -> None:
        """Fill `args` and `meta` (built once a plan, not at every launch: an eager step is host-bound)."""
        k, v, ka, t = self.k, self.v, seg.key_scale, self.tuning
        self.args = (*k.quant, *k.quant_strides, k.fp, *k.fp_strides, *v.quant, *v.quant_strides, v.fp,
                     *v.fp_strides)
        self.affine = (ka, seg.key_shift, *ka.stride()[:2]) if ka is not None else None
        self.meta = dict(D=D, NGP=NGP, XK=self.xk, XV=self.xv, K_KIND=k.kind, K_BITS=k.bits,
                         K_PW=per_word(k.bits) if k.kind else 1, K_G=k.group, K_NGRP=k.ngrp, V_KIND=v.kind,
                         V_BITS=v.bits, V_PW=per_word(v.bits) if v.kind else 1, V_G=v.group, V_NGRP=v.ngrp,
                         HAS_KRES=k.has_res, HAS_VRES=v.has_res, HAS_KAFF=ka is not None, BLOCK_N=self.block_n,
                         CODE_MODE=t.code_mode, RES_LAST=seg.residual_last, SVEC_K=k.svec, SVEC_V=v.svec,
                         PREFETCH=t.prefetch, num_warps=t.num_warps, num_stages=t.num_stages,
                         **({"maxnreg": t.maxnreg} if t.maxnreg else {}))


# id(segment) -> (weak reference, call key, its _Launch): a caller that passes the same segment object call after call
# (SmartKV's append classes between flushes, eager steps) has its launch planned once; the entry goes with the segment
_PLANS: dict[int, tuple] = {}


def _forget(ref_id: int):
    return lambda _: _PLANS.pop(ref_id, None)


def _plan(segments: Sequence[KVSegment], B: int, Hkv: int, NG: int, D: int, device,
          skip: frozenset = frozenset()) -> list[_Launch]:
    ngp = pow2(NG)
    fill = max(1, 16 // ngp)   # query-head columns are padded to 16 for the tensor cores
    plans, offset, table = [], 0, id(current_tuning())
    for i, seg in enumerate(segments):
        T = seg.num_tokens
        if T == 0 or i in skip:   # (skip: the segments a batched launch reads)
            offset += T
            continue
        call = (i, offset, B, Hkv, NG, D, device, table)
        hit = _PLANS.get(id(seg))
        if hit is not None and hit[0]() is seg and hit[1] == call:
            plans.append(hit[2])
            offset += T
            continue
        ks = _side(seg.keys, seg.key_residual, T, D)
        vs = _side(seg.values, seg.value_residual, T, D)
        xk = fill if ks.kind == K.CHAN else max(ks.ngrp, fill)  # column sets of the key and value dots
        xv = max(vs.ngrp, fill)
        tune = split_tuning(ks.kind, ks.bits, max(xk, xv) * ngp)
        if ks.kind == K.CHAN:  # a block holds the `fill` key groups of the columns (block_n 0) or fewer
            block_n = xk * ks.group
            if tune.block_n and tune.block_n % ks.group == 0 and tune.block_n < block_n:
                block_n = tune.block_n
        else:
            block_n = tune.block_n
        blocks = cdiv(T, block_n)
        min_blocks = cdiv(tune.min_split_tokens, block_n)
        key = None
        if tune.programs_per_sm:
            want = max(1, cdiv(tune.programs_per_sm * _sm_count(device), B * Hkv))
            per_split = max(cdiv(blocks, want), min_blocks)
        else:
            key = _resident_key(ks.kind, ks.bits, vs.bits, tune)
            per_split = _splits(blocks, B * Hkv, _slots(key, tune.num_warps, device), min_blocks)
        tps = per_split * block_n
        plans.append(_Launch(i, ks, vs, block_n, xk, xv, tps, cdiv(T, tps), offset, tune, key))
        plans[-1].bind(seg, D, ngp)
        # once the card's residency is known (never, off CUDA) the plan is final; a plan that read a copy (codes or
        # tokens not laid out for the kernel) is not kept: the segment's own tensors may change in place before the
        # next call
        in_place = all(side.quant[0].data_ptr() == (part.codes if isinstance(part, QTensor) else part).data_ptr()
                       for side, part in ((ks, seg.keys), (vs, seg.values)))
        if in_place and (key is None or key in _RESIDENT or device.type != "cuda"):
            _PLANS[id(seg)] = (weakref.ref(seg, _forget(id(seg))), call, plans[-1])
        offset += T
    return plans


def _merge_config(plans: Sequence[_Launch], D: int, programs: int, sms: int) -> tuple[int, int]:
    """(partials per step, warps) of the merge launch of `programs` programs on a card of `sms` SMs: the plans'
    largest merge_block_s (a power of two, 16 at least) and merge_warps (two at least past head_dim 128), or
    their few_ settings when programs < sms. Not by split count: the split count changes as the cache grows,
    and another BLOCK_S would compile another kernel mid-generation (the batch does not change)."""
    few = programs < sms
    block_s = max([16] + [pow2(p.tuning.few_merge_block_s if few else p.tuning.merge_block_s) for p in plans])
    warps = max([1 if D <= 128 else 2] + [p.tuning.few_merge_warps if few else p.tuning.merge_warps for p in plans])
    return block_s, warps


def triton_problem(q: torch.Tensor, segments: Sequence[KVSegment]) -> str | None:
    """Why the kernel does not take these shapes, None when it does: power-of-two head_dim >= 16 (a multiple of
    32 with 3-bit codes), power-of-two groups, at most 64 per-token groups. Any number of KV heads and query
    heads per KV head (Gemma 3: head_dim 256, one KV head, 4 query heads)."""
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        return f"head_dim must be a power of two >= 16, got {D}"
    for seg in segments:
        if seg.known("_triton_ok") == D:   # checked at an earlier call
            continue
        for part in (seg.keys, seg.values):
            if isinstance(part, QTensor):
                g = part.group_size
                if g & (g - 1):
                    return f"group sizes must be powers of two, got {g}"
                if part.axis == -1 and D // g > 64:
                    return f"at most 64 groups per token, got {D // g} (head_dim {D}, group {g})"
                if part.bits == 3 and D % 32:
                    return f"3-bit codes need a head_dim multiple of 32, got {D}"
        seg.keep("_triton_ok", D)
    return None


def triton_ok(q: torch.Tensor, segments: Sequence[KVSegment]) -> bool:
    return triton_problem(q, segments) is None


def decode_attention_triton(q: torch.Tensor, segments: Sequence[KVSegment], scaling: float,
                            lengths: torch.Tensor | None = None, return_token_probs: bool = False,
                            probs_out: Sequence[torch.Tensor] | None = None, fold: Sequence | None = None,
                            lse_io: torch.Tensor | None = None):
    squeeze = q.dim() == 3
    q3 = q if squeeze else q.squeeze(2)  # (B, Hq, D)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    B, Hq, D = q3.shape
    Hkv = segments[0].keys.shape[1]
    NG = Hq // Hkv
    dev = q.device
    # each segment's scores: folded in the pass (2), stored for its probabilities (1) or neither (0)
    stores = [2 if fold is not None and fold[i] is not None
              else int(return_token_probs and (probs_out is None or probs_out[i] is not None))
              for i in range(len(segments))]
    grp = batched.group(segments, q3, lengths, stores, fold) if batched.enabled() else None
    if grp is not None:
        grp = batched.call(grp, segments, q3, lengths, stores, fold)
    inside = grp.indices if grp is not None else frozenset()
    plans = _plan(segments, B, Hkv, NG, D, dev, inside)
    S = sum(p.n_splits for p in plans) + (grp.splits if grp is not None else 0)
    o_part = torch.empty(B, Hq, max(S, 1), D, dtype=torch.float32, device=dev)
    lse_part = torch.empty(B, Hq, max(S, 1), dtype=torch.float32, device=dev)
    sbuf = torch.empty(B, Hq, grp.score_width, dtype=torch.float32, device=dev) \
        if grp is not None and grp.score_width else None
    scores = [sbuf[..., grp.score_cols[i]:grp.score_cols[i] + s.num_tokens] if i in inside and stores[i] == 1
              else torch.empty(B, Hq, s.num_tokens, dtype=torch.float32, device=dev) if stores[i] == 1
              else None for i, s in enumerate(segments)]
    split0, o_strides, l_strides = 0, o_part.stride()[:3], lse_part.stride()[:2]
    if grp is not None:
        batched.run(grp, q3, o_part, lse_part, 0, sbuf, lse_io if fold is not None else None, scaling * LOG2E, Hkv)
        split0 = grp.splits
    for p in plans:
        seg = segments[p.index]
        lens = seg.lengths if seg.lengths is not None else lengths
        folds = fold is not None and fold[p.index] is not None
        sc = fold[p.index][0] if folds else scores[p.index] if scores[p.index] is not None else o_part
        k, v = p.k, p.v
        # the segment's own arguments from its plan; a missing key affine, length or fold reads q3 in their place
        kern = launch(K._split_kernel, (p.n_splits, B * Hkv),
                      q3, q3.stride(0), q3.stride(1), *p.args, *(p.affine or (q3, q3, 0, 0)),
                      lens if lens is not None else q3, 0 if seg.lengths is not None else p.offset, seg.num_tokens,
                      k.n_quant, v.n_quant, o_part, lse_part, *o_strides, *l_strides, split0,
                      sc, sc.stride(0), sc.stride(1), fold[p.index][1] if folds else q3, lse_io if folds else q3,
                      scaling * LOG2E, p.tps, Hkv, NG, HAS_LEN=lens is not None,
                      STORE_SCORES=2 if folds else int(scores[p.index] is not None), **p.meta)
        LAST_KERNELS[(k.kind, k.bits, v.bits)] = kern
        if p.resident_key is not None:
            _note_resident(p.resident_key, kern, p.tuning.num_warps)
        split0 += p.n_splits
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    # the call's log2-sum-exp: into lse_io when given (the next call's previous one; read by this call's splits
    # above, written by the merge after them)
    lse = lse_io if lse_io is not None else torch.empty(B, Hq, dtype=torch.float32, device=dev) \
        if return_token_probs else out
    if S == 0:
        lse_part.fill_(float("-inf"))
    if grp is not None and (folded := batched.merge_fold(out, o_part, lse_part, S, lse, scores, segments, lengths,
                                                         probs_out, Hkv)) is not None:
        scores = [None if i in folded else sc for i, sc in enumerate(scores)]   # folded in the merge's launch
    else:
        block_s, warps = _merge_config(plans, D, B * Hq, _sm_count(dev))
        launch(K._merge_kernel, (B * Hq,), o_part, lse_part, out, lse, max(S, 1), *o_strides,
               *l_strides, *out.stride()[:2], Hq, D=D, BLOCK_S=block_s,
               STORE_LSE=return_token_probs or lse_io is not None, num_warps=warps)
    out = out if squeeze else out.unsqueeze(2)
    if not return_token_probs:
        return out
    return out, token_probs(scores, lse, segments, lengths, Hkv, probs_out)


def token_probs(scores: Sequence[torch.Tensor], lse: torch.Tensor, segments: Sequence[KVSegment],
                lengths: torch.Tensor | None, h_kv: int, probs_out: Sequence[torch.Tensor] | None = None) -> list:
    """Each segment's token probabilities summed over the query heads of a KV group, (B, h_kv, T_seg) fp32 (added
    into `probs_out` when given), from the split kernels' logits `scores` (one (B, Hq, T_seg) per segment, log2
    domain) and the call's log2-sum-exp `lse` (B, Hq); tokens past a sequence's length get 0, whatever their
    scores buffer holds. One launch per non-empty segment; a segment whose scores are None gets None, as does one
    whose probs_out entry is a `FoldInto` (folded into its codes instead)."""
    B, Hq = lse.shape
    NG = Hq // h_kv
    probs, offset = [], 0
    for i, seg in enumerate(segments):
        T = seg.num_tokens
        if scores[i] is None:
            probs.append(None)
            offset += T
            continue
        po = probs_out[i] if probs_out is not None else torch.empty(B, h_kv, T, dtype=torch.float32,
                                                                      device=lse.device)
        lens = seg.lengths if seg.lengths is not None else lengths
        seg_offset = 0 if seg.lengths is not None else offset
        BLOCK_T = 256
        if T and isinstance(po, FoldInto):
            launch(K._probs_fold_kernel, (cdiv(T, BLOCK_T), B),
                   scores[i], *scores[i].stride()[:2], lse, po.codes, *po.codes.stride()[:2], po.seen,
                   po.seen.stride(0), float(po.divisor), lens if lens is not None else lse, seg_offset, T, h_kv, NG,
                   NGP=pow2(NG), BLOCK_T=BLOCK_T, HAS_LEN=lens is not None, num_warps=4)
        elif T:
            launch(K._probs_kernel, (cdiv(T, BLOCK_T), B * h_kv),
                   scores[i], *scores[i].stride()[:2], lse, po, *po.stride()[:2], lens if lens is not None else lse,
                   seg_offset, T, h_kv, NG, NGP=pow2(NG), BLOCK_T=BLOCK_T, HAS_LEN=lens is not None,
                   ACCUMULATE=probs_out is not None, num_warps=4)
        probs.append(None if isinstance(po, FoldInto) else po)
        offset += T
    return probs
