"""Bit allocation (smartkv.core.policy): budgets met, monotone, flat -> uniform, caps respected, equal counts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smartkv.core.classes import joint_assign, joint_candidates, joint_counts, joint_plan, staircase
from smartkv.core.policy import (WIDTHS, block_weights, cascade_assign, check_budget, counts_for, counts_for_budgets,
                                 incremental_assign, kv_budgets, pack_levels, rank_profile, solve_widths, unpack_levels)

weights_st = st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=200)
budget_st = st.floats(2, 8, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(weights_st, budget_st)
def test_budget_met_within_one_bit_in_total(ws, budget):
    bits = solve_widths(torch.tensor(ws), budget)
    n = len(ws)
    assert int(bits.sum()) <= math.floor(budget * n + 1e-9)
    # nothing left on the table: no single upgrade fits in the slack (at most one bit per... the step sizes)
    assert int(bits.sum()) >= math.floor(budget * n + 1e-9) - 4 or bool((bits == 8).all())


@settings(max_examples=60, deadline=None)
@given(weights_st, budget_st)
def test_more_important_never_fewer_bits(ws, budget):
    w = torch.tensor(ws)
    bits = solve_widths(w, budget)
    heavier = w.unsqueeze(1) > w.unsqueeze(0)             # (i, j): token i strictly more important than j
    assert not bool((heavier & (bits.unsqueeze(1) < bits.unsqueeze(0))).any())


@pytest.mark.parametrize("budget", [2, 3, 4, 8])
def test_flat_weights_give_uniform_widths(budget):
    bits = solve_widths(torch.ones(64), budget)
    assert bool((bits == budget).all())


def test_flat_weights_between_widths_mix_the_two_neighbours():
    bits = solve_widths(torch.ones(100), 3.5)
    assert set(bits.tolist()) == {3, 4} and int(bits.sum()) == 350


def test_concentrated_weights_get_the_wide_codes():
    w = torch.ones(100)
    w[:5] = 1e6
    bits = solve_widths(w, 4)
    assert bool((bits[:5] == 8).all()) and int(bits.sum()) <= 400


tied_st = st.lists(st.sampled_from([0.0, 1e-300, 1.0, 3.0, 21.333333333333332, 85.33333333333333, 1028.0157]),
                   min_size=1, max_size=200)  # many ties, some on the envelope's breakpoints


@settings(max_examples=150, deadline=None)
@given(st.one_of(weights_st, tied_st), budget_st, st.sampled_from([WIDTHS, (2, 4, 8), (3, 4)]))
def test_counts_for_is_the_histogram_of_solve_widths(ws, budget, widths):
    """counts_for runs the solve on sorted weights in numpy (SmartKV's re-allocations call it twice per layer);
    its counts are exactly those of the per-token solve."""
    budget = min(max(budget, min(widths)), max(widths))
    w = torch.tensor(ws, dtype=torch.float64)
    bits = solve_widths(w, budget, widths)
    assert counts_for(w, budget, widths) == {b: int((bits == b).sum()) for b in sorted(widths, reverse=True)}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 60), budget_st, st.integers(0, 2**31 - 1))
def test_cascade_respects_caps_and_gives_equal_counts(rows, n, budget, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, n, generator=g)
    counts = counts_for(rank_profile(w), budget)
    caps = torch.full((rows, n), 8)
    out = cascade_assign(w, caps, counts)
    hist = [[int((out[r] == b).sum()) for b in WIDTHS] for r in range(rows)]
    assert all(h == hist[0] for h in hist)
    assert int(out[0].sum()) <= math.floor(budget * n + 1e-9)
    # caps: demote-only rows never exceed their cap
    caps2 = torch.tensor(WIDTHS)[torch.randint(0, 4, (1, n), generator=g)].expand(rows, n)
    out2 = cascade_assign(w, caps2, counts)
    assert bool((out2 <= caps2).all())


def test_cascade_puts_heavier_tokens_first():
    w = torch.tensor([[0.1, 0.9, 0.5, 0.2]])
    out = cascade_assign(w, torch.full((1, 4), 8), {8: 1, 4: 1, 2: 2})
    assert out.tolist() == [[2, 8, 4, 2]]


def test_kv_budgets_keep_the_mean_and_the_range():
    assert kv_budgets(4, 2) == (5, 3)
    k, v = kv_budgets(2.5, 2)
    assert (k + v) / 2 == 2.5 and v >= 2
    k, v = kv_budgets(7.5, 4)
    assert k <= 8 and (k + v) / 2 == 7.5


@pytest.mark.parametrize("n", [0, 1, 7, 8, 33])
def test_levels_pack_to_two_bits(n):
    idx = torch.randint(0, 4, (2, 3, n), dtype=torch.uint8)
    packed = pack_levels(idx)
    assert packed.shape[-1] == math.ceil(n / 8) * 2
    assert torch.equal(unpack_levels(packed, n), idx)


@pytest.mark.parametrize("bad", [1.5, 9, float("nan"), "4", True])
def test_bad_budget_is_named(bad):
    with pytest.raises(ValueError, match="budget"):
        check_budget(bad)


@pytest.mark.parametrize("widths", [(2, 3, 4, 8), (2, 4, 8), (3, 4)])
def test_bit_counter_equals_choosing_every_token(widths):
    """The bisection's fast count of bits equals `_choose` on every token, also for lam right at a breakpoint
    (flat weights: every token ties there; the narrower width must win as argmin's first index does)."""
    from smartkv.core.solve import _BitCounter, _choose

    g = torch.Generator().manual_seed(len(widths))
    w_vals = torch.tensor(widths, dtype=torch.float64)
    for w in (torch.rand(5000, generator=g, dtype=torch.float64) ** 4,
              torch.full((300,), 0.37, dtype=torch.float64),
              torch.randint(0, 3, (999,), generator=g).double()):
        counter = _BitCounter(w, w_vals)
        lams = [2.0 ** e for e in torch.linspace(-40, 10, 97).tolist()]
        lams += [float(x) / brk for x in w[:5] for brk in counter.breaks if x > 0]  # exactly at breakpoints
        for lam in lams:
            assert counter.total(lam) == float(w_vals[_choose(w, lam, w_vals)].sum()), lam


def test_block_weights_sum_each_block():
    w = torch.arange(12.0).reshape(2, 6)
    assert block_weights(w, 3).tolist() == [[3.0, 12.0], [21.0, 30.0]]
    assert block_weights(w, 1) is w


def _stored_allocation(rows, nq, budget, g):
    """A stored allocation as a full re-allocation leaves it: equal histograms per row, within the budget."""
    w = torch.rand(rows, nq, generator=g).pow(4)
    old = cascade_assign(w, torch.full((rows, nq), 8), counts_for(rank_profile(w), budget))
    return old, {b: int((old[0] == b).sum()) for b in WIDTHS}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 80), st.integers(1, 12), budget_st, st.integers(1, 4),
       st.integers(0, 2**31 - 1))
