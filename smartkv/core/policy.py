"""Bit allocation under a budget: pure, deterministic, CPU-testable.

Model: quantizing a token with b bits adds error whose energy scales as 4^-b (the step halves per bit), weighted
by how much the token matters (`weight`, from attention importance). `solve_widths` (core.solve) minimises
sum(weight * 4^-b) subject to sum(b) <= floor(budget * n), b in `widths`: a Lagrangian sweep (the optimum of a
separable convex problem is a threshold rule) plus a greedy fill of the bits left over, so the average meets the
budget to within one bit in total. Flat weights give a uniform allocation (budget 4 -> all 4-bit): the
mixed-precision split appears only where attention is concentrated enough to pay for it.

`cascade_assign` turns per-width counts into per-token widths for many rows at once (rows = batch x KV heads),
the most important tokens first, never promoting a token above its cap (stored codes can only be demoted).
Every row gets the same number of tokens at each width, so storage pools stay dense.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from smartkv.core.counts import counts_for, counts_for_budgets  # noqa: F401
from smartkv.core.solve import WIDTHS, check_budget, solve_widths  # noqa: F401


def rank_profile(weights: torch.Tensor) -> torch.Tensor:
    """Average over rows of each row's weights sorted descending: (R, n) -> (n,)."""
    return ranked(weights)[0]


