"""How many tokens get each width: the allocation solve of `core.solve` on a sorted (rank-averaged) weight profile,
read from the assignment's breakpoints in numpy, at many budgets on one profile at once (SmartKV's re-allocations
and the append design's first allocation and demotion plan call these on the host, with the GPU waiting: at 8K
tokens a layer's prefill asks for 2 to 2 x 17 budgets)."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from smartkv.core.solve import WIDTHS, _BitCounter, _lagrangian, _problem, _target, check_budget, envelope_of


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
    at those n x (k - 1) thresholds: sorted once with each one's step of bits (`_thresholds`, kept on the counter
    for the next call on the same profile), the bits spent at every threshold are a suffix sum, and each target's
    smallest feasible threshold lam* is one search in that non-increasing array, every target at once. Every lam
    strictly between lam* and the next threshold assigns alike, and their geometric middle is taken where lam* sits
    well clear of its neighbours (relative 1e-8, far wider than the counter's 1e-9 band of exact arithmetic), holds
    one weight's thresholds only, and lies inside the bisection's range. Otherwise the bisection decides."""
    ws, J = counter.sorted, len(counter.breaks)
    n = len(ws)
    if not J or not n:
        return [None] * len(targets)
    cols, cs, spent = _thresholds(counter)
    need = np.asarray(targets, dtype=np.float64) - counter.base
    # smallest k with spent[k] <= need (spent falls as k grows; the last, 0 bits above the narrowest, always is
    # unless need < 0, which is never clear below)
    lo = np.minimum(np.searchsorted(-spent, -need, side="left"), len(cs) - 1)
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


def _thresholds(counter: _BitCounter) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cols (J, n): row j token i's threshold w_i / x_j, each row ascending; cs: all of them sorted; spent: the
    bits above the narrowest at lam = cs[k], the steps of the thresholds after it), made once a counter: a first
    allocation asks for several sets of budgets on one profile."""
    if getattr(counter, "_sweep_tables", None) is None:
        ws, n = counter.sorted, len(counter.sorted)
        cols = ws[None, :] / np.asarray(counter.breaks)[:, None]
        flat = cols.ravel()
        order = np.argsort(flat, kind="stable")   # timsort merges the J sorted rows
        cs = flat[order]
        steps = np.repeat(np.asarray(counter.steps, dtype=np.float64), n)[order]
        # the steps of cs[k + 1:]: at a run of ties this over-counts all but its last member, whose own count is
        # right, so the search below still stops in that run (at the same value) or past it, as exact counts would
        spent = np.append(np.cumsum(steps[::-1])[::-1][1:], 0.0)
        counter._sweep_tables = (cols, cs, spent)
    return counter._sweep_tables


def device_tables(profile: torch.Tensor, widths) -> torch.Tensor:
    """`_thresholds`' tables of a rank profile (..., n) made where it is (the first allocation's device, rows of
    several layers at once), flattened per row as [cols (J n), cs (J n), spent (J n)] float64: the host's values
    (the same sort of the profile, IEEE divisions, a stable sort of the thresholds and suffix sums of integer
    steps, exact in any order), so a `ProfileCounts` given them (`tables=`) answers as one that made its own."""
    ws = torch.sort(profile.detach().double().clamp_min(0), dim=-1, stable=True).values   # `_BitCounter.sorted`
    n = ws.shape[-1]
    breaks, steps = _device_envelope(tuple(float(w) for w in sorted(widths)), ws.device)
    if not breaks.numel() or not n:
        return ws.new_zeros(*ws.shape[:-1], 0)
    flat = (ws.unsqueeze(-2) / breaks[:, None]).flatten(-2)      # row j token i: w_i / x_j
    cs, order = torch.sort(flat, dim=-1, stable=True)
    tail = steps.repeat_interleave(n)[order].flip(-1).cumsum(-1).flip(-1)   # the steps of cs[k:]
    spent = torch.cat([tail[..., 1:], tail.new_zeros(*tail.shape[:-1], 1)], -1)
    return torch.cat([flat, cs, spent], -1)


@functools.cache
def _device_envelope(widths: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`envelope_of`'s breakpoints and steps as float64 tensors on `device` (made once)."""
    breaks, steps, _ = envelope_of(widths)
    return (torch.tensor(breaks, dtype=torch.float64).to(device), torch.tensor(steps, dtype=torch.float64).to(device))


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


