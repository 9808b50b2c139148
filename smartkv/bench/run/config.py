"""How a run is executed (ExecConfig) and the error that stops one before or while it runs (ExecError)."""
from __future__ import annotations

from dataclasses import dataclass


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
