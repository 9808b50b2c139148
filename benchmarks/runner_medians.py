"""Per-sample medians of a runner results dataset: each (prompt set, method)'s decode ms a token and prefill tokens/s,
median and range over its samples, and the medians' ratios against a baseline method's in the same prompt set. The
report's means carry a slow sample whole (a shared GPU's queueing, a first flush); issue 21's runner goal is read
from both.

    python benchmarks/runner_medians.py results/smartkv_speed --baseline int4
"""
from __future__ import annotations

import argparse

import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="the dataset directory `smartkv-bench submit --out` wrote")
    ap.add_argument("--baseline", default="int4", help="method whose medians the ratios divide by")
    args = ap.parse_args()
    df = pd.read_parquet(args.results)
    df = df[df["row_kind"] == "sample"].copy()
    if df.empty:
        raise SystemExit(f"{args.results}: no sample rows")
    df["prefill_tok_s"] = df["context_tokens"] / (df["prefill_ms"] / 1000.0)
    df["label"] = df["method_label"].fillna(df["method"]) if "method_label" in df else df["method"]
    rows = []
    for (prompt_set, method, label), g in df.groupby(["prompt_set", "method", "label"]):
        rows.append({"prompt_set": prompt_set, "method": method, "label": label, "samples": len(g),
                     "decode_ms": g["decode_ms_per_token"].median(), "decode_min": g["decode_ms_per_token"].min(),
                     "decode_max": g["decode_ms_per_token"].max(), "prefill_tok_s": g["prefill_tok_s"].median()})
    out = pd.DataFrame(rows)
    base = out[out["method"] == args.baseline].groupby("prompt_set").first()
    if base.empty:
        raise SystemExit(f"--baseline {args.baseline!r}: no such method in {sorted(out['method'].unique())}")
    out["decode_vs_base"] = out["decode_ms"] / out["prompt_set"].map(base["decode_ms"])
    out["prefill_vs_base"] = out["prefill_tok_s"] / out["prompt_set"].map(base["prefill_tok_s"])
    print(out.drop(columns="method").to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
