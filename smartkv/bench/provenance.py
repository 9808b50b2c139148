"""Which code and environment produced a result: recorded in every row, compared by `status` and `submit`.

A job's id covers what the grid asks for (grid.py); the code that answered is recorded here instead, so that an
edit of the code does not silently orphan every result: results from other code are shown as stale, and
`submit --rerun-stale` reruns them in place.

  package_version       smartkv's installed version
  source_commit         the git commit of the checkout smartkv is imported from, "+dirty" when its files differ
                        from that commit; null when it is not in git (an installed wheel)
  code_hash             sha256 of every .py file of the imported smartkv package (always set: the code that ran)
  runtime_env           the SMARTKV_* variables that change results (kernel choices, the embedded models' files)
  torch_version, transformers_version, triton_version, cuda_version (torch's CUDA build), gpu_name

A stored result is stale when its code_hash, runtime_env, torch or transformers version differs from the
submitting process's (STALE_KEYS). Triton, CUDA and the GPU are recorded, not compared: the driver often runs on a
machine without them.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
from pathlib import Path

import smartkv

COLUMNS = ("package_version", "source_commit", "code_hash", "runtime_env", "torch_version", "transformers_version",
           "triton_version", "cuda_version", "gpu_name")
STALE_KEYS = ("code_hash", "runtime_env", "torch_version", "transformers_version")
RESULT_ENV = ("SMARTKV_NO_KERNELS", "SMARTKV_FAST_ATTN", "SMARTKV_DIRECT_LAUNCH", "SMARTKV_DECODE_MODE",
              "SMARTKV_SMOLLM2_GGUF", "SMARTKV_GEMMA3_GGUF")
PACKAGE_DIR = Path(smartkv.__file__).resolve().parent


def files_hash(folder: Path = PACKAGE_DIR) -> str:
    """sha256 (16 hex digits) over the relative paths and bytes of every .py file under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit(folder: Path = PACKAGE_DIR) -> str | None:
    """HEAD of the git checkout holding `folder`, "+dirty" if the folder's files differ from it; None if none."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        if not git("ls-files", "--", ".").strip():  # not tracked here (e.g. a wheel inside some other repo)
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """This process's smartkv: package version, source commit, code hash (computed once per process)."""
    from smartkv.bench.spec.catalog import package_version
    return {"package_version": package_version(), "source_commit": git_commit(), "code_hash": files_hash()}


def runtime_env() -> str:
    return json.dumps({k: os.environ[k] for k in RESULT_ENV if k in os.environ}, sort_keys=True)


def environment(device: str | None = None) -> dict:
    """Library versions, and the CUDA build and GPU name when `device` is a CUDA device."""
    return {"runtime_env": runtime_env(), **_libraries(), **_gpu(None if device is None else str(device))}


@functools.lru_cache(maxsize=1)
def _libraries() -> dict:
    import torch
    return {"torch_version": torch.__version__, "transformers_version": _version("transformers"),
            "triton_version": _version("triton"), "cuda_version": torch.version.cuda}


@functools.lru_cache(maxsize=16)
def _gpu(device: str | None) -> dict:
    import torch
    if device is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return {"gpu_name": None}
    return {"gpu_name": torch.cuda.get_device_name(torch.device(device))}


def current(device: str | None = None) -> dict:
    """Every provenance column for results produced by this process (on `device`)."""
    return {**code_identity(), **environment(device)}


def differences(stored: dict | None, now: dict) -> list[str]:
    """What of STALE_KEYS differs between a stored row and `now` ("code_hash a -> b", ...); [] when current."""
    stored = stored or {}
    return [f"{key} {stored.get(key) or 'unknown'} -> {now.get(key)}" for key in STALE_KEYS
            if stored.get(key) != now.get(key)]
