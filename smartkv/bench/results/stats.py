"""Sample-level statistics for comparison tables: 95% bootstrap intervals and paired differences.

A unit is one sample of a prompt set (seed, sample id); repeats of a unit are averaged first, so a unit counts
once. Every interval is a percentile bootstrap over units (BOOTSTRAP resamples, a fixed seed: the same data
give the same interval). A paired difference takes the units both methods measured on the same model and prompt
set, the method's value minus the reference's on each, and bootstraps the mean of those differences: the noise
of sample difficulty, shared by both, cancels.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

BOOTSTRAP = 2000
SEED = 0
LEVEL = 0.95
UNIT = ["seed", "sample_id"]
METRICS = ("score", "kl_to_fp16")


def bootstrap_ci(values, resamples: int = BOOTSTRAP, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (NaNs dropped); (nan, nan) with fewer than 2."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def unit_values(samples: pd.DataFrame, metric: str) -> pd.Series:
    """One value per unit (mean over repeats) of `metric`, from ok sample rows; indexed by UNIT."""
    ok = samples[(samples["status"] == "ok")].dropna(subset=[metric])
    if ok.empty:
        return pd.Series(dtype=float)
    return ok.groupby(UNIT)[metric].mean()


def describe(samples: pd.DataFrame, metric: str) -> dict:
    """{metric}: mean over units, {metric}_lo / _hi: its 95% bootstrap interval, n_{metric}: units."""
    values = unit_values(samples, metric)
    lo, hi = bootstrap_ci(values.to_numpy())
    return {metric: float(values.mean()) if len(values) else math.nan, f"{metric}_lo": lo, f"{metric}_hi": hi,
            f"n_{metric}": len(values)}


def paired(samples: pd.DataFrame, reference: pd.DataFrame, metric: str) -> dict:
    """d_{metric}: mean over shared units of (method - reference), d_{metric}_lo / _hi: its 95% bootstrap
    interval, n_pairs_{metric}: shared units."""
    a, b = unit_values(samples, metric), unit_values(reference, metric)
    # index alignment keeps the units both measured; with no reference rows at all (its jobs failed, or their files
    # were skipped as unusable) there is nothing to pair, and an empty plain index would not align with units
    diff = (a - b).dropna() if len(a) and len(b) else pd.Series(dtype=float)
    lo, hi = bootstrap_ci(diff.to_numpy())
    return {f"d_{metric}": float(diff.mean()) if len(diff) else math.nan, f"d_{metric}_lo": lo,
            f"d_{metric}_hi": hi, f"n_pairs_{metric}": len(diff)}


def interval_columns(metrics=METRICS) -> list[str]:
    cols = []
    for m in metrics:
        cols += [f"{m}_lo", f"{m}_hi", f"n_{m}", f"d_{m}", f"d_{m}_lo", f"d_{m}_hi", f"n_pairs_{m}"]
    return cols


def sample_table(df: pd.DataFrame, group: list[str], reference: str, metrics=METRICS) -> pd.DataFrame:
    """Per group (model, prompt set, method): bootstrap intervals of each metric over its units, and paired
    differences against the `reference` method (a method label, or a method name when one label has it) on the
    same model and prompt set. Columns: group + interval_columns(metrics) (the means themselves are not repeated)."""
    samples = df[df["row_kind"] == "sample"]
    lines = []
    for key, part in samples.groupby(group, dropna=False, sort=True):
        row = dict(zip(group, key, strict=True))
        same = samples[(samples["model"] == row["model"]) & (samples["prompt_set"] == row["prompt_set"])]
        ref = same[same["method_label"] == reference]
        if ref.empty:
            labels = same.loc[same["method"] == reference, "method_label"].dropna().unique()
            ref = same[same["method_label"] == sorted(labels)[0]] if len(labels) else ref
        for m in metrics:
            d = describe(part, m)
            row.update({k: v for k, v in d.items() if k != m})
            row.update(paired(part, ref, m))
        lines.append(row)
    return pd.DataFrame(lines, columns=group + interval_columns(metrics))
