"""Attention-importance statistics for SmartKV: pure functions, CPU-testable.

Importance of a cached token (per layer and KV head) = the mean attention probability it receives from the
queries that can see it (ZipCache's normalised score: a token late in the prompt is seen by fewer queries and
is not penalised for it). At prefill only the last `observe_window` queries are used, so the full T x T
attention matrix of a long prompt is never materialised: (B, Hq, W, T) at most.
"""
from __future__ import annotations

import functools

import torch

from smartkv.core.transfer import host_to


def allowed_from_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, rows: int,
                      device) -> torch.Tensor:
    """(B, 1, q_len, kv_len) bool: which keys each of the last `q_len` queries may attend to.

    `attention_mask` is what transformers hands to SDPA: None (plain causal), bool (True = attend) or additive
    float (0 = attend); it may cover more queries than `q_len` (we take the last ones).
    """
    if attention_mask is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(-1)
        allowed = torch.arange(kv_len, device=device).unsqueeze(0) <= q_pos  # (q_len, kv_len)
        return allowed.expand(rows, 1, q_len, kv_len)
    m = attention_mask[..., -q_len:, -kv_len:]
    allowed = m if m.dtype == torch.bool else m == 0
    return allowed.expand(rows, 1, q_len, kv_len) if allowed.shape[0] == 1 else allowed


def attention_probs(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float,
                    return_lse: bool = False):
    """Softmax attention probabilities in fp32. query (B, Hq, W, D), keys (B, Hkv, T, D) -> (B, Hq, W, T); with
    `return_lse`, also each query's log2-sum-exp of its scores (B, Hq, W) (-inf for a fully masked query)."""
    return probs_from_scores(attention_scores(query, keys, scaling), allowed, return_lse)


def attention_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """`attention_probs`' scaled scores (B, Hq, W, T) fp32, before the mask."""
    B, Hq, W, D = query.shape
    Hkv = keys.shape[1]
    q = query.float().reshape(B, Hkv, Hq // Hkv * W, D)  # GQA: the query heads of a group share their KV head
    return (q @ keys.float().transpose(-1, -2)).reshape(B, Hq, W, -1) * scaling


def probs_from_scores(scores: torch.Tensor, allowed: torch.Tensor, return_lse: bool = False):
    """`attention_probs` from `attention_scores`' scores, row by row (rows of several calls may be stacked)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)  # fully masked rows (padding queries)
    if not return_lse:
        return probs
    return probs, torch.logsumexp(scores, -1) * 1.4426950408889634


def kv_head_mass(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Attention mass per KV head: mean over the query heads of each group, summed over queries.
    (B, Hq, W, T) -> (B, Hkv, T)."""
    B, Hq, W, T = probs.shape
    return probs.reshape(B, num_kv_heads, Hq // num_kv_heads, W, T).mean(2).sum(2)


def seen_counts(allowed: torch.Tensor) -> torch.Tensor:
    """How many of the observed queries could see each key: (B, 1, W, T) -> (B, T)."""
    return allowed.sum(dim=(1, 2)).to(torch.int32)


def update_mean(mean: torch.Tensor, seen: torch.Tensor, mass: torch.Tensor, new_seen: torch.Tensor):
    """Running mean of attention received. mean (B, H, T), seen (B, T), mass (B, H, T), new_seen (B, T)."""
    total = seen + new_seen
    denom = total.clamp_min(1).unsqueeze(1).float()
    out = (mean.float() * seen.unsqueeze(1).float() + mass.float()) / denom
    return out, total


def fold_attention(codes: torch.Tensor, probs: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """New importance codes (B, Hkv, T) after the last W queries' attention probs (B, Hq, W, T): the running mean
    of attention received, each token's earlier observers counted from the observed query `ranges` (n, 2)."""
    B, Hkv, T = codes.shape
    W = probs.shape[2]
    # both counts where the ranges are (the host, in a cache), then one copy that does not wait for the device
    new = torch.tensor([[T - W, T]], dtype=torch.int64, device=ranges.device)
    seen = torch.stack([seen_from_ranges(ranges, T), seen_from_ranges(new, T)])
    seen = host_to(seen, torch.int32, codes.device) if seen.device != codes.device else seen
    mean, _ = update_mean(decode_importance(codes), seen[:1], kv_head_mass(probs, Hkv), seen[1:])
    return encode_importance(mean)


def token_weights(importance: torch.Tensor, floor: float, power: float,
                  sensitivity: torch.Tensor | None = None) -> torch.Tensor:
    """Allocation weights (R, n) from importance (R, n): (importance + floor * row mean)^power * sensitivity.

    `floor` keeps never-attended tokens in play (the prompt's last queries do not predict everything later
    queries read); power 2 follows the error model (an error in token i moves the output by p_i * error_i);
    `sensitivity` (e.g. the token's squared quantization range) says how much error a bit removes.
    """
    imp = importance.double().clamp_min(0)
    w = (imp + floor * imp.mean(-1, keepdim=True)).pow(power)
    if sensitivity is not None:
        w = w * sensitivity.double()
    return w


def seen_from_ranges(ranges: torch.Tensor, kv_len: int) -> torch.Tensor:
    """How many observed queries could see each of `kv_len` tokens, derived from the observed query positions
    `ranges` (n, 2) int64 of [start, end) instead of stored per token: a query at p sees tokens t <= p.
    -> (kv_len,) int32. (Left padding: pad queries precede every real token, so counts of real tokens are exact;
    pad tokens receive no mass, so their count does not matter.)"""
    t = torch.arange(kv_len, device=ranges.device)
    if ranges.numel() == 0:
        return torch.zeros(kv_len, dtype=torch.int32, device=ranges.device)
    s, e = ranges[:, 0:1], ranges[:, 1:2]  # (n, 1)
    return (e - torch.maximum(s, t.unsqueeze(0))).clamp_min(0).sum(0).to(torch.int32)


def add_range(ranges: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Append [start, end) to sorted ranges (n, 2), merging with the last one when they touch."""
    if ranges.numel() and int(ranges[-1, 1]) >= start:
        out = ranges.clone()
        out[-1, 1] = max(int(out[-1, 1]), end)
        return out
    return torch.cat([ranges, torch.tensor([[start, end]], dtype=ranges.dtype, device=ranges.device)])


def encode_importance(p: torch.Tensor) -> torch.Tensor:
    """Attention probabilities in [0, 1] -> uint8 codes of -8 log2(p) (steps of 2^(1/8), 9%; 0 below 2^-31.9)."""
    c = torch.round(-8 * torch.log2(p.float().clamp_min(2.0 ** -31.875)))
    return c.clamp(0, 255).to(torch.uint8)


def decode_importance(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_importance` (code 255 -> 0)."""
    p = torch.pow(2.0, -codes.float() / 8)
    return torch.where(codes == 255, torch.zeros_like(p), p)


@functools.cache
def importance_table(device: torch.device) -> torch.Tensor:
    """`decode_importance` of every code (256,) fp32 on `device`: a lookup gives the same value for a code
    wherever it sits (an elementwise pow may round a vectorised and a scalar lane differently), so a kernel reading
    the table and torch reading it order tokens alike."""
    return decode_importance(torch.arange(256, device=device))
