"""Comparison tables and plots from a results dataset.

One line per (model, prompt set, method + params): jobs and samples, task score with a 95% interval over repeats
(and seeds), the score delta against the baseline method (fp16 by default) on the same model and prompt set, KL
to fp16, total memory ratio (all KV bytes / fp16 KV bytes), average bits, prefill and decode speed, and the
serving view of a request: time to first token, time per output token, output tokens, end-to-end latency.

The reference says what it holds: the fp16 cache stores the model's own dtype, so a model run in fp32 (the CPU
default) gives a row `fp16 (holds fp32)` with memory ratio 2 and 32 bits. It is kept that way rather than rounded
to 16 bits on CPU: the reference stays the model's exact output (KL to it is the distance to the model itself),
and the other rows' ratios are against 16-bit bytes (`kv_fp16_bytes`) whatever the model's dtype. Plots: plots.py.

Each job's samples are averaged first, then the job means are averaged, so a repeat counts once whatever its
sample count; score_ci95 is Student's t over job means (blank with one job). Over samples (smartkv.bench.results.
stats): 95% bootstrap intervals of score and KL (`score_lo`/`_hi`, `kl_to_fp16_lo`/`_hi`, with n), and paired
differences against the baseline method on the same samples (`d_score`, `d_kl_to_fp16` with their intervals and
n_pairs). `allocated_ratio` is the bytes allocated (slack of growable buffers included) over fp16 bytes, next to
`total_ratio` (the bytes held).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from smartkv.bench.results import stats

log = logging.getLogger(__name__)

GROUP = ["model", "prompt_set", "method", "method_label"]
# Student's t, two-sided 95%, by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
COLUMNS = ["model", "prompt_set", "method", "jobs", "samples", "failed", "oom", "score", "score_ci95",
           "delta_vs_baseline", "ppl", "kl_to_fp16", "total_ratio", "allocated_ratio", "avg_bits", "prefill_tok_s",
           "prefill_ci95", "decode_tok_s", "decode_ci95", "ttft_ms", "tpot_ms", "output_tokens", "e2e_ms",
           *stats.interval_columns()]
SERVING = ["ttft_ms", "tpot_ms", "output_tokens", "e2e_ms"]


def t95(n: int) -> float:
    return _T95[n - 2] if 2 <= n <= 31 else 1.96


def _mean_ci(values: pd.Series) -> tuple[float, float]:
    values = values.dropna()
    if values.empty:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), t95(len(values)) * float(values.std(ddof=1)) / math.sqrt(len(values))


def per_job(df: pd.DataFrame) -> pd.DataFrame:
    """One line per job: means over its ok samples, counts of samples and failures, the job status."""
    samples = df[(df["row_kind"] == "sample")].copy()
    samples["prefill_tok_s"] = samples["context_tokens"] / (samples["prefill_ms"] / 1000.0)
    samples["decode_tok_s"] = 1000.0 / samples["decode_ms_per_token"]
    allocated = samples["kv_allocated_bytes"] if "kv_allocated_bytes" in samples else math.nan
    samples["allocated_ratio"] = allocated / samples["kv_fp16_bytes"]
    ok = samples[samples["status"] == "ok"]
    metrics = ["score", "ppl", "kl_to_fp16", "total_ratio", "allocated_ratio", "avg_bits", "prefill_tok_s",
               "decode_tok_s"]
    metrics += [c for c in SERVING if c in ok]  # results written before schema 2 have none
    means = ok.groupby("job_id")[metrics].mean()
    counts = samples.groupby("job_id").agg(samples=("status", lambda s: int((s == "ok").sum())),
                                           failed=("status", lambda s: int((s != "ok").sum())))
    summary = df[df["row_kind"] == "summary"].drop_duplicates("job_id").set_index("job_id")
    jobs = summary[GROUP + ["status"]].join(means).join(counts)
    jobs[["samples", "failed"]] = jobs[["samples", "failed"]].fillna(0).astype(int)
    return jobs.reset_index()


def summarize(df: pd.DataFrame, baseline: str = "fp16") -> pd.DataFrame:
    """The comparison table (see module docstring) as a DataFrame with COLUMNS."""
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    jobs = per_job(df)
    lines = []
    for key, group in jobs.groupby(GROUP, dropna=False, sort=True):
        score, score_ci = _mean_ci(group["score"])
        prefill, prefill_ci = _mean_ci(group["prefill_tok_s"])
        decode, decode_ci = _mean_ci(group["decode_tok_s"])
        lines.append({"model": key[0], "prompt_set": key[1], "method": reference_label(key[2], key[3], group),
                      "_method_name": key[2], "_label": key[3],
                      "jobs": len(group), "samples": int(group["samples"].sum()),
                      "failed": int((group["status"] == "error").sum() + group["failed"].sum()),
                      "oom": int((group["status"] == "oom").sum()), "score": score, "score_ci95": score_ci,
                      "ppl": group["ppl"].mean(), "kl_to_fp16": group["kl_to_fp16"].mean(),
                      "total_ratio": group["total_ratio"].mean(),
                      "allocated_ratio": group["allocated_ratio"].mean(),
                      "avg_bits": group["avg_bits"].mean(), "prefill_tok_s": prefill, "prefill_ci95": prefill_ci,
                      "decode_tok_s": decode, "decode_ci95": decode_ci,
                      **{c: group[c].mean() if c in group else math.nan for c in SERVING}})
    table = pd.DataFrame(lines)
    base = table[table["_method_name"] == baseline].groupby(["model", "prompt_set"])["score"].first()
    table["delta_vs_baseline"] = [row.score - base.get((row.model, row.prompt_set), math.nan)
                                  for row in table.itertuples()]
    intervals = stats.sample_table(df, GROUP, baseline).drop(columns=["method"]).rename(
        columns={"method_label": "_label"})
    table = table.merge(intervals, on=["model", "prompt_set", "_label"], how="left")
    table = table.sort_values(["model", "prompt_set", "total_ratio"], ascending=[True, True, False],
                              na_position="last", kind="stable")
    return table[COLUMNS].reset_index(drop=True)


def reference_label(method: str, label: str, jobs: pd.DataFrame) -> str:
    """The fp16 reference's label with what it held when that was not 16 bits, e.g. `fp16 (holds fp32)`."""
    bits = jobs["avg_bits"].dropna()
    if method != "fp16" or bits.empty or round(float(bits.mean())) == 16:
        return label
    return f"{label} (holds fp{round(float(bits.mean()))})"


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def to_markdown(table: pd.DataFrame, baseline: str = "fp16") -> str:
    header = [c.replace("baseline", baseline) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame, baseline: str = "fp16") -> str:
    return table.rename(columns={"delta_vs_baseline": f"delta_vs_{baseline}"}).to_csv(index=False)
