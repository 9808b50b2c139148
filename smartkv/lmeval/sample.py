"""One lm-eval document as one grid row: its requests through the job's cache, lm-eval's metrics, and the
serving view of those requests (the worker's `lm-eval` sample kind)."""
from __future__ import annotations

import math

from smartkv.lmeval.model import RequestStats, SmartKVLM
from smartkv.metrics import speed


def run_lm_eval_sample(handle, sample, method: str, params: dict, max_length: int | None = None
                       ) -> tuple[dict, dict]:
    """(row values, extra) of a sample of kind "lm-eval" (sample.harness is its data.lmeval.LMEvalDoc)."""
    doc = sample.harness
    if doc is None:
        raise ValueError(f"sample {sample.id!r} of kind 'lm-eval' carries no lm-eval document")
    lm = SmartKVLM.from_handle(handle, method, max_length=max_length, **params)
    speed.reset_peak_memory(handle.device)
    metrics = doc.run(lm)
    values = request_values(lm.requests_log)
    values.update(peak_mem_bytes=speed.peak_memory_bytes(handle.device), metric=doc.primary_metric,
                  score=doc.score(metrics), prediction=doc.prediction())
    if doc.request_type == "loglikelihood_rolling" and values["output_tokens"]:
        nll = -sum(float(inst.resps[0]) for inst in doc.instances) / values["output_tokens"]
        values.update(nll=nll, ppl=math.exp(nll))  # per token, as the project's perplexity sets report it
    largest = max(lm.requests_log, key=lambda r: r.context_tokens)
    extra = {"lm_eval": {"task": doc.task_name, "doc_id": doc.doc_id, "request_type": doc.request_type,
                         "requests": len(lm.requests_log), "metrics": _plain(metrics)},
             "memory": largest.memory}
    return values, extra


def request_values(log: list[RequestStats]) -> dict:
    """Row columns over a document's requests: the largest cache's bytes, summed tokens and end-to-end time,
    mean prefill and time to first token, decode time over all decode steps."""
    if not log:
        raise ValueError("the lm-eval document sent no requests")
    largest = max(log, key=lambda r: r.context_tokens)
    steps = sum(r.decode_steps for r in log)
    per_token = sum(r.decode_ms for r in log) / steps if steps else None
    ttfts = [r.ttft_ms for r in log if r.ttft_ms is not None]
    return {"context_tokens": largest.context_tokens, "new_tokens": sum(r.output_tokens for r in log),
            "output_tokens": sum(r.output_tokens for r in log),
            "prefill_ms": sum(r.prefill_ms for r in log) / len(log), "decode_ms_per_token": per_token,
            "tokens_per_s": speed.tokens_per_s(1, per_token) if per_token else None,
            "ttft_ms": sum(ttfts) / len(ttfts) if ttfts else None, "tpot_ms": per_token,
            "e2e_ms": sum(r.e2e_ms or 0.0 for r in log),
            "kv_total_bytes": largest.kv_total_bytes, "kv_fp16_bytes": largest.kv_fp16_bytes,
            "payload_ratio": largest.memory.get("payload_ratio"), "total_ratio": largest.memory.get("total_ratio"),
            "avg_bits": largest.memory.get("avg_bits")}


def _plain(value):
    """lm-eval's per-document metric values as JSON-friendly numbers (numpy scalars, tuples of corpus items)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
