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


def _sweep(tab: "_Stack", targets: list[list[int]]) -> list[list[float | None]]:
    """log2 of a lam in the piece where `_lagrangian` ends, per target of each of the stack's solvers (None: bisect
    that one), without bisecting, every solver's targets in one search a step.

    A token crosses breakpoint j while lam < w / x_j, so the bits spent are a step function of lam with its steps
    at those n x (k - 1) thresholds: sorted once with each one's step of bits (`_thresholds`, kept on the counter
    for the next call on the same profile), the bits spent at every threshold are a suffix sum, and each target's
    smallest feasible threshold lam* is one search in that non-increasing array, every target at once. Every lam
    strictly between lam* and the next threshold assigns alike, and their geometric middle is taken where lam* sits
    well clear of its neighbours (relative 1e-8, far wider than the counter's 1e-9 band of exact arithmetic), holds
    one weight's thresholds only, and lies inside the bisection's range. Otherwise the bisection decides."""
    counter = tab.solvers[0].counter
    J, n, S, M = len(counter.breaks), len(counter.sorted), len(targets), max(map(len, targets))
    if not J or not n or not M:
        return [[None] * len(t) for t in targets]
    need = np.zeros((S, M))
    for s, t in enumerate(targets):
        need[s, :len(t)] = np.asarray(t, dtype=np.float64) - counter.base
    need_t, L = torch.from_numpy(need), tab.cs.shape[-1]
    # smallest k with spent[k] <= need (spent falls as k grows; the last, 0 bits above the narrowest, always is
    # unless need < 0, which is never clear below)
    lo = torch.searchsorted(tab.neg_spent, -need_t, side="left").clamp_(max=L - 1)
    star = tab.cs.gather(1, lo)
    below = torch.searchsorted(tab.cs, star, side="left")
    above = torch.searchsorted(tab.cs, star, side="right")
    prev = tab.cs.gather(1, (below - 1).clamp_(min=0))
    nxt = torch.where(above < L, tab.cs.gather(1, above.clamp(max=L - 1)), 4 * star)
    each = star.unsqueeze(1).expand(-1, J, -1).contiguous()    # (S, J, M): searched in every breakpoint's column
    owners = (torch.searchsorted(tab.cols, each, side="right") > torch.searchsorted(tab.cols, each, side="left")).sum(1)
    tight = 1 + 1e-8
    clear = ((need_t >= 0) & (below > 0) & (prev * tight < star) & (nxt > star * tight) & (owners == 1)
             & (star > 2.0 ** -59) & (nxt < 2.0 ** 59))
    star, nxt, clear = star.tolist(), nxt.tolist(), clear.tolist()
    return [[math.log2(math.sqrt(a * b)) if ok else None for a, b, ok in zip(star[s], nxt[s], clear[s][:len(t)])]
            for s, t in enumerate(targets)]


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
    the ring's widths, then for the demotion plan's budgets, which depend on them; a group of layers asks all
    their profiles at once (`counts_many`)."""

    def __init__(self, weight_profile: torch.Tensor, widths=WIDTHS, tables: torch.Tensor | None = None):
        self.widths = tuple(widths)
        w, self.w_vals, _ = _problem(weight_profile, min(widths), widths)   # the profile to the host once
        self.profile, self.n = w, w.numel()
        self.counter = _BitCounter(w, self.w_vals) if self.n else None
        self._stack: _Stack | None = None   # its own tables as a stack of one (`counts`)
        J = len(self.counter.breaks) if self.n else 0
        if tables is not None and J:   # `device_tables` of this profile, on the host: not made again here
            if tables.numel() != 3 * J * self.n:
                raise ValueError(f"tables of {tables.numel()} values do not fit a profile of {self.n} tokens and "
                                 f"{J} breakpoints (3 x {J * self.n})")
            cols, cs, spent = tables.double().cpu().numpy().reshape(3, J * self.n)
            self.counter._sweep_tables = (cols.reshape(J, self.n), cs, spent)

    def counts(self, budgets: list) -> list[dict[int, int]]:
        if self._stack is None and self.n:
            self._stack = _Stack([self])
        return counts_many([self], [budgets], self._stack)[0]


class _Stack:
    """The sweep tables (`_thresholds`) and sorted weights of solvers of one length and widths, rows of host
    tensors, so that each step of `counts_many` searches every solver's budgets in one call."""

    def __init__(self, solvers: list[ProfileCounts]):
        tabs = [_thresholds(s.counter) for s in solvers]

        def rows(arrays: list) -> torch.Tensor:   # one solver: its own arrays, not copied
            return torch.from_numpy(arrays[0][None] if len(arrays) == 1 else np.stack(arrays))
        self.solvers = solvers
        self.ws = rows([s.counter.sorted for s in solvers])       # (S, n)
        self.cols = rows([t[0] for t in tabs])                     # (S, J, n)
        self.cs = rows([t[1] for t in tabs])                       # (S, J n)
        self.neg_spent = -rows([t[2] for t in tabs])               # (S, J n): ascending, as the searches need