def counts_for(weight_profile: torch.Tensor, budget: float, widths=WIDTHS) -> dict[int, int]:
    """Tokens per width for a representative (rank-averaged) weight profile: `solve_widths`' counts, without
    placing them. The same Lagrangian solve and greedy fill, run on the sorted weights in numpy (the assignment
    of a sorted profile is a step function, read from the breakpoints): a few times faster than `_solve`, which
    matters because SmartKV calls it twice per layer at every re-allocation, with the GPU waiting."""
    return counts_for_budgets(weight_profile, [budget], widths)[0]


def counts_for_budgets(weight_profile, budgets: list, widths=WIDTHS) -> list[dict[int, int]]:
    """`counts_for` at each of several budgets on one profile, sorted once (the append design's demotion plan
    asks for 2 x 17 of them on a prompt's profile). `weight_profile`: a tensor, or a `ProfileCounts` made on it
    (its sort and threshold tables then serve every call)."""
    if isinstance(weight_profile, ProfileCounts):   # its `counts` checks the budgets
        if tuple(weight_profile.widths) != tuple(widths):
            raise ValueError(f"widths {tuple(widths)} differ from the ProfileCounts' {tuple(weight_profile.widths)}")
        return weight_profile.counts(budgets)
    for budget in budgets:   # each budget checked before any work (the profile's copy to the host included)
        check_budget(budget, widths)
    if not budgets:
        return []
    return ProfileCounts(weight_profile, widths).counts(budgets)


class ProfileCounts:
    """`counts_for_budgets` on one profile, asked several times: the profile goes to the host, is sorted and its
    thresholds tabled (`_thresholds`) once. An append layer's first allocation asks on its prompt's profile for
    the ring's widths, then for the demotion plan's budgets, which depend on them."""

    def __init__(self, weight_profile: torch.Tensor, widths=WIDTHS, tables: torch.Tensor | None = None):
        self.widths = tuple(widths)
        w, self.w_vals, _ = _problem(weight_profile, min(widths), widths)   # the profile to the host once
        self.profile, self.n = w, w.numel()
        self.counter = _BitCounter(w, self.w_vals) if self.n else None
        J = len(self.counter.breaks) if self.n else 0
        if tables is not None and J:   # `device_tables` of this profile, on the host: not made again here
            if tables.numel() != 3 * J * self.n:
                raise ValueError(f"tables of {tables.numel()} values do not fit a profile of {self.n} tokens and "
                                 f"{J} breakpoints (3 x {J * self.n})")
            cols, cs, spent = tables.double().cpu().numpy().reshape(3, J * self.n)
            self.counter._sweep_tables = (cols.reshape(J, self.n), cs, spent)

    def counts(self, budgets: list) -> list[dict[int, int]]:
        outs = [dict.fromkeys(sorted(self.widths, reverse=True), 0) for _ in budgets]
        for budget in budgets:   # each budget checked before any work
            check_budget(budget, self.widths)
        if not self.n or not budgets:
            return outs
        counter, vals = self.counter, self.w_vals.numpy()
        targets = [_target(self.n, b, self.widths) for b in budgets]
        lams = _lagrangian_many(counter, targets)
        many = _counts_in_step(counter, targets, lams)
        for out, target, feasible, counts in zip(outs, targets, lams, many):
            if counts[0] < 0:   # not decided in step: this budget alone
                idx = counter.assign(2.0 ** feasible) if feasible is not None else np.zeros(self.n, dtype=np.int64)
                counts = np.bincount(idx, minlength=len(vals))
                slack = target - int(counts @ vals)
                if slack > 0:   # the fill runs on the few tokens it can reach (`_fill_candidates`), alike
                    sub = _fill_candidates(idx, len(vals), slack)
                    counts += np.bincount(_fill_sorted(counter.sorted[sub], idx[sub], vals, slack),
                                          minlength=len(vals))
                    counts -= np.bincount(idx[sub], minlength=len(vals))
            for i, c in enumerate(counts.tolist()):
                out[int(vals[i])] = c
        return outs


