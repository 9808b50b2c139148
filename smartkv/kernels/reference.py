"""Torch reference paths: the functions the Triton kernels compute, and what CPU runs use.

These dequantize (materialise) the cache; the kernels never do.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from smartkv.core.quant import QTensor, dequantize, quantize
from smartkv.kernels.segment import FoldInto, KVSegment


def write_rows(out: QTensor, q: QTensor, start: int) -> QTensor:
    """Copy q into out's tokens [start, start + T) (scale rows start // G on for per-channel groups)."""
    T = q.codes.shape[-2]
    out.codes[..., start:start + T, :] = q.codes
    r0 = start if q.axis == -1 else start // q.group_size
    out.scale[..., r0:r0 + q.scale.shape[-2], :] = q.scale
    out.zero[..., r0:r0 + q.zero.shape[-2], :] = q.zero
    return out


def quantize_pack_reference(x: torch.Tensor, bits: int, group_size: int, axis: int = -1,
                            out: QTensor | None = None, start: int | torch.Tensor = 0) -> QTensor:
    """`smartkv.core.quant.quantize`, optionally written into `out` at token `start` (or, with a (B,) tensor,
    sequence b at token start[b])."""
    q = quantize(x, bits, group_size, axis)
    if isinstance(start, torch.Tensor):  # per-sequence rows (a static decode step), (B,) int
        for b, row in enumerate(start.tolist()):
            one = QTensor(q.codes[b:b + 1], q.scale[b:b + 1], q.zero[b:b + 1], bits, group_size, axis)
            write_rows(QTensor(out.codes[b:b + 1], out.scale[b:b + 1], out.zero[b:b + 1], bits, group_size, axis),
                       one, row)
        return out
    return q if out is None else write_rows(out, q, start)


def _dequant(part, dtype) -> torch.Tensor | None:
    if part is None:
        return None
    return dequantize(part, dtype) if isinstance(part, QTensor) else part.to(dtype)


