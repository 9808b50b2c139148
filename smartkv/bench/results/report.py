"""Comparison tables and plots from a results dataset.

One line per (model, prompt set, method + params): jobs and samples, task score with a 95% interval over repeats
(and seeds), the score delta against the baseline method (fp16 by default) on the same model and prompt set, KL
to fp16, total memory ratio (all KV bytes / fp16 KV bytes), average bits, prefill and decode speed.

Each job's samples are averaged first, then the job means are averaged, so a repeat counts once whatever its
sample count; the interval is Student's t over job means (blank with one job).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

GROUP = ["model", "prompt_set", "method", "method_label"]
# Student's t, two-sided 95%, by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
COLUMNS = ["model", "prompt_set", "method", "jobs", "samples", "failed", "oom", "score", "score_ci95",
           "delta_vs_baseline", "ppl", "kl_to_fp16", "total_ratio", "avg_bits", "prefill_tok_s", "prefill_ci95",
           "decode_tok_s", "decode_ci95"]


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
    ok = samples[samples["status"] == "ok"]
    metrics = ["score", "ppl", "kl_to_fp16", "total_ratio", "avg_bits", "prefill_tok_s", "decode_tok_s"]
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
        lines.append({"model": key[0], "prompt_set": key[1], "method": key[3], "_method_name": key[2],
                      "jobs": len(group), "samples": int(group["samples"].sum()),
                      "failed": int((group["status"] == "error").sum() + group["failed"].sum()),
                      "oom": int((group["status"] == "oom").sum()), "score": score, "score_ci95": score_ci,
                      "ppl": group["ppl"].mean(), "kl_to_fp16": group["kl_to_fp16"].mean(),
                      "total_ratio": group["total_ratio"].mean(),
                      "avg_bits": group["avg_bits"].mean(), "prefill_tok_s": prefill, "prefill_ci95": prefill_ci,
                      "decode_tok_s": decode, "decode_ci95": decode_ci})
    table = pd.DataFrame(lines)
    base = table[table["_method_name"] == baseline].groupby(["model", "prompt_set"])["score"].first()
    table["delta_vs_baseline"] = [row.score - base.get((row.model, row.prompt_set), math.nan)
                                  for row in table.itertuples()]
    table = table.sort_values(["model", "prompt_set", "total_ratio"], ascending=[True, True, False],
                              na_position="last", kind="stable")
    return table[COLUMNS].reset_index(drop=True)


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


def plot(df: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """quality_vs_memory.png (the Pareto picture, one panel per prompt set) and decode_speed_vs_context.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_pareto(plt, table, out / "quality_vs_memory.png"),
             _plot_speed(plt, df, out / "decode_speed_vs_context.png")]
    return [p for p in paths if p is not None]


def _quality(part: pd.DataFrame) -> tuple[pd.Series, str]:
    """Task score where the set has one, else minus perplexity (prose sets), so higher is better on both."""
    if part["score"].notna().any():
        return part["score"], "task score"
    return -part["ppl"], "- perplexity"


def _plot_pareto(plt, table: pd.DataFrame, path: Path) -> Path | None:
    data = table.dropna(subset=["total_ratio"])
    data = data[data["score"].notna() | data["ppl"].notna()]
    if data.empty:
        return None
    sets = sorted(data["prompt_set"].unique())
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        part = data[data["prompt_set"] == name]
        quality, ylabel = _quality(part)
        part = part.assign(quality=quality).dropna(subset=["quality"])
        for (model, method), group in part.groupby(["model", part["method"].str.split("(").str[0]]):
            group = group.sort_values("total_ratio")
            ax.plot(group["total_ratio"], group["quality"], marker="o", label=f"{method} [{model}]")
        frontier = _pareto(part)
        ax.plot(frontier["total_ratio"], frontier["quality"], "k--", linewidth=0.8, label="frontier")
        ax.set(title=name, xlabel="total KV memory / fp16", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _pareto(part: pd.DataFrame) -> pd.DataFrame:
    """Points no other point beats on both memory (lower) and score (higher)."""
    best, keep = -math.inf, []
    for row in part.sort_values(["total_ratio", "quality"], ascending=[True, False]).itertuples():
        if row.quality > best:
            best = row.quality
            keep.append(row.Index)
    return part.loc[keep]


def _plot_speed(plt, df: pd.DataFrame, path: Path) -> Path | None:
    samples = df[(df["row_kind"] == "sample") & (df["status"] == "ok")].dropna(
        subset=["context_tokens", "decode_ms_per_token"])
    if samples.empty:
        return None
    samples = samples.assign(decode_tok_s=1000.0 / samples["decode_ms_per_token"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, label), group in samples.groupby(["model", "method_label"]):
        line = group.groupby("context_tokens")["decode_tok_s"].mean()
        ax.plot(line.index, line.values, marker="o", label=f"{label} [{model}]")
    ax.set(xlabel="context tokens", ylabel="decode tokens / s", title="decode speed vs context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
