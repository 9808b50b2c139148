"""What a run did: counts by status, retries, model loads and where the time went (RunStats), and the two steps
every finished job takes in the driver: handed to the caller to be written (`deliver`), then counted (`record`)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from smartkv.bench.progress import Progress
from smartkv.bench.results.store import job_status
from smartkv.bench.spec.grid import job_cost

OnResult = Callable[[dict, dict], None]          # (job, result) -> None; result["rows"] are the job's rows
OnTick = Callable[[Progress], None]


@dataclass
class RunStats:
    finished: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    retried: int = 0
    restarts: int = 0
    model_loads: int = 0
    model_load_s: float = 0.0           # summed over loads (each actor loads each of its models once)
    actor_start_s: float = 0.0          # from creating the actors to all of them answering
    interrupted: bool = False
    lost_in_flight: int = 0
    # Where the run's time went (the scaling benchmark reads these; the CLI prints a summary line).
    workers: int = 0
    run_s: float = 0.0                  # from the first job handed out to the last result written
    job_s: float = 0.0                  # summed wall time of the jobs inside the workers (model loads included)
    write_s: float = 0.0                # driver time spent writing results
    busy_s: dict[str, float] = field(default_factory=dict)     # per worker: summed job wall time
    last_done_s: dict[str, float] = field(default_factory=dict)  # per worker: when its last result arrived

    def _job_done(self, slot: str, job_s: float, at_s: float) -> None:
        self.job_s += job_s
        self.busy_s[slot] = self.busy_s.get(slot, 0.0) + job_s
        self.last_done_s[slot] = at_s

    @property
    def busy_fraction(self) -> float | None:
        """Share of the workers' time spent inside jobs."""
        return self.job_s / (self.workers * self.run_s) if self.workers and self.run_s > 0 else None

    @property
    def tail_fraction(self) -> float | None:
        """Share of the workers' time spent idle after their last job while others still ran (imbalance)."""
        if not self.workers or self.run_s <= 0:
            return None
        idle = sum(self.run_s - self.last_done_s.get(name, 0.0) for name in self.busy_s)
        return idle / (self.workers * self.run_s)


def deliver(stats: RunStats, on_result: OnResult, job: dict, result: dict) -> None:
    """Hand a result to the caller (who writes it), timing the write."""
    start = time.perf_counter()
    on_result(job, result)
    stats.write_s += time.perf_counter() - start


def record(stats: RunStats, progress: Progress, slot: str | None, job: dict, result: dict,
           run_start: float | None = None) -> None:
    status = job_status(result["rows"])
    if slot is not None and run_start is not None:
        stats._job_done(slot, float(result.get("wall_s") or 0.0), time.perf_counter() - run_start)
    stats.finished += 1
    stats.statuses[status] = stats.statuses.get(status, 0) + 1
    if result.get("model_loaded"):
        stats.model_loads += 1
        stats.model_load_s += result.get("model_load_s") or 0.0
        if slot is not None:
            progress.slot(slot).model_loads += 1
    progress.finished(slot, status, job_cost(job))