def _counts_in_step(counter: _BitCounter, targets: list[int], lams: list) -> np.ndarray:
    """Tokens per width (m, k) at every budget whose assignment is a clean step function of the sorted weights (a
    lam, no token within the counter's band of a breakpoint), with the greedy fill on each width's heaviest `slack`
    tokens (`_fill_candidates`) run for all of them in step: `_fill_sorted`'s rounds on a padded (m, candidates)
    array, the same float64 arithmetic, so the same counts as the per-budget path (ties among equal gains go to
    equal tokens either way). Rows of -1 are left to that path (no lam, undecided tokens, a large slack); a prompt's
    demotion plan asks for 2 x 17 budgets, and one budget at a time was ~55 us of numpy calls each."""
    ws, n, vals = counter.sorted, len(counter.sorted), counter.values
    k, m = len(vals), len(targets)
    out = np.full((m, k), -1, dtype=np.int64)
    at = np.asarray([i for i, lam in enumerate(lams) if lam is not None], dtype=np.int64)
    if not at.size or not n or (np.diff(vals) < 1).any():
        return out
    lam = np.asarray([2.0 ** lams[i] for i in at.tolist()])     # Python's pow, as the per-budget path's
    env = np.asarray(counter.envelope)
    counts = np.zeros((at.size, k), dtype=np.int64)
    if counter.breaks:
        xs = np.asarray(counter.breaks)[None, :] * lam[:, None]
        los = ws.searchsorted(xs * (1 - counter.EPS), side="right")
        his = ws.searchsorted(xs * (1 + counter.EPS), side="right")
        clean = (his == los).all(1)
        edges = np.concatenate([np.zeros((at.size, 1), dtype=np.int64), his, np.full((at.size, 1), n)], 1)
        counts[:, env] = np.diff(edges, axis=1)
    else:
        clean = np.ones(at.size, dtype=bool)
        counts[:, env[0]] = n
    slack = np.asarray(targets, dtype=np.int64)[at] - (counts @ vals).astype(np.int64)
    fill = clean & (slack > 0)
    if fill.any():
        cap = np.minimum(counts[fill][:, :, None], slack[fill][:, None, None])      # candidates a width
        if int(cap.sum(1).max()) * int(fill.sum()) > 4_000_000:
            return out
        counts[fill] = _fill_in_step(ws, counts[fill], slack[fill], vals)
    out[at[clean]] = counts[clean]
    return out


def _fill_in_step(ws: np.ndarray, counts: np.ndarray, slack: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """`_fill_sorted` on each row's `_fill_candidates` of a step assignment (counts (r, k) along the sorted
    weights), all rows at once; returns the counts after the fill."""
    r, k = counts.shape
    ends = np.cumsum(counts, 1)
    take = np.minimum(counts, slack[:, None])                   # each width's heaviest `slack` tokens
    C = int(take.sum(1).max())
    j = np.arange(C)
    first = np.cumsum(take, 1) - take                           # where each width's candidates start in a row
    width = (j[None, :, None] >= first[:, None, :]).sum(2) - 1  # (r, C): the width index of candidate j
    width = np.minimum(width, k - 1)
    valid = j[None, :] < take.sum(1)[:, None]
    pos = np.take_along_axis(ends - take, width, 1) + j[None, :] - np.take_along_axis(first, width, 1)
    w = ws[np.where(valid, pos, 0)]
    idx = np.where(valid, width, 0)
    start = idx.copy()
    pows = 4.0 ** -vals
    slack = slack.copy()
    rows = np.arange(r)[:, None]
    for _ in range(16):
        can = valid & (idx < k - 1)
        nxt = np.minimum(idx + 1, k - 1)
        step = vals[nxt] - vals[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(can, w * (pows[idx] - pows[nxt]) / step, -1.0)
        gain = gain + 1e-12 * (k - idx).astype(np.float64)
        gain = np.where(can & (step <= slack[:, None]), gain, -1.0)
        gain = np.where(valid, gain, -np.inf)
        order = np.argsort(-gain, axis=1, kind="stable")
        cost = np.take_along_axis(np.where(valid, step, 0.0), order, 1)
        ok = (np.take_along_axis(gain, order, 1) >= 0) & (np.cumsum(cost, 1) <= slack[:, None])
        if not ok.any():
            break
        chosen = np.zeros_like(valid)
        chosen[np.broadcast_to(rows, order.shape)[ok], order[ok]] = True
        slack -= (cost * ok).sum(1).astype(np.int64)
        idx = idx + chosen
    at = (rows * k + idx)[valid], (rows * k + start)[valid]      # the counts' change by width, every row at once
    return counts + (np.bincount(at[0], minlength=r * k) - np.bincount(at[1], minlength=r * k)).reshape(r, k)


def _fill_candidates(idx: np.ndarray, k: int, slack: int) -> np.ndarray:
    """Sorted positions the greedy fill can upgrade with `slack` bits, whatever it picks: each width's heaviest
    `slack` tokens (a fill upgrades a width's tokens heaviest first, at most `slack` of them all told, and a token
    it raises is lighter than every token of its new width), from widths ascending along the sorted weights."""
    if (np.diff(idx) < 0).any():   # not along the weights (rounding at a breakpoint): every token then
        return np.arange(len(idx))
    ends = np.searchsorted(idx, np.arange(k), side="right")
    starts = np.concatenate([[0], ends[:-1]])
    return np.concatenate([np.arange(max(a, b - slack), b) for a, b in zip(starts.tolist(), ends.tolist())])
