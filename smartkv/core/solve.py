"""The bit-allocation solve (core.policy's model): widths for tokens of given weights that minimise
sum(weight * 4^-b) under sum(b) <= floor(budget * n), a Lagrangian sweep plus a greedy fill of the bits left over;
`counts_for` / `counts_for_budgets` give only the tokens per width of a sorted (rank-averaged) profile, read from
the assignment's breakpoints in numpy (SmartKV's re-allocations and the append design's demotion plan call them on
the host, with the GPU waiting)."""
from __future__ import annotations

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
        # envelope from x = 0 (narrowest width) upwards: at each step the next width whose line crosses first
        self.breaks, self.steps, self.envelope, cur = [], [], [0], 0
        while cur < len(b) - 1:
            xs = [(b[j] - b[cur]) / (a[cur] - a[j]) for j in range(cur + 1, len(b))]
            j = cur + 1 + int(np.argmin(xs))
            self.breaks.append(xs[j - cur - 1])
            self.steps.append(b[j] - b[cur])
            self.envelope.append(j)
            cur = j
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


def _lagrangian_many(counter: _BitCounter, targets: list[int]) -> list[float | None]:
    """`_lagrangian` for several targets on one counter: read off the sorted thresholds (`_sweep`) where it can
    be, the rest bisected in step (`_lagrangian_bisect`)."""
    swept = _sweep(counter, targets)
    rest = [t for t, lam in zip(targets, swept) if lam is None]
    if rest:
        bisected = iter(_lagrangian_bisect(counter, rest))
        swept = [next(bisected) if lam is None else lam for lam in swept]
    return swept


def _lagrangian_bisect(counter: _BitCounter, targets: list[int]) -> list[float | None]:
    """The bisections in step: each step counts every unconverged target's lam at once (`totals`), and each
    target ends where `_lagrangian` would (one target: `_lagrangian` itself, whose scalar loop is faster alone)."""
    if len(targets) == 1:
        return [_lagrangian(counter, targets[0])]
    m = len(targets)
    lo, hi = np.full(m, -60.0), np.full(m, 60.0)
    feasible: list[float | None] = [None] * m
    live = np.ones(m, dtype=bool)
    goal = np.asarray(targets, dtype=np.float64)
    for _ in range(64):
        mid = (lo + hi) / 2
        live &= (lo < mid) & (mid < hi)
        if not live.any():
            break
        at = np.flatnonzero(live)
        ok = counter.totals([2.0 ** float(x) for x in mid[at]]) <= goal[at]
        for i, good in zip(at.tolist(), ok.tolist()):
            if good:
                feasible[i], hi[i] = float(mid[i]), mid[i]
            else:
                lo[i] = mid[i]
    return feasible


def _sweep(counter: _BitCounter, targets: list[int]) -> list[float | None]:
    """log2 of a lam in the piece where `_lagrangian` ends, per target, without bisecting (None: bisect that one).

    A token crosses breakpoint j while lam < w / x_j, so the bits spent are a step function of lam with its steps
    at those n x (k - 1) thresholds. Sorted once, a binary search over them (every target in step, each probe k - 1
    searches in the sorted weights' columns) finds each target's smallest feasible threshold lam*; every lam
    strictly between it and the next threshold assigns alike, and their geometric middle is taken where lam* sits
    well clear of its neighbours (relative 1e-8, far wider than the counter's 1e-9 band of exact arithmetic), holds
    one weight's thresholds only, and lies inside the bisection's range. Otherwise the bisection decides."""
    ws, J = counter.sorted, len(counter.breaks)
    n = len(ws)
    if not J or not n:
        return [None] * len(targets)
    cols = ws[None, :] / np.asarray(counter.breaks)[:, None]   # (J, n): row j sorted, token i's threshold there
    steps = np.asarray(counter.steps, dtype=np.float64)
    cs = np.sort(cols.ravel(), kind="stable")   # timsort merges the J sorted rows

    def spent(v: np.ndarray) -> np.ndarray:   # bits above the narrowest at lam = v
        return sum(s * (n - np.searchsorted(col, v, side="right")) for s, col in zip(steps, cols))

    need = np.asarray(targets, dtype=np.float64) - counter.base
    lo, hi = np.zeros(len(need), dtype=np.int64), np.full(len(need), len(cs) - 1)
    while (lo < hi).any():                   # smallest k with spent(cs[k]) <= need (the last always is)
        mid = (lo + hi) // 2
        ok = spent(cs[mid]) <= need
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
    star = cs[lo]
    below, above = np.searchsorted(cs, star, side="left"), np.searchsorted(cs, star, side="right")
    prev = cs[np.maximum(below - 1, 0)]
    nxt = np.where(above < len(cs), cs[np.minimum(above, len(cs) - 1)], 4 * star)
    owners = sum((np.searchsorted(col, star, side="right") > np.searchsorted(col, star, side="left")).astype(int)
                 for col in cols)
    tight = 1 + 1e-8
    clear = ((need >= 0) & (below > 0) & (prev * tight < star) & (nxt > star * tight) & (owners == 1)
             & (star > 2.0 ** -59) & (nxt < 2.0 ** 59))
    return [math.log2(math.sqrt(a * b)) if ok else None for a, b, ok in zip(star.tolist(), nxt.tolist(), clear)]


