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

from smartkv.bench import provenance
from smartkv.bench.spec.catalog import Catalog
from smartkv.bench.run.executor import ExecConfig, ExecError, RunStats, execute
from smartkv.bench.spec.grid import Grid, load_grid
from smartkv.bench.progress import Progress
from smartkv.bench.run.runner import DEFAULT_WORKER, import_ref, resolve_worker_ref
from smartkv.bench.spec.checks import check_jobs
from smartkv.bench.results.store import ResultFile, ResultStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("results")


@dataclass
class Plan:
    grid: Grid
    store: ResultStore
    done: dict[str, ResultFile]
    pending: list[dict]
    corrupt: list[ResultFile] = field(default_factory=list)  # files that are not usable results (check.py)
    stale: dict[str, list[str]] = field(default_factory=dict)  # job_id -> how its stored result's code differs
    checked: bool = False                                       # check_ready passed (it runs once per plan)


def results_root(grid: Grid, out: str | Path | None) -> Path:
    return Path(out) if out else DEFAULT_RESULTS / grid.name


def make_plan(grid_path: str | Path, out: str | Path | None = None, force: bool = False,
              retry_failed: bool = False, catalog: Catalog | None = None, rerun_stale: bool = False) -> Plan:
    grid = load_grid(grid_path, catalog)
    store = ResultStore(results_root(grid, out))
    return _plan_for(grid, store, force, retry_failed, rerun_stale)


def _plan_for(grid: Grid, store: ResultStore, force: bool, retry_failed: bool, rerun_stale: bool = False) -> Plan:
    files = store.scan()
    corrupt = [f for f in files if f.is_corrupt]
    usable = {f.job_id: f for f in files if not f.is_corrupt}
    now = provenance.current()
    stale = {j["job_id"]: diff for j in grid.jobs if j["job_id"] in usable
             and (diff := provenance.differences(usable[j["job_id"]].summary, now))}
    done = {job_id: f for job_id, f in usable.items() if (not retry_failed or f.status == "ok")
            and not (rerun_stale and job_id in stale)}
    pending = list(grid.jobs) if force else [j for j in grid.jobs if j["job_id"] not in done]
    return Plan(grid, store, {j["job_id"]: done[j["job_id"]] for j in grid.jobs if j["job_id"] in done},
                pending, corrupt, stale)


def stale_line(plan: Plan) -> str | None:
    """One line when stored results of the plan's grid came from other code or libraries than this process's."""
    if not plan.stale:
        return None
    kinds = sorted({d for diffs in plan.stale.values() for d in diffs})
    shown = "; ".join(kinds[:3]) + (f"; ... ({len(kinds) - 3} more)" if len(kinds) > 3 else "")
    rerun = [j for j in plan.stale if j not in plan.done]
    fate = "they run again now" if rerun and len(rerun) == len(plan.stale) else \
        "they count as done; submit --rerun-stale reruns them"
    return (f"{len(plan.stale)} stored results of grid '{plan.grid.name}' came from other code or libraries "
            f"({shown}): {fate}")


@dataclass
class SubmitResult:
    plan: Plan
    stats: RunStats
    written: list[Path] = field(default_factory=list)


def submit(plan: Plan, config: ExecConfig, force: bool = False, retry_failed: bool = False,
           progress: Progress | None = None, on_tick=None, rerun_stale: bool = False) -> SubmitResult:
    """Run the plan's pending jobs; raises StoreError/ExecError before any job starts if that cannot work."""
    store = plan.store
    check_ready(plan, config)
    with store.lock():
        removed = store.remove_stale_temp_files()
        if removed:
            log.info("removed %d temp files left by an interrupted run", removed)
        plan = _plan_for(plan.grid, store, force, retry_failed, rerun_stale)  # another submit may have finished
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
    """Before Ray starts: the pending jobs can run (GridError: data, lengths, task minimums; spec/checks.py), the
    output directory is usable and every pending job's file writable (StoreError), the worker importable
    (ExecError). Loads no model."""
    if plan.checked:
        return
    if plan.pending and _checks_jobs(config):
        check_jobs(plan.pending, plan.grid.path)
    plan.store.preflight()
    plan.store.check_targets(plan.pending)
    if plan.pending:
        _check_worker(config)
    plan.checked = True


def _checks_jobs(config: ExecConfig) -> bool:
    """The job checks know the real worker's inputs; a stand-in worker (fake_worker) needs none of them."""
    return resolve_worker_ref(config.worker_ref) == DEFAULT_WORKER


def problem_lines(plan: Plan) -> list[str]:
    """One line per file in the results folder that is not a usable result: what it is, and what happens to it."""
    pending = {j["job_id"]: j for j in plan.pending}
    lines = []
    for f in plan.corrupt:
        job = pending.get(f.job_id)
        if job is not None and plan.store.path_for(job) == f.path:
            fate = f"the next submit reruns job {f.job_id} in its place"
        else:
            fate = "not a result of this grid's jobs: report and submit skip it (remove it)"
        lines.append(f"{f.path}: {f.problem}; {fate}")
    return lines


def _check_worker(config: ExecConfig) -> None:
    ref = resolve_worker_ref(config.worker_ref)
    try:
        import_ref(ref)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ExecError(f"cannot import the worker {ref!r}: {exc}") from None
