"""A decode call's stable segments in one launch (`triton_batched`).

An eager decode step of a batch of one is bound by host time, and each Triton launch costs tens of microseconds
of it (BENCHMARKS.md, the runner's loop: SmartKV's append step launched ~9.5 kernels a layer, int4's 3). Segments
the caller passes call after call (`KVSegment.stable`: SmartKV's sinks, classes and ring between flushes) become
rows of a descriptor table on the device, built at their first call, and one launch of `_batched_kernel` reads
them all; the others (the recent window, new each step) launch as before. Taken only while the batched segments
hold at most `MAX_ROWS` (sequence, KV head, token) rows: the batched kernel reads codes byte-wise and multiplies in
fp32, slower per byte than the specialised kernels, which win once the card, not the host, sets the pace. A table
is never built while a CUDA graph is being captured (its copy from pinned memory would be replayed from a buffer
reused since).

SMARTKV_BATCH_SEGMENTS=0 turns it off (A/B runs).
"""
from __future__ import annotations

import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smartkv.core.quant import QTensor
from smartkv.kernels import triton_batched as KB
from smartkv.kernels.launch import cdiv, launch, pow2
from smartkv.kernels.segment import FoldInto, KVSegment
from smartkv.kernels.tuning import FP, TOK, programs_per_sm, sm_count, splits_of

MAX_ROWS = 1 << 17        # batch x KV heads x tokens of the batched segments, at most
SPLIT_TOKENS = 512        # tokens a program, at most; fewer while the card has room for more programs (`_group_tps`)
FOLD_TOKENS = 128         # tokens a merge-and-fold program folds (`merge_fold`)
MAX_GRID_Y = 65535        # a CUDA grid's second dimension, at most
_FP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # full-precision segments it reads
_TL = None                # torch dtype -> triton dtype, filled at first use
_GROUPS: dict = {}        # call key -> _Group; an entry leaves when one of its segments dies (and is never used after)
MAX_GROUPS = 1024
WARPS = 4                 # the batched launch's warps a program
DOTS = {"fp32": ("ieee", "ieee"), "tf32": ("tf32", "tf32"), "tf32x3": ("tf32x3", "tf32")}   # (scores, values)
STATS = {"tables": 0, "launches": 0}


def enabled() -> bool:
    return os.environ.get("SMARTKV_BATCH_SEGMENTS", "1") != "0"


def _precision() -> tuple[str, str]:
    """The dots' operands (scores', values'): `SMARTKV_BATCH_DOTS` tf32x3 (the default: the scores as three TF32
    products on the tensor cores, to fp32's accuracy, the values in TF32), tf32 (both in TF32: a 10-bit mantissa as
    the specialised kernels' fp16 operands, fp32's range; the scores then miss test_batched's bounds) or fp32 (exact
    products on the FMA units: ~1.5x tf32x3's device time a call on the H100, BENCHMARKS.md `smartkv_shared_h100`)."""
    raw = os.environ.get("SMARTKV_BATCH_DOTS", "tf32x3")
    if raw not in DOTS:
        raise ValueError(f"SMARTKV_BATCH_DOTS must be one of {', '.join(DOTS)}, got {raw!r}")
    return DOTS[raw]


@dataclass
class _Group:
    refs: tuple             # weak references to the batched segments, in row order
    indices: frozenset      # the segments' places in the call's list
    desc: torch.Tensor      # (rows, NF) int64 on the device
    smap: torch.Tensor      # (splits,) int32: each split's row
    splits: int
    score_cols: dict        # segment index -> its first column in the call's scores buffer (STORE 1 rows)
    score_width: int
    meta: dict              # the launch's constexprs


def _forget(key: tuple):
    return lambda _: _GROUPS.pop(key, None)


def _tl(dtype: torch.dtype):
    global _TL
    if _TL is None:
        import triton.language as tl
        _TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
               torch.int32: tl.int32, torch.int64: tl.int64}
    return _TL[dtype]


def _part_ok(part, residual) -> bool:
    if residual is not None:
        return False
    if isinstance(part, QTensor):
        return (part.axis == -1 and part.codes.stride(-1) == 1 and part.scale.stride(-1) == 1
                and part.zero.stride() == part.scale.stride() and part.scale.dtype == torch.float16)
    return part.stride(-1) == 1 and part.dtype in _FP_DTYPES


