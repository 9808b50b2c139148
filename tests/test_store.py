"""The results store: atomic per-job files, readable by pandas at any time, explicit schema, safe paths, lock."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smartkv.bench.run import fake_worker
from smartkv.bench.results import schema
from smartkv.bench.results import store as store_mod
from smartkv.bench.spec.grid import load_grid
from smartkv.bench.run.runner import failure_rows
from smartkv.bench.results.store import LockBusy, ResultStore, StoreError, partition_value


@pytest.fixture
def jobs(tiny_grid):
    return load_grid(tiny_grid).jobs


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    return ResultStore(root)


def test_write_is_atomic_and_carries_the_spec(store, jobs):
    job = jobs[0]
    path = store.write_job(job, fake_worker.run_job(job, None))
    assert path.name == f"{job['job_id']}.parquet"
    assert path.parent.name == "method_key=fp16" and path.parent.parent.name == "model_key=tiny-llama"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert store.job_spec(path) == json.loads(json.dumps(job))
    meta = pq.read_metadata(path).metadata
    assert meta[store_mod.META_STATUS] == b"ok"
    assert pq.read_schema(path).remove_metadata().equals(schema.SCHEMA.remove_metadata())


def test_pandas_reads_the_dataset_with_temp_files_lock_and_report_present(store, jobs):
    for job in jobs[:3]:
        store.write_job(job, fake_worker.run_job(job, None))
    part = next(store.root.glob("model_key=*/method_key=*"))
    (part / f".{jobs[5]['job_id']}.parquet.123.tmp").write_bytes(b"PAR1 half a file")
    (part / "_scratch.parquet").write_bytes(b"junk")
    (store.root / ".lock").write_text("pid 1")
    (store.root / "_report").mkdir()
    (store.root / "_report" / "report.md").write_text("| x |")
    frame = pd.read_parquet(store.root)
    assert set(frame["job_id"]) == {j["job_id"] for j in jobs[:3]}
    assert set(frame["row_kind"]) == {"sample", "summary"}
    assert len(frame) == 3 * 3  # 2 samples + 1 summary per job


def test_a_failed_write_leaves_nothing_visible(store, jobs, monkeypatch):
    def explode(table, where, **kwargs):
        where.write(b"PAR1 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", explode)
    with pytest.raises(OSError):
        store.write_job(jobs[0], fake_worker.run_job(jobs[0], None))
    assert list(store.files()) == []
    assert not list(store.root.rglob("*.tmp"))


def test_rewrite_replaces_the_old_file(store, jobs):
    job = jobs[0]
    store.write_job(job, failure_rows(job, "error", "boom"))
    store.write_job(job, fake_worker.run_job(job, None))
    assert [f.status for f in store.scan()] == ["ok"]


def test_older_files_read_under_the_current_schema(store, jobs):
    job = jobs[0]
    path = store.write_job(job, fake_worker.run_job(job, None))
    old = pq.read_table(path).drop_columns(["avg_bits", "extra"])  # as if written before these columns existed
    pq.write_table(old, path)
    table, warnings = store.read()
    assert not warnings
    assert table.schema.names == schema.SCHEMA.names
    assert table.column("avg_bits").null_count == table.num_rows


def test_corrupt_files_are_flagged_skipped_and_not_done(store, jobs):
    good, truncated, garbage = jobs[:3]
    for job in (good, truncated, garbage):
        store.write_job(job, fake_worker.run_job(job, None))
    t_path, g_path = store.path_for(truncated), store.path_for(garbage)
    t_path.write_bytes(t_path.read_bytes()[: t_path.stat().st_size // 2])
    g_path.write_bytes(b"not parquet at all")
    corrupt = {f.job_id for f in store.scan() if f.is_corrupt}
    assert corrupt == {truncated["job_id"], garbage["job_id"]}
    assert set(store.done()) == {good["job_id"]}
    table, warnings = store.read()
    assert set(table.column("job_id").to_pylist()) == {good["job_id"]}
    assert len(warnings) == 2 and all("not a readable Parquet file" in w for w in warnings)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path/model", "org/name", ".hidden", "a b$c", "..",
                                  "x" * 300, "123", "ünïcode"])
def test_partition_values_are_safe(name):
    key = partition_value(name)
    assert "/" not in key and "\\" not in key and not key.startswith((".", "_", "-"))
    assert len(key) <= 80 and key[0].isalpha()
    assert partition_value(name) == key


def test_names_from_grids_cannot_escape_the_root(store, jobs):
    job = json.loads(json.dumps(jobs[0]))
    job["model"]["name"] = "../../../../tmp/evil"
    job["method"]["name"] = "/etc"
    path = store.write_job(job, fake_worker.run_job(job, None))
    assert path.resolve().is_relative_to(store.root.resolve())
    job["job_id"] = "../escape"
    with pytest.raises(ValueError, match="hex"):
        store.path_for(job)


def test_distinct_names_never_share_a_partition():
    assert partition_value("org/model") != partition_value("org_model")


def test_lock_refuses_a_second_writer_and_names_the_holder(store):
    with store.lock():
        with pytest.raises(LockBusy, match=f"pid {os.getpid()}"):
            with store.lock():
                pass
    with store.lock():  # released
        pass


def test_lock_of_a_killed_process_is_released(store):
    code = ("import sys, time; from smartkv.bench.results.store import ResultStore\n"
            "with ResultStore(sys.argv[1]).lock():\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockBusy):
            with store.lock():
                pass
        proc.kill()
        proc.wait(10)
        with store.lock():
            pass
    finally:
        proc.kill()


def test_preflight_refuses_a_full_disk(store, monkeypatch):
    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024 * 1024))
    with pytest.raises(StoreError, match="MiB free"):
        store.preflight()


def test_preflight_refuses_when_writing_fails(store, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_write_bytes_durably", full)
    with pytest.raises(StoreError, match="disk is full"):
        store.preflight()
    assert not list(store.root.iterdir())


def test_stale_temp_files_are_removed(store, jobs):
    store.write_job(jobs[0], fake_worker.run_job(jobs[0], None))
    tmp = store.path_for(jobs[1]).parent / f".{jobs[1]['job_id']}.parquet.999.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(b"half")
    assert store.remove_stale_temp_files() == 1
    assert not tmp.exists() and len(list(store.files())) == 1


def test_secrets_never_reach_result_files(store, jobs, monkeypatch):
    token = "hf_" + "Abc123" * 6
    monkeypatch.setenv("HF_TOKEN", token)
    job = jobs[0]
    path = store.write_job(job, failure_rows(job, "error", f"401 for https://hub/x?token={token} and hf_{'Z' * 30}"))
    blob = path.read_bytes()
    assert token.encode() not in blob and b"hf_ZZZZ" not in blob
    table, _ = store.read(["error"])
    assert "***" in table.column("error")[0].as_py()


def test_status_comes_from_the_summary_row(jobs):
    job = jobs[0]
    rows = fake_worker.run_job(job, None)
    assert store_mod.job_status(rows) == "ok"
    assert store_mod.job_status(failure_rows(job, "oom", "CUDA out of memory")) == "oom"
    assert store_mod.job_status([]) == "error"


def test_empty_store_reads_as_empty_table(tmp_path):
    table, warnings = ResultStore(tmp_path / "none").read()
    assert table.num_rows == 0 and table.schema.names == schema.SCHEMA.names and not warnings
    assert isinstance(table, pa.Table)