def counts_many(solvers: list[ProfileCounts], budgets: list[list], stack: _Stack | None = None) -> list[list[dict]]:
    """`ProfileCounts.counts` of each solver at its own budgets (`budgets[s]`), solvers of one profile length and
    widths (a group of layers' prompts) answered together: the sweep's and the counts' searches one call each for
    all of them (a layer's solve was ~40 numpy calls, the host's time, whatever the profile's length), each answer
    the one that solver gives alone. `stack`: a `_Stack` of exactly these solvers, made once for several calls."""
    if not solvers:
        return []
    widths, n = solvers[0].widths, solvers[0].n
    if len(budgets) != len(solvers) or any(s.widths != widths or s.n != n for s in solvers):
        raise ValueError(f"counts_many: one list of budgets a solver, solvers of one length and widths; got "
                         f"{len(budgets)} lists for {len(solvers)} solvers")
    for budget in (b for bs in budgets for b in bs):   # each budget checked before any work
        check_budget(budget, widths)
    empty = dict.fromkeys(sorted(widths, reverse=True), 0)
    if not n or not any(budgets):
        return [[dict(empty) for _ in bs] for bs in budgets]
    tab = stack if stack is not None else _Stack(solvers)
    if tab.solvers != solvers:
        raise ValueError("counts_many: the stack is of other solvers")
    vals = solvers[0].w_vals.numpy()
    keys = [int(v) for v in vals.tolist()]
    targets = [[_target(n, b, widths) for b in bs] for bs in budgets]
    lams = _sweep(tab, targets)
    for s, (solver, lam) in enumerate(zip(solvers, lams)):   # the few the sweep cannot tell: bisected
        rest = [t for t, x in zip(targets[s], lam) if x is None]
        if rest:
            bisected = iter(_lagrangian_bisect(solver.counter, rest))
            lams[s] = [next(bisected) if x is None else x for x in lam]
    outs = []
    for solver, targets_s, lams_s, many_s in zip(solvers, targets, lams, _counts_in_step(tab, targets, lams)):
        counter, out_s = solver.counter, []
        for target, feasible, counts in zip(targets_s, lams_s, many_s.tolist()):
            if counts[0] < 0:   # not decided in step: this budget alone
                idx = counter.assign(2.0 ** feasible) if feasible is not None else np.zeros(n, dtype=np.int64)
                counts = np.bincount(idx, minlength=len(vals))
                slack = target - int(counts @ vals)
                if slack > 0:   # the fill runs on the few tokens it can reach (`_fill_candidates`), alike
                    sub = _fill_candidates(idx, len(vals), slack)
                    counts += np.bincount(_fill_sorted(counter.sorted[sub], idx[sub], vals, slack),
                                          minlength=len(vals))
                    counts -= np.bincount(idx[sub], minlength=len(vals))
                counts = counts.tolist()
            out = dict(empty)
            out.update(zip(keys, counts))
            out_s.append(out)
        outs.append(out_s)
    return outs


def _counts_in_step(tab: _Stack, targets: list[list[int]], lams: list[list]) -> list[np.ndarray]:
    """Tokens per width (m, k) at every budget of every solver whose assignment is a clean step function of the
    sorted weights (a lam, no token within the counter's band of a breakpoint), with the greedy fill on each
    width's heaviest `slack` tokens (`_fill_candidates`) run for all of them in step: `_fill_sorted`'s rounds on a
    padded (m, candidates) array, the same float64 arithmetic, so the same counts as the per-budget path (ties
    among equal gains go to equal tokens either way). Rows of -1 are left to that path (no lam, undecided tokens,
    a large slack); a prompt's demotion plan asks for 2 x 17 budgets, and one budget at a time was ~55 us of numpy
    calls each."""
    counter = tab.solvers[0].counter
    n, vals = len(counter.sorted), counter.values
    k = len(vals)
    outs = [np.full((len(t), k), -1, dtype=np.int64) for t in targets]
    rows = [(s, i) for s, lam in enumerate(lams) for i, x in enumerate(lam) if x is not None]
    if not rows or not n or (np.diff(vals) < 1).any():
        return outs
    of = np.asarray([s for s, _ in rows], dtype=np.int64)            # each row's solver
    lam = np.asarray([2.0 ** lams[s][i] for s, i in rows])           # Python's pow, as the per-budget path's
    env = np.asarray(counter.envelope)
    counts = np.zeros((len(rows), k), dtype=np.int64)
    if counter.breaks:
        xs = np.asarray(counter.breaks)[None, :] * lam[:, None]      # (rows, J)
        J, M = xs.shape[1], max(map(len, targets))
        slot = np.asarray([i for _, i in rows], dtype=np.int64)
        bounds = []
        for eps in (1 - counter.EPS, 1 + counter.EPS):   # every row searched in its own solver's weights
            padded = np.zeros((len(targets), M, J))
            padded[of, slot] = xs * eps
            found = torch.searchsorted(tab.ws, torch.from_numpy(padded.reshape(len(targets), M * J)), side="right")
            bounds.append(found.numpy().reshape(len(targets), M, J)[of, slot])
        los, his = bounds
        clean = (his == los).all(1)
        edges = np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), his, np.full((len(rows), 1), n)], 1)
        counts[:, env] = np.diff(edges, axis=1)
    else:
        clean = np.ones(len(rows), dtype=bool)
        counts[:, env[0]] = n
    slack = np.asarray([targets[s][i] for s, i in rows], dtype=np.int64) - (counts @ vals).astype(np.int64)
    fill = clean & (slack > 0)
    if fill.any():
        cap = np.minimum(counts[fill][:, :, None], slack[fill][:, None, None])      # candidates a width
        if int(cap.sum(1).max()) * int(fill.sum()) > 4_000_000:
            return outs
        counts[fill] = _fill_in_step(tab.ws.numpy(), of[fill], counts[fill], slack[fill], vals)
    for (s, i), row, ok in zip(rows, counts, clean.tolist()):
        if ok:
            outs[s][i] = row
    return outs


def _fill_in_step(ws: np.ndarray, of: np.ndarray, counts: np.ndarray, slack: np.ndarray,
                  vals: np.ndarray) -> np.ndarray:
    """`_fill_sorted` on each row's `_fill_candidates` of a step assignment (counts (r, k) along the sorted
    weights ws[of[row]], ws (S, n) a stack's), all rows at once; returns the counts after the fill."""
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
    w = ws[of[:, None], np.where(valid, pos, 0)]
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
