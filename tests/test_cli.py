"""The CLI through Typer's test runner: exit codes, dry run, resume, status, ls, help."""
from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from smartkv.bench import submit as submit_lib
from smartkv.bench.cli import app
from smartkv.bench.spec.grid import load_grid

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_submit_dry_run_lists_jobs_and_writes_nothing(workdir, tiny_grid):
    result = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--dry-run"])
    assert result.exit_code == 0, result.output
    jobs = load_grid(tiny_grid).jobs
    assert all(j["job_id"] in result.stdout for j in jobs)
    assert "8 jobs, 0 done, 8 to run" in result.stdout
    assert not (workdir / "results").exists()


def test_submit_then_resume_then_force(workdir, tiny_grid, fake_worker):
    first = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local"])
    assert first.exit_code == 0, first.output
    assert "ran 8 jobs (8 ok)" in first.stdout and "smartkv(budget=3)" in first.stdout
    root = workdir / "results" / "tiny"
    assert len(list(root.rglob("*.parquet"))) == 8
    assert (root / "_report" / "report.md").exists() and (root / "_report" / "report.csv").exists()
    second = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local"])
    assert second.exit_code == 0 and "Nothing to run: all 8 jobs" in second.stdout
    dry = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--dry-run"])
    assert "8 jobs, 8 done, 0 to run" in dry.stdout
    forced = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local", "--force"])
    assert forced.exit_code == 0 and "ran 8 jobs" in forced.stdout
    assert len(list(root.rglob("*.parquet"))) == 8


def test_failed_jobs_give_exit_1_and_retry_failed_reruns_them(workdir, tiny_grid, fake_worker):
    job = load_grid(tiny_grid).jobs[0]
    (fake_worker / f"raise-{job['job_id']}").touch()
    result = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local"])
    assert result.exit_code == 1 and "1 jobs failed" in result.stderr
    status = runner.invoke(app, ["status", str(tiny_grid)])
    assert status.exit_code == 0
    row = next(line for line in status.stdout.splitlines() if " tiny " in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[:8] == ["tiny", "8", "8", "7", "1", "0", "0", "0"]  # jobs done ok error oom pending corrupt
    plain = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local"])
    assert "Nothing to run" in plain.stdout
    retry = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--local", "--retry-failed"])
    assert retry.exit_code == 0 and "ran 1 jobs (1 ok)" in retry.stdout


def test_status_defaults_to_jobs_folder(workdir, tiny_grid, fake_worker):
    (workdir / "jobs").mkdir()
    (workdir / "jobs" / "tiny.yaml").write_text(tiny_grid.read_text())
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0 and "tiny" in result.stdout and "results/tiny" in result.stdout


def test_submit_passes_options_to_the_executor(workdir, tiny_grid, monkeypatch):
    seen = {}

    def fake_submit(plan, config, **kwargs):
        seen.update(config=config, kwargs=kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(submit_lib, "submit", fake_submit)
    monkeypatch.setattr(submit_lib, "check_ready", lambda plan, config: None)
    result = runner.invoke(app, ["submit", "--grid", str(tiny_grid), "--address", "auto", "--workers", "3",
                                 "--cpus-per-worker", "2", "--max-inflight", "5", "--max-attempts", "4",
                                 "--workers-per-gpu", "4", "--out", "elsewhere", "--no-progress"])
    assert result.exit_code == 130 and "submit again to resume" in result.stderr
    cfg = seen["config"]
    assert (cfg.address, cfg.workers, cfg.cpus_per_worker, cfg.max_inflight, cfg.max_attempts, cfg.local,
            cfg.workers_per_gpu) == ("auto", 3, 2, 5, 4, False, 4)


def test_ls_lists_methods_sets_and_models():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    for name in ("fp16", "int8", "int4", "kivi", "smartkv", "passkey", "longbench:qasper", "smollm2", "gemma3",
                 "tiny-llama", "tiny-gemma3"):
        assert name in result.stdout


def test_help_documents_every_option():
    result = runner.invoke(app, ["submit", "--help"])
    assert result.exit_code == 0
    for option in ("--grid", "--address", "--out", "--force", "--dry-run", "--max-inflight", "--local", "--workers",
                   "--cpus-per-worker", "--workers-per-gpu", "--retry-failed", "--rerun-stale"):
        assert option in result.stdout
    assert runner.invoke(app, ["report", "--help"]).exit_code == 0


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "smartkv.bench.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "submit" in out.stdout and "report" in out.stdout


def test_live_progress_view_renders_workers_and_eta():
    from io import StringIO

    from rich.console import Console

    from smartkv.bench.cli import ProgressView
    from smartkv.bench.progress import Progress

    state = Progress()
    state.start(total=4, total_cost=4.0)
    state.slot("worker-0").current = "smollm2 kivi passkey r0"
    state.finished("worker-0", "ok", 1.0)
    state.finished("worker-1", "oom", 1.0)
    state.note("worker-1 died while running x")
    buffer = StringIO()
    view = ProgressView(Console(file=buffer, force_terminal=True, width=160), live=True)
    with view:
        view.update(state)
    text = buffer.getvalue()
    for part in ("jobs 2/4 done", "1 oom", "ETA", "worker-0", "smollm2 kivi passkey r0", "died while running"):
        assert part in text, text


@pytest.mark.parametrize("args,field", [(["--ctx", "10"], "--ctx"), (["--decode", "0"], "--decode"),
                                        (["--budget", "9"], "--budget")])
def test_analyze_refuses_bad_options_before_loading_a_model(args, field, tmp_path):
    result = runner.invoke(app, ["analyze", *args, "--out", str(tmp_path / "plots")])
    assert result.exit_code == 2
    assert field in result.output
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_analyze_writes_plots_and_a_table(tmp_path):
    result = runner.invoke(app, ["analyze", "--ctx", "128", "--decode", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["attention_stats.png", "smartkv_bits.png"]
    assert "| 29 |" in result.output  # one row per layer of the embedded model (30 layers)