def test_incremental_keeps_the_budget_the_caps_and_equal_counts(rows, nq, n_new, budget, per_width, seed):
    """Units added over many incremental steps: the total never passes floor(budget * n), stored units are never
    promoted, only the new units and at most `per_width` stored units per width change, every row has the same
    histogram, and the budget is spent to within what one step can leave (a few units' widths)."""
    g = torch.Generator().manual_seed(seed)
    old, stored = _stored_allocation(rows, nq, budget, g)
    for _ in range(3):
        n = old.shape[1] + n_new
        w = torch.rand(rows, n, generator=g).pow(4)
        out = incremental_assign(w, old, stored, budget, WIDTHS, per_width)
        assert out.shape == (rows, n)
        hist = [[int((out[r] == b).sum()) for b in WIDTHS] for r in range(rows)]
        assert all(h == hist[0] for h in hist)
        assert int(out[0].sum()) <= math.floor(budget * n + 1e-9)
        assert bool((out[:, :old.shape[1]] <= old).all())
        changed = (out[:, :old.shape[1]] != old).sum(-1)
        assert int(changed.max()) <= per_width * (len(WIDTHS) - 1)
        old, stored = out, dict(zip(WIDTHS, hist[0]))


def test_incremental_demotes_the_lightest_stored_unit_for_a_heavy_new_one():
    old = torch.tensor([[8, 2, 8, 2]])          # 20 bits of floor(5 * 4) = 20: the budget is spent
    w = torch.tensor([[5.0, 1.0, 0.5, 1.0, 9.0]])
    out = incremental_assign(w, old, {8: 2, 2: 2}, 5.0, (2, 8), per_width=1)
    assert out.tolist() == [[8, 2, 2, 2, 8]]    # the new heavy unit takes the 8 of the lighter stored one


