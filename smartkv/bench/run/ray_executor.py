"""Jobs on Ray actors: one actor per GPU (or per `cpus_per_worker` CPUs), the only module that imports ray (and
only inside functions).

The driver hands each actor the jobs of one model in a row (so an actor loads a model once) and of one prompt set
in a row (so it computes that set's fp16 references once; they are memoised on the model), keeps a bounded
number of calls in flight, takes results as they finish (`ray.wait` with a timeout, which also refreshes the
progress display) and gives each result to `on_result` at once.

Faults: a job that raises becomes an error row inside the actor (runner.JobRunner). A dead actor (process killed,
node lost) is replaced; the job it was running is retried up to `max_attempts` times in all, the jobs queued behind
it go back to the queue without counting an attempt. A replacement gets work only once it answers a ping, so
after a node is lost the jobs flow to the actors still alive while the replacement waits for room (an autoscaler,
a node joining); if no actor at all is alive for `actor_start_timeout_s`, the run stops with ExecError. Ray's own
actor restarts are off: the driver owns the retry policy.
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

from smartkv.bench.progress import Progress
from smartkv.bench.run.config import ExecConfig, ExecError
from smartkv.bench.run.runner import JobRunner, failure_rows, resolve_worker_ref
from smartkv.bench.run.scheduler import Scheduler, job_label, model_key, unit_key
from smartkv.bench.run.stats import OnResult, OnTick, RunStats, deliver, record
from smartkv.bench.spec.grid import job_cost

log = logging.getLogger(__name__)

# Set before `import ray` when we start Ray ourselves: with it Ray uses the loopback address for the node and
# binds its servers to 127.0.0.1 instead of every interface (Ray's own switch, meant for laptops).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PASS_ENV_PREFIX = "SMARTKV_"


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


def _passed_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(PASS_ENV_PREFIX)}


@dataclass
class _Slot:
    name: str
    actor: object
    ping: object = None                              # the actor's first call while it starts; None once it answered
    since: float = field(default_factory=time.monotonic)  # when the current actor was created
    inflight: deque = field(default_factory=deque)   # (ref, job), oldest first: the head is running
    model: str | None = None
    unit: tuple | None = None                        # (model, prompt set) of the last job handed out

    @property
    def ready(self) -> bool:
        return self.ping is None


class RayExecutor:
    def __init__(self, config: ExecConfig, progress: Progress, on_result: OnResult, on_tick: OnTick | None):
        self.config, self.progress, self.on_result, self.on_tick = config, progress, on_result, on_tick
        self.stats = RunStats()
        self.attempts: dict[str, int] = {}
        self.ray = None
        self.started_here = False
        self.run_start = 0.0
        self.actor_cls = None

    def run(self, jobs: list[dict]) -> RunStats:
        cfg = self.config
        self.ray, self.started_here = connect(cfg.address)
        try:
            workers, use_gpu = plan_workers(self.ray.cluster_resources(), cfg)
            self.actor_cls = self._actor_class(use_gpu)
            slots = [self._new_slot(f"worker-{i}") for i in range(min(workers, len(jobs)) or 1)]
            self._wait_started(slots)
            self.progress.start(len(jobs), sum(job_cost(j) for j in jobs))
            self.stats.workers, self.run_start = len(slots), time.perf_counter()
            try:
                self._loop(Scheduler(jobs), slots)
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

    def _new_slot(self, name: str) -> _Slot:
        actor = self.actor_cls.remote(resolve_worker_ref(self.config.worker_ref), _passed_env(),
                                      self.config.cpus_per_worker, name)
        self.progress.slot(name)
        return _Slot(name, actor, ping=actor.ping.remote())

    def _wait_started(self, slots: list[_Slot]) -> None:
        start = time.perf_counter()
        pings = [s.ping for s in slots]
        ready, _ = self.ray.wait(pings, num_returns=len(pings), timeout=self.config.actor_start_timeout_s)
        if len(ready) < len(pings):
            raise ExecError(f"only {len(ready)} of {len(pings)} workers started within "
                            f"{self.config.actor_start_timeout_s:.0f} s: the cluster lacks the resources")
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError as exc:  # e.g. the runner cannot be imported on the cluster's nodes
            raise ExecError(f"the workers failed to start: {str(exc).splitlines()[0][:300]}") from None
        for slot in slots:
            slot.ping = None
        self.stats.actor_start_s += time.perf_counter() - start

    def _loop(self, scheduler: Scheduler, slots: list[_Slot]) -> None:
        cfg = self.config
        max_inflight = cfg.max_inflight or 2 * len(slots)
        per_slot = max(1, math.ceil(max_inflight / len(slots)))
        pending: dict = {}
        try:
            while len(scheduler) or pending:
                self._fill(scheduler, slots, pending, per_slot, max_inflight)
                starting = {s.ping: s for s in slots if not s.ready}
                ready, _ = self.ray.wait(list(pending) + list(starting), num_returns=1, timeout=cfg.poll_s)
                for ref in ready:
                    if ref in pending:
                        self._collect(ref, pending, scheduler)
                    elif ref in starting:
                        self._started(starting[ref], pending, scheduler)
                self._check_alive(slots)
                self._show_current(slots)
                if self.on_tick:
                    self.on_tick(self.progress)
        except KeyboardInterrupt:
            self.stats.lost_in_flight = len(pending)
            raise

    def _fill(self, scheduler: Scheduler, slots: list[_Slot], pending: dict, per_slot: int,
              max_inflight: int) -> None:
        for slot in slots:
            while slot.ready and len(slot.inflight) < per_slot and len(pending) < max_inflight:
                others = [s for s in slots if s is not slot]
                job = scheduler.next_for(slot.model, {s.model for s in others if s.model}, slot.unit,
                                         {s.unit for s in others if s.unit})
                if job is None:
                    return
                slot.model, slot.unit = model_key(job), unit_key(job)
                ref = slot.actor.run.remote(job)
                slot.inflight.append((ref, job))
                pending[ref] = slot

    def _started(self, slot: _Slot, pending: dict, scheduler: Scheduler) -> None:
        """A replacement actor answered its ping (it runs from now on), or died before it could."""
        try:
            self.ray.get(slot.ping)
        except self.ray.exceptions.RayError as exc:
            self._replace_dead(slot, pending, scheduler, exc)
            return
        slot.ping = None

    def _check_alive(self, slots: list[_Slot]) -> None:
        """Stop when no actor is alive and none could be started for actor_start_timeout_s (all nodes gone)."""
        if any(s.ready for s in slots):
            return
        waited = time.monotonic() - max(s.since for s in slots)
        if waited > self.config.actor_start_timeout_s:
            raise ExecError(f"no worker is alive and none could be started within "
                            f"{self.config.actor_start_timeout_s:.0f} s (nodes lost?); finished jobs are saved, "
                            "submit again to resume")

    def _collect(self, ref, pending: dict, scheduler: Scheduler) -> None:
        ray_exc = self.ray.exceptions
        slot = pending[ref]
        job = next(j for r, j in slot.inflight if r == ref)
        try:
            result = self.ray.get(ref)
        except (ray_exc.RayActorError, ray_exc.ObjectLostError, ray_exc.OwnerDiedError) as exc:
            self._replace_dead(slot, pending, scheduler, exc)
            return
        except ray_exc.RayTaskError as exc:  # JobRunner.run does not raise; this is e.g. an unpicklable result
            result = {"rows": failure_rows(job, "error", str(exc).splitlines()[-1]), "model_loaded": False}
        slot.inflight = deque((r, j) for r, j in slot.inflight if r != ref)
        del pending[ref]
        deliver(self.stats, self.on_result, job, result)
        record(self.stats, self.progress, slot.name, job, result, self.run_start)

    def _replace_dead(self, slot: _Slot, pending: dict, scheduler: Scheduler, exc) -> None:
        """The actor died: retry the job it was running (bounded), requeue the others, start a new actor."""
        lost = list(slot.inflight)
        for ref, _ in lost:
            pending.pop(ref, None)
        slot.inflight.clear()
        slot.model = slot.unit = None
        self.ray.kill(slot.actor, no_restart=True)
        reason = str(exc).splitlines()[0][:300]
        for _, job in reversed(lost[1:]):
            scheduler.requeue(job)
        if lost:  # the running job goes back first, ahead of those queued behind it
            self._retry_or_fail(slot, lost[0][1], reason, scheduler)
        else:
            self.progress.note(f"{slot.name} died while starting: {reason}")
        self.stats.restarts += 1
        self.progress.slot(slot.name).restarts += 1
        new = self._new_slot(slot.name)
        slot.actor, slot.ping, slot.since = new.actor, new.ping, new.since

    def _retry_or_fail(self, slot: _Slot, running: dict, reason: str, scheduler: Scheduler) -> None:
        """The job that was running when its worker died: once more, or after max_attempts tries an error row."""
        tries = self.attempts[running["job_id"]] = self.attempts.get(running["job_id"], 1) + 1
        self.progress.note(f"{slot.name} died while running {job_label(running)}: {reason}")
        if tries > self.config.max_attempts:
            error = f"worker died {self.config.max_attempts} times running this job; last: {reason}"
            result = {"rows": failure_rows(running, "error", error), "model_loaded": False}
            deliver(self.stats, self.on_result, running, result)
            record(self.stats, self.progress, slot.name, running, result, self.run_start)
        else:
            self.stats.retried += 1
            self.progress.retried += 1
            scheduler.requeue(running)

    def _show_current(self, slots: list[_Slot]) -> None:
        for slot in slots:
            current = job_label(slot.inflight[0][1]) if slot.inflight else None
            self.progress.slot(slot.name).current = current if slot.ready else "(starting)"
