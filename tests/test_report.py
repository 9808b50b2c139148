"""Report: aggregation on a hand-made dataset (known numbers), markdown/CSV output, plots, CLI report command."""
from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from smartkv.bench.results import plots, report
from smartkv.bench.results import schema
from smartkv.bench.cli import app
from smartkv.bench.spec.grid import load_grid
from smartkv.bench.results.store import ResultStore

runner = CliRunner()


def _rows(job_id, method, label, scores, repeat=0, ratio=1.0, bits=16.0, status="ok", prompt_set="passkey"):
    ident = dict(job_id=job_id, grid="fixture", model="m", method=method, method_label=label, method_params="{}",
                 prompt_set=prompt_set, seed=0, repeat=repeat)
    rows = [schema.empty_row(**ident, row_kind="sample", sample_id=str(i), status="ok", score=s, context_tokens=1000,
                             prefill_ms=100.0, decode_ms_per_token=10.0 * (1 + repeat), kl_to_fp16=0.0 if
                             method == "fp16" else 0.1, total_ratio=ratio, avg_bits=bits, ttft_ms=100.0 + i,
                             tpot_ms=10.0 * (1 + repeat), output_tokens=8 + i, e2e_ms=200.0 + 10 * i)
            for i, s in enumerate(scores)]
    rows.append(schema.empty_row(**ident, row_kind="summary", status=status, n_samples=len(scores)))
    return rows


@pytest.fixture
def frame() -> pd.DataFrame:
    rows = (_rows("a0", "fp16", "fp16", [1.0, 1.0])
            + _rows("b0", "kivi", "kivi(value_bits=2)", [0.5, 0.7], repeat=0, ratio=0.15, bits=2.0)
            + _rows("b1", "kivi", "kivi(value_bits=2)", [0.7, 0.9], repeat=1, ratio=0.15, bits=2.0)
            + _rows("c0", "int4", "int4", [], status="oom", ratio=0.3, bits=4.0))
    return pd.DataFrame(rows)


def test_summary_numbers(frame):
    table = report.summarize(frame, "fp16").set_index("method")
    kivi = table.loc["kivi(value_bits=2)"]
    assert kivi["jobs"] == 2 and kivi["samples"] == 4
    assert kivi["score"] == pytest.approx(0.7)                   # mean of job means 0.6 and 0.8
    half = 12.706 * math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1) / math.sqrt(2)
    assert kivi["score_ci95"] == pytest.approx(half)              # t interval over the two repeats
    assert kivi["delta_vs_baseline"] == pytest.approx(-0.3)
    assert kivi["kl_to_fp16"] == pytest.approx(0.1) and kivi["avg_bits"] == 2.0
    assert kivi["prefill_tok_s"] == pytest.approx(10_000.0)
    assert kivi["decode_tok_s"] == pytest.approx((100.0 + 50.0) / 2)
    assert table.loc["fp16", "delta_vs_baseline"] == 0.0 and math.isnan(table.loc["fp16", "score_ci95"])
    assert table.loc["int4", "oom"] == 1 and table.loc["int4", "samples"] == 0


def test_rows_sorted_by_memory_with_fp16_first_and_unmeasured_last(frame):
    table = report.summarize(frame)
    assert table["method"].tolist() == ["fp16", "kivi(value_bits=2)", "int4"]  # int4 ran out of memory


def test_markdown_and_csv(frame):
    table = report.summarize(frame, "fp16")
    md = report.to_markdown(table, "fp16")
    lines = md.splitlines()
    assert lines[0].startswith("| model | prompt_set | method |") and "delta_vs_fp16" in lines[0]
    assert lines[1].startswith("|---|") and len(lines) == 2 + 3
    assert "| m | passkey | kivi(value_bits=2) | 2 | 4 | 0 | 0 | 0.7 |" in md
    parsed = pd.read_csv(io.StringIO(report.to_csv(table, "fp16")))
    assert list(parsed.columns) == [c.replace("baseline", "fp16") for c in report.COLUMNS]
    assert parsed.loc[parsed["method"] == "kivi(value_bits=2)", "score"].item() == pytest.approx(0.7)