def test_staircase_merges_both_kinds_along_one_ranking():
    assert staircase({8: 3, 4: 5, 2: 2}, {4: 2, 3: 3, 2: 5}) == [(8, 4, 2), (8, 3, 1), (4, 3, 2), (4, 2, 3), (2, 2, 2)]
    assert staircase({4: 3}, {4: 0, 2: 3}) == [(4, 2, 3)]
    with pytest.raises(ValueError, match="different numbers"):
        staircase({8: 1}, {4: 2})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(8, 80), st.integers(1, 12), st.floats(2.5, 6, allow_nan=False),
       st.floats(0, 3, allow_nan=False), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_joint_keeps_both_budgets_the_caps_and_equal_class_counts(rows, n0, n_new, budget, gap, per_width, seed):
    """A first allocation, then incremental steps placing keys and values together: every row holds the same
    number of units of each (key width, value width) class (what `joint_counts` says), neither kind passes
    floor(its budget * n), stored units are never promoted in either kind, and only the candidates change."""
    g = torch.Generator().manual_seed(seed)
    budgets = kv_budgets(budget, gap)
    old_k = old_v = torch.zeros(rows, 0, dtype=torch.long)
    stored, n = {}, n0
    for _ in range(4):
        w = torch.rand(rows, n, generator=g).pow(4)
        cand = joint_candidates(w, old_k, old_v, stored, budgets, WIDTHS, per_width)
        classes = staircase(*(counts_for(rank_profile(cand.weights), b) for b in cand.budgets))
        plan = joint_plan(classes, cand.capped(classes))
        bits_k, bits_v = joint_assign(cand.weights, cand.caps_k, cand.caps_v, plan, (2, 2))
        nq = old_k.shape[1]
        out_k = torch.cat([old_k, old_k.new_full((rows, n - nq), 8)], -1).scatter_(1, cand.idx, bits_k)
        out_v = torch.cat([old_v, old_v.new_full((rows, n - nq), 8)], -1).scatter_(1, cand.idx, bits_v)
        hist = [{c: int(((out_k[r] == c[0]) & (out_v[r] == c[1])).sum()) for c in
                 {(int(a), int(b)) for a, b in zip(out_k[0], out_v[0])}} for r in range(rows)]
        assert all(h == hist[0] for h in hist)
        expect = {c: m - cand.sources.get(c, 0) for c, m in stored.items()}
        for c, m in joint_counts(plan, cand.idx.shape[1], (2, 2)).items():
            expect[c] = expect.get(c, 0) + m
        assert {c: m for c, m in expect.items() if m} == hist[0]
        for out, b in ((out_k, budgets[0]), (out_v, budgets[1])):
            assert int(out[0].sum()) <= math.floor(b * n + 1e-9)
        assert bool((out_k[:, :nq] <= old_k).all()) and bool((out_v[:, :nq] <= old_v).all())
        changed = ((out_k[:, :nq] != old_k) | (out_v[:, :nq] != old_v)).sum(-1)
        assert int(changed.max()) <= per_width * len(stored)
        old_k, old_v, stored, n = out_k, out_v, hist[0], n + n_new


def test_joint_demotes_the_lightest_stored_unit_of_a_class_for_a_heavy_new_one():
    # 5 units: keys may hold 25 bits, values 15; the new heavy unit takes the (8, 4) class from the lighter stored
    # one, which drops to what the budgets leave it (keys 25 - 20 = 5 -> 4, values 15 - 12 = 3 -> 2)
    old_k, old_v = torch.tensor([[8, 2, 8, 2]]), torch.tensor([[4, 2, 4, 2]])
    w = torch.tensor([[5.0, 1.0, 0.5, 1.0, 9.0]])
    cand = joint_candidates(w, old_k, old_v, {(8, 4): 2, (2, 2): 2}, (5.0, 3.0), (2, 4, 8), per_width=1)
    classes = staircase(*(counts_for(rank_profile(cand.weights), b, (2, 4, 8)) for b in cand.budgets))
    bits_k, bits_v = joint_assign(cand.weights, cand.caps_k, cand.caps_v, joint_plan(classes, cand.capped(classes)),
                                  (2, 2))
    out_k = torch.cat([old_k, torch.tensor([[8]])], -1).scatter_(1, cand.idx, bits_k)
    out_v = torch.cat([old_v, torch.tensor([[8]])], -1).scatter_(1, cand.idx, bits_v)
    assert out_k.tolist() == [[8, 2, 4, 2, 8]] and out_v.tolist() == [[4, 2, 2, 2, 4]]


