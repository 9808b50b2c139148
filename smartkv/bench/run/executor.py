"""Run jobs on Ray actors (one per GPU, or per `cpus_per_worker` CPUs) or in-process, longest first.

`execute` is the entry point. In-process (`local`) it runs one job at a time here (run_local); otherwise
ray_executor.RayExecutor spreads the jobs over actors. Either way each finished job goes to `on_result` at once
(the caller writes it; only the driver writes) and is counted in RunStats (stats.py); scheduler.py picks the order.
"""
from __future__ import annotations

import time

from smartkv.bench.progress import Progress
from smartkv.bench.run.config import ExecConfig, ExecError
from smartkv.bench.run.ray_executor import LOOPBACK_ENV, PASS_ENV_PREFIX, RayExecutor, connect, plan_workers
from smartkv.bench.run.runner import JobRunner, resolve_worker_ref
from smartkv.bench.run.scheduler import Scheduler, job_label, model_key, unit_key
from smartkv.bench.run.stats import OnResult, OnTick, RunStats, deliver, record
from smartkv.bench.spec.grid import job_cost

__all__ = ["LOOPBACK_ENV", "PASS_ENV_PREFIX", "ExecConfig", "ExecError", "RunStats", "Scheduler", "connect",
           "execute", "job_label", "model_key", "plan_workers", "run_local", "unit_key"]


def run_local(jobs: list[dict], config: ExecConfig, on_result: OnResult, progress: Progress,
              on_tick: OnTick | None = None) -> RunStats:
    """Everything in this process, one job at a time (debugging; a worker crash ends the run)."""
    stats = RunStats()
    runner = JobRunner(resolve_worker_ref(config.worker_ref), name="local")
    scheduler = Scheduler(jobs)
    progress.start(len(jobs), sum(job_cost(j) for j in jobs))
    slot = progress.slot("local").name
    current = None
    stats.workers, start = 1, time.perf_counter()
    try:
        unit = None
        while (job := scheduler.next_for(current, set(), unit)) is not None:
            current, unit = model_key(job), unit_key(job)
            progress.slot(slot).current = job_label(job)
            if on_tick:
                on_tick(progress)
            result = runner.run(job)
            deliver(stats, on_result, job, result)
            record(stats, progress, slot, job, result, start)
            progress.slot(slot).current = None
    except KeyboardInterrupt:
        stats.interrupted, stats.lost_in_flight = True, 1
    stats.run_s = time.perf_counter() - start
    if on_tick:
        on_tick(progress)
    return stats


def execute(jobs: list[dict], config: ExecConfig, on_result: OnResult, progress: Progress | None = None,
            on_tick: OnTick | None = None) -> RunStats:
    """Run `jobs` (in-process with config.local, else on Ray) and hand each finished job to `on_result`."""
    progress = progress or Progress()
    if not jobs:
        return RunStats()
    if config.local:
        return run_local(jobs, config, on_result, progress, on_tick)
    return RayExecutor(config, progress, on_result, on_tick).run(jobs)
