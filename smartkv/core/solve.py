"""The bit-allocation solve (core.policy's model): widths for tokens of given weights that minimise
sum(weight * 4^-b) under sum(b) <= floor(budget * n), a Lagrangian sweep plus a greedy fill of the bits left over,
and the exact bit counter its Lagrangian searches share with `core.counts` (tokens per width only, on a sorted
profile, at many budgets at once)."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

WIDTHS = (2, 3, 4, 8)


def check_budget(budget: float, widths=WIDTHS) -> None:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or math.isnan(budget):
        raise ValueError(f"budget must be a number in [{min(widths)}, {max(widths)}], got {budget!r}")
    if not min(widths) <= budget <= max(widths):
        raise ValueError(f"budget must be in [{min(widths)}, {max(widths)}] bits, got {budget}")


def _choose(weight: torch.Tensor, lam: float, widths: torch.Tensor) -> torch.Tensor:
    """Per token, the width minimising weight * 4^-b + lam * b. weight (n,) -> index into widths (n,)."""
    cost = weight.unsqueeze(-1) * torch.pow(4.0, -widths) + lam * widths  # (n, k)
    return cost.argmin(-1)


@functools.cache
def envelope_of(widths: tuple) -> tuple[tuple, tuple, tuple]:
    """(breakpoints, bits each one steps up, width index after each, from the narrowest's 0) of the lower envelope
    of the lines x * 4^-b + b over `widths` (ascending float64 values): `_BitCounter`'s, made once per widths."""
    b = np.asarray(widths, dtype=np.float64)
    a = 4.0 ** -b
    # envelope from x = 0 (narrowest width) upwards: at each step the next width whose line crosses first
    breaks, steps, envelope, cur = [], [], [0], 0
    while cur < len(b) - 1:
        xs = [(b[j] - b[cur]) / (a[cur] - a[j]) for j in range(cur + 1, len(b))]
        j = cur + 1 + int(np.argmin(xs))
        breaks.append(xs[j - cur - 1])
        steps.append(b[j] - b[cur])
        envelope.append(j)
        cur = j
    return tuple(breaks), tuple(steps), tuple(envelope)


class _BitCounter:
    """sum(widths[_choose(w, lam)]) for many lam in O(k log n) each, equal to evaluating `_choose` on every token.

    Dividing a token's costs by lam, it picks the line x * 4^-b + b lowest at x = w / lam: the lower envelope of k
    lines, so the width steps up at fixed breakpoints of x. Tokens far from every breakpoint are counted by binary
    search in the sorted weights; the few within a relative 1e-9 of one (where rounding could decide) go through
    `_choose`'s own float64 arithmetic (in numpy, cheaper on a few tokens), so the count is what `_choose` gives,
    ties included (the first, narrowest, width wins)."""

    EPS = 1e-9

    def __init__(self, w: torch.Tensor, widths: torch.Tensor):
        self.sorted = np.sort(w.numpy(), kind="stable")   # timsort: a sorted profile in O(n)
        a, b = (4.0 ** -widths.numpy()), widths.numpy()
        breaks, steps, envelope = envelope_of(tuple(widths.tolist()))
        self.breaks, self.steps, self.envelope = list(breaks), list(steps), list(envelope)
        self.base = float(b[0]) * len(self.sorted)
        self.values, self.pows = b, a             # _choose's terms, for the same float64 operations in numpy

    def _bounds(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """Per breakpoint, the sorted positions where tokens stop being clearly below it (lo) and start being
        clearly above it (hi): one searchsorted for all of them."""
        xs = np.asarray(self.breaks) * lam
        pos = self.sorted.searchsorted(np.concatenate([xs * (1 - self.EPS), xs * (1 + self.EPS)]), side="right")
        return pos[:len(xs)], pos[len(xs):]

    def total(self, lam: float) -> float:
        """Bits `_choose` spends at `lam` (`totals` at many lam at once)."""
        ws, n = self.sorted, len(self.sorted)
        los, his = self._bounds(lam)
        total = self.base
        for step, hi in zip(self.steps, his.tolist()):
            total += step * (n - hi)            # clearly above this breakpoint
        near = self._undecided(los, his)
        if near:                                # undecided tokens: exactly as _choose decides
            lo, hi = near
            exact = float(self.values[self._exact(lo, hi, lam)].sum())
            # those tokens were counted above for the breakpoints they clearly pass; recount them exactly
            counted = self.base / n * (hi - lo)
            for x, step in zip(self.breaks, self.steps):
                counted += step * int(np.sum(ws[lo:hi] > x * lam * (1 + self.EPS)))
            total += exact - counted
        return total

    def totals(self, lams: list[float]) -> np.ndarray:
        """`total` at several lam at once, in the same float64 operations (every partial sum is an integer, so
        exact in any order): one searchsorted for all of them, and the tokens near a breakpoint of any of them
        (a bisection's last steps have some at nearly every lam) decided in one pass."""
        lams = np.asarray(lams, dtype=np.float64)
        ws, n = self.sorted, len(self.sorted)
        brk, steps = np.asarray(self.breaks), np.asarray(self.steps, dtype=np.float64)
        xs = brk[None, :] * lams[:, None]
        los = ws.searchsorted(xs * (1 - self.EPS), side="right")
        his = ws.searchsorted(xs * (1 + self.EPS), side="right")
        out = self.base + ((n - his) * steps[None, :]).sum(1)
        near = his > los
        at = np.flatnonzero(near.any(1))
        if at.size:   # as `total`: the span of undecided tokens of each such lam, recounted exactly
            lo = np.where(near, los, n).min(1)[at]
            cnt = np.where(near, his, 0).max(1)[at] - lo
            of = np.repeat(np.arange(at.size), cnt)
            tok = ws[np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(lo, cnt)]
            lam = lams[at][of]
            cost = tok[:, None] * self.pows[None, :] + lam[:, None] * self.values[None, :]
            exact = np.bincount(of, weights=self.values[cost.argmin(-1)], minlength=at.size)
            above = tok[:, None] > (brk[None, :] * lam[:, None]) * (1 + self.EPS)
            counted = self.base / n * cnt + np.bincount(of, weights=(above * steps[None, :]).sum(1),
                                                          minlength=at.size)
            out[at] += exact - counted
        return out

    def assign(self, lam: float) -> np.ndarray:
        """`_choose(w, lam)` for the sorted weights (ascending): width indices, from the same breakpoints as
        `total`, the undecided tokens by `_choose`'s arithmetic."""
        idx = np.full(len(self.sorted), self.envelope[0], dtype=np.int64)
        los, his = self._bounds(lam)
        for j, hi in zip(self.envelope[1:], his.tolist()):
            idx[hi:] = j
        near = self._undecided(los, his)
        if near:
            idx[near[0]:near[1]] = self._exact(*near, lam)
        return idx

    @staticmethod
    def _undecided(los: np.ndarray, his: np.ndarray) -> tuple[int, int] | None:
        """The sorted positions [lo, hi) spanning every token near some breakpoint (None: there are none)."""
        near = [(lo, hi) for lo, hi in zip(los.tolist(), his.tolist()) if hi > lo]
        return (min(r[0] for r in near), max(r[1] for r in near)) if near else None

    def _exact(self, lo: int, hi: int, lam: float) -> np.ndarray:
        """Width indices of sorted tokens [lo, hi) by `_choose`'s float64 arithmetic (first minimum wins)."""
        cost = self.sorted[lo:hi, None] * self.pows[None, :] + lam * self.values[None, :]
        return cost.argmin(-1)


def solve_widths(weight: torch.Tensor, budget: float, widths=WIDTHS) -> torch.Tensor:
    """Widths (n,) for tokens of `weight` (n,), sum <= floor(budget * n), a heavier token never fewer bits."""
    w, bits = _solve(weight, budget, widths)
    # rearrangement: heaviest tokens get the largest widths (same total, never higher cost)
    order = torch.argsort(w, descending=True, stable=True)
    out = torch.empty(w.numel(), dtype=torch.long)
    out[order] = torch.sort(bits, descending=True).values.long()
    return out


def _problem(weight: torch.Tensor, budget: float, widths) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The allocation problem, checked: (weights (n,) float64 on the CPU, widths ascending float64, bit target
    floor(budget * n))."""
    check_budget(budget, widths)
    w = weight.detach().double().clamp_min(0).flatten().cpu()
    return w, torch.tensor(sorted(widths), dtype=torch.float64), _target(w.numel(), budget, widths)


def _target(n: int, budget: float, widths) -> int:
    """The bit target floor(budget * n) of n tokens (`budget` already checked), at least the narrowest width's."""
    target = int(math.floor(budget * n + 1e-9))
    if min(widths) * n > target:
        raise ValueError(f"budget {budget} is below the smallest width {min(widths)}")
    return target


def _solve(weight: torch.Tensor, budget: float, widths) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights as float64 on the CPU, widths (n,) before the rearrangement: the same multiset of widths)."""
    w, w_vals, target = _problem(weight, budget, widths)
    n = w.numel()
    if n == 0:
        return w, torch.zeros(0, dtype=torch.float64)
    feasible = _lagrangian(_BitCounter(w, w_vals), target)
    best = _choose(w, 2.0 ** feasible, w_vals) if feasible is not None else torch.zeros(n, dtype=torch.long)
    idx = _fill(w, best.clone(), w_vals, target - int(w_vals[best].sum()))
    return w, w_vals[idx]


def _lagrangian(counter: _BitCounter, target: int) -> float | None:
    """log2 of the largest lam on the bisection's grid whose `_choose` spends at most `target` bits (None: none
    does, every token at the narrowest width)."""
    lo, hi = -60.0, 60.0  # log2(lam): from huge (all min width) down to tiny (all max width)
    feasible = None
    for _ in range(64):
        mid = (lo + hi) / 2
        if not lo < mid < hi:  # converged to adjacent doubles: further steps change nothing
            break
        if counter.total(2.0 ** mid) <= target:
            feasible, hi = mid, mid
        else:
            lo = mid
    return feasible


def _fill(w: torch.Tensor, idx: torch.Tensor, w_vals: torch.Tensor, slack: int) -> torch.Tensor:
    """Spend `slack` left-over bits on the upgrades with the best error reduction per bit."""
    k = len(w_vals)
    for _ in range(16):
        if slack <= 0:
            break
        can = idx < k - 1
        nxt = torch.clamp(idx + 1, max=k - 1)
        step = (w_vals[nxt] - w_vals[idx])
        gain = torch.where(can, w * (torch.pow(4.0, -w_vals[idx]) - torch.pow(4.0, -w_vals[nxt])) / step,
                           torch.full_like(w, -1.0))
        # ties (flat weights) go to the narrowest tokens first: spreads bits instead of stacking them
        gain = gain + 1e-12 * (k - idx).double()
        gain = torch.where(can & (step <= slack), gain, torch.full_like(w, -1.0))
        # every upgrade costs a bit at least: the best `slack` gains are all the greedy pass below can take
        # (topk's order among exact ties differs from a stable sort's, but tied tokens have the same width and
        # weight, so the multiset of widths, all that callers use, is the same)
        order = torch.topk(gain, min(slack, gain.numel())).indices
        cost = step[order]
        ok = (gain[order] >= 0) & (torch.cumsum(cost, 0) <= slack)
        chosen = order[ok]
        if chosen.numel() == 0:
            break
        idx[chosen] += 1
        slack -= int(step[chosen].sum())
    return idx