def test_counts_for_budgets_shares_one_sort_and_answers_as_each_budget_alone():
    """The budgets' bisections run in step (one count of every budget's lam a step): each answers as the per-token
    solve does at that budget alone, on a smooth profile and on one of many ties."""
    g = torch.Generator().manual_seed(3)
    smooth = torch.sort(torch.rand(3000, generator=g) ** 3, descending=True).values
    for profile in (smooth, torch.round(smooth * 8) / 8):
        budgets = [2.0, 2.37, 3.0, 4.25, 5.5, 8.0, 3.1]
        many = counts_for_budgets(profile, budgets)
        for b, counts in zip(budgets, many):
            bits = solve_widths(profile, b)
            assert counts == {w: int((bits == w).sum()) for w in sorted(WIDTHS, reverse=True)}
    assert counts_for_budgets(profile[:0], [3.0]) == [counts_for(profile[:0], 3.0)]


def test_a_profile_asked_again_answers_as_a_fresh_solve_from_one_table():
    """`ProfileCounts` (an append layer's first allocation asks one profile for the ring's widths, then for the
    plan's budgets) answers each call as `counts_for_budgets` on the tensor does, its thresholds tabled once; its
    widths are its own."""
    from smartkv.core.counts import ProfileCounts

    g = torch.Generator().manual_seed(6)
    smooth = torch.sort(torch.rand(3000, generator=g) ** 3, descending=True).values
    for profile in (smooth, torch.round(smooth * 8) / 8):
        solver = ProfileCounts(profile)
        first = counts_for_budgets(solver, [2.3, 4.25, 6.0])
        tables = solver.counter._sweep_tables
        again = counts_for_budgets(solver, [3.1, 4.25, 7.5, 2.0])
        assert solver.counter._sweep_tables is tables
        assert first == counts_for_budgets(profile, [2.3, 4.25, 6.0])
        assert again == counts_for_budgets(profile, [3.1, 4.25, 7.5, 2.0])
    with pytest.raises(ValueError, match="widths"):
        counts_for_budgets(ProfileCounts(smooth), [3.0], (2, 4, 8))
    with pytest.raises(ValueError, match="budget"):
        counts_for_budgets(ProfileCounts(smooth), [9.0])


def test_tables_made_on_the_device_are_the_hosts_and_answer_alike():
    """`device_tables` (an append layer's first allocation makes its profile's solve tables where the profile is,
    rows of several layers at once) equal the host's `_thresholds` value for value, ties included, on every row
    of a stack, and a `ProfileCounts` given them answers as one that made its own; tables of another size are
    refused."""
    from smartkv.core.counts import ProfileCounts, _thresholds, device_tables
    from smartkv.core.policy import rank_profile

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    for n, power, widths in [(3000, 3, WIDTHS), (517, 8, (2, 4)), (64, 1, (2, 3, 4, 8)), (1, 2, WIDTHS)]:
        rows = [rank_profile(torch.rand(3, n, generator=g, dtype=torch.float64) ** power) for _ in range(3)]
        rows[1] = torch.round(rows[1] * 16) / 16   # ties among the thresholds
        stacked = device_tables(torch.stack(rows).to(dev), widths).cpu()
        for profile, tables in zip(rows, stacked):
            own = ProfileCounts(profile, widths)
            given = ProfileCounts(profile, widths, tables=tables)
            for x, y in zip(_thresholds(own.counter), given.counter._sweep_tables, strict=True):
                assert x.shape == y.shape and (x == y).all()
            budgets = [min(widths) + 0.31 * i for i in range(20) if min(widths) + 0.31 * i <= max(widths)]
            assert given.counts(budgets) == own.counts(budgets)
    with pytest.raises(ValueError, match="do not fit a profile of 3000 tokens"):
        ProfileCounts(torch.rand(3000, dtype=torch.float64), WIDTHS, tables=torch.zeros(5, dtype=torch.float64))


