"""JobRunner: runs jobs in one worker process (a Ray actor, or the driver with --local). Never imports ray.

It keeps one model resident and loads a model only when a job for another model arrives (the executor sends
each runner one model's jobs in a row, so each model is loaded once per runner), calls the worker function, and
turns anything that escapes it into rows: a CUDA out-of-memory into an `oom` row, any other exception into an
`error` row. `run` never raises for a job's fault.
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import socket
import time
import traceback
from typing import Callable

from smartkv.bench import provenance
from smartkv.bench.results import schema
from smartkv.bench.spec.grid import canonical_json, job_identity
from smartkv.bench.redact import redact

log = logging.getLogger(__name__)

DEFAULT_WORKER = "smartkv.bench.run.worker:run_job"
WORKER_ENV = "SMARTKV_BENCH_WORKER"


def resolve_worker_ref(ref: str | None = None) -> str:
    return ref or os.environ.get(WORKER_ENV) or DEFAULT_WORKER


def import_ref(ref: str) -> Callable:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"worker must be given as 'module:function', got {ref!r}")
    return getattr(importlib.import_module(module), attr)


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(__import__("torch"), "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(exc, oom_type)) or "CUDA out of memory" in str(exc)


def failure_rows(job: dict, status: str, error: str, worker: str = "", wall_s: float | None = None) -> list[dict]:
    """A job that produced no rows of its own: one summary row carrying the error (and this process's code)."""
    values = {**job_identity(job), **provenance.code_identity()}
    return [schema.empty_row(**values, row_kind="summary", status=status, error=redact(error)[:4000], n_samples=0,
                             n_failed=0, worker=worker, wall_s=wall_s)]


def load_handle(model: dict):
    """Load the model of a job spec: tiny random models with config overrides, or smartkv.models.load_model."""
    from smartkv import models

    if model.get("config"):
        device = models.resolve_device(model["device"])
        handle = models.load_tiny(model["name"], dtype=models.parse_dtype(model["dtype"], device), device=device,
                                  **model["config"])
        return handle
    return models.load_model(model["name"], device=model["device"], dtype=model["dtype"],
                             revision=model["revision"], trust_remote_code=model["trust_remote_code"])


class JobRunner:
    def __init__(self, worker_ref: str | None = None, env: dict[str, str] | None = None,
                 threads: int | None = None, name: str = "local"):
        os.environ.update(env or {})
        if threads:
            import torch
            torch.set_num_threads(threads)
        self.worker_ref = resolve_worker_ref(worker_ref)
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"
        self._worker: Callable | None = None
        self._model_key: str | None = None
        self._handle = None
        self._load_errors: dict[str, str] = {}
        self.loads: dict[str, int] = {}

    def ping(self) -> dict:
        return {"pid": os.getpid(), "name": self.name}

    def run(self, job: dict) -> dict:
        start = time.perf_counter()
        loaded = False
        try:
            loaded = self._ensure_model(job["model"])
            load_s = time.perf_counter() - start if loaded else 0.0
            rows = self._worker_fn()(job, self._handle)
            if not rows:
                raise RuntimeError("the worker returned no rows")
        except Exception as exc:  # the job's fault, whatever it is, becomes its result
            status = "oom" if is_oom(exc) else "error"
            if status == "oom":
                self._free_cuda()
            text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            log.warning("job %s failed (%s): %s", job["job_id"], status, redact(text))
            rows = failure_rows(job, status, text)
            load_s = 0.0
        wall_s = time.perf_counter() - start
        self._annotate(rows, job, wall_s, loaded)
        return {"job_id": job["job_id"], "rows": rows, "worker": self.name, "model_loaded": loaded,
                "model_load_s": load_s, "wall_s": wall_s}

    def _worker_fn(self) -> Callable:
        if self._worker is None:
            self._worker = import_ref(self.worker_ref)
        return self._worker

    def _ensure_model(self, model: dict) -> bool:
        key = canonical_json(model)
        if key in self._load_errors:
            raise RuntimeError(f"model {model['name']!r} failed to load earlier on this worker: "
                               f"{self._load_errors[key]}")
        if key == self._model_key:
            return False
        self._release_model()
        try:
            self._handle = load_handle(model)
        except Exception as exc:
            if not is_oom(exc):
                self._load_errors[key] = f"{exc.__class__.__name__}: {exc}"[:500]
            raise
        self._model_key = key
        self.loads[key] = self.loads.get(key, 0) + 1
        log.info("%s loaded model %s (load number %d)", self.name, model["name"], self.loads[key])
        return True

    def _release_model(self) -> None:
        self._handle, self._model_key = None, None
        gc.collect()
        self._free_cuda()

    @staticmethod
    def _free_cuda() -> None:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _annotate(self, rows: list[dict], job: dict, wall_s: float, loaded: bool) -> None:
        """Canonical identity and provenance on every row (whatever the worker wrote), who ran it, wall time, model
        loads."""
        identity = job_identity(job)
        device = getattr(self._handle, "device", None) if self._handle is not None else None
        made_by = provenance.current(str(device) if device is not None else None)
        for row in rows:
            row.update(identity)
            row.update(made_by)
            row["worker"] = row.get("worker") or self.name
            if row.get("row_kind") != "summary":
                continue
            if row.get("wall_s") is None:
                row["wall_s"] = wall_s
            extra = json.loads(row["extra"]) if row.get("extra") else {}
            extra = extra if isinstance(extra, dict) else {"worker_extra": extra}
            extra["runner"] = {"model_loaded": loaded, "model_loads": self.loads.get(canonical_json(job["model"]),
                                                                                       0)}
            row["extra"] = canonical_json(extra)