def test_other_baseline(frame):
    table = report.summarize(frame, "kivi").set_index("method")
    assert table.loc["fp16", "delta_vs_baseline"] == pytest.approx(0.3)


def test_serving_columns_are_means_over_jobs(frame):
    kivi = report.summarize(frame).set_index("method").loc["kivi(value_bits=2)"]
    assert kivi["ttft_ms"] == pytest.approx(100.5) and kivi["output_tokens"] == pytest.approx(8.5)
    assert kivi["tpot_ms"] == pytest.approx(15.0) and kivi["e2e_ms"] == pytest.approx(205.0)


def test_the_reference_says_what_it_holds(frame):
    frame.loc[frame["method"] == "fp16", "avg_bits"] = 32.0   # an fp32 model: the fp16 cache holds fp32
    table = report.summarize(frame)
    assert table["method"].tolist()[0] == "fp16 (holds fp32)"
    assert table.set_index("method").loc["kivi(value_bits=2)", "delta_vs_baseline"] == pytest.approx(-0.3)


def test_plots_one_per_prompt_set_and_speed(frame, tmp_path):
    frame = pd.concat([frame, pd.DataFrame(_rows("p0", "fp16", "fp16", [None], prompt_set="prose-ppl"))])
    frame.loc[frame["prompt_set"] == "prose-ppl", "ppl"] = 12.0
    table = report.summarize(frame)
    paths = plots.plot(frame, table, tmp_path / "plots")
    assert [p.name for p in paths] == ["quality_vs_memory_passkey.png", "quality_vs_memory_prose-ppl.png",
                                       "decode_speed_vs_context.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_perplexity_is_plotted_as_perplexity_with_its_frontier():
    part = pd.DataFrame({"score": [None] * 3, "ppl": [10.0, 12.0, 11.0], "total_ratio": [1.0, 0.25, 0.3]})
    column, label, higher = plots.quality_axis(part)
    assert (column, higher) == ("ppl", False) and "lower is better" in label
    assert plots.frontier(part, column, higher)["ppl"].tolist() == [12.0, 11.0, 10.0]
    worse = part.assign(ppl=[10.0, 12.0, 12.5])  # 0.3 holds more bytes and is worse than 0.25: off the frontier
    assert plots.frontier(worse, "ppl", False)["total_ratio"].tolist() == [0.25, 1.0]


def test_error_bars_come_from_whichever_interval_columns_exist():
    table = pd.DataFrame({"score": [0.5, 0.7], "score_ci95": [0.1, None]})
    below, above = plots.interval(table, "score")
    assert list(below) == list(above) == [0.1, 0.0]
    table = table.assign(score_lo=[0.4, 0.6], score_hi=[0.55, 0.9])
    bars = plots.interval(table, "score")
    assert bars[0] == pytest.approx([0.1, 0.1]) and bars[1] == pytest.approx([0.05, 0.2])
    assert plots.interval(table.drop(columns=["score_ci95", "score_lo", "score_hi"]), "score") is None


def test_empty_dataset_gives_an_empty_table():
    assert report.summarize(pd.DataFrame(columns=list(schema.COLUMNS))).empty


def test_report_command_on_a_fixture_dataset(tmp_path, tiny_grid):
    from smartkv.bench.run import fake_worker

    store = ResultStore(tmp_path / "res")
    for job in load_grid(tiny_grid).jobs:
        store.write_job(job, fake_worker.run_job(job, None))
    md = runner.invoke(app, ["report", str(store.root), "--format", "md", "--plot", str(tmp_path / "p")])
    assert md.exit_code == 0, md.output
    assert md.stdout.count("\n") == 2 + 8 and "smartkv(budget=3)" in md.stdout
    assert (tmp_path / "p" / "quality_vs_memory_passkey.png").exists()
    csv = runner.invoke(app, ["report", str(store.root), "--format", "csv", "--baseline", "int4"])
    assert csv.exit_code == 0 and "delta_vs_int4" in csv.stdout.splitlines()[0]
    table = runner.invoke(app, ["report", str(store.root)])
    assert table.exit_code == 0 and "Δ fp16" in table.stdout and "prose-ppl" in table.stdout