def ranked(weights: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`rank_profile` of weights (R, n) and each row's tokens heaviest first, ties by position (R, n), from one
    stable sort (a float64 sort is 8 radix passes on the GPU); with `groups`, the rows are that many layers' stacked
    and the profile is each one's ((groups, n))."""
    s = torch.sort(weights.double(), dim=-1, descending=True, stable=True)
    profile = s.values.mean(0) if groups == 1 else s.values.view(groups, -1, s.values.shape[-1]).mean(1)
    return profile, s.indices


def cascade_assign(weights: torch.Tensor, caps: torch.Tensor, counts: dict[int, int],
                   capped: list[int] | None = None) -> torch.Tensor:
    """Widths (R, n) for tokens of `weights` (R, n): from the widest width down, each row gives `counts[b]`
    slots to its heaviest tokens whose cap (R, n) allows b. When fewer tokens are eligible than a width wants
    (codes cannot be promoted) their bits pass to the next width down, so the budget is still spent. Rows with
    equal cap histograms get equal width histograms. `capped`: per width above the narrowest, widest first, the
    fewest tokens of a row whose cap allows it, where the caller knows them (else read from `caps`: on CUDA a
    wait for the device)."""
    R, n = weights.shape
    lowest = min(counts)
    out = torch.full((R, n), lowest, dtype=torch.long, device=weights.device)
    free = torch.ones(R, n, dtype=torch.bool, device=weights.device)
    neg = torch.finfo(torch.float64).min
    w = weights.double()
    if capped is None:
        capped = cap_counts(caps, counts)
    for b, take in cascade_plan(counts, capped):
        eligible = free & (caps >= b)
        scores = torch.where(eligible, w, torch.full_like(w, neg))
        top = torch.topk(scores, take, dim=-1, sorted=False).indices  # (R, take)
        out.scatter_(1, top, b)
        free.scatter_(1, top, False)
    return out


def cap_counts(caps: torch.Tensor, counts: dict[int, int]) -> list[int]:
    """Per width of `counts` above the narrowest, widest first: the fewest tokens of a row capped at it or wider
    (one read of the device)."""
    wide = sorted(counts, reverse=True)[:-1]
    if not caps.shape[0] or not wide:
        return [0] * len(wide)
    return torch.stack([(caps >= b).sum(-1).min() for b in wide]).tolist()


def cascade_plan(counts: dict[int, int], capped: list[int]) -> list[tuple[int, int]]:
    """cascade_assign's slots on the host: (width, tokens each row gives it) for the widths above the narrowest,
    widest first, those given none left out; the narrowest takes every token left. `capped`: see cascade_assign.
    A slot a wider width cannot use (too few tokens capped that wide: codes cannot be promoted) passes its bits
    to the next width down."""
    lowest = min(counts)
    wide = sorted(counts, reverse=True)[:-1]
    plan, taken, surplus = [], 0, 0  # surplus: bits (above the narrowest) of slots a wider width could not use
    for b, cap_b in zip(wide, capped):
        want = counts[b] + surplus // (b - lowest)
        surplus %= b - lowest
        # tokens a row could give b: those capped at b or wider, less the slots wider widths took (every one of
        # those was capped wider, so it is among them)
        take = min(want, cap_b - taken)
        surplus += (want - max(take, 0)) * (b - lowest)
        if take > 0:
            plan.append((b, take))
            taken += take
    return plan


def plan_counts(plan: list[tuple[int, int]], n: int, widths) -> dict[int, int]:
    """Tokens per width (in every row) that cascade_assign gives `n` tokens under `plan`."""
    out = dict.fromkeys(widths, 0)
    out.update(plan)
    out[min(widths)] = n - sum(t for _, t in plan)
    return out


def kv_budgets(budget: float, gap: float, widths=WIDTHS) -> tuple[float, float]:
    """Key and value budgets whose mean is `budget`, keys `gap` bits above values where the widths allow it."""
    lo, hi = min(widths), max(widths)
    value = min(max(budget - gap / 2, lo, 2 * budget - hi), hi)
    return 2 * budget - value, value


def pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """Width indices (..., n) uint8 in 0..3 -> (..., ceil(n / 8) * 2) uint8, 2 bits each (n padded to 8)."""
    from smartkv.core.quant import pack
    pad = -levels.shape[-1] % 8
    if pad:
        levels = torch.cat([levels, levels.new_zeros(*levels.shape[:-1], pad)], -1)
    return pack(levels, 2)


def unpack_levels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_levels`: -> (..., n) uint8."""
    from smartkv.core.quant import unpack
    return unpack(packed, 2)[..., :n]


def block_weights(weights: torch.Tensor, block: int) -> torch.Tensor:
    """Allocation weights of blocks of `block` consecutive tokens: (R, n) -> (R, n // block), each the sum of its
    tokens' (a block's error is the sum of its tokens' errors at one width); n a multiple of `block`."""
    if block == 1:
        return weights
    R, n = weights.shape
    return weights.reshape(R, n // block, block).sum(-1)


def incremental_assign(weights: torch.Tensor, old_bits: torch.Tensor, stored: dict[int, int], budget: float,
                       widths=WIDTHS, per_width: int = 1) -> torch.Tensor:
    """Widths (R, n) for units (tokens or blocks) of `weights` (R, n): the first `old_bits.shape[1]` are stored at
    `old_bits` (R, nq) (`stored`: units per width in every row, known on the host), the rest are new. Only the new
    units and, for each width above the narrowest, the `per_width` lightest stored units of that width are
    re-allocated (`cascade_assign`, stored ones capped at their width), against the bits the other stored units
    leave of floor(budget * n): the work grows with the new units, not with the stored ones."""
    c = incremental_candidates(weights, old_bits, stored, budget, widths, per_width)
    counts = counts_for(rank_profile(c.weights).cpu(), c.budget, widths)
    R, n = weights.shape
    out = torch.cat([old_bits, old_bits.new_full((R, n - old_bits.shape[1]), max(widths))], -1)
    return out.scatter_(1, c.idx, cascade_assign(c.weights, c.caps, counts, c.capped))


@dataclasses.dataclass
class Candidates:
    """The units an incremental re-allocation places: `idx` (R, C) the new units (in order), then per width above
    the narrowest, ascending, the `sources[w]` lightest stored units of that width; their `weights` and `caps`
    (R, C); `capped` as cascade_assign takes it and `budget` (bits a candidate may average): known on the host."""
    idx: torch.Tensor
    weights: torch.Tensor
    caps: torch.Tensor
    capped: list[int]
    budget: float
    new: int
    sources: dict[int, int]


def incremental_candidates(weights: torch.Tensor, old_bits: torch.Tensor, stored: dict[int, int], budget: float,
                           widths=WIDTHS, per_width: int = 1) -> Candidates:
    """The candidates of `incremental_assign` (see there), with every size known on the host: no device wait."""
    R, n = weights.shape
    nq = old_bits.shape[1]
    lowest, widest = min(widths), max(widths)
    idx = [torch.arange(nq, n, device=weights.device).expand(R, n - nq)]
    fixed_bits, sources = 0, {}
    for w in sorted(widths):
        c = stored.get(w, 0)
        m = 0 if w == lowest else min(per_width, c)
        fixed_bits += (c - m) * w
        if m:
            lightest = torch.where(old_bits == w, weights[:, :nq], torch.full_like(weights[:, :nq], math.inf))
            idx.append(torch.topk(lightest, m, dim=-1, largest=False).indices)
            sources[w] = m
    idx = torch.cat(idx, -1)                                                  # (R, candidates), the same count per row
    target = math.floor(budget * n + 1e-9) - fixed_bits
    caps = torch.where(idx < nq, old_bits.gather(1, idx.clamp(max=max(nq - 1, 0))) if nq else widest, widest)
    # a candidate's cap: widest for a new unit, its stored width for a stored one
    capped = [(n - nq) + sum(m for w, m in sources.items() if w >= b) for b in sorted(widths, reverse=True)[:-1]]
    return Candidates(idx, weights.gather(1, idx), caps, capped,
                      min(max(target / idx.shape[1], lowest), widest), n - nq, sources)
