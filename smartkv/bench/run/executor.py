"""Run jobs on Ray actors (one per GPU, or per `cpus_per_worker` CPUs) or in-process, longest first.

The driver hands each actor the jobs of one model in a row (so an actor loads a model once) and of one prompt set
in a row (so it computes that set's fp16 references once; they are memoised on the model), keeps a bounded
number of calls in flight, takes results as they finish (`ray.wait` with a timeout, which also refreshes the
progress display) and gives each result to `on_result` at once (the caller writes it; only the driver writes).

Faults: a job that raises becomes an error row inside the actor (runner.JobRunner). A dead actor (process killed,
node lost) is replaced; the job it was running is retried up to `max_attempts` times in all, the jobs queued behind
it are resubmitted without counting an attempt. Ray's own actor restarts are off: the driver owns the retry policy.
This is the only module that imports ray, and only inside functions.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from smartkv.bench.spec.grid import canonical_json, job_cost, method_label
from smartkv.bench.progress import Progress
from smartkv.bench.run.runner import JobRunner, failure_rows, resolve_worker_ref

log = logging.getLogger(__name__)

# Set before `import ray` when we start Ray ourselves: with it Ray uses the loopback address for the node and
# binds its servers to 127.0.0.1 instead of every interface (Ray's own switch, meant for laptops).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PASS_ENV_PREFIX = "SMARTKV_"


class ExecError(RuntimeError):
    """The run cannot proceed (no resources, Ray unreachable, bad worker)."""


@dataclass
class ExecConfig:
    address: str | None = None          # join this cluster ("auto" = the local `ray start`); None: start one
    workers: int | None = None          # actors; default: workers_per_gpu per GPU, else CPUs // cpus_per_worker
    cpus_per_worker: int = 1
    workers_per_gpu: int = 1            # actors sharing one GPU (Ray fractional GPUs): small models leave a GPU
                                        # mostly idle, launch-bound on one CPU core
    max_inflight: int | None = None     # calls queued on all actors together; default 2 per worker
    max_attempts: int = 3               # tries of a job whose actor died
    local: bool = False                 # in-process, no Ray
    worker_ref: str | None = None       # "module:function"; default smartkv.bench.run.worker:run_job
    poll_s: float = 0.5
    actor_start_timeout_s: float = 300.0


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


OnResult = Callable[[dict, dict], None]          # (job, result) -> None; result["rows"] are the job's rows
OnTick = Callable[[Progress], None]


def model_key(job: dict) -> str:
    return canonical_json(job["model"])


def unit_key(job: dict) -> tuple[str, str]:
    """(model, prompt set). A worker memoises the fp16 reference of each prompt on its model (bench/decode.py), so
    the jobs of one prompt set run cheapest on one worker: on several, each recomputes the references."""
    return model_key(job), canonical_json(job["prompt_set"])


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


def job_label(job: dict) -> str:
    return f"{job['model']['name']} {method_label(job['method'])} {job['prompt_set']['name']} r{job['repeat']}"


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIX)}


def _deliver(stats: RunStats, on_result: OnResult, job: dict, result: dict) -> None:
    """Hand a result to the caller (who writes it), timing the write."""
    start = time.perf_counter()
    on_result(job, result)
    stats.write_s += time.perf_counter() - start


def _record(stats: RunStats, progress: Progress, slot: str | None, job: dict, result: dict,
            run_start: float | None = None) -> None:
    status = _status_of(result["rows"])
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


def _status_of(rows: list[dict]) -> str:
    from smartkv.bench.results.store import job_status
    return job_status(rows)


# ---------------------------------------------------------------------------------------------------------------
# in-process


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
            _deliver(stats, on_result, job, result)
            _record(stats, progress, slot, job, result, start)
            progress.slot(slot).current = None
    except KeyboardInterrupt:
        stats.interrupted, stats.lost_in_flight = True, 1
    stats.run_s = time.perf_counter() - start
    if on_tick:
        on_tick(progress)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Ray


def connect(address: str | None, num_cpus: int | None = None):
    """Join `address`, or start a local Ray bound to 127.0.0.1 (dashboard off). Returns (ray, started_here)."""
    if address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray

    if ray.is_initialized():
        return ray, False
    common = dict(log_to_driver=False, configure_logging=False, namespace="smartkv-bench")
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            ray.init(address=address, **common)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ExecError(f"cannot {'join Ray at ' + address if address else 'start a local Ray'}: {exc}") from None
    if threading.current_thread() is threading.main_thread():
        # ray.init replaces the SIGTERM handler with one that aborts the process; keep the caller's (the CLI's
        # turns `kill` into a clean stop: in-flight jobs dropped, Ray shut down, exit 130).
        signal.signal(signal.SIGTERM, on_term)
    return ray, True


def plan_workers(resources: dict, config: ExecConfig) -> tuple[int, bool]:
    """(number of actors, use GPUs) from the cluster's resources and the options."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    use_gpu = gpus > 0
    per_gpu = max(config.workers_per_gpu, 1)
    default = gpus * per_gpu if use_gpu else max(1, cpus // max(config.cpus_per_worker, 1))
    workers = config.workers or default
    need_cpus = workers * config.cpus_per_worker
    if use_gpu and workers > gpus * per_gpu or need_cpus > cpus:
        have = f"{gpus} GPUs and {cpus} CPUs" if use_gpu else f"{cpus} CPUs"
        want = f"{workers} x {config.cpus_per_worker} CPUs"
        if use_gpu:
            want = f"{workers} x 1/{per_gpu} GPU and {want}"
        message = f"{workers} workers need {want}; the cluster has {have}"
        if config.address:
            log.warning("%s: the extra workers wait for the autoscaler", message)
        else:
            raise ExecError(f"{message}: lower --workers, --workers-per-gpu or --cpus-per-worker")
    return workers, use_gpu


@dataclass
class _Slot:
    name: str
    actor: object
    inflight: deque = field(default_factory=deque)   # (ref, job), oldest first: the head is running
    model: str | None = None
    unit: tuple | None = None                        # (model, prompt set) of the last job handed out


class RayExecutor:
    def __init__(self, config: ExecConfig, progress: Progress, on_result: OnResult, on_tick: OnTick | None):
        self.config, self.progress, self.on_result, self.on_tick = config, progress, on_result, on_tick
        self.stats = RunStats()
        self.attempts: dict[str, int] = {}
        self.ray = None
        self.started_here = False
        self.run_start = 0.0

    def run(self, jobs: list[dict]) -> RunStats:
        cfg = self.config
        self.ray, self.started_here = connect(cfg.address)
        try:
            workers, use_gpu = plan_workers(self.ray.cluster_resources(), cfg)
            actor_cls = self._actor_class(use_gpu)
            slots = [self._new_slot(actor_cls, f"worker-{i}") for i in range(min(workers, len(jobs)) or 1)]
            self._wait_started(slots)
            self.progress.start(len(jobs), sum(job_cost(j) for j in jobs))
            self.stats.workers, self.run_start = len(slots), time.perf_counter()
            try:
                self._loop(Scheduler(jobs), slots, actor_cls)
            finally:
                self.stats.run_s = time.perf_counter() - self.run_start
        except KeyboardInterrupt:
            self.stats.interrupted = True
        finally:
            if self.started_here:
                self.ray.shutdown()
        return self.stats

    def _actor_class(self, use_gpu: bool):
        cfg = self.config
        options = dict(max_restarts=0, max_task_retries=0, max_concurrency=1, num_cpus=cfg.cpus_per_worker)
        if use_gpu:
            options["num_gpus"] = 1 / max(cfg.workers_per_gpu, 1)
        return self.ray.remote(**options)(JobRunner)

    def _new_slot(self, actor_cls, name: str) -> _Slot:
        actor = actor_cls.remote(resolve_worker_ref(self.config.worker_ref), _passed_env(),
                                 self.config.cpus_per_worker, name)
        self.progress.slot(name)
        return _Slot(name, actor)

    def _wait_started(self, slots: list[_Slot]) -> None:
        start = time.perf_counter()
        pings = [s.actor.ping.remote() for s in slots]
        ready, _ = self.ray.wait(pings, num_returns=len(pings), timeout=self.config.actor_start_timeout_s)
        if len(ready) < len(pings):
            raise ExecError(f"only {len(ready)} of {len(pings)} workers started within "
                            f"{self.config.actor_start_timeout_s:.0f} s: the cluster lacks the resources")
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError as exc:  # e.g. the runner cannot be imported on the cluster's nodes
            raise ExecError(f"the workers failed to start: {str(exc).splitlines()[0][:300]}") from None
        self.stats.actor_start_s += time.perf_counter() - start

    def _loop(self, scheduler: Scheduler, slots: list[_Slot], actor_cls) -> None:
        cfg = self.config
        max_inflight = cfg.max_inflight or 2 * len(slots)
        per_slot = max(1, math.ceil(max_inflight / len(slots)))
        pending: dict = {}
        try:
            while len(scheduler) or pending:
                self._fill(scheduler, slots, pending, per_slot, max_inflight)
                ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=cfg.poll_s)
                for ref in ready:
                    if ref in pending:
                        self._collect(ref, pending, scheduler, actor_cls)
                self._show_current(slots)
                if self.on_tick:
                    self.on_tick(self.progress)
        except KeyboardInterrupt:
            self.stats.lost_in_flight = len(pending)
            raise

    def _fill(self, scheduler: Scheduler, slots: list[_Slot], pending: dict, per_slot: int,
              max_inflight: int) -> None:
        for slot in slots:
            while len(slot.inflight) < per_slot and len(pending) < max_inflight:
                others = [s for s in slots if s is not slot]
                job = scheduler.next_for(slot.model, {s.model for s in others if s.model}, slot.unit,
                                         {s.unit for s in others if s.unit})
                if job is None:
                    return
                slot.model, slot.unit = model_key(job), unit_key(job)
                ref = slot.actor.run.remote(job)
                slot.inflight.append((ref, job))
                pending[ref] = slot

    def _collect(self, ref, pending: dict, scheduler: Scheduler, actor_cls) -> None:
        ray_exc = self.ray.exceptions
        slot = pending[ref]
        job = next(j for r, j in slot.inflight if r == ref)
        try:
            result = self.ray.get(ref)
        except (ray_exc.RayActorError, ray_exc.ObjectLostError, ray_exc.OwnerDiedError) as exc:
            self._replace_dead(slot, pending, scheduler, actor_cls, exc)
            return
        except ray_exc.RayTaskError as exc:  # JobRunner.run does not raise; this is e.g. an unpicklable result
            result = {"rows": failure_rows(job, "error", str(exc).splitlines()[-1]), "model_loaded": False}
        slot.inflight = deque((r, j) for r, j in slot.inflight if r != ref)
        del pending[ref]
        _deliver(self.stats, self.on_result, job, result)
        _record(self.stats, self.progress, slot.name, job, result, self.run_start)

    def _replace_dead(self, slot: _Slot, pending: dict, scheduler: Scheduler, actor_cls, exc) -> None:
        """The actor died: retry the job it was running (bounded), resubmit the others, start a new actor."""
        lost = list(slot.inflight)
        for ref, _ in lost:
            pending.pop(ref, None)
        slot.inflight.clear()
        slot.model = slot.unit = None
        self.ray.kill(slot.actor, no_restart=True)
        running = lost[0][1]
        tries = self.attempts[running["job_id"]] = self.attempts.get(running["job_id"], 1) + 1
        reason = str(exc).splitlines()[0][:300]
        self.progress.note(f"{slot.name} died while running {job_label(running)}: {reason}")
        for _, job in reversed(lost[1:]):
            scheduler.requeue(job)
        if tries > self.config.max_attempts:
            error = f"worker died {self.config.max_attempts} times running this job; last: {reason}"
            result = {"rows": failure_rows(running, "error", error), "model_loaded": False}
            _deliver(self.stats, self.on_result, running, result)
            _record(self.stats, self.progress, slot.name, running, result, self.run_start)
        else:
            self.stats.retried += 1
            self.progress.retried += 1
            scheduler.requeue(running)
        self.stats.restarts += 1
        self.progress.slot(slot.name).restarts += 1
        new = self._new_slot(actor_cls, slot.name)
        slot.actor = new.actor

    def _show_current(self, slots: list[_Slot]) -> None:
        for slot in slots:
            self.progress.slot(slot.name).current = job_label(slot.inflight[0][1]) if slot.inflight else None


def execute(jobs: list[dict], config: ExecConfig, on_result: OnResult, progress: Progress | None = None,
            on_tick: OnTick | None = None) -> RunStats:
    """Run `jobs` (in-process with config.local, else on Ray) and hand each finished job to `on_result`."""
    progress = progress or Progress()
    if not jobs:
        return RunStats()
    if config.local:
        return run_local(jobs, config, on_result, progress, on_tick)
    return RayExecutor(config, progress, on_result, on_tick).run(jobs)
