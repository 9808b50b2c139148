"""A stand-in for worker.run_job: plausible rows without running a model, plus one-shot fault injection.

Used by the runner's tests and to check a cluster's plumbing without models:

    SMARTKV_BENCH_WORKER=smartkv.bench.run.fake_worker:run_job smartkv-bench submit --grid jobs/quick.yaml

Environment (all optional; SMARTKV_* variables reach the Ray actors):
  SMARTKV_FAKE_SLEEP_S    seconds to spend per job (default 0)
  SMARTKV_FAKE_FAULT_DIR  a directory of fault orders; before each job the worker writes
                          `started-<job_id>-<pid>` there, then obeys and consumes (rename, so once only) one file
                          named `<fault>-<job_id>[suffix]` or `<fault>-any[suffix]` (several queue up), fault:
                            oom   raise torch.cuda.OutOfMemoryError
                            raise raise RuntimeError (its message includes $HF_TOKEN if set: tests check redaction)
                            exit  kill this worker process (os._exit), as a crash or `kill -9` would
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from smartkv.bench.results import schema
from smartkv.bench.spec.grid import job_identity

FAULTS = ("oom", "raise", "exit")
_BITS = {"fp16": 16.0, "int8": 8.0, "int4": 4.0}


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the arguments."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _avg_bits(method: dict) -> float:
    params = method["params"]
    if method["name"] in _BITS:
        return _BITS[method["name"]]
    if method["name"] == "smartkv":
        return float(params.get("budget", 7))
    return (params.get("key_bits", 2) + params.get("value_bits", 4)) / 2.0


def _claim_fault(job_id: str) -> str | None:
    folder = os.environ.get("SMARTKV_FAKE_FAULT_DIR")
    if not folder:
        return None
    root = Path(folder)
    (root / f"started-{job_id}-{os.getpid()}").touch()
    for fault in FAULTS:
        for order in sorted(root.glob(f"{fault}-{job_id}*")) + sorted(root.glob(f"{fault}-any*")):
            try:
                os.rename(order, root / f"claimed-{order.name}-{job_id}-{os.getpid()}")
            except FileNotFoundError:  # another worker took it first
                continue
            return fault
    return None


def _sample_row(job: dict, i: int, bits: float) -> dict:
    options = job["prompt_set"]["options"]
    context = int(options.get("length") or 1024)
    quality = 1.0 - 0.5 * (16.0 - bits) / 16.0 * _unit(job["job_id"], i, "q")
    return schema.empty_row(
        **job_identity(job), row_kind="sample", sample_id=str(i), status="ok", metric="exact_match",
        score=round(quality, 3), prediction="fake", context_tokens=context, new_tokens=8,
        kl_to_fp16=0.0 if bits >= 16 else (16.0 - bits) / 100.0 * (1 + _unit(job["job_id"], i)),
        prefill_ms=context / 10.0, decode_ms_per_token=5.0 + context / 1000.0, tokens_per_s=1000 / (5 + context / 1000),
        kv_fp16_bytes=context * 1024, kv_total_bytes=int(context * 1024 * (bits + 0.5) / 16),
        total_ratio=(bits + 0.5) / 16.0, payload_ratio=bits / 16.0, avg_bits=bits)


def run_job(job: dict, handle) -> list[dict]:
    fault = _claim_fault(job["job_id"])
    time.sleep(float(os.environ.get("SMARTKV_FAKE_SLEEP_S", "0")))
    if fault == "exit":
        os._exit(1)
    if fault == "oom":
        import torch
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
    if fault == "raise":
        raise RuntimeError(f"injected failure (token={os.environ.get('HF_TOKEN', '')})")
    bits = _avg_bits(job["method"])
    n = int(job["prompt_set"]["options"].get("num_samples") or 2)
    rows = [_sample_row(job, i, bits) for i in range(n)]
    mean = sum(r["score"] for r in rows) / n
    rows.append(schema.empty_row(**job_identity(job), row_kind="summary", status="ok", metric="exact_match",
                                 score=mean, n_samples=n, n_failed=0, avg_bits=bits,
                                 total_ratio=rows[0]["total_ratio"]))
    return rows
