"""Joint classes: a unit's (key width, value width). Keys and values share one weight, so placing both kinds along
one ranking gives every row the same number of units in each class; each class can then be one dense segment that
the uniform decode kernels read in one pass (docs/smartkv.md, "Joint classes"). The per-kind counts come from
`policy.counts_for`; these functions merge them into classes and place the classes under both kinds' caps."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from smartkv.core.counts import ProfileCounts
from smartkv.core.policy import WIDTHS
from smartkv.core.solve import check_budget
from smartkv.core.solves import Ask, solve_one


def zip_runs(a: list, b: list) -> list:
    """Two run-length sequences [(value, length)] of one total length, side by side: [(a's, b's, length)], in
    O(runs), not O(units)."""
    out, i, j = [], 0, 0
    left_a, left_b = (a[0][1] if a else 0), (b[0][1] if b else 0)
    while i < len(a) and j < len(b):
        m = min(left_a, left_b)
        if m:
            out.append((a[i][0], b[j][0], m))
        left_a, left_b = left_a - m, left_b - m
        if not left_a:
            i += 1
            left_a = a[i][1] if i < len(a) else 0
        if not left_b:
            j += 1
            left_b = b[j][1] if j < len(b) else 0
    return out


def staircase(counts_k: dict[int, int], counts_v: dict[int, int]) -> list[tuple[int, int, int]]:
    """Classes (key width, value width, units) that per-kind width counts give when both kinds are handed out
    along one ranking, the heaviest units first: both counts sum to the same number of units."""
    def runs(counts):
        return [(w, counts[w]) for w in sorted(counts, reverse=True) if counts[w]]
    if sum(counts_k.values()) != sum(counts_v.values()):
        raise ValueError(f"keys' counts {counts_k} and values' {counts_v} place different numbers of units")
    return zip_runs(runs(counts_k), runs(counts_v))


def joint_plan(classes: list[tuple[int, int, int]], capped: list[int]) -> list[tuple[int, int, int]]:
    """`joint_assign`'s slots on the host: (key width, value width, units each row gives it), widest first, the
    lowest class (which takes every unit left) left out. `capped[i]`: the fewest units of a row whose caps allow
    class i. A class short of eligible units passes its slots to the next class down: never more bits than asked."""
    plan, taken, carry = [], 0, 0
    for (kw, vw, want), cap in zip(classes, capped):
        want += carry
        take = max(min(want, cap - taken), 0)
        carry = want - take
        if take:
            plan.append((kw, vw, take))
            taken += take
    return plan


def joint_assign(weights: torch.Tensor, caps_k: torch.Tensor, caps_v: torch.Tensor,
                 plan: list[tuple[int, int, int]], lowest: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value widths (R, n) for units of `weights` (R, n): class by class (`joint_plan`), each row gives a
    class's slots to its heaviest free units whose caps (R, n) allow both widths (stored codes cannot be
    promoted); the units left take `lowest`. Every row ends with the same count in each class."""
    R, n = weights.shape
    out_k = torch.full((R, n), lowest[0], dtype=torch.long, device=weights.device)
    out_v = torch.full((R, n), lowest[1], dtype=torch.long, device=weights.device)
    free = torch.ones(R, n, dtype=torch.bool, device=weights.device)
    neg = torch.finfo(torch.float64).min
    w = weights.double()
    for kw, vw, take in plan:
        eligible = free & (caps_k >= kw) & (caps_v >= vw)
        top = torch.topk(torch.where(eligible, w, torch.full_like(w, neg)), take, dim=-1, sorted=False).indices
        out_k.scatter_(1, top, kw)
        out_v.scatter_(1, top, vw)
        free.scatter_(1, top, False)
    return out_k, out_v


@dataclasses.dataclass
class JointCandidates:
    """The units a joint incremental re-allocation places: `idx` (R, C) the new units (in order), then per stored
    class (key width, value width) but the lowest, ascending, the `sources[c]` lightest stored units of that class;
    their `weights` and caps (R, C) per kind; each kind's `budgets` (bits a candidate may average): known on the
    host."""
    idx: torch.Tensor
    weights: torch.Tensor
    caps_k: torch.Tensor
    caps_v: torch.Tensor
    budgets: tuple[float, float]
    new: int
    sources: dict[tuple[int, int], int]

    def capped(self, classes: list[tuple[int, int, int]]) -> list[int]:
        """`joint_plan`'s capped: per class, the candidates whose caps allow it (the same in every row)."""
        return [self.new + sum(m for (ck, cv), m in self.sources.items() if ck >= kw and cv >= vw)
                for kw, vw, _ in classes]


