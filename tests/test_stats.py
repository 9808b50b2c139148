"""Sample-level statistics: bootstrap intervals (deterministic, the right width), paired differences (shared
samples only, the shared noise cancels), and their columns in the report."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from smartkv.bench.results import report, stats
from smartkv.bench.results.schema import empty_row


def test_bootstrap_interval_is_seeded_and_as_wide_as_the_normal_one():
    x = np.random.default_rng(1).normal(size=400)
    lo, hi = stats.bootstrap_ci(x)
    assert (lo, hi) == stats.bootstrap_ci(x)                                   # same data, same interval
    assert lo < x.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(400), rel=0.1)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0]))              # one value: no interval


def _samples(method, values, repeat=0, seed=0, ids=None):
    ids = ids if ids is not None else range(len(values))
    return [empty_row(job_id=f"{method}{repeat}", model="m", method=method, method_label=method, prompt_set="p",
                      seed=seed, repeat=repeat, row_kind="sample", sample_id=str(i), status="ok", score=v,
                      kl_to_fp16=v / 10) for i, v in zip(ids, values, strict=True)]


def test_paired_difference_cancels_the_shared_noise():
    rng = np.random.default_rng(2)
    hard = rng.uniform(0, 1, size=60)                           # per-sample difficulty, shared by both methods
    ref = pd.DataFrame(_samples("a", list(hard)))
    better = pd.DataFrame(_samples("b", list(hard + 0.05 + rng.normal(0, 0.01, size=60))))
    d = stats.paired(better, ref, "score")
    assert d["n_pairs_score"] == 60 and d["d_score"] == pytest.approx(0.05, abs=0.01)
    assert 0 < d["d_score_lo"] < d["d_score_hi"] < 0.1        # excludes zero ...
    a, b = stats.describe(ref, "score"), stats.describe(better, "score")
    assert b["score_lo"] < a["score_hi"]                       # ... where the unpaired intervals overlap


def test_units_average_repeats_and_pairs_only_shared_samples():
    rows = (_samples("a", [1.0, 2.0, 3.0]) + _samples("b", [2.0, 3.0], repeat=0, ids=[0, 1])
            + _samples("b", [4.0, 5.0], repeat=1, ids=[0, 1]))
    df = pd.DataFrame(rows)
    b, a = df[df["method"] == "b"], df[df["method"] == "a"]
    assert stats.unit_values(b, "score").tolist() == [3.0, 4.0]
    d = stats.paired(b, a, "score")
    assert d["n_pairs_score"] == 2 and d["d_score"] == pytest.approx(2.0)   # (3 - 1 + 4 - 2) / 2


def test_report_carries_intervals_paired_differences_and_allocated_bytes():
    rows = _samples("fp16", [1.0] * 8) + _samples("int4", [0.5, 0.7, 0.6, 0.9, 0.4, 0.8, 0.7, 0.6])
    for r in rows:
        r.update(kv_fp16_bytes=1000, kv_allocated_bytes=1000 if r["method"] == "fp16" else 400, total_ratio=0.3)
    rows += [empty_row(job_id=f"{m}0", model="m", method=m, method_label=m, prompt_set="p", row_kind="summary",
                       status="ok") for m in ("fp16", "int4")]
    table = report.summarize(pd.DataFrame(rows), "fp16").set_index("method")
    int4 = table.loc["int4"]
    assert int4["n_score"] == 8 and int4["n_pairs_score"] == 8
    assert int4["score_lo"] < int4["score"] < int4["score_hi"]
    assert int4["d_score"] == pytest.approx(-0.35) and int4["d_score_hi"] < 0
    assert int4["d_kl_to_fp16"] == pytest.approx(-0.035)
    assert int4["allocated_ratio"] == pytest.approx(0.4) and table.loc["fp16", "d_score"] == 0.0
    rows = [dict(r, avg_bits=32.0) if r["method"] == "fp16" else r for r in rows]   # an fp32 model's reference
    table = report.summarize(pd.DataFrame(rows), "fp16").set_index("method")
    assert table.loc["fp16 (holds fp32)", "n_score"] == 8 and table.loc["int4", "d_score"] == pytest.approx(-0.35)
    assert list(report.summarize(pd.DataFrame(rows)).columns) == report.COLUMNS


def test_paired_difference_when_one_side_has_no_ok_rows():
    """A method whose every sample failed (or a reference with none) pairs no units: n 0, no interval, no error."""
    from smartkv.bench.results import stats

    ok = pd.DataFrame({"status": ["ok", "ok"], "seed": [0, 0], "sample_id": [0, 1], "score": [1.0, 0.0]})
    failed = ok.assign(status="error", score=float("nan"))
    for a, b in ((ok, failed), (failed, ok)):
        d = stats.paired(a, b, "score")
        assert d["n_pairs_score"] == 0 and math.isnan(d["d_score"]) and math.isnan(d["d_score_lo"])
