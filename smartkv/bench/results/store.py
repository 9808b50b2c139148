"""The results dataset: one Parquet file per finished job, hive-partitioned, written atomically by the driver.

Layout under the root (`results/<grid>/` or `--out`):

    model_key=<model>/method_key=<method>/<job_id>.parquet      one file per job: sample rows + a summary row
    .lock                                                        held (flock) by the submit writing here
    .<job_id>.parquet.<pid>.tmp                                  a file being written; invisible to readers

Partition directories are `model_key`/`method_key` (sanitized names), not `model`/`method`: the rows carry the
real names as columns and pyarrow refuses a dataset whose partition field repeats a column with another type.
Every file's key-value metadata holds the job spec (`smartkv.job_spec`, JSON) and its status (`smartkv.status`).

A write goes to a hidden temp name in the final directory, is fsynced, then renamed (atomic on POSIX), and the
directory is fsynced: a reader (pandas, pyarrow, `status`) sees either no file or the whole file. pyarrow's
dataset discovery skips names starting with "." or "_", so `pandas.read_parquet(root)` never meets a temp file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from smartkv.bench.results import schema
from smartkv.bench.redact import redact

log = logging.getLogger(__name__)

META_SPEC = b"smartkv.job_spec"
META_STATUS = b"smartkv.status"
LOCK_NAME = ".lock"
MIN_FREE_BYTES = 64 * 1024 * 1024
_KEY_RE = re.compile(r"[^A-Za-z0-9._-]+")


class StoreError(RuntimeError):
    """The output directory cannot be used (unwritable, full) or a write failed."""


class LockBusy(StoreError):
    """Another submit is writing into the same directory."""


@dataclass(frozen=True)
class ResultFile:
    job_id: str
    path: Path
    status: str | None        # "ok" | "error" | "oom" from the footer; None when corrupt
    problem: str | None = None  # why the file cannot be read

    @property
    def is_corrupt(self) -> bool:
        return self.problem is not None


def partition_value(name: str) -> str:
    """A safe directory-name form of a model or method name: no separators, no '..', no leading dot.

    Names that had to change get a short hash, so two different names never share a directory.
    """
    key = _KEY_RE.sub("_", name).strip("._-")[:60] or "x"
    if not key[0].isalpha():
        key = "x" + key
    if key != name:
        key = f"{key}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    return key


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------------------------------
    def path_for(self, job: dict) -> Path:
        part = (self.root / f"model_key={partition_value(job['model']['name'])}"
                / f"method_key={partition_value(job['method']['name'])}")
        if not re.fullmatch(r"[0-9a-f]{8,64}", job["job_id"]):
            raise ValueError(f"job_id must be hex digits, got {job['job_id']!r}")
        path = part / f"{job['job_id']}.parquet"
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"refusing to write outside {self.root}: {path}")
        return path

    def files(self) -> Iterator[Path]:
        """Final result files (hidden temp files and lock excluded)."""
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            for fn in sorted(filenames):
                if fn.endswith(".parquet") and not fn.startswith((".", "_")):
                    yield Path(dirpath) / fn

    # -- checks before a run -----------------------------------------------------------------------------------
    def preflight(self, min_free_bytes: int = MIN_FREE_BYTES) -> None:
        """Fail early, before any job starts, if results could not be written here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create output directory {self.root}: {exc.strerror or exc}") from None
        if not self.root.is_dir():
            raise StoreError(f"output path {self.root} is not a directory")
        free = shutil.disk_usage(self.root).free
        if free < min_free_bytes:
            raise StoreError(f"output directory {self.root} has {free // 2**20} MiB free; at least "
                             f"{min_free_bytes // 2**20} MiB are needed")
        probe = self.root / f".probe-{os.getpid()}.tmp"
        try:
            _write_bytes_durably(probe, b"\0" * 65536)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StoreError(f"output directory {self.root} is not writable: {reason}") from None
        finally:
            probe.unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the directory by one submit. Held by the OS: a killed driver releases it."""
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise LockBusy(f"{self.root} is in use by another submit ({holder}); wait for it to finish "
                                 "or use another --out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the flock; the file stays (harmless, hidden)

    def remove_stale_temp_files(self) -> int:
        """Temp files left by a killed driver (call while holding the lock)."""
        removed = 0
        for tmp in self.root.rglob(".*.tmp"):
            if tmp.is_file() and tmp.resolve().is_relative_to(self.root.resolve()):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    # -- writing -----------------------------------------------------------------------------------------------
    def write_job(self, job: dict, rows: list[dict]) -> Path:
        """Write one job's rows as <partition>/<job_id>.parquet, atomically; replaces an older file."""
        final = self.path_for(job)
        final.parent.mkdir(parents=True, exist_ok=True)
        table = rows_to_table(rows)
        meta = {**(schema.SCHEMA.metadata or {}), META_SPEC: redact(json.dumps(job, sort_keys=True)).encode(),
                META_STATUS: job_status(rows).encode()}
        table = table.replace_schema_metadata(meta)
        tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return final

    # -- reading -----------------------------------------------------------------------------------------------
    def scan(self) -> list[ResultFile]:
        """Every result file with its status from the footer (cheap); unreadable files are flagged, not raised."""
        out = []
        for path in self.files():
            job_id = path.stem
            try:
                meta = pq.read_metadata(path).metadata or {}
                status = meta.get(META_STATUS, b"").decode() or None
                out.append(ResultFile(job_id, path, status))
            except Exception as exc:  # any unreadable footer means a corrupt file; pyarrow raises several types
                out.append(ResultFile(job_id, path, None, f"{exc.__class__.__name__}: {str(exc)[:200]}"))
        return out

    def done(self, retry_failed: bool = False) -> dict[str, ResultFile]:
        """job_id -> readable result file. With retry_failed, jobs whose status is not ok count as not done."""
        return {f.job_id: f for f in self.scan()
                if not f.is_corrupt and (not retry_failed or f.status == "ok")}

    def read(self, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
        """All readable rows under the explicit schema (older files gain null columns); warnings for skipped files."""
        good, warnings = [], []
        for f in self.scan():
            if f.is_corrupt:
                warnings.append(f"skipped corrupt result file {f.path} ({f.problem})")
                continue
            good.append(str(f.path))
        readable = []
        for path in good:  # a file with a valid footer can still have bad pages: check each once
            try:
                pads.dataset(path, format="parquet", schema=schema.SCHEMA).to_table(columns=["job_id"])
                readable.append(path)
            except Exception as exc:
                warnings.append(f"skipped corrupt result file {path} ({exc.__class__.__name__})")
        if not readable:
            return schema.SCHEMA.empty_table().select(columns or schema.SCHEMA.names), warnings
        dataset = pads.dataset(readable, format="parquet", schema=schema.SCHEMA)
        return dataset.to_table(columns=columns), warnings

    def job_spec(self, path: Path) -> dict:
        meta = pq.read_metadata(path).metadata or {}
        return json.loads(meta[META_SPEC])


def rows_to_table(rows: list[dict]) -> pa.Table:
    for row in rows:
        if row.get("error"):
            row["error"] = redact(str(row["error"]))
    return pa.Table.from_pylist(rows, schema=schema.SCHEMA)


def job_status(rows: list[dict]) -> str:
    """The job's status: its summary row's, else the worst of its rows."""
    summary = [r for r in rows if r.get("row_kind") == "summary"]
    statuses = [r.get("status") for r in (summary or rows)]
    for status in ("oom", "error"):
        if status in statuses:
            return status
    return "ok" if statuses else "error"


def _write_bytes_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