def joint_candidates(weights: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor,
                     stored: dict[tuple[int, int], int], budgets: tuple[float, float], widths=WIDTHS,
                     per_width: int = 1) -> JointCandidates:
    """`incremental_candidates` for both kinds at once: units stored at widths `old_k`, `old_v` (R, nq), every
    row holding `stored[(kw, vw)]` units of each class; the rest of `weights` (R, n) new. Only the new units and,
    per stored class but the lowest, its `per_width` lightest units are placed again, against the bits of each
    kind the other stored units leave of floor(budget * n)."""
    R, n = weights.shape
    nq = old_k.shape[1]
    lo, hi = min(widths), max(widths)
    idx = [torch.arange(nq, n, device=weights.device).expand(R, n - nq)]
    fixed, sources = [0, 0], {}
    for (kw, vw), c in sorted(stored.items()):
        m = 0 if (kw, vw) == (lo, lo) else min(per_width, c)
        fixed[0] += (c - m) * kw
        fixed[1] += (c - m) * vw
        if m:
            mine = (old_k == kw) & (old_v == vw)
            lightest = torch.where(mine, weights[:, :nq], torch.full_like(weights[:, :nq], math.inf))
            idx.append(torch.topk(lightest, m, dim=-1, largest=False).indices)
            sources[(kw, vw)] = m
    idx = torch.cat(idx, -1)
    C = idx.shape[1]
    stored_at = idx.clamp(max=max(nq - 1, 0))
    caps = [torch.where(idx < nq, old.gather(1, stored_at), hi) if nq else torch.full_like(idx, hi)
            for old in (old_k, old_v)]
    budgets = tuple(min(max((math.floor(b * n + 1e-9) - f) / max(C, 1), lo), hi) for b, f in zip(budgets, fixed))
    return JointCandidates(idx, weights.gather(1, idx), caps[0], caps[1], budgets, n - nq, sources)


def joint_counts(plan: list[tuple[int, int, int]], n: int, lowest: tuple[int, int]) -> dict[tuple[int, int], int]:
    """Units per class (in every row) that `joint_assign` gives `n` units under `plan`."""
    out: dict[tuple[int, int], int] = {}
    for kw, vw, take in plan:
        out[(kw, vw)] = out.get((kw, vw), 0) + take
    rest = n - sum(out.values())
    if rest:
        out[lowest] = out.get(lowest, 0) + rest
    return out


def flush_mix(profile: torch.Tensor, budgets: tuple[float, float], widths, n: int) -> list[tuple[int, int, int]]:
    """The classes (key width, value width, units) every later flush of `n` units gives its units, heaviest
    first (SmartKV's `realloc="append"`): each kind's counts solved (`policy.counts_for`) on `profile` (a first
    allocation's rank profile, (N,) descending) resampled at n evenly spaced quantiles, so every flush spends the
    budget the way the prompt's weight distribution says, and merged along one ranking (`staircase`)."""
    return solve_one(flush_mix_steps(profile, budgets, widths, n))


def flush_mix_steps(profile: torch.Tensor, budgets: tuple[float, float], widths, n: int):
    """`flush_mix` as a solve that yields its counts' `Ask` (`solves.solve_asks`: a group's layers asked at once)."""
    N = profile.numel()
    if N == 0:
        raise ValueError("flush_mix needs a non-empty rank profile")
    for budget in budgets:   # checked before the sample is made
        check_budget(budget, widths)
    at = ((torch.arange(n, dtype=torch.float64) + 0.5) * N / n).long().clamp(max=N - 1)
    sample = profile.double().cpu()[at]
    return staircase(*(yield Ask(ProfileCounts(sample, widths), list(budgets))))


def ring_widths(profile, recent: float, budgets: tuple[float, float], widths, ring: int) -> tuple:
    """The (key width, value width) of an append layer's ring of `ring` tokens over `profile` (the n prompt tokens'
    rank profile, (n,) descending, or a `counts.ProfileCounts` made on it, which the caller asks again): per kind,
    the width w that minimises the allocation's error model (weight x 4^-w, `policy._choose`'s) summed over the
    ring's tokens, each weighing `recent` (the mean weight of the prompt's newest `ring` tokens: the ring's tokens
    are read as the prompt's newest were, by the queries right after them),
    and over the prompt's tokens at the bits the ring leaves them (floor(budget x (n + ring)) - ring x w, solved as
    the first allocation solves), among the widths no narrower than the kind's budget. The mix's top class instead
    gave the whole ring 8-bit values wherever one token a flush earns them (SmolLM2, int4's point: half the layers),
    starving the prompt's values."""
    return solve_one(ring_widths_steps(profile, recent, budgets, widths, ring))


def ring_widths_steps(profile, recent: float, budgets: tuple[float, float], widths, ring: int):
    """`ring_widths` as a solve that yields its counts' `Ask` (`solves.solve_asks`)."""
    solver = profile if isinstance(profile, ProfileCounts) else ProfileCounts(profile, widths)
    if solver.widths != tuple(widths):
        raise ValueError(f"widths {tuple(widths)} differ from the ProfileCounts' {solver.widths}")
    prof, lo = solver.profile, min(widths)
    n = prof.numel()
    cands, lefts = [], []   # each kind's candidate widths and the budget each leaves the prompt: one solve for all
    for b in budgets:
        bits = math.floor(b * (n + ring) + 1e-9)
        # no narrower than the budget (the prompt's tokens are never raised: bits a narrower ring left would go
        # unspent), and leaving the prompt at least the narrowest width; none fits: the narrowest such width
        # (the caller shrinks the ring until it fits)
        wide = [w for w in sorted(widths) if w >= b - 1e-9]
        cands.append([w for w in wide if bits - ring * w >= lo * n] or wide[:1])
        lefts += [min(max((bits - ring * w) / n, lo), max(widths)) for w in cands[-1]]
    solved = iter((yield Ask(solver, lefts)))
    csum = np.concatenate([[0.0], np.cumsum(prof.numpy())])   # the profile's error by runs of one width
    out = []
    for cand in cands:
        best = None
        for w, counts in zip(cand, solved):
            err, at = ring * recent * 4.0 ** -w, 0
            for x, c in sorted(counts.items(), reverse=True):   # widest to the heaviest
                err += float(csum[at + c] - csum[at]) * 4.0 ** -x
                at += c
            if best is None or err < best[0]:
                best = (err, w)
        out.append(best[1])
    return tuple(out)