def test_bit_counts_at_many_lambdas_equal_one_at_a_time():
    """`_BitCounter.totals` (the vectorised count the bisections use) equals `total` exactly, also at lam where
    tokens sit on a breakpoint (ties: the exact recount)."""
    from smartkv.core.solve import _BitCounter, _problem

    g = torch.Generator().manual_seed(4)
    for profile in (torch.rand(2000, generator=g) ** 4, torch.round(torch.rand(500, generator=g) * 4) / 4):
        w, w_vals, _ = _problem(profile, 4.0, WIDTHS)
        counter = _BitCounter(w, w_vals)
        lams = [2.0 ** float(x) for x in torch.linspace(-30, 30, 301)]
        lams += [float(x) / b for x in counter.sorted[::50] for b in counter.breaks]   # on breakpoints
        assert counter.totals(lams).tolist() == [counter.total(lam) for lam in lams]


def test_the_sweep_reads_lam_where_the_bisection_ends():
    """`_sweep` (each target's lam read off the sorted thresholds) answers for a smooth profile's budgets, and its
    lam assigns every token as the bisection's does; where it cannot tell (ties across weights on the threshold)
    it leaves the target to the bisection."""
    from smartkv.core.counts import ProfileCounts, _lagrangian_bisect, _Stack, _sweep

    g = torch.Generator().manual_seed(5)
    for profile in (torch.rand(4000, generator=g) ** 3, torch.ones(300), torch.round(torch.rand(900, generator=g) * 8)):
        solver = ProfileCounts(profile)
        counter = solver.counter
        targets = [int(b * solver.n) for b in (2.1, 2.5, 3.0, 3.7, 4.25, 5.0, 7.9)]
        swept, bisected = _sweep(_Stack([solver]), [targets])[0], _lagrangian_bisect(counter, targets)
        if profile.numel() == 4000:
            assert None not in swept
        for s, b in zip(swept, bisected):
            if s is not None:
                assert counter.assign(2.0 ** s).tolist() == counter.assign(2.0 ** b).tolist()


def test_many_profiles_asked_at_once_answer_as_each_alone():
    """`counts_many` (a group of layers' first allocations asks their profiles together) answers each profile's
    budgets as that profile asked alone does, and as the per-token solve, on profiles of one length that differ
    (smooth, many ties, flat), each asking its own number of budgets; `solve_asks` runs solves written as
    generators in lock step with the same answers; solvers of other lengths, a stack of other solvers and a bad
    budget are refused before any work."""
    from smartkv.core.counts import ProfileCounts, _Stack, counts_many
    from smartkv.core.solves import Ask, solve_asks

    g = torch.Generator().manual_seed(8)
    smooth = torch.sort(torch.rand(1200, generator=g) ** 5, descending=True).values
    profiles = [smooth, torch.round(smooth * 6) / 6, torch.ones(1200), torch.linspace(1, 0, 1200) ** 2]
    budgets = [[2.0, 2.37, 4.25, 8.0], [3.1], [], [2.5, 2.5, 6.75, 3.0, 4.0]]
    solvers = [ProfileCounts(p) for p in profiles]
    many = counts_many(solvers, budgets)
    for profile, bs, got in zip(profiles, budgets, many):
        assert got == ProfileCounts(profile).counts(bs)
        for b, counts in zip(bs, got):
            bits = solve_widths(profile, b)
            assert counts == {w: int((bits == w).sum()) for w in sorted(WIDTHS, reverse=True)}
    assert many[0] != counts_many(solvers[1:2], [budgets[0]])[0]   # the profiles differ: a mix-up would show

    def solve(solver, first, second):
        a = yield Ask(solver, first)
        b = yield Ask(solver, second)
        return a + b
    got = solve_asks([solve(s, bs, bs[::-1]) for s, bs in zip(solvers, budgets)])
    assert got == [c + c[::-1] for c in many]
    with pytest.raises(ValueError, match="one length"):
        counts_many([solvers[0], ProfileCounts(smooth[:100])], [[3.0], [3.0]])
    with pytest.raises(ValueError, match="other solvers"):
        counts_many(solvers[:2], budgets[:2], _Stack(solvers[1:3]))
    with pytest.raises(ValueError, match="budget"):
        counts_many(solvers[:2], [[3.0], [8.5]])