def _row_ok(seg: KVSegment, lengths) -> bool:
    """A segment the batched kernel reads: per-token groups or full precision, no residuals, its own lengths or
    none in the call, a contiguous key affine."""
    if seg.residual_last or (seg.lengths is None and lengths is not None):
        return False
    if seg.key_scale is not None and (seg.key_scale.stride(-1) != 1 or seg.key_shift.stride() != seg.key_scale.stride()
                                      or seg.key_shift.dtype != seg.key_scale.dtype):
        return False
    return _part_ok(seg.keys, seg.key_residual) and _part_ok(seg.values, seg.value_residual)


def _readable(seg: KVSegment) -> bool:
    """`_row_ok` of a stable segment but for the call's lengths, worked out at its first call: its tensors change
    only in place, and a step of a batch of one is bound by host work like these stride checks."""
    ok = seg.known("_batch_readable")
    return ok if ok is not None else seg.keep("_batch_readable", _row_ok(seg, None))


def _side(part) -> list:
    """[kind, bits, group] and [pointer, b, h, t strides, scale pointer, b, h, t strides] of keys or values."""
    if isinstance(part, QTensor):
        c, s = part.codes, part.scale
        return [TOK, part.bits, part.group_size], [c.data_ptr(), *c.stride()[:3], s.data_ptr(), *s.stride()[:3]]
    return [FP, 16, part.shape[-1]], [part.data_ptr(), *part.stride()[:3], 0, 0, 0, 0]


def _zero_ptr(part) -> int:
    return part.zero.data_ptr() if isinstance(part, QTensor) else 0


def _row(seg: KVSegment, store: int, fold, start: int, tps: int, scol: int, dummy: int) -> list:
    kh, kp = _side(seg.keys)
    vh, vp = _side(seg.values)
    ka, kb = seg.key_scale, seg.key_shift
    aff = [ka.data_ptr(), kb.data_ptr(), *ka.stride()[:2]] if ka is not None else [0, 0, 0, 0]
    sc = [fold[0].data_ptr(), *fold[0].stride()[:2], fold[1].data_ptr()] if store == 2 else [scol, 0, 0, dummy]
    row = [*kh, *vh, int(ka is not None), int(seg.lengths is not None), store, seg.num_tokens, tps, start, 0,
           kp[0], kp[4], _zero_ptr(seg.keys), *kp[1:4], *kp[5:8],
           vp[0], vp[4], _zero_ptr(seg.values), *vp[1:4], *vp[5:8],
           *aff, seg.lengths.data_ptr() if seg.lengths is not None else 0, *sc]
    assert len(row) == KB.NF.value
    return row


def _tps(tokens: int, most: int = SPLIT_TOKENS) -> int:
    """Tokens a program of a row of `tokens` reads: at most `most`, a multiple of 16."""
    return max(16, min(most, cdiv(tokens, 16) * 16))


def _group_tps(tokens: Sequence[int], rows: int, block_n: int, device) -> int:
    """Tokens a program reads at most, the same for every segment of a group: the fewest waves' time over the card's
    slots (`splits_of`, as the specialised kernels split), in blocks of `block_n`, at most SPLIT_TOKENS. At a
    batch of one a call has a few rows (SmolLM2: 3 KV heads), and 512 tokens a program left an 8K-token call ~50
    programs for 132 SMs, each walking its tokens' latency-bound loads in turn (130 us a call on the H100, int4's
    specialised launch 11; 56 us cut this way: BENCHMARKS.md `smartkv_shared_h100`)."""
    slots = programs_per_sm(WARPS) * sm_count(device)
    per = splits_of(tuple(cdiv(t, block_n) for t in tokens), rows, slots, 1)
    return min(SPLIT_TOKENS, per * block_n)