def segment_kv(seg: KVSegment, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized keys and values of a segment, (B, H, T, D) in `dtype`, key normalisation undone."""
    k = _dequant(seg.keys, dtype)
    if seg.key_residual is not None:
        k = torch.cat([k, seg.key_residual.to(dtype)], -2)
    v = _dequant(seg.values, dtype)
    if seg.value_residual is not None:
        v = torch.cat([v, seg.value_residual.to(dtype)], -2)
    if seg.residual_last:  # the residual stands for token lengths[b] - 1 (the last one counted)
        at = (seg.lengths.to(k.device).long() - 1).clamp(min=0).view(-1, 1, 1, 1)
        k = k.scatter(-2, at.expand(k.shape[0], k.shape[1], 1, k.shape[-1]), seg.key_residual.to(dtype))
        v = v.scatter(-2, at.expand(v.shape[0], v.shape[1], 1, v.shape[-1]), seg.value_residual.to(dtype))
    if seg.key_scale is not None:
        k = k * seg.key_scale.to(dtype) + seg.key_shift.to(dtype)
    return k, v


def segment_valid(segments: Sequence[KVSegment], lengths: torch.Tensor | None, batch: int,
                  device) -> list[torch.Tensor]:
    """(B, T_seg) bool per segment: which tokens take part. `lengths` counts over the segments in order; a
    segment's own `lengths` replaces it for that segment."""
    out, offset = [], 0
    for seg in segments:
        t = torch.arange(seg.num_tokens, device=device)
        if seg.lengths is not None:
            valid = t < seg.lengths.to(device).view(-1, 1)
        elif lengths is not None:
            valid = t < (lengths.to(device).view(-1, 1) - offset)
        else:
            valid = torch.ones(batch, seg.num_tokens, dtype=torch.bool, device=device)
        out.append(valid.expand(batch, seg.num_tokens))
        offset += seg.num_tokens
    return out


def decode_attention_reference(q: torch.Tensor, segments: Sequence[KVSegment], scaling: float,
                               lengths: torch.Tensor | None = None, return_token_probs: bool = False,
                               probs_out: Sequence[torch.Tensor] | None = None,
                               compute_dtype: torch.dtype = torch.float32, fold: Sequence | None = None,
                               lse_io: torch.Tensor | None = None):
    """Exact attention of one query token over the dequantized segments.

    q (B, Hq, D) or (B, Hq, 1, D); Hq a multiple of kv_heads (GQA). Returns the output in q's shape and dtype,
    and with `return_token_probs` also, per segment, (B, kv_heads, T_seg) fp32: each token's attention
    probability summed over the query heads of its KV group (added into `probs_out` when given).
    A sequence with no valid token gets output 0.
    """
    squeeze = q.dim() == 3
    q4 = q.unsqueeze(2) if squeeze else q
    B, Hq, _, D = q4.shape
    kv = [segment_kv(s, compute_dtype) for s in segments]
    keys = torch.cat([k for k, _ in kv], -2)      # (B, Hkv, T, D)
    values = torch.cat([v for _, v in kv], -2)
    Hkv = keys.shape[1]
    seg_valid = segment_valid(segments, lengths, B, q.device)
    valid = torch.cat(seg_valid, -1)                                       # (B, T)
    qg = q4.to(compute_dtype).reshape(B, Hkv, Hq // Hkv, D)               # (B, Hkv, G, D)
    scores = (qg @ keys.transpose(-1, -2)) * scaling                       # (B, Hkv, G, T)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    out = (probs @ values).reshape(B, Hq, 1, D).to(q.dtype)
    out = out.squeeze(2) if squeeze else out
    if lse_io is not None:   # `kernels.decode_attention`'s fold: the previous call's log2-sum-exp, then this one's
        s2 = scores * 1.4426950408889634                                   # log2 units, as the kernels'
        G = Hq // Hkv
        prev = lse_io.reshape(B, Hkv, G, 1)
        prev = torch.where(prev > -1e30, prev, torch.zeros_like(prev))
        ends = torch.tensor([s.num_tokens for s in segments]).cumsum(0).tolist()
        for (codes, seen), start, end in ((f, e - s.num_tokens, e) for f, s, e in zip(fold or [], segments, ends)
                                          if f is not None):
            mass = torch.exp2(s2[..., start:end] - prev).sum(2)             # (B, Hkv, T_seg)
            row = codes[..., :end - start]
            old = row.clone()
            importance_fold_reference(row, mass, seen, 1, G)
            row.copy_(torch.where(valid[:, None, start:end], row, old))     # tokens past a length: as they were
        lse_io.copy_(torch.logsumexp(scores, -1).reshape(B, Hq) * 1.4426950408889634)
    if not return_token_probs:
        return out
    mass = probs.sum(2).float()                                            # (B, Hkv, T)
    parts = list(mass.split([s.num_tokens for s in segments], -1))
    if probs_out is not None:
        for i, (acc, p, ok) in enumerate(zip(probs_out, parts, seg_valid, strict=True)):
            if isinstance(acc, FoldInto):   # mass 0 past a length; its count stays
                T = p.shape[-1]
                importance_fold_reference(acc.codes[..., :T], p, acc.seen[:, :T], 1, acc.divisor)
                seen = acc.seen[:, :T]
                seen.add_((ok & (seen < 255)).to(torch.uint8))   # in place (`x[:, :T] +=` copies it back too)
                acc = None
            elif acc is not None:
                acc += p
            parts[i] = acc
    return out, parts


MAX_POOLS, MAX_FP = 4, 2  # SmartKV's two passes: width pools and full-precision runs of one launch
MAX_RANGES = 4  # observed query ranges the importance fold takes


def _pool_index(positions: torch.Tensor, offset: int, group: int) -> torch.Tensor:
    """(B, Hkv, N) positions -> (B, Hq, N) indices into position-ordered (B, Hq, T) tensors."""
    return (positions.long() + offset).repeat_interleave(group, dim=1)


def pool_scores_reference(q: torch.Tensor, pools, out: torch.Tensor, scaling: float,
                          bias: torch.Tensor | None = None, q_fp: torch.Tensor | None = None, fp=()) -> None:
    B, Hq, D = q.shape
    for pool, positions, base in pools:
        Hkv, N = pool.codes.shape[1], pool.codes.shape[2]
        G = Hq // Hkv
        k = dequantize(pool)                                                   # (B, Hkv, N, D)
        s = (q.float().reshape(B, Hkv, G, D) @ k.transpose(-1, -2)).reshape(B, Hq, N)
        if bias is not None:
            s = s + bias.float().unsqueeze(-1)
        out.scatter_(-1, _pool_index(positions, base, G), (s * scaling).to(out.dtype))
    for keys, start in fp:
        Hkv, n = keys.shape[1], keys.shape[2]
        qf = q if q_fp is None else q_fp
        s = (qf.float().reshape(B, Hkv, Hq // Hkv, D) @ keys.float().transpose(-1, -2)).reshape(B, Hq, n)
        out[..., start:start + n] = (s * scaling).to(out.dtype)


def pool_values_reference(probs: torch.Tensor, pools, fp=()) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, _ = probs.shape
    parts = []
    for segments in (pools, [(x, None, start) for x, start in fp]):
        acc = 0
        for data, positions, base in segments:
            Hkv, N = data.shape[1], data.shape[2]
            G = Hq // Hkv
            if positions is None:                                              # a full-precision run
                p, v = probs[..., base:base + N].float(), data.float()
            else:
                p, v = probs.float().gather(-1, _pool_index(positions, base, G)), dequantize(data)
            acc = acc + (p.reshape(B, Hkv, G, N) @ v).reshape(B, Hq, -1)
        parts.append(acc if torch.is_tensor(acc) else probs.new_zeros(B, Hq, 0))
    return parts[0], parts[1]


def pool_positions_reference(levels: torch.Tensor, n: int, counts: tuple[int, ...]) -> torch.Tensor:
    from smartkv.core.policy import unpack_levels
    return torch.argsort(unpack_levels(levels, n), dim=-1, stable=True).to(torch.int32)


def importance_update_reference(codes: torch.Tensor, probs: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    from smartkv.core.importance import fold_attention
    codes.copy_(fold_attention(codes, probs.unsqueeze(2), torch.tensor(ranges, dtype=torch.int64).reshape(-1, 2)))


def importance_fold_reference(codes: torch.Tensor, mass: torch.Tensor, seen: torch.Tensor, queries: int,
                              divisor: float = 1.0) -> None:
    from smartkv.core.importance import decode_importance, encode_importance
    seen = seen.float()
    if seen.dim() == 2:   # one count a sequence and token, shared by its KV heads
        seen = seen[:, None, :]
    codes.copy_(encode_importance((decode_importance(codes) * seen + mass / divisor) / (seen + queries)))


def merge_plan_reference(cmap: torch.Tensor, n: int, gone: torch.Tensor, k: torch.Tensor, cid: int, tid: int,
                         Ct: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, _ = cmap.shape
    Cc, i32 = gone.shape[-1], torch.int32
    nb = (n + 1) // 2
    nib = torch.stack([cmap[..., :nb] & 15, cmap[..., :nb] >> 4], -1).flatten(-2)   # 4-bit ids, two a byte
    cm = nib[..., :n]
    keep = torch.argsort(gone, dim=-1, stable=True)                  # rows that stay first, in order
    is_c, is_t = cm == cid, cm == tid
    moved = is_c & gone.gather(-1, (is_c.cumsum(-1, dtype=i32) - 1).clamp(0, max(Cc - 1, 0)).long()).bool()
    before_t, before_m = is_t.cumsum(-1, dtype=i32), moved.cumsum(-1, dtype=i32)
    src = torch.where(is_t, before_t - 1, Ct + before_m - 1)
    dest = torch.where(is_t | moved, before_t + before_m - 1, Ct).clamp(max=Ct).long()
    order = torch.zeros(B, H, Ct + 1, dtype=i32, device=cm.device).scatter_(-1, dest, src)[..., :Ct]
    cm.masked_fill_(moved, tid)
    cmap[..., :nb] = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return order.long(), keep


def move_rows_reference(x: torch.Tensor, src: torch.Tensor, n: torch.Tensor | None,
                        fresh: torch.Tensor | None) -> None:
    B, H, C, F = x.shape
    full = torch.cat([x, fresh], -2) if fresh is not None else x
    moved = full.gather(-2, src[..., :C, None].expand(B, H, C, F))
    if n is None:
        x.copy_(moved)
    else:   # rows at or past n[b] stay
        x.copy_(torch.where((torch.arange(C, device=x.device) < n.to(x.device)[:, None, None])[..., None], moved, x))


def demotion_keys_reference(codes: torch.Tensor, kq: QTensor, vq: QTensor, length: torch.Tensor,
                            floor: torch.Tensor, kmul: torch.Tensor, power: float, sensitivity: bool) -> torch.Tensor:
    from smartkv.core.importance import importance_table
    from smartkv.core.quant import token_ranges
    C = codes.shape[-1]
    x = importance_table(codes.device)[codes.long()] + floor[..., None]
    # another power in float64, rounded once to fp32: fp32 pow differs by an ulp between CPU and CUDA libraries,
    # and the keys order rows alike on every device
    w = (x if power == 1 else x * x if power == 2 else torch.ones_like(x) if power == 0
         else x.double().pow(power).float())
    if sensitivity:
        a, b = token_ranges(kq) * kmul[..., None], token_ranges(vq)
        w = w * (a * a + b * b)
    rows = torch.arange(C, device=codes.device)
    w = w.masked_fill(rows >= length.to(codes.device)[:, None, None], float("inf"))
    return (w.view(torch.int32).long() << 32) | rows


def importance_sum_reference(codes: torch.Tensor, length: torch.Tensor, out: torch.Tensor,
                             accumulate: bool) -> torch.Tensor:
    from smartkv.core.importance import importance_table
    rows = torch.arange(codes.shape[-1], device=codes.device)
    total = (importance_table(codes.device)[codes.long()] * (rows < length.to(codes.device)[:, None, None])).sum(-1)
    return out.add_(total) if accumulate else out.copy_(total)


def leaving_rows(keep: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Rows (B, H, k_max) of the class that leave it, in row order: the last k[b] of `keep` (a stable argsort of
    the flags, rows that stay first); past k[b], the class's last row."""
    B, H, C = keep.shape
    j = torch.arange(k_max, device=keep.device) + (C - k.to(keep.device).long())[:, None, None]
    return keep.gather(-1, j.clamp(max=C - 1).expand(B, H, k_max))


def requantize_rows_reference(kq: QTensor, vq: QTensor, codes: torch.Tensor, keep: torch.Tensor, k: torch.Tensor,
                              k_max: int, bits: tuple[int, int]) -> tuple[QTensor, QTensor, torch.Tensor]:
    from smartkv.core.quant import take_rows
    rows = leaving_rows(keep, k, k_max)
    out = []
    for q, b in zip((kq, vq), bits):
        taken = QTensor(take_rows(q.codes, rows), take_rows(q.scale, rows), take_rows(q.zero, rows), q.bits,
                        q.group_size, q.axis)
        out.append(quantize(dequantize(taken), b, q.group_size, axis=-1))
    return out[0], out[1], codes.gather(-1, rows)
