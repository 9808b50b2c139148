"""Quality of a compressed KV cache against the reference: output distributions, likelihood, reconstruction.

Everything is computed in float32 whatever the input dtype (bf16 log-softmax differences are mostly rounding).
Logits are (..., vocab) and compared position by position; tensors in the attention error are
(batch, heads, tokens, head_dim) with the KV heads repeated to the query heads (GQA).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per position, (...,): sum_v p_ref * (log p_ref - log p_test), from log_softmax in fp32."""
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return kl.clamp_min(0.0)  # rounding can leave -1e-9 where the distributions agree


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of `targets` (...,) under `logits` (..., vocab), per position."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity(nll_or_logits: torch.Tensor | Sequence[float], targets: torch.Tensor | None = None) -> float:
    """exp(mean NLL): of per-token NLLs, or of `logits` against `targets` when targets are given."""
    values = nll(nll_or_logits, targets) if targets is not None else torch.as_tensor(nll_or_logits, dtype=torch.float32)
    if values.numel() == 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(values.float().mean().item())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Share of positions where the two argmax tokens are the same."""
    return (ref_logits.argmax(dim=-1) == logits.argmax(dim=-1)).float().mean().item()


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - ref|| / ||ref|| (Frobenius norms, fp32); 0 when both are zero."""
    ref, approx = ref.float(), approx.float()
    num, den = torch.linalg.vector_norm(approx - ref).item(), torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in fp32; q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D). With `causal`, query i is the
    (Tk - Tq + i)-th position, so it sees keys up to that one (queries are the last Tq positions)."""
    q, k, v = q.float(), k.float(), v.float()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, Hq, Tk, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, Hq, Tq, Tk)
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, Hq, Tq, D)


def attention_output_error(q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, causal: bool = False) -> float:
    """Relative error of the attention output with the compressed K/V against the reference K/V."""
    return relative_error(attention_output(q, k_ref, v_ref, causal), attention_output(q, k, v, causal))
