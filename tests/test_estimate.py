"""submit --dry-run's cost estimate: rates fitted from rows, token counts, sums per method, store vs calibration."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from smartkv.bench import estimate
from smartkv.bench.cli import app
from smartkv.bench.results import schema
from smartkv.bench.results.store import ResultStore
from smartkv.bench.run import fake_worker
from smartkv.bench.spec.grid import load_grid

runner = CliRunner()


def sample_rows(contexts, prefill_per_token, decode_line, **ident) -> pd.DataFrame:
    return pd.DataFrame([schema.empty_row(row_kind="sample", status="ok", context_tokens=c, prefill_ms=c * p,
                                          decode_ms_per_token=decode_line[0] + decode_line[1] * c, **ident)
                         for c, p in zip(contexts, prefill_per_token)])


def test_rates_interpolate_prefill_and_fit_a_line_to_decode():
    rate = estimate.fit_rate(sample_rows([100, 200, 200], [0.1, 0.2, 0.2], (1.0, 0.01)), "test")
    assert rate.prefill_ms(150) == pytest.approx(150 * 0.15)
    assert rate.prefill_ms(400) == pytest.approx(400 * 0.2)      # clamped past the measured range
    assert rate.decode_ms_per_token(300) == pytest.approx(4.0)   # the line, extended
    assert not rate.extrapolated(300) and rate.extrapolated(1000)
    flat = estimate.fit_rate(sample_rows([100, 100], [0.1, 0.1], (2.0, 0.0)), "one context")
    assert flat.decode_ms_per_token(10_000) == pytest.approx(2.0)


def test_estimate_sums_samples_warm_up_passes_and_the_fp16_reference(write_grid):
    grid = load_grid(write_grid("""\
        models: [tiny-llama]
        methods: {fp16: {}, int4: {}}
        prompt_sets: {passkey: {length: 300, num_samples: 3}}
        generation: {max_new_tokens: 10}
        """))
    rate = estimate.Rate([300.0], [0.5], (2.0, 0.0), "test")   # 150 ms a prompt, 2 ms a token
    rates = {("tiny-llama", "fp16"): rate, ("tiny-llama", "int4"): rate}
    lines = estimate.estimate(grid.jobs, rates, pd.DataFrame())
    per_sample = (150 + 10 * 2) / 1000
    # the timed samples and the warm-up's run of the first (`generation.warmup`, 1 by default)
    assert lines["fp16"].seconds == pytest.approx((3 + 1) * per_sample) and lines["fp16"].samples == 3
    assert lines["int4"].seconds == pytest.approx((3 + 1) * 2 * per_sample)    # compared with fp16: two passes
    assert lines["fp16 reference"].seconds == pytest.approx(3 * per_sample)
    assert lines["int4"].prefill_tokens == 3 * 2 * 300 and lines["int4"].decode_tokens == 3 * 2 * 10
    unknown = estimate.estimate(grid.jobs, {}, pd.DataFrame())
    assert unknown["int4"].unknown_jobs == 1 and unknown["int4"].seconds == 0


def test_measured_token_counts_win_over_options(write_grid):
    job = load_grid(write_grid("""\
        models: [tiny-llama]
        methods: {int4: {}}
        prompt_sets: {passkey: {length: 300, num_samples: 3}}
        """)).jobs[0]
    assert estimate.job_tokens(job, pd.DataFrame()) == (3, 300.0, 32.0, "options")
    measured = sample_rows([280, 290], [0.1, 0.1], (1.0, 0.0), model="tiny-llama", job_id="x",
                           prompt_set_hash=job["prompt_set_hash"]).assign(output_tokens=[5, 7])
    assert estimate.job_tokens(job, measured) == (2, 285.0, 6.0, "measured")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dry_run_estimates_from_stored_rows_without_calibrating(workdir, tiny_grid, write_grid, monkeypatch):
    other = ResultStore(workdir / "results" / "earlier")  # another grid's results, beside this grid's folder
    for job in load_grid(tiny_grid).jobs:
        other.write_job(job, fake_worker.run_job(job, None))
    smaller = write_grid(TINY_GRID_SMALLER, "smaller.yaml")
    monkeypatch.setattr(estimate, "calibrate", lambda *a: pytest.fail("calibrated although rates were stored"))
    result = runner.invoke(app, ["submit", "--grid", str(smaller), "--dry-run", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "estimate for the 4 jobs to run" in result.stdout and "store (" in result.stdout
    assert "unknown" not in result.stdout and "fp16 reference" in result.stdout
    assert "on 2 worker(s)" in result.stdout and "CPU worker-h" in result.stdout
    assert not (workdir / "results" / "smaller").exists()
    unmeasured = runner.invoke(app, ["submit", "--grid", str(write_grid(TINY_GRID_SMALLER.replace(
        "int4", "int8"), "new.yaml")), "--dry-run", "--no-calibrate"])
    assert "(2 unknown)" in unmeasured.stdout  # int8 has no rows and no calibration was allowed


TINY_GRID_SMALLER = """\
    name: smaller
    models: [tiny-llama]
    methods: {fp16: {}, int4: {}}
    prompt_sets: {passkey: {length: 512, num_samples: 3}, prose-ppl: {length: 128, num_samples: 2}}
    """


@pytest.mark.usefixtures("one_thread")
def test_dry_run_calibrates_methods_with_no_rates(workdir, write_grid):
    grid = write_grid("""\
        models: [tiny-llama]
        methods: {fp16: {}, smartkv: {budget: 4}}
        prompt_sets: {passkey: {length: 300, num_samples: 2}}
        generation: {max_new_tokens: 8}
        """)
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "calibrated here (cpu)" in result.stdout and "smartkv(budget=4)" in result.stdout
    total = next(line for line in result.stdout.splitlines() if "total" in line and "│" in line)
    assert "│ 0.0 s" not in total and " s " in total  # seconds of a tiny grid, measured here
    assert not (workdir / "results" / "g").exists() or not list((workdir / "results" / "g").rglob("*.parquet"))
