"""The results schema: one row per sample plus one summary row per job. Shared by worker, store and report.

Bump SCHEMA_VERSION when a column is added; readers fill columns missing from older files with nulls, so files
written by older versions still read. Never remove or retype a column.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 4  # 2: serving columns (ttft_ms...); 3: kv_allocated_bytes; 4: provenance (source_commit...)

ROW_KINDS = ("sample", "summary")
STATUSES = ("ok", "error", "oom")

# name -> arrow type. Identity first, then outcome, then metrics (null where a job does not measure them).
COLUMNS: dict[str, pa.DataType] = {
    # identity of the job (the same on every row of a job)
    "schema_version": pa.int32(),
    "job_id": pa.string(),
    "grid": pa.string(),
    "model": pa.string(),
    "model_revision": pa.string(),
    "method": pa.string(),
    "method_params": pa.string(),      # canonical JSON of the method's parameters
    "method_label": pa.string(),       # e.g. "smartkv(budget=4)"
    "prompt_set": pa.string(),
    "prompt_set_version": pa.string(),
    "prompt_set_hash": pa.string(),
    "seed": pa.int64(),
    "repeat": pa.int64(),
    "package_version": pa.string(),
    # the code and environment that produced the row (bench/provenance.py)
    "source_commit": pa.string(),      # git commit of smartkv's checkout (+dirty), null outside git
    "code_hash": pa.string(),          # hash of smartkv's .py files
    "runtime_env": pa.string(),        # JSON of the SMARTKV_* variables that change results
    "torch_version": pa.string(),
    "transformers_version": pa.string(),
    "triton_version": pa.string(),
    "cuda_version": pa.string(),       # torch's CUDA build; null on CPU builds
    "gpu_name": pa.string(),           # the GPU the job ran on; null on CPU
    # which row
    "row_kind": pa.string(),           # "sample" | "summary"
    "sample_id": pa.string(),          # null on summary rows
    "status": pa.string(),             # "ok" | "error" | "oom"
    "error": pa.string(),
    # task outcome
    "metric": pa.string(),             # name of the task metric (qa_f1, string_match, ...)
    "score": pa.float64(),             # task score in [0, 1]
    "prediction": pa.string(),
    "context_tokens": pa.int64(),
    "new_tokens": pa.int64(),
    # quality against the fp16 cache
    "kl_to_fp16": pa.float64(),
    "nll": pa.float64(),
    "ppl": pa.float64(),
    "top1_agreement": pa.float64(),
    "key_rel_error": pa.float64(),
    "value_rel_error": pa.float64(),
    # speed and memory
    "prefill_ms": pa.float64(),
    "decode_ms_per_token": pa.float64(),
    "tokens_per_s": pa.float64(),
    "peak_mem_bytes": pa.int64(),
    "kv_total_bytes": pa.int64(),
    "kv_fp16_bytes": pa.int64(),
    "kv_allocated_bytes": pa.int64(),  # kv_total_bytes + the slack of growable buffers (capacity not yet used)
    "payload_ratio": pa.float64(),
    "total_ratio": pa.float64(),
    "avg_bits": pa.float64(),
    # serving view of the measured run (schema 2). Per request: ttft = start to the first token chosen (the
    # prefill and that choice), tpot = decode time / decode steps, e2e = start to the last token. A sample of
    # several requests (lm-eval multiple choice) sums e2e and output tokens and averages ttft and tpot.
    "ttft_ms": pa.float64(),
    "tpot_ms": pa.float64(),
    "output_tokens": pa.int64(),       # tokens the decode loop produced (forced ones for perplexity / scoring)
    "e2e_ms": pa.float64(),
    # bookkeeping
    "n_samples": pa.int64(),           # summary rows: samples counted
    "n_failed": pa.int64(),            # summary rows: samples with status != ok
    "wall_s": pa.float64(),
    "worker": pa.string(),             # actor / host that ran the job
    "extra": pa.string(),              # JSON of anything else (per-layer errors, depths, ...)
}

SCHEMA = pa.schema([pa.field(name, typ) for name, typ in COLUMNS.items()],
                   metadata={b"smartkv_schema_version": str(SCHEMA_VERSION).encode()})


def empty_row(**values) -> dict:
    """A row with every column present (nulls), then `values`; unknown keys are an error."""
    unknown = set(values) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown result columns {sorted(unknown)}; allowed: {list(COLUMNS)}")
    row = dict.fromkeys(COLUMNS)
    row["schema_version"] = SCHEMA_VERSION
    row.update(values)
    return row
