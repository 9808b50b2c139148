"""Fused kernels for quantized KV caches (Triton), each with a torch reference that computes the same function.

    quantize_pack(x, bits, group_size, axis=-1, out=None, start=0) -> QTensor
    quantize_pack_kv(k, v, bits, group_size, out=None, start=0) -> (QTensor, QTensor)     # one launch
    decode_attention(q, segments, scaling, lengths=None, return_token_probs=False, probs_out=None)
    pool_scores(q, pools, out, scaling, bias=None, q_fp=None, fp=())   # SmartKV's two passes, one launch each
    pool_values(probs, pools, fp=(), tokens_per_split=None, importance=None) -> ((B, Hq, D), (B, Hq, D)) fp32
    pool_positions(levels, n, counts) -> (B, H, n) int32                 # where each pool's tokens sit
    pool_positions([lk, lv], n, [ck, cv]) -> (2, B, H, n)                # keys' and values', one launch
    importance_update(codes, probs, ranges)                             # SmartKV's statistics, in place
    importance_fold(codes, mass, seen, queries, divisor=1)              # a mean over one denominator, in place
    importance_sum(codes, length, out, accumulate=False)                # rows' decoded importance summed
    merge_plan(cm, gone, k, cid, tid, Ct) -> (order, keep)              # one demotion move's row maps
    demotion_keys(codes, kq, vq, length, floor, kmul, power, sensitivity) # its rows' weights as top-k keys
    requantize_rows(kq, vq, codes, keep, k, k_max, bits)                 # its leaving rows at the target's widths
    move_rows(x or [x, ...], src, n=None, fresh=None)                   # rows moved in place (one launch a pass)
    kernels_available(device) -> bool

On CUDA, `decode_attention` runs the CUDA C++ kernels of `cuda_attn` (compiled at first use) where they apply and
says why once where they do not (logger "smartkv.kernels"; Gemma 3's head_dim 256 is one). The Triton path runs
on CUDA tensors (or any tensors under TRITON_INTERPRET=1); everything else, and shapes the kernels do not cover
(head_dim not a power of two), takes the `*_reference` path, logging why once per reason where the kernels could
have run (`split.triton_problem`, `triton_pool.pool_problem`). Bytes written by `quantize_pack` equal
`smartkv.core.quant.quantize`'s; `decode_attention` matches the reference to fp16-operand
accuracy (see tests/test_kernels.py for the bounds).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Sequence

import torch

from smartkv.core.quant import QTensor, packed_width
from smartkv.kernels.reference import (MAX_FP, MAX_POOLS, MAX_RANGES, decode_attention_reference,
                                       demotion_keys_reference, importance_fold_reference, importance_sum_reference,
                                       importance_update_reference, merge_plan_reference, move_rows_reference,
                                       pool_positions_reference, pool_scores_reference, pool_values_reference,
                                       quantize_pack_reference, requantize_rows_reference)
from smartkv.kernels import cuda_attn as _cuda
from smartkv.kernels.segment import FoldInto, KVSegment, check_inputs

try:
    import triton  # noqa: F401
    from triton.runtime.errors import OutOfResources

    from smartkv.kernels import split as _decode
    from smartkv.kernels import triton_pool as _tp
    from smartkv.kernels import triton_demote as _td
    from smartkv.kernels import triton_quant as _tq
    HAVE_TRITON = True
except ImportError:  # no Triton on this platform: reference paths only
    HAVE_TRITON = False
    OutOfResources = RuntimeError

log = logging.getLogger(__name__)

__all__ = ["FoldInto", "KVSegment", "decode_attention", "decode_attention_reference", "demotion_keys",
           "importance_fold", "importance_sum", "importance_update", "kernels_available", "merge_plan", "move_rows",
           "pool_positions", "pool_scores", "pool_values", "quantize_pack", "quantize_pack_at", "quantize_pack_kv",
           "quantize_pack_reference", "requantize_rows", "torch_only", "warm_decode_kernels"]


@functools.cache
def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import; fixed from
    then on, so asked once: decode steps ask on every launch)."""
    if not HAVE_TRITON:
        return False
    from triton.runtime.jit import JITFunction
    return not isinstance(_decode.K._split_kernel, JITFunction)


_TOO_BIG: dict[tuple, str] = {}   # shapes whose kernels ran out of a card's resources: the reference from then on


def _shape_key(q: torch.Tensor, segments: Sequence[KVSegment]) -> tuple:
    parts = [(p.bits, p.group_size, p.axis) if isinstance(p, QTensor) else (p.dtype,)
             for seg in segments for p in (seg.keys, seg.values)]
    return (q.device.type, q.dtype, q.shape[1], q.shape[-1], segments[0].keys.shape[1] if segments else 0,
            tuple(parts), tuple(getattr(seg.key_residual, "dtype", None) for seg in segments))


