"""The results dataset: one Parquet file per finished job, hive-partitioned, written atomically by the driver.

Layout under the root (`results/<grid>/` or `--out`):

    model_key=<model>/method_key=<method>/<job_id>.parquet      one file per job: sample rows + a summary row
    .lock                                                        held (flock) by the submit writing here
    .<job_id>.parquet.<pid>-<random>.tmp                         a file being written; invisible to readers
    _report/                                                     report.md, report.csv, plots (submit writes them)

Partition directories are `model_key`/`method_key` (sanitized names), not `model`/`method`: the rows carry the
real names as columns and pyarrow refuses a dataset whose partition field repeats a column with another type.
Every file's key-value metadata holds the job spec (`smartkv.job_spec`, JSON) and its status (`smartkv.status`).

A write goes to a hidden temp name in the final directory, is fsynced, then renamed (atomic on POSIX), and the
directory is fsynced: a reader (pandas, pyarrow, `status`) sees either no file or the whole file. pyarrow's
dataset discovery skips names starting with "." or "_", so `pandas.read_parquet(root)` never meets a temp file.
Nothing below the root is opened through a symbolic link (safe_fs.py), the lock included.

`scan` reads every file whole (check.py): only a file the store wrote, intact, in its place, counts as a job's
result; anything else is reported for what it is, skipped by `read`, and its job runs again on the next submit.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from smartkv.bench.redact import redact
from smartkv.bench.results import safe_fs, schema
from smartkv.bench.results.check import META_SPEC, META_STATUS, ResultFile, inspect_file

__all__ = ["LOCK_NAME", "META_SPEC", "META_STATUS", "LockBusy", "ResultFile", "ResultStore", "StoreError",
           "job_status", "partition_value", "rows_to_table"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
REPORT_DIR = "_report"  # "_" keeps it out of pyarrow's dataset discovery
MIN_FREE_BYTES = 64 * 1024 * 1024
_KEY_RE = re.compile(r"[^A-Za-z0-9._-]+")
_JOB_ID_RE = re.compile(r"[0-9a-f]{8,64}")


class StoreError(RuntimeError):
    """The output directory cannot be used (unwritable, full, a planted link) or a write failed."""


class LockBusy(StoreError):
    """Another submit is writing into the same directory."""


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


def partition_of(job: dict) -> tuple[str, str]:
    """The two folder names a job's file lies in (credentials in a model id masked, as everywhere on disk)."""
    return (f"model_key={partition_value(redact(job['model']['name']))}",
            f"method_key={partition_value(redact(job['method']['name']))}")


class ResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------------------------------
    def path_for(self, job: dict) -> Path:
        if not _JOB_ID_RE.fullmatch(str(job["job_id"])):
            raise ValueError(f"job_id must be hex digits, got {job['job_id']!r}")
        return self.root.joinpath(*partition_of(job), f"{job['job_id']}.parquet")

    def files(self) -> Iterator[Path]:
        """Names that look like result files (hidden temp files, links and the lock excluded); not checked."""
        for rel, _, names, fd in safe_fs.walk(self.root):
            for name in names:
                if name.endswith(".parquet") and not safe_fs.is_link(fd, name):
                    yield self.root / rel / name if rel != "." else self.root / name

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
        try:
            _write_bytes_durably(self.root, b"\0" * 65536)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StoreError(f"output directory {self.root} is not writable: {reason}") from None

    def check_targets(self, jobs: list[dict]) -> None:
        """Every pending job's file can be written: its folders are not links or files, its name not a folder."""
        for parts in sorted({partition_of(job) for job in jobs}):
            try:
                with safe_fs.dir_fd(self.root, (), create=False) as root_fd:
                    self._check_partition(root_fd, parts, [j for j in jobs if partition_of(j) == parts])
            except safe_fs.LinkRefused as exc:
                raise StoreError(str(exc)) from None

    def _check_partition(self, root_fd: int, parts: tuple[str, str], jobs: list[dict]) -> None:
        fd, opened, path = root_fd, [], self.root
        try:
            for part in parts:
                path = path / part
                try:
                    fd = safe_fs.open_subdir(fd, part, path, create=False)
                except FileNotFoundError:
                    return
                opened.append(fd)
            for job in jobs:
                name = f"{job['job_id']}.parquet"
                if _is_dir_nofollow(fd, name):
                    raise StoreError(f"{path / name} is a directory where job {job['job_id']}'s result goes; "
                                     "remove it")
        finally:
            for opened_fd in opened:
                os.close(opened_fd)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the directory by one submit. Held by the OS: a killed driver releases it."""
        path = self.root / LOCK_NAME
        with safe_fs.root_fd(self.root) as root_fd:
            try:
                fd = safe_fs.open_regular(root_fd, LOCK_NAME, path, os.O_RDWR | os.O_CREAT, 0o644)
            except safe_fs.LinkRefused as exc:
                raise StoreError(str(exc)) from None
        try:
            if os.fstat(fd).st_nlink != 1:  # a hard link to someone's file: truncating it would clobber that file
                raise StoreError(f"{path} has other hard links; refusing to use it (remove it)")
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
        """Temp files left by a killed driver (call while holding the lock); links are removed, not followed."""
        removed = 0
        for fd, name in safe_fs.hidden_temp_files(self.root):
            try:
                os.unlink(name, dir_fd=fd)
                removed += 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
        return removed

    # -- writing -----------------------------------------------------------------------------------------------
    def write_job(self, job: dict, rows: list[dict]) -> Path:
        """Write one job's rows as <partition>/<job_id>.parquet, atomically; replaces whatever stood there."""
        final = self.path_for(job)
        table = rows_to_table(rows)
        meta = {**(schema.SCHEMA.metadata or {}), META_SPEC: redact(json.dumps(job, sort_keys=True)).encode(),
                META_STATUS: job_status(rows).encode()}
        table = table.replace_schema_metadata(meta)
        try:
            with safe_fs.dir_fd(self.root, partition_of(job), create=True) as fd:
                safe_fs.write_atomic(fd, final.name, final, lambda fh: pq.write_table(
                    table, fh, compression="zstd", write_page_checksum=True))
        except safe_fs.LinkRefused as exc:
            raise StoreError(str(exc)) from None
        return final

    def write_report_files(self, files: dict[str, bytes]) -> Path:
        """Files of the report into `_report/`, each atomically and without following links."""
        folder = self.root / REPORT_DIR
        try:
            with safe_fs.dir_fd(self.root, (REPORT_DIR,), create=True) as fd:
                for name, data in files.items():
                    safe_fs.write_atomic(fd, name, folder / name, lambda fh, data=data: fh.write(data))
        except safe_fs.LinkRefused as exc:
            raise StoreError(str(exc)) from None
        return folder

    # -- reading -----------------------------------------------------------------------------------------------
    def scan(self) -> list[ResultFile]:
        """Every file under the root, each read whole and checked (check.py); problems flagged, never raised."""
        return [f for f, _ in self._inspect_all()]

    def _inspect_all(self) -> Iterator[tuple[ResultFile, pa.Table | None]]:
        for rel, _, names, fd in safe_fs.walk(self.root):
            parts = () if rel == "." else tuple(Path(rel).parts)
            for name in names:
                yield inspect_file(fd, name, self.root.joinpath(*parts, name), parts, partition_of)

    def done(self, retry_failed: bool = False) -> dict[str, ResultFile]:
        """job_id -> usable result file. With retry_failed, jobs whose status is not ok count as not done."""
        return {f.job_id: f for f in self.scan()
                if not f.is_corrupt and (not retry_failed or f.status == "ok")}

    def read(self, columns: list[str] | None = None) -> tuple[pa.Table, list[str]]:
        """Rows of every usable result under the explicit schema (older files gain null columns), and one warning
        line per file skipped (see check.py for what is skipped)."""
        tables, warnings = [], []
        for f, table in self._inspect_all():
            if f.is_corrupt:
                warnings.append(f"skipped {f.path}: {f.problem}")
            else:
                tables.append(table)
        data = pa.concat_tables(tables) if tables else schema.SCHEMA.empty_table()
        return data.select(columns or schema.SCHEMA.names), warnings

    def job_spec(self, path: Path) -> dict:
        parts = path.relative_to(self.root).parts
        with safe_fs.dir_fd(self.root, parts[:-1], create=False) as fd:
            with os.fdopen(safe_fs.open_regular(fd, parts[-1], path), "rb") as fh:
                meta = pq.read_metadata(fh).metadata or {}
        return json.loads(meta[META_SPEC])


def _is_dir_nofollow(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows under the schema, credentials masked in every text cell (model ids and predictions included)."""
    for row in rows:
        for key, value in row.items():
            if isinstance(value, str) and value:
                row[key] = redact(value)
    return pa.Table.from_pylist(rows, schema=schema.SCHEMA)


def job_status(rows: list[dict]) -> str:
    """The job's status: its summary row's, else the worst of its rows."""
    summary = [r for r in rows if r.get("row_kind") == "summary"]
    statuses = [r.get("status") for r in (summary or rows)]
    for status in ("oom", "error"):
        if status in statuses:
            return status
    return "ok" if statuses else "error"


def _write_bytes_durably(folder: Path, data: bytes) -> None:
    """Write and fsync a probe file under a fresh random name (never an existing file, never through a link)."""
    name = f".probe-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    with safe_fs.root_fd(folder) as root_fd:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=root_fd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name, dir_fd=root_fd)
