"""`submit` as a library call: load the grid, find what is already done, run the rest, write each result.

Order of events, so that nothing runs when something is wrong: grid validated (GridError) -> output directory
created, probed for writing and free space (StoreError) -> directory lock taken (StoreError if another submit
holds it) -> stale temp files removed -> pending jobs computed under the lock -> jobs run -> each result written
atomically the moment it arrives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from smartkv.bench.spec.catalog import Catalog
from smartkv.bench.run.executor import ExecConfig, ExecError, RunStats, execute
from smartkv.bench.spec.grid import Grid, load_grid
from smartkv.bench.progress import Progress
from smartkv.bench.run.runner import import_ref, resolve_worker_ref
from smartkv.bench.results.store import ResultFile, ResultStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("results")


@dataclass
class Plan:
    grid: Grid
    store: ResultStore
    done: dict[str, ResultFile]
    pending: list[dict]
    corrupt: list[ResultFile] = field(default_factory=list)


def results_root(grid: Grid, out: str | Path | None) -> Path:
    return Path(out) if out else DEFAULT_RESULTS / grid.name


def make_plan(grid_path: str | Path, out: str | Path | None = None, force: bool = False,
              retry_failed: bool = False, catalog: Catalog | None = None) -> Plan:
    grid = load_grid(grid_path, catalog)
    store = ResultStore(results_root(grid, out))
    return _plan_for(grid, store, force, retry_failed)


def _plan_for(grid: Grid, store: ResultStore, force: bool, retry_failed: bool) -> Plan:
    files = store.scan()
    corrupt = [f for f in files if f.is_corrupt]
    done = {f.job_id: f for f in files if not f.is_corrupt and (not retry_failed or f.status == "ok")}
    pending = list(grid.jobs) if force else [j for j in grid.jobs if j["job_id"] not in done]
    return Plan(grid, store, {j["job_id"]: done[j["job_id"]] for j in grid.jobs if j["job_id"] in done},
                pending, corrupt)


@dataclass
class SubmitResult:
    plan: Plan
    stats: RunStats
    written: list[Path] = field(default_factory=list)


def submit(plan: Plan, config: ExecConfig, force: bool = False, retry_failed: bool = False,
           progress: Progress | None = None, on_tick=None) -> SubmitResult:
    """Run the plan's pending jobs; raises StoreError/ExecError before any job starts if that cannot work."""
    store = plan.store
    check_ready(plan, config)
    with store.lock():
        removed = store.remove_stale_temp_files()
        if removed:
            log.info("removed %d temp files left by an interrupted run", removed)
        plan = _plan_for(plan.grid, store, force, retry_failed)  # another submit may have finished meanwhile
        written: list[Path] = []

        def on_result(job: dict, result: dict) -> None:
            try:
                written.append(store.write_job(job, result["rows"]))
            except OSError as exc:
                raise StoreError(f"cannot write results to {store.root}: {exc.strerror or exc}; "
                                 f"{len(written)} jobs were saved, submit again to resume") from None

        stats = execute(plan.pending, config, on_result, progress or Progress(), on_tick)
    return SubmitResult(plan, stats, written)


def check_ready(plan: Plan, config: ExecConfig) -> None:
    """Output directory usable (StoreError) and worker importable (ExecError); cheap, runs nothing."""
    plan.store.preflight()
    if plan.pending:
        _check_worker(config)


def _check_worker(config: ExecConfig) -> None:
    ref = resolve_worker_ref(config.worker_ref)
    try:
        import_ref(ref)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ExecError(f"cannot import the worker {ref!r}: {exc}") from None