def _fill_sorted(w: np.ndarray, idx: np.ndarray, w_vals: np.ndarray, slack: int) -> np.ndarray:
    """`_fill` in numpy, the same arithmetic: spend `slack` left-over bits on the best upgrades per bit."""
    k = len(w_vals)
    pows = 4.0 ** -w_vals
    for _ in range(16):
        if slack <= 0:
            break
        can = idx < k - 1
        nxt = np.minimum(idx + 1, k - 1)
        step = w_vals[nxt] - w_vals[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(can, w * (pows[idx] - pows[nxt]) / step, -1.0)
        gain = gain + 1e-12 * (k - idx).astype(np.float64)
        gain = np.where(can & (step <= slack), gain, -1.0)
        m = min(slack, gain.size)
        top = np.argpartition(-gain, m - 1)[:m] if m < gain.size else np.arange(gain.size)
        order = top[np.argsort(-gain[top], kind="stable")]
        cost = step[order]
        ok = (gain[order] >= 0) & (np.cumsum(cost) <= slack)
        chosen = order[ok]
        if chosen.size == 0:
            break
        idx[chosen] += 1
        slack -= int(step[chosen].sum())
    return idx


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


def counts_for(weight_profile: torch.Tensor, budget: float, widths=WIDTHS) -> dict[int, int]:
    """Tokens per width for a representative (rank-averaged) weight profile: `solve_widths`' counts, without
    placing them. The same Lagrangian solve and greedy fill, run on the sorted weights in numpy (the assignment
    of a sorted profile is a step function, read from the breakpoints): a few times faster than `_solve`, which
    matters because SmartKV calls it twice per layer at every re-allocation, with the GPU waiting."""
    return counts_for_budgets(weight_profile, [budget], widths)[0]


def counts_for_budgets(weight_profile: torch.Tensor, budgets: list, widths=WIDTHS) -> list[dict[int, int]]:
    """`counts_for` at each of several budgets on one profile, sorted once (the append design's demotion plan
    asks for 2 x 17 of them on a prompt's profile)."""
    outs = [dict.fromkeys(sorted(widths, reverse=True), 0) for _ in budgets]
    for budget in budgets:   # each budget checked before any work
        check_budget(budget, widths)
    if not budgets:
        return outs
    w, w_vals, _ = _problem(weight_profile, budgets[0], widths)   # the profile to the host once
    targets = [_target(w.numel(), b, widths) for b in budgets]
    if w.numel() == 0:
        return outs
    counter = _BitCounter(w, w_vals)   # one sort, and the thresholds' search for all of them
    vals = w_vals.numpy()
    for out, target, feasible in zip(outs, targets, _lagrangian_many(counter, targets)):
        idx = counter.assign(2.0 ** feasible) if feasible is not None else np.zeros(w.numel(), dtype=np.int64)
        counts = np.bincount(idx, minlength=len(vals))
        slack = target - int(counts @ vals)
        if slack > 0:   # the fill runs on the few tokens it can reach (`_fill_candidates`), alike
            sub = _fill_candidates(idx, len(vals), slack)
            counts += np.bincount(_fill_sorted(counter.sorted[sub], idx[sub], vals, slack), minlength=len(vals))
            counts -= np.bincount(idx[sub], minlength=len(vals))
        for i, c in enumerate(counts.tolist()):
            out[int(vals[i])] = c
    return outs


def _fill_candidates(idx: np.ndarray, k: int, slack: int) -> np.ndarray:
    """Sorted positions the greedy fill can upgrade with `slack` bits, whatever it picks: each width's heaviest
    `slack` tokens (a fill upgrades a width's tokens heaviest first, at most `slack` of them all told, and a token
    it raises is lighter than every token of its new width), from widths ascending along the sorted weights."""
    if (np.diff(idx) < 0).any():   # not along the weights (rounding at a breakpoint): every token then
        return np.arange(len(idx))
    ends = np.searchsorted(idx, np.arange(k), side="right")
    starts = np.concatenate([[0], ends[:-1]])
    return np.concatenate([np.arange(max(a, b - slack), b) for a, b in zip(starts.tolist(), ends.tolist())])