@functools.cache
def fallback(kernel: str, reason: str) -> None:
    """Log, once per kernel and reason, that a call the kernels could have run takes the torch reference path."""
    log.warning("%s takes the torch reference path: %s", kernel, reason)


_TORCH_ONLY = threading.local()


@contextlib.contextmanager
def torch_only():
    """Within it (this thread), `kernels_available` is False: every call here takes its torch path. A cache layer
    that does not use the kernels (on the CPU unless `cache.layer.FORCE_KERNELS`, or `use_kernels=False`) runs its
    work in one, so under the interpreter (tests) it is not the interpreter that quantizes a whole prompt."""
    before = getattr(_TORCH_ONLY, "on", False)
    _TORCH_ONLY.on = True
    try:
        yield
    finally:
        _TORCH_ONLY.on = before


def kernels_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels run on tensors of `device`: CUDA with Triton, or Triton's interpreter (not
    within `torch_only`)."""
    if not HAVE_TRITON or getattr(_TORCH_ONLY, "on", False):
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
                     out: tuple[QTensor, QTensor] | None = None,
                     start: int | torch.Tensor = 0) -> tuple[QTensor, QTensor]:
    """Keys and values of one layer, per-token groups, in one launch (the append path of int8/int4).
    start: a row, or with `out` a (B,) int32 tensor, sequence b written from row start[b] (read on the device
    by the kernel: static decode steps)."""
    if kernels_available(k.device) and _tq.triton_shapes_ok(k, group_size):
        return _tq.quantize_pack_kv_triton(k, v, bits, group_size, out, start)
    outs = out if out is not None else (None, None)
    return (quantize_pack_reference(k, bits, group_size, -1, outs[0], start),
            quantize_pack_reference(v, bits, group_size, -1, outs[1], start))


def quantize_pack_at(x: torch.Tensor, bits: int, group_size: int, out: QTensor, starts: torch.Tensor) -> QTensor:
    """Quantize x (B, H, T, D) per token into `out`'s rows [starts[b], starts[b] + T) of each sequence b, starts a
    (B,) int32 tensor read on the device (one launch with the kernels: SmartKV's flush inside a captured step)."""
    if kernels_available(x.device) and _tq.triton_shapes_ok(x, group_size):
        return _tq.quantize_pack_kv_triton(x, x, bits, group_size, (out, out), starts, single=True)[0]
    return quantize_pack_reference(x, bits, group_size, -1, out, starts)


def decode_attention(q: torch.Tensor, segments: Sequence[KVSegment], scaling: float,
                     lengths: torch.Tensor | None = None, return_token_probs: bool = False,
                     probs_out: Sequence[torch.Tensor] | None = None, fold: Sequence | None = None,
                     lse_io: torch.Tensor | None = None):
    """Attention of one new query token per sequence over the cached segments, read in place.

    q: (B, Hq, D) or (B, Hq, 1, D); Hq = kv_heads * group (GQA). segments: the cache's runs of tokens (their
    order matters only for `lengths`). lengths: (B,) int, valid tokens per sequence counted over the segments
    in order (a segment's own `lengths` overrides). Returns the output in q's shape and dtype; with
    `return_token_probs`, also a list with one (B, kv_heads, T_seg) fp32 tensor per segment: each token's
    attention probability summed over the query heads of its group (added into `probs_out` when given, so a
    cache can accumulate importance without another pass). A None entry of `probs_out` skips that segment (its
    logits are neither stored nor normalised; its entry in the returned list is None): a cache that needs the
    probabilities of a few tokens only (SmartKV's window) does not pay for the rest.

    A probs_out entry may be a `FoldInto` (codes, seen, divisor): that segment's probabilities are folded into the
    importance codes as one more query and its valid tokens' counts advanced, in the launch that would have
    stored them (its returned entry is None).

    `fold` (one entry a segment, None or (codes, seen)) with `lse_io` ((B, Hq) fp32): each such segment's tokens'
    importance is folded in the pass, its probabilities never stored: codes (B, kv_heads, >= T_seg) uint8 (last
    dimension contiguous), a mean over `seen` ((1,) fp32 on the device) queries, becomes the mean after this one,
    which gave token t the mass sum over its group's heads h of 2^(s_ht - lse_io[b, h]) / group (s: the log2
    scores, scaling x log2(e) x q.k), i.e. its probability were this call's log2-sum-exp that of lse_io; then
    lse_io holds this call's log2-sum-exp, the next call's. SmartKV's append classes: the probabilities of every
    class row are (B, Hq, T) logits written and read twice a step; the previous query's normaliser differs from
    this one's by a factor common to a head's tokens (quality: docs/smartkv.md). The caller advances `seen`.
    """
    check_inputs(q, segments)
    folds = _check_fold(q, segments, probs_out, fold, lse_io)
    for i, (entry, seg) in enumerate(zip(probs_out or (), segments)):
        if isinstance(entry, FoldInto):
            if not return_token_probs:
                raise ValueError(f"probs_out[{i}] is a FoldInto: it needs return_token_probs=True")
            entry.check(q.shape[0], seg.keys.shape[1], seg.num_tokens, i)
    if q.is_cuda:  # the CUDA kernels first (cuda_attn); the Triton ones where they do not apply
        why = _cuda.unsupported(q, segments)
        if why is None and return_token_probs and not kernels_available(q.device):
            why = "token probabilities without Triton (its kernel normalises them)"
        if why is None and folds and not lse_io.is_contiguous():
            why = "a fold's lse_io not contiguous"
        if why is None:
            try:
                return _cuda_attention(q, segments, scaling, lengths, return_token_probs, probs_out,
                                       fold if folds else None, lse_io if folds else None)
            except RuntimeError as exc:  # NVRTC or the driver refused this configuration: noted once
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        _cuda.note_fallback(why)
    if kernels_available(q.device):
        problem = _decode.triton_problem(q, segments)
        if problem is None and _TOO_BIG:   # the shapes' key only when a card has refused some
            problem = _TOO_BIG.get(_shape_key(q, segments))
        if problem is None:
            try:
                return _decode.decode_attention_triton(q, segments, scaling, lengths, return_token_probs, probs_out,
                                                       fold if folds else None, lse_io)
            except (OutOfResources, RuntimeError) as exc:  # raised at a first launch, before the output is written
                if probs_out is not None or folds or not (isinstance(exc, OutOfResources) or _compile_failed(exc)):
                    raise
                problem = f"its launch config does not fit this card at these shapes ({str(exc).splitlines()[0]})"
                _TOO_BIG[_shape_key(q, segments)] = problem
        fallback("decode_attention", problem)
    return decode_attention_reference(q, segments, scaling, lengths, return_token_probs, probs_out,
                                      fold=fold if folds else None, lse_io=lse_io)


def _compile_failed(exc: BaseException) -> bool:
    """Whether a Triton compile failed in its passes: Triton 3.6 on an H100 raises RuntimeError("PassManager::run
    failed") for some head_dim-256 mixes of per-token groups (benchmarks/batched_gpu.out). Any other RuntimeError
    (a CUDA error above all) is not a shape the reference should take over."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("PassManager::run failed")


def _check_fold(q, segments, probs_out, fold, lse_io) -> bool:
    """Whether any segment folds its importance (`decode_attention`); a malformed request raises."""
    if fold is None or not any(f is not None for f in fold):
        return False
    B, Hq = q.shape[:2]
    if len(fold) != len(segments) or lse_io is None or lse_io.shape != (B, Hq) or lse_io.dtype != torch.float32:
        raise ValueError(f"fold must hold one entry for each of the {len(segments)} segments and lse_io be "
                         f"({B}, {Hq}) fp32, got {len(fold)} entries and lse_io {getattr(lse_io, 'shape', None)}")
    for i, (f, seg) in enumerate(zip(fold, segments)):
        if f is None:
            continue
        codes, seen = f
        if probs_out is not None and probs_out[i] is not None:
            raise ValueError(f"segment {i} folds its importance: its probs_out entry must be None")
        done = seg.known("_fold_ok")   # these tensors checked at an earlier call
        if done is not None and done[0]() is codes and done[1]() is seen and done[2] == B:
            continue
        want = (B, seg.keys.shape[1])
        if (codes.dtype != torch.uint8 or codes.shape[:2] != want or codes.shape[-1] < seg.num_tokens
                or codes.stride(-1) != 1 or seen.shape != (1,) or seen.dtype != torch.float32):
            raise ValueError(f"fold[{i}] must be (codes uint8 {want + ('>= ' + str(seg.num_tokens),)}, last dimension "
                             f"contiguous; seen (1,) fp32), got {codes.dtype} {tuple(codes.shape)}, {seen.dtype} "
                             f"{tuple(seen.shape)}")
        seg.keep("_fold_ok", (weakref.ref(codes), weakref.ref(seen), B))   # weakly: keeps neither tensor alive
    return True


def warm_decode_kernels(device: torch.device | str, head_dim: int, pairs, group_size: int) -> None:
    """Compile now the CUDA decode kernels for per-token (key bits, value bits) `pairs` at this head_dim and group
    (1-3 s each, then cached on disk), so that a cache whose segments change widths as it runs (SmartKV's classes)
    does not stop a decode step for a compilation. A no-op off CUDA and for configurations the path does not take;
    a configuration NVRTC refuses is remembered and its calls take the Triton kernels."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("SMARTKV_FAST_ATTN", "1") == "0" or head_dim not in (64, 128):
        return
    dev = device.index if device.index is not None else torch.cuda.current_device()
    for kb, vb in pairs:
        if _cuda.per_token_problem(head_dim, kb, vb, group_size) is None:
            try:
                _cuda.kernels(dev, head_dim, 1, kb, vb, group_size)
            except RuntimeError:
                pass   # remembered by cuda_attn: the calls it would have taken go to Triton, saying why once


def _cuda_attention(q, segments, scaling, lengths, return_token_probs, probs_out, fold=None, lse_io=None):
    if not return_token_probs:
        if fold is None:
            return _cuda.decode_attention_cuda(q, segments, scaling, lengths)
        return _cuda.decode_attention_cuda(q, segments, scaling, lengths, fold=fold, lse_io=lse_io)[0]
    B, Hq = q.shape[:2]
    scores = [None if probs_out is not None and probs_out[i] is None else
              torch.empty(B, Hq, s.num_tokens, dtype=torch.float32, device=q.device) for i, s in enumerate(segments)]
    out, lse = _cuda.decode_attention_cuda(q, segments, scaling, lengths, scores=scores, fold=fold, lse_io=lse_io)
    h_kv = segments[0].keys.shape[1]
    return out, _decode.token_probs(scores, lse, segments, lengths, h_kv, probs_out)


def pool_scores(q: torch.Tensor, pools: Sequence, out: torch.Tensor, scaling: float,
                bias: torch.Tensor | None = None, q_fp: torch.Tensor | None = None, fp: Sequence = ()) -> None:
    """SmartKV's first decode pass, in one launch: the scores of every width pool and full-precision run written
    into the position-ordered logits `out` (B, Hq, T) fp32, contiguous.

    q: (B, Hq, D), the query in the pools' stored space; pools: at most 4 (pool, positions, base): a per-token
    QTensor (B, Hkv, N, D), its tokens' positions (B, Hkv, N) int and a base added to them; bias: (B, Hq), added
    to the pools' scores; fp: at most 2 (keys (B, Hkv, n, D), start): full-precision runs at positions start,
    start + 1, ..., scored with `q_fp` (the plain query; q when None). Sets out[b, hq, base + positions[b, hq // G, j]] =
    scaling * (q[b, hq] . pool[b, hq // G, j] + bias[b, hq]) and out[b, hq, start + j] = scaling * q_fp[b, hq]
    . keys[b, hq // G, j]; other logits stay as they are."""
    pools, fp = _check_segments(pools, fp)
    if _empty(pools, fp):
        return None
    if kernels_available(q.device) and _pools_ok(pools, "pool_scores") and out.is_contiguous():
        return _tp.pool_scores_triton(q, pools, out, scaling, bias, q_fp, fp)
    return pool_scores_reference(q, pools, out, scaling, bias, q_fp, fp)


def pool_values(probs: torch.Tensor, pools: Sequence, fp: Sequence = (), tokens_per_split: int | None = None,
                importance: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SmartKV's second decode pass, in one launch: (sum over the pools' tokens, sum over the full-precision
    runs' tokens) of probs[b, hq, position] * value, each (B, Hq, D) fp32 (apart, so the caller can rotate the
    pools' part back). probs: (B, Hq, T); pools and fp as in `pool_scores` (values instead of keys); each
    program sums at most `tokens_per_split` tokens of one segment (None: planned by whole waves of the card, at
    least POOL_CONFIG's `split_tokens`). importance: (codes, ranges) as
    `importance_update` takes them, where the segments cover every position once: the same launch folds probs
    into the codes (in place). (codes, ranges, range_end): exactly MAX_RANGES ranges, the last one ending at
    range_end[b] ((B,) int32) for sequence b instead of at its own end (read on the device: static decode
    steps)."""
    pools, fp = _check_segments(pools, fp)
    end = importance[2] if importance is not None and len(importance) > 2 else None
    if end is not None:
        _check_range_end(probs.shape[0], importance[1], end)
        importance = (importance[0], importance[1])
        if not (kernels_available(probs.device) and _pools_ok(pools, "pool_values")
                and importance[0].is_contiguous()):
            out = pool_values(probs, pools, fp, tokens_per_split)   # values apart, then the fold on its own
            importance_update(importance[0], probs, importance[1], end)
            return out
    if importance is not None and (importance[0].dim() != 3 or importance[0].shape[0] != probs.shape[0]
                                   or importance[0].shape[-1] != probs.shape[-1]):
        raise ValueError(f"importance codes must be (B, Hkv, T) = ({probs.shape[0]}, Hkv, {probs.shape[-1]}), "
                         f"got {tuple(importance[0].shape)}")
    if _empty(pools, fp):
        D = (pools[0][0].shape[-1] if pools else fp[0][0].shape[-1]) if pools or fp else 0
        z = probs.new_zeros(probs.shape[0], probs.shape[1], D)
        out = z, z.clone()
    elif kernels_available(probs.device) and _pools_ok(pools, "pool_values"):
        fold = importance is not None and len(importance[1]) <= MAX_RANGES and importance[0].is_contiguous()
        out = _tp.pool_values_triton(probs, pools, fp, tokens_per_split,
                                     (importance[0], [tuple(map(int, r)) for r in importance[1]], end)
                                     if fold else None)
        if fold:
            return out
    else:
        out = pool_values_reference(probs, pools, fp)
    if importance is not None:
        importance_update(importance[0], probs, importance[1])
    return out


def _check_segments(pools: Sequence, fp: Sequence) -> tuple[list, list]:
    """At most 4 pools and 2 full-precision runs. Empty ones stay: a caller that always passes the same slots
    (one per width it uses) gets one compiled kernel whatever is empty (see triton_pool._segments)."""
    pools = [(p, pos, int(base)) for p, pos, base in pools]
    fp = [(x, int(start)) for x, start in fp]
    if len(pools) > MAX_POOLS or len(fp) > MAX_FP:
        raise ValueError(f"pools: at most {MAX_POOLS}, fp: at most {MAX_FP}, got {len(pools)} and {len(fp)}")
    return pools, fp


def pool_kernels_ok(pool: QTensor) -> bool:
    """Whether the pool passes' kernels take pools shaped like `pool` (else those calls run the torch path)."""
    return HAVE_TRITON and _tp.pool_ok(pool)


def _pools_ok(pools: list, kernel: str) -> bool:
    """Whether the pool passes' kernels take every non-empty pool (if not, logs why, once per reason)."""
    problem = next((r for r in (_tp.pool_problem(p) for p, _, _ in pools if p.codes.shape[-2]) if r), None)
    if problem is not None:
        fallback(kernel, problem)
    return problem is None


def _empty(pools: list, fp: list) -> bool:
    return not any(p.codes.shape[-2] for p, _, _ in pools) and not any(x.shape[-2] for x, _ in fp)


def pool_positions(levels, n: int, counts: Sequence) -> torch.Tensor:
    """Positions (B, H, n) int32 of the tokens of each width pool, pool after pool, each in position order: a
    stable argsort of the 2-bit level indices `levels` (B, H, ceil8(n) / 4) packed uint8 (policy.pack_levels).
    `counts` = tokens per level index (every row has the same; at most 4 levels).

    Keys' and values' positions in one launch: `levels` a list of 2 such tensors (same shape) and `counts` a list
    of their 2 count lists give (2, B, H, n)."""
    many = isinstance(levels, (list, tuple))
    stack, all_counts = (list(levels), list(counts)) if many else ([levels], [counts])
    if len(stack) > 2 or len(all_counts) != len(stack) or len({x.shape for x in stack}) != 1:
        raise ValueError("levels must be one tensor or a list of at most 2 tensors of one shape, with one counts "
                         f"list each; got {len(stack)} tensors and {len(all_counts)} counts lists")
    for c in all_counts:
        if len(c) > 4 or sum(c) != n:
            raise ValueError(f"counts must be at most 4 tokens-per-level numbers summing to n={n}, got {list(c)}")
    if n and kernels_available(stack[0].device):
        out = _tp.pool_positions_triton(torch.stack(stack), n, [tuple(c) for c in all_counts])
    else:
        out = torch.stack([pool_positions_reference(x, n, tuple(c)) for x, c in zip(stack, all_counts)])
    return out if many else out[0]


def _check_range_end(batch: int, ranges: Sequence, range_end: torch.Tensor) -> None:
    if len(ranges) != MAX_RANGES or range_end.shape != (batch,) or range_end.dtype != torch.int32:
        raise ValueError(f"with range_end, ranges must hold exactly {MAX_RANGES} ranges and range_end be "
                         f"({batch},) int32, got {len(ranges)} ranges, {tuple(range_end.shape)} {range_end.dtype}")


def importance_update(codes: torch.Tensor, probs: torch.Tensor, ranges: Sequence[tuple[int, int]],
                      range_end: torch.Tensor | None = None) -> None:
    """Fold one decode query's attention into SmartKV's importance codes, in place (smartkv.core.importance).

    codes: (B, Hkv, T) uint8 (`encode_importance` of the mean attention each token received); probs: (B, Hq, T)
    fp32, the query's attention over all T tokens; ranges: the [start, end) positions of the queries observed
    before, from which each token's count of observers is derived. range_end ((B,) int32, with exactly
    MAX_RANGES ranges): the last range ends at range_end[b] for sequence b instead, read on the device (static
    decode steps)."""
    ranges = [tuple(map(int, r)) for r in ranges]
    if range_end is not None:
        _check_range_end(codes.shape[0], ranges, range_end)
        if kernels_available(codes.device) and codes.shape[-1]:
            return _tp.importance_update_triton(codes, probs, ranges, range_end)
        for b, e in enumerate(range_end.tolist()):   # the reference: ranges per sequence
            importance_update_reference(codes[b:b + 1], probs[b:b + 1], ranges[:-1] + [(ranges[-1][0], e)])
        return None
    if kernels_available(codes.device) and len(ranges) <= MAX_RANGES and codes.shape[-1]:
        return _tp.importance_update_triton(codes, probs, ranges)
    return importance_update_reference(codes, probs, ranges)


def importance_fold(codes: torch.Tensor, mass: torch.Tensor, seen: torch.Tensor, queries: int,
                    divisor: float = 1.0) -> None:
    """Fold `queries` more queries' attention into importance codes of tokens whose observers are counted on the
    device, in place.

    codes: (B, Hkv, n) uint8 (`encode_importance` of each token's mean attention over `seen` queries so far), last
    dimension contiguous; mass: (B, Hkv, n) float, the attention the tokens received from the new queries, summed,
    divided by `divisor` here (e.g. the query heads of a group); seen: fp32 or uint8 (a count that saturates at 255,
    past which the mean is a moving average over about that many queries) on the codes' device, read there (a
    captured graph replays it as it changes), (1,) one count for every token or (B, n) one a sequence and token
    (shared by its KV heads; last dimension contiguous); the caller advances it. One launch on the kernels' devices
    (SmartKV's append classes fold every class row and ring token each step: as torch ops, ~20 small kernels a
    class)."""
    if codes.shape != mass.shape or codes.dtype != torch.uint8 or not mass.is_floating_point():
        raise ValueError(f"codes must be uint8 and mass floating of one shape, got {codes.dtype} "
                         f"{tuple(codes.shape)} and {mass.dtype} {tuple(mass.shape)}")
    if seen.shape not in ((1,), (codes.shape[0], codes.shape[-1])) or seen.dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"seen must be fp32 or uint8 (1,) or (B, n) = {(codes.shape[0], codes.shape[-1])}, got "
                         f"{seen.dtype} {tuple(seen.shape)}")
    mass = mass.float()
    if (kernels_available(codes.device) and codes.numel() and codes.stride(-1) == 1 and mass.stride(-1) == 1
            and seen.device == codes.device and seen.stride(-1) == 1):
        return _tp.importance_fold_triton(codes, mass, seen, queries, divisor)
    return importance_fold_reference(codes, mass, seen, queries, divisor)


def merge_plan(cmap: torch.Tensor, n: int, gone: torch.Tensor, k: torch.Tensor, cid: int, tid: int,
               Ct: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One demotion move of SmartKV's append classes (methods/smartkv/demote.py): the flagged rows of class `cid`
    go to class `tid`, both kept in position order. cmap: (B, H, >= ceil(n / 2)) uint8, the class of each middle
    position as 4 bits, two positions a byte (p in byte p // 2, the low nibble for even p; a class's positions in
    order are its rows), of which the first n positions are read and updated in place (moved -> tid); gone:
    (B, H, Cc) uint8, 1 for each row of class cid that goes (k[b] of them in sequence b, all within its length); k:
    (B,) int32. Returns order (B, H, Ct) int64, the row of [t's rows, the moved rows in position order] each row of t
    takes after the merge (0 past its new length), and keep (B, H, Cc) int64, the stable argsort of the flags (rows
    that stay first). One launch on the kernels' devices (as torch ops, three prefix sums over every position, a
    sort and a dozen elementwise passes)."""
    B, H, nb = cmap.shape
    if gone.shape[:2] != (B, H) or gone.dtype != torch.uint8 or cmap.dtype != torch.uint8 or k.shape != (B,):
        raise ValueError(f"cmap and gone must be uint8 (B, H, .) of one (B, H) and k (B,), got {tuple(cmap.shape)} "
                         f"{cmap.dtype}, {tuple(gone.shape)} {gone.dtype}, {tuple(k.shape)}")
    if not 0 <= n <= 2 * nb:
        raise ValueError(f"n must be within the map's {2 * nb} positions, got {n}")
    rows_ok = all(t.stride(-1) == 1 and t.stride(0) == H * t.stride(1) for t in (cmap, gone))
    if kernels_available(cmap.device) and n and gone.shape[-1] and rows_ok:
        return _td.merge_plan_triton(cmap, n, gone, k.to(torch.int32).contiguous(), cid, tid, Ct)
    return merge_plan_reference(cmap, n, gone, k, cid, tid, Ct)


def move_rows(x, src: torch.Tensor, n: torch.Tensor | None = None, fresh=None) -> None:
    """Rows of x (B, H, C, F), in place: row r becomes row src[r] of x ((B, H, >= C) int64, its first C read), or
    with `fresh` (B, H, k, F) of the same dtype, row src[r] - C of fresh where src[r] >= C; only rows r < n[b]
    ((B,) int; None: every row). SmartKV's append demotions: a class's compaction and the merge into its target.
    Only the rows whose source differs are moved (staged first: any permutation of sources is fine). The kernels
    take x with dense rows (last dimension contiguous, row stride its width) and evenly spaced (B, H) rows (a view
    of the first rows of a larger buffer is fine); torch the rest.

    x a list of such tensors of one (B, H, C) (and `fresh` a list of one k, or None): all moved by the one map, in
    one launch a pass where each x's rows are dense (a class's keys, values and importance)."""
    many = isinstance(x, (list, tuple))
    xs = list(x) if many else [x]
    fr = [None] * len(xs) if fresh is None else list(fresh) if many else [fresh]
    if len(fr) != len(xs):
        raise ValueError(f"fresh must hold one tensor for each of the {len(xs)} tensors, got {len(fr)}")
    for xi, fi in zip(xs, fr):
        _check_move(xi, src, fi)
    even = xs + [src] + [f for f in fr if f is not None]   # (B, H) rows evenly spaced, last dimension contiguous
    dense = all(t.stride(-2) == t.shape[-1] for t in xs) and all(
        t.stride(-1) == 1 and t.stride(0) == t.shape[1] * t.stride(1) for t in even)
    if (kernels_available(src.device) and xs and len(xs) <= _td.MAX_MOVED and xs[0].numel() and dense
            and len({t.shape[:3] for t in xs}) == 1 and len({f.shape[2] for f in fr if f is not None}) <= 1):
        n = None if n is None else n.to(device=src.device, dtype=torch.int32).contiguous()
        return _td.move_rows_many_triton(xs, src, n, None if fresh is None else fr)
    for xi, fi in zip(xs, fr):
        move_rows_reference(xi, src, n, fi)
    return None


def _check_move(x: torch.Tensor, src: torch.Tensor, fresh: torch.Tensor | None) -> None:
    B, H, C, F = x.shape
    if src.shape[:2] != (B, H) or src.shape[-1] < C or src.dtype != torch.int64:
        raise ValueError(f"src must be int64 (B, H, >= C) = ({B}, {H}, >= {C}), got {src.dtype} {tuple(src.shape)}")
    if fresh is not None and (fresh.shape[:2] != (B, H) or fresh.shape[-1] != F or fresh.dtype != x.dtype):
        raise ValueError(f"fresh must be {x.dtype} (B, H, k, F) = ({B}, {H}, k, {F}), got {fresh.dtype} "
                         f"{tuple(fresh.shape)}")


def demotion_keys(codes: torch.Tensor, kq: QTensor, vq: QTensor, length: torch.Tensor, floor: torch.Tensor,
                  kmul: torch.Tensor, power: float, sensitivity: bool) -> torch.Tensor:
    """SmartKV's append demotions: each class row's weight (its importance + floor, to `power`, times its
    sensitivity (k range x kmul)^2 + (v range)^2 from the rows' scales and zeros), in fp32, +inf at and past the
    class's length[b], as one unique int64 key a row: the weight's bits (a non-negative float's bits order as it
    does) << 32 | the row, so a top-k over the keys takes the lightest rows, ties by row. codes: (B, H, C) uint8
    importance codes (`encode_importance`); kq, vq: the class's (B, H, C, .) per-token QTensors; length: (B,) int32;
    floor: (B, H) fp32, what is added to every row's importance (importance_floor x the rows' mean); kmul: (B, H)
    fp32, the keys' mean channel scale. One launch on the kernels' devices where `power` is 0, 1 or 2 (as torch ops
    ~25), the same keys bit for bit as the torch path (a table decodes the codes; no fused multiply-adds)."""
    from smartkv.core.importance import importance_table
    B, H, C = codes.shape
    if kq.codes.shape[:3] != (B, H, C) or vq.codes.shape[:3] != (B, H, C) or length.shape != (B,):
        raise ValueError(f"kq, vq must hold (B, H, C) = {(B, H, C)} rows and length be (B,), got "
                         f"{tuple(kq.codes.shape)}, {tuple(vq.codes.shape)}, {tuple(length.shape)}")
    ok = (kernels_available(codes.device) and C and power in (0, 1, 2) and codes.stride(-1) == 1
          and all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and not t.shape[-1] & (t.shape[-1] - 1)
                  for q in (kq, vq) for t in (q.scale, q.zero)) and kq.scale.stride(1) == kq.zero.stride(1)
          and vq.scale.stride(1) == vq.zero.stride(1))
    if ok:
        return _td.demotion_keys_triton(codes, kq, vq, length.to(torch.int32).contiguous(),
                                        floor.float().contiguous(), kmul.float().contiguous(), int(power),
                                        sensitivity, importance_table(codes.device))
    return demotion_keys_reference(codes, kq, vq, length, floor.float(), kmul.float(), power, sensitivity)


def importance_sum(codes: torch.Tensor, length: torch.Tensor, out: torch.Tensor,
                   accumulate: bool = False) -> torch.Tensor:
    """out (B, H) fp32 (+ with `accumulate`) = the decoded importance codes (B, H, C) uint8 of each row's first
    length[b] tokens (length (B,) int32 on the codes' device): SmartKV's demotion floor, the class rows' mean
    importance, read on the device inside a captured flush. One launch on the kernels' devices (as torch ops, six a
    class); the same table as `demotion_keys`, summed in another order (fp32 rounding apart)."""
    from smartkv.core.importance import importance_table
    B, H, C = codes.shape
    if (length.shape != (B,) or out.shape != (B, H) or out.dtype != torch.float32 or codes.dtype != torch.uint8
            or length.dtype != torch.int32):
        raise ValueError(f"importance_sum takes codes (B, H, C) uint8, length (B,) int32 and out (B, H) fp32, got "
                         f"{codes.dtype} {tuple(codes.shape)}, {length.dtype} {tuple(length.shape)}, {out.dtype} "
                         f"{tuple(out.shape)}")
    if kernels_available(codes.device) and codes.stride(-1) == 1 and out.is_contiguous() and length.is_contiguous():
        return _td.importance_sum_triton(codes, length, out, accumulate, importance_table(codes.device))
    return importance_sum_reference(codes, length, out, accumulate)


def _like(q: QTensor, bits: int) -> QTensor:
    """An empty per-token QTensor of q's head_dim and groups at `bits` (what a kernel's shape checks read)."""
    D = q.codes.shape[-1] * 8 // q.bits
    codes = q.codes.new_empty(0, packed_width(D, bits))
    return QTensor(codes, q.scale[..., :0, :], q.zero[..., :0, :], bits, q.group_size, -1)


def requantize_rows(kq: QTensor, vq: QTensor, codes: torch.Tensor, keep: torch.Tensor, k: torch.Tensor,
                    k_max: int, bits: tuple[int, int]) -> tuple[QTensor, QTensor, torch.Tensor]:
    """The rows leaving a class of SmartKV's append layers, for their target: rows j < k[b] of the outputs are the
    class's rows keep[b, h, C - k[b] + j] (keep: (B, H, C) int64, rows that stay first, then those that go, each in
    row order; k: (B,) int32), keys and values dequantized and quantized again at `bits` (the bytes
    `core.quant.quantize` writes), and their importance codes (B, H, k_max) (codes: (B, H, C) uint8). Rows at and
    past k[b] are not written (the kernels) or hold the class's last row (torch). One launch on the kernels'
    devices where both pools pass `triton_pool.pool_problem` and are dense (as torch ops ~25)."""
    B, H, C = keep.shape
    ok = (kernels_available(keep.device) and k_max and C and codes.stride(-1) == 1
          and all(_tp.pool_problem(q) is None and q.codes.shape[-2] == C and q.scale.shape[-1] == kq.scale.shape[-1]
                  and all(t.is_contiguous() for t in (q.codes, q.scale, q.zero)) for q in (kq, vq))
          and all(_tp.pool_problem(_like(kq, b)) is None for b in bits)
          and keep.stride(-1) == 1)
    if ok:
        return _td.requantize_rows_triton(kq, vq, codes, keep, k.to(torch.int32).contiguous(), k_max, bits)
    return requantize_rows_reference(kq, vq, codes, keep, k, k_max, bits)