def _capturing(q3: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on q3's stream: no table is copied to the device then."""
    return q3.is_cuda and torch.cuda.is_current_stream_capturing()


def group(segments: Sequence[KVSegment], q3: torch.Tensor, lengths, stores: Sequence[int], fold) -> _Group | None:
    """The batched launch of this call's stable segments (`KVSegment.stable`) that it can read, or None when fewer
    than two qualify or they hold more than MAX_ROWS rows. `stores[j]`: segment j's STORE mode (0 none, 1 scores,
    2 fold into fold[j])."""
    B, Hq, D = q3.shape
    picked = [(i, seg) for i, seg in enumerate(segments)
              if seg.stable and seg.num_tokens and not (seg.lengths is None and lengths is not None) and _readable(seg)]
    if len(picked) < 2 or D < 16 or D > 256 or D & (D - 1):
        return None
    Hkv = segments[0].keys.shape[1]
    if B * Hkv * sum(seg.num_tokens for _, seg in picked) > MAX_ROWS:
        return None
    folds = tuple((fold[i][0].data_ptr(), fold[i][1].data_ptr()) if stores[i] == 2 else 0 for i, _ in picked)
    key = (tuple((i, id(seg), stores[i]) for i, seg in picked), folds, B, Hq, D, q3.device)
    hit = _GROUPS.get(key)
    if hit is not None and all(r() is seg for r, (_, seg) in zip(hit.refs, picked)):
        return hit
    if _capturing(q3):
        return None
    fdt = {seg.keys.dtype for _, seg in picked if not isinstance(seg.keys, QTensor)}
    fdt |= {seg.values.dtype for _, seg in picked if not isinstance(seg.values, QTensor)}
    adt = {seg.key_scale.dtype for _, seg in picked if seg.key_scale is not None}
    ldt = {seg.lengths.dtype for _, seg in picked if seg.lengths is not None}
    if len(fdt) > 1 or len(adt) > 1 or len(ldt) > 1 or not ldt <= {torch.int32, torch.int64}:
        return None
    block_n = max(16, min(64, 4096 // D))   # the split's unit; the kernel's loop steps at most 32 tokens (below)
    most = _group_tps([seg.num_tokens for _, seg in picked], B * Hkv, block_n, q3.device)
    rows, smap, cols, width = [], [], {}, 0
    for r, (i, seg) in enumerate(picked):
        tps = _tps(seg.num_tokens, most)
        n = cdiv(seg.num_tokens, tps)
        if stores[i] == 1:
            cols[i], width = width, width + seg.num_tokens
        rows.append(_row(seg, stores[i], fold[i] if stores[i] == 2 else None, len(smap), tps, cols.get(i, 0),
                         q3.data_ptr()))
        smap += [r] * n
    dev = q3.device
    # from pinned memory, not waiting for the stream (a copy from pageable memory synchronises it)
    pin = dev.type == "cuda"
    desc, smap = (torch.tensor(x, dtype=t, pin_memory=pin).to(dev, non_blocking=True)
                  for x, t in ((rows, torch.int64), (smap, torch.int32)))
    STATS["tables"] += 1
    # a loop step of 32 tokens, not 64, at head_dim 64: 23.4 against 34.1 us a call (tf32x3 dots, the H100; 16 is no
    # faster over a request)
    meta = dict(D=D, QN=max(16, pow2(Hq // Hkv)), BLOCK_N=min(32, block_n),
                FPT=_tl(fdt.pop() if fdt else q3.dtype), AFT=_tl(adt.pop() if adt else torch.float16),
                LENT=_tl(ldt.pop() if ldt else torch.int64), num_warps=WARPS)
    meta["PREC_S"], meta["PREC_V"] = _precision()
    g = _Group(tuple(weakref.ref(seg, _forget(key)) for _, seg in picked), frozenset(i for i, _ in picked),
               desc, smap, int(smap.numel()), cols, width, meta)
    while len(_GROUPS) >= MAX_GROUPS:   # (entries leave with their segments: this is a bound, not a sweep)
        del _GROUPS[next(iter(_GROUPS))]
    _GROUPS[key] = g
    return g


@dataclass
class Call:
    """What one call's batched launch reads: its group's kept rows and, when the call's last segment is new to it
    but readable (SmartKV's recent window, a new object each step), that segment as a row of its own, copied to the
    device from pinned memory (no wait on the stream): the window takes no launch of its own."""
    group: _Group
    indices: frozenset
    splits: int
    score_cols: dict
    score_width: int
    tail: torch.Tensor | None = None


def call(g: _Group, segments: Sequence[KVSegment], q3: torch.Tensor, lengths, stores: Sequence[int],
         fold) -> Call:
    last = len(segments) - 1
    seg = segments[last]
    plain = Call(g, g.indices, g.splits, g.score_cols, g.score_width)
    if (last in g.indices or not seg.num_tokens or not _row_ok(seg, lengths) or not _dtypes_fit(g, seg)
            or _capturing(q3)):
        return plain
    tps = _tps(seg.num_tokens)
    cols, width = g.score_cols, g.score_width
    if stores[last] == 1:
        cols, width = {**cols, last: width}, width + seg.num_tokens
    row = _row(seg, stores[last], fold[last] if stores[last] == 2 else None, g.splits, tps, cols.get(last, 0),
               q3.data_ptr())
    tail = torch.tensor(row, dtype=torch.int64, pin_memory=q3.is_cuda).to(q3.device, non_blocking=True)
    return Call(g, g.indices | {last}, g.splits + cdiv(seg.num_tokens, tps), cols, width, tail)


def _dtypes_fit(g: _Group, seg: KVSegment) -> bool:
    """Whether `seg`'s full-precision parts, key affine and lengths have the dtypes `g`'s kernel reads."""
    fp = [p.dtype for p in (seg.keys, seg.values) if not isinstance(p, QTensor)]
    return (all(_tl(t) == g.meta["FPT"] for t in fp)
            and (seg.key_scale is None or _tl(seg.key_scale.dtype) == g.meta["AFT"])
            and (seg.lengths is None or _tl(seg.lengths.dtype) == g.meta["LENT"]))


def run(c: Call, q3: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor, split0: int,
        scores: torch.Tensor | None, lse_io: torch.Tensor | None, qk_scale: float, h_kv: int) -> None:
    """The batched launch: partials at splits split0.. of o_part / lse_part, scores into `scores` (B, Hq, width)."""
    B, Hq, _ = q3.shape
    g = c.group
    sc = scores if scores is not None else lse_part
    STATS["launches"] += 1
    launch(KB._batched_kernel, (c.splits, B * h_kv), q3, q3.stride(0), q3.stride(1), g.desc, g.smap, g.splits,
           c.tail if c.tail is not None else g.desc, o_part, lse_part, *o_part.stride()[:3], *lse_part.stride()[:2],
           split0,
           sc, sc.stride(0) if scores is not None else 0, sc.stride(1) if scores is not None else 0,
           lse_io if lse_io is not None else lse_part, qk_scale, h_kv, Hq // h_kv, **g.meta)


def _merge_block(splits: int, head_dim: int) -> int:
    """Partials a merge step reads: a batched call's splits in one step up to 128 (a head's merge is two passes of
    dependent loads a step, and a fold's program works out every head's log2-sum-exp the same way before its own
    work), while a step's partials fit a program's registers (128 x head_dim 128 fp32 over 4 warps: 128 a thread);
    two compiled sizes."""
    return 128 if splits > 64 and head_dim <= 128 else 64


def merge_fold(out: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor, S: int, lse: torch.Tensor,
               scores: Sequence, segments: Sequence[KVSegment], lengths, probs_out, h_kv: int) -> set | None:
    """A batched call's merge and up to two `FoldInto` folds in one launch (`_merge_fold_kernel`: a program a query
    head and one a block of each fold's tokens). Returns the folded segments' indices, or None (more than two folds,
    an lse that is not (B, Hq) contiguous fp32, more programs than a grid's second dimension holds): the caller
    merges as usual."""
    B, Hq, D = out.shape
    targets, offset = [], 0
    for i, seg in enumerate(segments):
        if probs_out is not None and isinstance(probs_out[i], FoldInto) and scores[i] is not None and seg.num_tokens:
            lens = seg.lengths if seg.lengths is not None else lengths
            po, sc = probs_out[i], scores[i]
            targets.append((i, [sc, sc.stride(0), sc.stride(1), po.codes, po.codes.stride(0), po.codes.stride(1),
                                po.seen, po.seen.stride(0), float(po.divisor), lens if lens is not None else lse,
                                0 if seg.lengths is not None else offset, seg.num_tokens], lens is not None))
        offset += seg.num_tokens
    blocks = sum(cdiv(t[-1], FOLD_TOKENS) for _, t, _ in targets)
    if (len(targets) > 2 or lse.dtype != torch.float32 or lse.shape != (B, Hq) or not lse.is_contiguous()
            or Hq + blocks > MAX_GRID_Y):
        return None
    none = [lse, 0, 0, lse, 0, 0, lse, 0, 1.0, lse, 0, 0]
    args = [a for _, t, _ in targets for a in t] + none * (2 - len(targets))
    has = [h for _, _, h in targets] + [False] * (2 - len(targets))
    STATS["launches"] += 1
    launch(KB._merge_fold_kernel, (B, Hq + blocks), o_part, lse_part, out, lse, max(S, 1), *o_part.stride()[:3],
           *lse_part.stride()[:2], *out.stride()[:2], h_kv, Hq // h_kv, *args, D=D, BLOCK_S=_merge_block(S, D),
           NGP=pow2(Hq // h_kv), BLOCK_T=FOLD_TOKENS, HAS_LEN0=has[0], HAS_LEN1=has[1], num_warps=4)
    return {i for i, _, _ in targets}
