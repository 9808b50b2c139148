"""Report plots: per prompt set, quality against true KV bytes with the frontier; decode speed against context.

Quality is the task score (higher is better) where the set has one, else perplexity (lower is better), each
plotted as itself with the direction on the axis. Intervals are error bars, drawn from whatever interval columns
the table holds for a value: `<col>_lo` / `<col>_hi` (bounds) or `<col>_ci95` (a half-width).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from smartkv.bench.results.report import t95


def plot(df: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """quality_vs_memory_<prompt set>.png for each set, and decode_speed_vs_context.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_plot_quality(plt, table, name, out / f"quality_vs_memory_{_slug(name)}.png")
             for name in sorted(table["prompt_set"].dropna().unique())]
    paths.append(_plot_speed(plt, df, out / "decode_speed_vs_context.png"))
    return [p for p in paths if p is not None]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))


def interval(table: pd.DataFrame, column: str) -> pd.Series | None:
    """Error bar sizes (2 x n: below, above) for `column`, or None when the table has no interval for it."""
    lo, hi, half = f"{column}_lo", f"{column}_hi", f"{column}_ci95"
    if lo in table and hi in table and (table[lo].notna() | table[hi].notna()).any():
        return pd.concat([(table[column] - table[lo]).clip(lower=0), (table[hi] - table[column]).clip(lower=0)],
                         axis=1).fillna(0).T.values
    if half in table and table[half].notna().any():
        bar = table[half].fillna(0).values
        return [bar, bar]
    return None


def quality_axis(part: pd.DataFrame) -> tuple[str, str, bool]:
    """(column, axis label, higher is better) of a prompt set's quality."""
    if part["score"].notna().any():
        return "score", "task score (higher is better)", True
    return "ppl", "perplexity (lower is better)", False


def frontier(part: pd.DataFrame, column: str, higher_better: bool) -> pd.DataFrame:
    """Points no other point beats on both memory (lower) and quality."""
    sign = 1.0 if higher_better else -1.0
    best, keep = -math.inf, []
    ordered = part.sort_values(["total_ratio", column], ascending=[True, not higher_better])
    for index, value in zip(ordered.index, ordered[column], strict=True):
        if sign * value > best:
            best = sign * value
            keep.append(index)
    return part.loc[keep]


def _plot_quality(plt, table: pd.DataFrame, name: str, path: Path) -> Path | None:
    part = table[(table["prompt_set"] == name) & table["total_ratio"].notna()]
    column, ylabel, higher_better = quality_axis(part)
    part = part.dropna(subset=[column])
    if part.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (model, method), group in part.groupby(["model", part["method"].str.split("(").str[0]]):
        group = group.sort_values("total_ratio")
        ax.errorbar(group["total_ratio"], group[column], yerr=interval(group, column), marker="o", capsize=3,
                    label=f"{method} [{model}]")
    best = frontier(part, column, higher_better)
    ax.plot(best["total_ratio"], best[column], "k--", linewidth=0.8, label="frontier")
    ax.set(title=name, xlabel="KV bytes held / fp16 KV bytes (true bytes, lower is smaller)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _plot_speed(plt, df: pd.DataFrame, path: Path) -> Path | None:
    """Decode tokens/s against context tokens, one line per method; bars: 95% interval over samples."""
    samples = df[(df["row_kind"] == "sample") & (df["status"] == "ok")].dropna(
        subset=["context_tokens", "decode_ms_per_token"])
    if samples.empty:
        return None
    samples = samples.assign(decode_tok_s=1000.0 / samples["decode_ms_per_token"])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (model, label), group in samples.groupby(["model", "method_label"]):
        stats = group.groupby("context_tokens")["decode_tok_s"].agg(["mean", "std", "count"])
        half = [t95(int(n)) * s / math.sqrt(n) if n > 1 and s == s else 0.0
                for s, n in zip(stats["std"], stats["count"], strict=True)]
        ax.errorbar(stats.index, stats["mean"], yerr=half, marker="o", capsize=3, label=f"{label} [{model}]")
    ax.set(xlabel="context tokens", ylabel="decode tokens / s (higher is faster)",
           title="decode speed vs context (bars: 95% interval over samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
