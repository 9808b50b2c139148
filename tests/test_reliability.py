"""Fault injection on a real local Ray (fake worker, bounded in time): every job ends up in the dataset exactly
once, the dataset stays readable, and each fault gives a clear outcome. docs/reliability.md explains each one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from smartkv.bench.results import store as store_mod
from smartkv.bench.cli import app
from smartkv.bench.run.executor import ExecConfig
from smartkv.bench.spec.grid import load_grid
from smartkv.bench.results.store import ResultStore
from smartkv.bench.submit import make_plan, submit

runner = CliRunner()
pytestmark = pytest.mark.slow

GRID = """\
name: faults
models: [tiny-llama]
methods: {{fp16: {{}}, int8: {{}}, int4: {{}}, smartkv: {{budget: [3, 4, 6]}}}}
prompt_sets:
  passkey: {{length: {length}, num_samples: 2}}
"""


def _grid(write_grid, lengths="[256, 512]") -> Path:
    return write_grid(GRID.format(length=lengths), "faults.yaml")


def _assert_each_job_once(root: Path, jobs: list[dict]) -> pd.DataFrame:
    files = ResultStore(root).scan()
    assert sorted(f.job_id for f in files) == sorted(j["job_id"] for j in jobs)
    assert not any(f.is_corrupt for f in files)
    frame = pd.read_parquet(root)
    per_job = frame.groupby("job_id")["row_kind"].value_counts().unstack(fill_value=0)
    assert (per_job["summary"] == 1).all()
    return frame


class Reader(threading.Thread):
    """Reads the dataset with pandas in a loop, as a user would during a run; records any failure."""

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.errors, self.reads, self.stop = root, [], 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if any(self.root.glob("model_key=*/method_key=*/*.parquet")):
                try:
                    pd.read_parquet(self.root)
                    self.reads += 1
                except Exception as exc:  # any failure to read is what this test exists to catch
                    self.errors.append(repr(exc))
            time.sleep(0.02)


def _started(faults: Path) -> list[tuple[str, int]]:
    out = []
    for marker in faults.glob("started-*"):
        _, job_id, pid = marker.name.split("-")
        out.append((job_id, int(pid)))
    return out


def test_killed_worker_process_is_replaced_and_its_job_retried(ray_session, write_grid, fake_worker, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("SMARTKV_FAKE_SLEEP_S", "1.5")
    plan = make_plan(_grid(write_grid, "[256]"), tmp_path / "out")
    victim: dict = {}

    def kill_first_started():
        deadline = time.time() + 120
        while time.time() < deadline and not victim:
            started = _started(fake_worker)
            if started:
                victim["job_id"], victim["pid"] = started[0]
                os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_started, daemon=True)
    reader = Reader(tmp_path / "out")
    killer.start(), reader.start()
    result = submit(plan, ExecConfig(workers=2, poll_s=0.1))
    reader.stop.set()
    assert victim, "no job started"
    assert result.stats.restarts >= 1 and result.stats.retried >= 1
    assert result.stats.statuses == {"ok": len(plan.grid.jobs)}
    _assert_each_job_once(tmp_path / "out", plan.grid.jobs)
    assert [j for j, _ in _started(fake_worker)].count(victim["job_id"]) == 2  # ran again after the kill
    assert reader.errors == []


def test_a_job_that_keeps_killing_its_worker_fails_after_bounded_attempts(ray_session, write_grid, fake_worker,
                                                                         tmp_path):
    plan = make_plan(_grid(write_grid, "[256]"), tmp_path / "out")
    doomed = plan.grid.jobs[0]["job_id"]
    for i in range(5):
        (fake_worker / f"exit-{doomed}.{i}").touch()
    result = submit(plan, ExecConfig(workers=1, max_attempts=2, poll_s=0.1))
    assert result.stats.statuses == {"ok": len(plan.grid.jobs) - 1, "error": 1}
    frame = _assert_each_job_once(tmp_path / "out", plan.grid.jobs)
    error = frame.loc[frame["job_id"] == doomed, "error"].dropna().item()
    assert "worker died 2 times" in error
    assert len(list(fake_worker.glob(f"claimed-exit-{doomed}*"))) == 2  # exactly max_attempts tries


def test_driver_sigkill_then_resubmit_completes_exactly_once(ray_session, write_grid, fake_worker, tmp_path):
    grid = _grid(write_grid, "[256]")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SMARTKV_FAKE_SLEEP_S="0.8", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    reader = Reader(out)
    reader.start()
    proc = subprocess.Popen([sys.executable, "-m", "smartkv.bench.cli", "submit", "--grid", str(grid), "--out",
                             str(out), "--workers", "1", "--no-progress"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(list(ResultStore(out).files())) < 2:
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        try:  # the driver's own Ray processes (same session), so nothing outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_before = len(list(ResultStore(out).files()))
    jobs = load_grid(grid).jobs
    assert 2 <= done_before < len(jobs)
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--workers", "2",
                                 "--no-progress"])
    reader.stop.set()
    assert result.exit_code == 0, result.output
    assert f"ran {len(jobs) - done_before} jobs" in result.stdout
    _assert_each_job_once(out, jobs)
    assert reader.errors == [] and reader.reads > 0
    again = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out)])
    assert again.exit_code == 0 and "Nothing to run" in again.stdout


def test_driver_sigterm_stops_cleanly(write_grid, fake_worker, tmp_path):
    """`kill` (SIGTERM) of a driver using Ray: exit 130 with a resume hint, Ray shut down, results intact."""
    grid, out = _grid(write_grid, "[256]"), tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(SMARTKV_FAKE_SLEEP_S="1.0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen([sys.executable, "-m", "smartkv.bench.cli", "submit", "--grid", str(grid), "--out",
                             str(out), "--workers", "1", "--no-progress"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list(ResultStore(out).files()):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "submit again to resume" in err
    assert list(ResultStore(out).files()) and not list(out.rglob("*.tmp"))
    pd.read_parquet(out)


def test_corrupt_result_file_is_reported_skipped_and_rerun(write_grid, fake_worker, tmp_path):
    grid, out = _grid(write_grid), tmp_path / "out"
    assert runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"]).exit_code == 0
    files = sorted(ResultStore(out).files())
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    files[1].write_bytes(b"garbage")                     # overwritten
    status = runner.invoke(app, ["status", str(grid), "--out", str(out)])
    assert status.exit_code == 0
    assert status.stderr.count("not a readable Parquet file") == 2 and files[0].stem in status.stderr
    assert status.stderr.count("the next submit reruns job") == 2
    report = runner.invoke(app, ["report", str(out), "--format", "csv"])
    assert report.exit_code == 0 and report.stderr.count("warning: skipped ") == 2
    rerun = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"])
    assert rerun.exit_code == 0 and "ran 2 jobs (2 ok)" in rerun.stdout
    _assert_each_job_once(out, load_grid(grid).jobs)


def test_deleting_a_result_file_reruns_exactly_that_job(write_grid, fake_worker, tmp_path):
    grid, out = _grid(write_grid), tmp_path / "out"
    assert runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"]).exit_code == 0
    victim = sorted(ResultStore(out).files())[3]
    victim.unlink()
    for marker in fake_worker.glob("started-*"):
        marker.unlink()
    rerun = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"])
    assert rerun.exit_code == 0 and "ran 1 jobs" in rerun.stdout
    assert [job_id for job_id, _ in _started(fake_worker)] == [victim.stem]
    _assert_each_job_once(out, load_grid(grid).jobs)


def test_cuda_oom_becomes_an_oom_row_and_the_grid_continues(ray_session, write_grid, fake_worker, tmp_path):
    grid, out = _grid(write_grid, "[256]"), tmp_path / "out"
    jobs = load_grid(grid).jobs
    (fake_worker / f"oom-{jobs[2]['job_id']}").touch()
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "1 oom" in result.stdout and f"{len(jobs) - 1} ok" in result.stdout
    frame = _assert_each_job_once(out, jobs)
    row = frame[(frame["job_id"] == jobs[2]["job_id"]) & (frame["row_kind"] == "summary")].iloc[0]
    assert row["status"] == "oom" and "CUDA out of memory" in row["error"]


def test_full_output_directory_is_refused_before_any_job(write_grid, fake_worker, tmp_path, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 * 2**20))
    result = runner.invoke(app, ["submit", "--grid", str(_grid(write_grid)), "--out", str(tmp_path / "o"), "--local"])
    assert result.exit_code == 2 and "10 MiB free" in result.stderr
    assert not list(fake_worker.glob("started-*"))


def test_disk_full_mid_run_stops_cleanly_and_resumes(write_grid, fake_worker, tmp_path, monkeypatch):
    grid, out = _grid(write_grid), tmp_path / "out"
    real_replace, calls = os.replace, []

    def replace(src, dst, **fds):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, **fds)

    monkeypatch.setattr(store_mod.os, "replace", replace)
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"])
    assert result.exit_code == 1 and "No space left on device" in result.stderr and "2 jobs were saved" in result.stderr
    assert len(list(ResultStore(out).files())) == 2 and not list(out.rglob("*.tmp"))
    pd.read_parquet(out)  # what was written is intact
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local"]).exit_code == 0
    _assert_each_job_once(out, load_grid(grid).jobs)


def test_two_submits_into_one_directory(write_grid, fake_worker, tmp_path):
    grid, out = _grid(write_grid), tmp_path / "out"
    env = dict(os.environ, SMARTKV_FAKE_SLEEP_S="0.25")
    cmd = [sys.executable, "-m", "smartkv.bench.cli", "submit", "--grid", str(grid), "--out", str(out), "--local",
           "--no-progress"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    text = "\n".join(o + e for o, e in outputs)
    if codes == [0, 1]:
        # the holder's pid, or "another process" when the second one looked between the first's lock and its write
        assert "is in use by another submit (pid " in text or "is in use by another submit (another process)" in text
    else:  # the second one started after the first had finished
        assert codes == [0, 0] and "Nothing to run" in text
    _assert_each_job_once(out, load_grid(grid).jobs)


def test_tokens_in_the_environment_never_reach_results(write_grid, fake_worker, tmp_path, monkeypatch):
    token = "hf_" + "SeCrEt0" * 5
    monkeypatch.setenv("HF_TOKEN", token)
    grid, out = _grid(write_grid, "[256]"), tmp_path / "out"
    (fake_worker / "raise-any").touch()
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local", "-v"])
    assert result.exit_code == 1 and "1 jobs failed" in result.stderr
    assert token not in result.output
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert "***" in " ".join(pd.read_parquet(out)["error"].dropna())
