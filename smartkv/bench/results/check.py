"""What a file in the results folder is: a result the store wrote (read whole, so damaged data pages show), or
something else, named for what it is.

A file counts as a job's result only if all of these hold; the first that fails is its `problem`:
  regular file (not a link, FIFO, directory)  -> else "a symbolic link, not followed" / "not a regular file"
  a Parquet footer that reads                 -> else "not a readable Parquet file (...)"
  the store's job spec in the footer          -> else "a Parquet file not written by smartkv-bench"
  every known column with the store's type    -> else "foreign schema: column x is T, smartkv-bench writes U"
  every data page decodes (checksums too)     -> else "damaged data pages (...)"
  rows of the job its name says, one summary  -> else "inconsistent rows (...)"
  the current job spec version                -> else "written under job spec version N ..." (ids changed)
  in its job's partition folder               -> else "misplaced: ... belongs in ..."
Names that are not `<hex job id>.parquet` two folders down are "stray files".
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from smartkv.bench.results import schema
from smartkv.bench.spec.grid import SPEC_VERSION
from smartkv.bench.results.safe_fs import LinkRefused, open_regular

META_SPEC = b"smartkv.job_spec"
META_STATUS = b"smartkv.status"
JOB_FILE_RE = re.compile(r"^([0-9a-f]{8,64})\.parquet$")
REQUIRED = ("job_id", "row_kind", "status")


@dataclass(frozen=True)
class ResultFile:
    job_id: str | None          # from the file name (None for a stray name)
    path: Path
    status: str | None          # "ok" | "error" | "oom" from the summary row; None when not a usable result
    problem: str | None = None  # what the file is, when it is not a usable result
    summary: dict | None = None  # the summary row (provenance columns included)

    @property
    def is_corrupt(self) -> bool:
        """Not a usable result: damaged, foreign, misplaced, a link, a stray file."""
        return self.problem is not None


class _Bad(Exception):
    pass


def inspect_file(parent_fd: int, name: str, path: Path, rel_parts: tuple[str, ...], expected_dir) \
        -> tuple[ResultFile, pa.Table | None]:
    """(ResultFile, the rows under schema.SCHEMA, or None) for `name` in the folder `parent_fd` (at `rel_parts`
    below the root). `expected_dir(spec)` gives the partition folder (a tuple of names) a job spec belongs in."""
    match = JOB_FILE_RE.match(name)
    job_id = match.group(1) if match else None
    try:
        fd = open_regular(parent_fd, name, path)
    except LinkRefused as exc:
        what = "a symbolic link, not followed" if "symbolic link" in str(exc) else "not a regular file"
        return ResultFile(job_id, path, None, what), None
    except OSError as exc:
        return ResultFile(job_id, path, None, f"unreadable ({exc.strerror or exc})"), None
    with os.fdopen(fd, "rb") as fh:
        if job_id is None or len(rel_parts) != 2:
            return ResultFile(job_id, path, None, _stray(fh, rel_parts)), None
        try:
            table, summary, spec = _read_result(fh, job_id)
        except _Bad as bad:
            return ResultFile(job_id, path, None, str(bad)), None
    if tuple(expected_dir(spec)) != rel_parts:
        where = "/".join(expected_dir(spec))
        return ResultFile(job_id, path, None, f"misplaced: a result of job {job_id} that belongs in {where}/"), None
    return ResultFile(job_id, path, summary.get("status"), None, summary), table


def _stray(fh, rel_parts: tuple[str, ...]) -> str:
    is_parquet = fh.read(4) == b"PAR1"
    where = "two folders down (model_key=.../method_key=...)" if len(rel_parts) != 2 else "named <job id>.parquet"
    return f"stray {'Parquet ' if is_parquet else ''}file: not a result file (results lie {where})"


def _read_result(fh, job_id: str) -> tuple[pa.Table, dict, dict]:
    try:
        parquet = pq.ParquetFile(fh, page_checksum_verification=True)
        meta = parquet.schema_arrow.metadata or {}
    except Exception as exc:  # pyarrow raises several types for a bad footer; all mean the same here
        raise _Bad(f"not a readable Parquet file ({_short(exc)})") from None
    if META_SPEC not in meta:
        raise _Bad("a Parquet file not written by smartkv-bench (no job spec in its metadata)")
    _check_schema(parquet.schema_arrow)
    try:
        spec = json.loads(meta[META_SPEC])
        raw = parquet.read()
    except Exception as exc:
        raise _Bad(f"damaged data pages ({_short(exc)})") from None
    table = conform(raw)
    summary = _check_rows(table, job_id, spec)
    if spec.get("spec_version") != SPEC_VERSION:
        raise _Bad(f"written under job spec version {spec.get('spec_version')} (now {SPEC_VERSION}: job ids "
                   "changed); its job runs again under its new id")
    return table, summary, spec


def _check_schema(file_schema: pa.Schema) -> None:
    for name in REQUIRED:
        if file_schema.get_field_index(name) < 0:
            raise _Bad(f"foreign schema: no column {name!r}")
    for field in file_schema:
        expected = schema.COLUMNS.get(field.name)
        if expected is not None and not field.type.equals(expected):
            raise _Bad(f"foreign schema: column {field.name!r} is {field.type}, smartkv-bench writes {expected}")


def conform(table: pa.Table) -> pa.Table:
    """The rows under schema.SCHEMA: columns in order, those an older file lacks as nulls, unknown ones dropped."""
    columns = [table.column(name) if name in table.column_names else pa.nulls(table.num_rows, typ)
               for name, typ in schema.COLUMNS.items()]
    return pa.Table.from_arrays(columns, schema=schema.SCHEMA)


def _check_rows(table: pa.Table, job_id: str, spec: dict) -> dict:
    ids = set(table.column("job_id").to_pylist())
    if ids != {job_id} or spec.get("job_id") != job_id:
        raise _Bad(f"inconsistent rows: the name says job {job_id}, the rows say {sorted(map(str, ids))[:3]}")
    kinds = table.column("row_kind").to_pylist()
    if kinds.count("summary") != 1:
        raise _Bad(f"inconsistent rows: {kinds.count('summary')} summary rows, the store writes one")
    summary = table.slice(kinds.index("summary"), 1).to_pylist()[0]
    if summary["status"] not in schema.STATUSES:
        raise _Bad(f"inconsistent rows: status {summary['status']!r}, expected one of {schema.STATUSES}")
    return summary


def _short(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else exc.__class__.__name__
