"""Which job a worker runs next: jobs grouped by model (each worker loads a model once) and by prompt set (each
worker computes a set's fp16 references once), longest first."""
from __future__ import annotations

from collections import deque

from smartkv.bench.redact import redact
from smartkv.bench.spec.grid import canonical_json, job_cost, method_label


def model_key(job: dict) -> str:
    return canonical_json(job["model"])


def unit_key(job: dict) -> tuple[str, str]:
    """(model, prompt set). A worker memoises the fp16 reference of each prompt on its model (run/generation.py),
    so the jobs of one prompt set run cheapest on one worker: on several, each recomputes the references."""
    return model_key(job), canonical_json(job["prompt_set"])


def job_label(job: dict) -> str:
    """A job in a few words, for people (progress, dry run); credentials masked."""
    return redact(f"{job['model']['name']} {method_label(job['method'])} {job['prompt_set']['name']} "
                  f"r{job['repeat']}")


class Scheduler:
    """Jobs grouped by model, longest first; a slot keeps its model until that model has no jobs left, and its
    prompt set while that set has jobs; a slot looking for work prefers a model and a set no other slot is on.
    Each pick costs O(prompt sets of a model), not O(jobs): grids of many thousands of jobs schedule instantly."""

    def __init__(self, jobs: list[dict]):
        self.groups: dict[str, dict[tuple, deque]] = {}    # model -> (model, prompt set) -> jobs, longest first
        self.cost: dict[str, float] = {}                    # model -> summed cost of its queued jobs
        for job in sorted(jobs, key=job_cost, reverse=True):
            self._queue(job).append(job)

    def _queue(self, job: dict) -> deque:
        model = model_key(job)
        self.cost[model] = self.cost.get(model, 0.0) + job_cost(job)
        return self.groups.setdefault(model, {}).setdefault(unit_key(job), deque())

    def __len__(self) -> int:
        return sum(len(q) for units in self.groups.values() for q in units.values())

    def next_for(self, current: str | None, busy_models: set[str], unit: tuple | None = None,
                 busy_units: set[tuple] = frozenset()) -> dict | None:
        if current in self.groups and any(self.groups[current].values()):
            return self._take(current, unit, busy_units)
        left = [k for k, units in self.groups.items() if any(units.values())]
        if not left:
            return None
        # Prefer a model no other slot is loading: fewer loads overall.
        fresh = [k for k in left if k not in busy_models] or left
        return self._take(max(fresh, key=lambda k: self.cost[k]), None, busy_units)

    def _take(self, model: str, unit: tuple | None, busy_units: set[tuple]) -> dict:
        """The longest job of the slot's own prompt set, else of a set no other slot is on, else the longest."""
        units = self.groups[model]
        queue = units.get(unit) if unit is not None else None
        if not queue:
            queues = [q for u, q in units.items() if q]
            queue = max([q for u, q in units.items() if q and u not in busy_units] or queues,
                        key=lambda q: job_cost(q[0]))
        job = queue.popleft()
        self.cost[model] -= job_cost(job)
        return job

    def requeue(self, job: dict) -> None:
        self._queue(job).appendleft(job)
