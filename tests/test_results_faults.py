"""Faults planted in a results folder, through the CLI (in-process runs, the fake worker): links are never followed
(lock, partition folders, result files, report files, temp and probe names), and anything the store did not write
(foreign Parquet, damaged data pages, stray files, FIFOs, misplaced copies) is reported by `status` for what it is,
skipped by `report` with one warning line, and rerun by `submit` when it stands where a job's result goes."""
from __future__ import annotations

import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from smartkv.bench.cli import app
from smartkv.bench.results.store import ResultStore
from smartkv.bench.spec.grid import load_grid

runner = CliRunner()

GRID = """\
name: planted
models: [tiny-llama]
methods: [fp16, int8, int4]
prompt_sets:
  passkey: {length: 256, num_samples: 2}
"""


@pytest.fixture
def setup(write_grid, fake_worker, tmp_path):
    """(grid path, results folder, jobs, a victim file outside the folder that must never change)."""
    grid = write_grid(GRID, "planted.yaml")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return grid, tmp_path / "out", load_grid(grid).jobs, victim


def _submit(grid, out, *extra):
    return runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local", "--no-progress",
                               *extra])


def _status(grid, out):
    result = runner.invoke(app, ["status", str(grid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning: ")]


def _report_warnings(out):
    result = runner.invoke(app, ["report", str(out), "--format", "csv"])
    assert result.exit_code == 0, result.output
    return [ln for ln in result.stderr.splitlines() if ln.strip()], result.stdout


def _ran(result) -> str:
    return next((ln for ln in result.stdout.splitlines() if ln.startswith(("ran ", "Nothing to run"))), "")


def _rows_once(out, jobs) -> pd.DataFrame:
    frame = ResultStore(out).read()[0].to_pandas()
    assert sorted(frame["job_id"].unique()) == sorted(j["job_id"] for j in jobs)
    assert frame.groupby(["job_id", "row_kind", "sample_id"], dropna=False).size().eq(1).all()
    return frame


# -- links ------------------------------------------------------------------------------------------------------

def test_a_linked_lock_is_refused_and_its_target_untouched(setup):
    grid, out, jobs, victim = setup
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    result = _submit(grid, out)
    assert result.exit_code != 0 and "symbolic link" in result.stderr
    assert victim.read_text() == "precious\n" and not list(ResultStore(out).files())


def test_a_hard_linked_lock_is_refused(setup):
    grid, out, jobs, victim = setup
    out.mkdir()
    os.link(victim, out / ".lock")
    result = _submit(grid, out)
    assert result.exit_code != 0 and "hard links" in result.stderr
    assert victim.read_text() == "precious\n"


def test_a_linked_partition_folder_is_refused_before_any_job(setup, fake_worker, tmp_path):
    grid, out, jobs, victim = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "model_key=tiny-llama").symlink_to(elsewhere)
    result = _submit(grid, out)
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert list(elsewhere.iterdir()) == [] and not list(fake_worker.glob("started-*"))


def test_a_linked_result_file_is_reported_and_replaced_not_followed(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    target = ResultStore(out).path_for(jobs[0])
    target.unlink()
    target.symlink_to(victim)
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "a symbolic link, not followed" in warnings[0] and "reruns job" in warnings[0]
    lines, _ = _report_warnings(out)
    assert len(lines) == 1 and "symbolic link" in lines[0]
    rerun = _submit(grid, out)
    assert rerun.exit_code == 0 and _ran(rerun).startswith("ran 1 jobs")
    assert not target.is_symlink() and victim.read_text() == "precious\n"
    _rows_once(out, jobs)


def test_report_files_and_temp_names_are_never_followed(setup, tmp_path):
    grid, out, jobs, victim = setup
    (out / "_report").mkdir(parents=True)
    (out / "_report" / "report.md").symlink_to(victim)
    (out / f".probe-{os.getpid()}.tmp").symlink_to(victim)             # the probe's old, predictable name
    part = ResultStore(out).path_for(jobs[0]).parent
    part.mkdir(parents=True)
    (part / f".{jobs[0]['job_id']}.parquet.{os.getpid()}.tmp").symlink_to(victim)  # a "stale temp file"
    result = _submit(grid, out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious\n"
    assert not (out / "_report" / "report.md").is_symlink() and "| method" not in victim.read_text()
    assert not list(out.rglob("*.tmp"))


def test_a_linked_report_folder_is_not_written_through(setup, tmp_path):
    grid, out, jobs, victim = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "_report").symlink_to(elsewhere)
    result = _submit(grid, out)
    assert result.exit_code == 0 and "symbolic link" in result.stderr  # the results are fine; the report is not
    assert list(elsewhere.iterdir()) == []


# -- files the store did not write ---------------------------------------------------------------------------------

def _damage_data_pages(path):
    """Overwrite bytes in the middle of the data pages, leaving the footer (schema, metadata) intact."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    middle = (4 + len(data) - 8 - footer) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert pq.read_metadata(path).num_rows == 3  # the footer still reads: only a full read finds the damage


def test_damaged_data_pages_are_reported_skipped_and_rerun(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    target = ResultStore(out).path_for(jobs[1])
    _damage_data_pages(target)
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "damaged data pages" in warnings[0] and f"reruns job {jobs[1]['job_id']}" \
        in warnings[0]
    lines, csv = _report_warnings(out)
    assert len(lines) == 1 and "damaged data pages" in lines[0]
    rerun = _submit(grid, out)
    assert rerun.exit_code == 0 and _ran(rerun).startswith("ran 1 jobs")
    _rows_once(out, jobs)


def test_a_foreign_parquet_file_is_named_skipped_and_never_crashes_report(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    target = ResultStore(out).path_for(jobs[2])
    pq.write_table(pa.table({"job_id": [1, 2], "score": ["high", "low"]}), target)  # valid Parquet, other schema
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "not written by smartkv-bench" in warnings[0] and "reruns job" in warnings[0]
    lines, _ = _report_warnings(out)
    assert len(lines) == 1 and "not written by smartkv-bench" in lines[0]
    rerun = _submit(grid, out)
    assert rerun.exit_code == 0 and _ran(rerun).startswith("ran 1 jobs"), rerun.output
    _rows_once(out, jobs)


def test_a_retyped_column_is_a_foreign_schema(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    target = ResultStore(out).path_for(jobs[0])
    table = pq.read_table(target)
    table = table.set_column(table.schema.get_field_index("seed"), "seed", pa.array(["zero"] * table.num_rows))
    pq.write_table(table, target)
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "foreign schema: column 'seed' is string" in warnings[0]
    nothing = _submit(grid, out, "--dry-run")
    assert "2 done, 1 to run" in nothing.stdout


def test_stray_files_are_named_and_skipped_with_one_line_each(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    part = ResultStore(out).path_for(jobs[0]).parent
    (out / "notes.txt").write_text("my notes")
    (part / "readme.md").write_text("hi")
    shutil.copy(ResultStore(out).path_for(jobs[0]), out / "copy.parquet")
    warnings = _status(grid, out)
    assert len(warnings) == 3 and all("stray" in w and "report and submit skip it" in w for w in warnings)
    lines, csv = _report_warnings(out)
    assert len(lines) == 3
    again = _submit(grid, out)
    assert again.exit_code == 0 and "Nothing to run" in again.stdout


def test_a_misplaced_copy_is_not_counted_twice(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    store = ResultStore(out)
    source = store.path_for(jobs[0])
    other = store.path_for(jobs[1]).parent / source.name
    shutil.copy(source, other)
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "misplaced" in warnings[0]
    _rows_once(out, jobs)


def test_a_fifo_where_a_result_goes_is_rerun_without_hanging(setup):
    grid, out, jobs, victim = setup
    assert _submit(grid, out).exit_code == 0
    target = ResultStore(out).path_for(jobs[0])
    target.unlink()
    os.mkfifo(target)
    warnings = _status(grid, out)
    assert len(warnings) == 1 and "not a regular file" in warnings[0]
    rerun = _submit(grid, out)
    assert rerun.exit_code == 0 and _ran(rerun).startswith("ran 1 jobs")
    _rows_once(out, jobs)


def test_a_folder_where_a_result_goes_is_refused_before_any_job(setup, fake_worker):
    grid, out, jobs, victim = setup
    target = ResultStore(out).path_for(jobs[0])
    target.mkdir(parents=True)
    result = _submit(grid, out)
    assert result.exit_code == 2 and "is a directory where job" in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1
    assert not list(fake_worker.glob("started-*"))
