"""Solves written as generators, run in lock step: a solve (an append layer's first allocation: the flush mix, the
ring's widths, the demotion plan, one after another, each needing the one before) yields an `Ask` for counts and
is sent the answer, so that a group of layers' solves (smartkv/methods/smartkv/first.py) has each round's asks
answered together by `counts.counts_many`: the host calls of one layer's solve, whatever the group's size."""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from smartkv.core.counts import ProfileCounts, _Stack, counts_many


@dataclass
class Ask:
    """What a solve written as a generator (`solve_asks`) yields: `ProfileCounts.counts(budgets)` of `solver`, sent
    back into it."""
    solver: ProfileCounts
    budgets: list


def solve_asks(solves: list[Generator], together: bool = True) -> list:
    """Run solves written as generators that yield `Ask`s (each a layer's first allocation: the flush mix, the ring's
    widths, the demotion plan, one after another) in lock step: each round, every running solve's ask is answered,
    the asks of one profile length and widths by one `counts_many` (a group of layers' solves then costs about one
    layer's calls; `together=False`: each ask on its own, the A/B baseline); returns each solve's return value. A
    solve's answers are those its asks get alone."""
    results: list = [None] * len(solves)
    asks: dict[int, Ask] = {}
    stacks: dict[tuple, _Stack] = {}   # solvers asked again together (the prompt's, for the ring, then the plan)

    def step(i: int, answer) -> None:
        try:
            asks[i] = solves[i].send(answer)
        except StopIteration as done:
            results[i] = done.value
    for i in range(len(solves)):
        step(i, None)
    while asks:
        alike: dict = {}
        for i, ask in asks.items():
            alike.setdefault((ask.solver.n, ask.solver.widths) if together else i, []).append(i)
        now, asks = asks, {}
        for rows in alike.values():
            solvers = [now[i].solver for i in rows]
            if len(solvers) == 1:   # its own stack, kept on it
                answers = [solvers[0].counts(now[rows[0]].budgets)]
            else:
                key = tuple(map(id, solvers))
                if key not in stacks:
                    stacks[key] = _Stack(solvers) if solvers[0].n else None
                answers = counts_many(solvers, [now[i].budgets for i in rows], stacks[key])
            for i, answer in zip(rows, answers):
                step(i, answer)
    return results


def solve_one(solve: Generator):
    """`solve_asks` of one solve: its return value."""
    return solve_asks([solve])[0]
