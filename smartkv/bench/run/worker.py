"""Run ONE job: every sample of a prompt set through one method's cache, scored and measured. Never imports ray.

`run_job(job, handle)` returns one row per sample and a summary row (schema.py). Per sample:
  generate - prefill (timed), then greedy or sampled decode one token per forward call through the cache (timed
             per step), stop at EOS or max_new_tokens, score the text. With `compare_fp16`, the fp16 cache's greedy
             continuation is teacher-forced through a fresh cache of the method: KL to fp16 and top-1 agreement on
             the same positions (when the method produced exactly the fp16 tokens, its own logits are those).
  ppl      - prefill the context, feed the continuation one token at a time (the decode path: the quantized cache
             is read), NLL and perplexity; KL and top-1 agreement against the fp16 cache's logits.
  lm-eval  - a document of an lm-evaluation-harness task: its requests through the cache, lm-eval's filters and
             metrics (score = the task's first metric), no fp16 comparison (smartkv.lmeval.sample).
Every row carries the true-byte memory report at the end of the sample, CUDA peak memory, and the key/value
reconstruction error of the prompt's prefill against the prompt's own (fp16-cache) keys and values. The fp16
reference of a (model, prompt) is computed once and memoised on the handle (bench/decode.py).

Before the timed samples, `generation.warmup` untimed runs of the job's first sample (default 1) take the one-time
costs out of every timing: kernels compiled or loaded (Triton's JIT: seconds for a quantized cache's first prefill
and decode step on a fresh worker, measured on an H100: a SmartKV job's first sample prefilled in 3.0-4.0 s against
0.16-0.27 s for its next ones), the allocator's first growth, lazy initialisation. Their results are dropped; a
warm-up that raises is logged and the timed samples run as they would have.

A sample that raises becomes a row with status "error" (CUDA out-of-memory: "oom", after freeing the allocator's
cache) and the others still run. The summary row averages the ok samples; its status is the worst of the samples'.
Sampling draws from a generator seeded by (job seed, sample id), so results do not depend on sample order.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch

import smartkv
from smartkv.bench.results import schema
from smartkv.bench.redact import redact
from smartkv.bench.run.generation import (Decoded, decode, decode_measuring_prefill, fp16_reference, greedy,
                                          prefill_errors, reference_memo, sampler)
from smartkv.bench.run.runner import is_oom
from smartkv.bench.spec.grid import job_identity
from smartkv.data import build_input_ids, continuation_ids, get_prompt_set
from smartkv.methods import MethodConfig
from smartkv.metrics import quality, speed, task
from smartkv.models import context_of

log = logging.getLogger(__name__)

TRUNCATION_SIDES = ("left", "right", "middle", "none")
DEFAULT_MAX_NEW_TOKENS = 32  # for a generate sample that names none
# Columns a summary row averages over the ok samples (peak memory takes the max; token counts a rounded mean).
MEAN_COLUMNS = ("score", "kl_to_fp16", "nll", "top1_agreement", "key_rel_error", "value_rel_error", "prefill_ms",
                "decode_ms_per_token", "tokens_per_s", "payload_ratio", "total_ratio", "avg_bits", "ttft_ms",
                "tpot_ms", "e2e_ms")
ROUNDED_MEAN_COLUMNS = ("context_tokens", "new_tokens", "kv_total_bytes", "kv_fp16_bytes", "output_tokens")


@dataclass(frozen=True)
class Settings:
    """What a job asks of each sample, read tolerantly from the job dict."""
    method: str
    params: dict = field(default_factory=dict)
    max_new_tokens: int | None = None        # None: the sample's own
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    compare_fp16: bool = True
    warmup: int = 1                          # untimed runs of the first sample before the timed ones
    seed: int = 0
    truncation_side: str = "none"
    max_context_tokens: int | None = None
    config: MethodConfig = field(init=False, repr=False)  # built (and validated) once, from method and params

    def __post_init__(self):
        object.__setattr__(self, "config", smartkv.make_config(self.method, **self.params))  # frozen: set once

    @classmethod
    def from_job(cls, job: dict) -> "Settings":
        method, gen, trunc = job.get("method") or {}, job.get("generation") or {}, job.get("truncation") or {}
        if not method.get("name"):
            raise ValueError("the job has no method name (job['method']['name'])")
        side = trunc.get("side") or "none"
        if side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation.side must be one of {TRUNCATION_SIDES}, got {side!r}")
        return cls(method=method["name"], params=dict(method.get("params") or {}),
                   max_new_tokens=gen.get("max_new_tokens"), do_sample=bool(gen.get("do_sample", False)),
                   temperature=gen.get("temperature"), top_p=gen.get("top_p"), top_k=gen.get("top_k"),
                   compare_fp16=bool(gen.get("compare_fp16", True)), warmup=int(gen.get("warmup", 1)),
                   seed=int(job.get("seed") or 0),
                   truncation_side=side, max_context_tokens=trunc.get("max_context_tokens"))


# --- one job -------------------------------------------------------------------------------------------------

def run_job(job: dict, handle) -> list[dict]:
    """One row per sample of the job's prompt set, then a summary row; see the module docstring.

    Raises ValueError for a job that cannot start (bad method or prompt set); per-sample failures become rows.
    """
    start = time.perf_counter()
    settings = Settings.from_job(job)
    identity = job_identity(job)
    prompt_set = get_prompt_set(job["prompt_set"]["name"], **(job["prompt_set"].get("options") or {}))
    samples = prompt_set.samples(handle.tokenizer)
    warm_up(handle, samples[:1] * settings.warmup, settings)
    torch.manual_seed(settings.seed)
    worker = worker_name()
    rows = []
    for sample in samples:
        rows.append(sample_row(handle, sample, settings, identity, worker))
    extra = {"prompt_set_hash_now": prompt_set.content_hash()}
    if job.get("prompt_set_hash") not in (None, extra["prompt_set_hash_now"]):
        log.warning("prompt set %s changed since the job was made (hash %s, now %s)", prompt_set.name,
                    job.get("prompt_set_hash"), extra["prompt_set_hash_now"])
    memo = reference_memo(handle)
    extra["fp16_reference_memo"] = {"hits": memo.hits, "misses": memo.misses, "entries": len(memo.items)}  # so far
    rows.append(summary_row(rows, identity, worker, time.perf_counter() - start, extra))
    return rows


def warm_up(handle, samples: list, settings: Settings) -> None:
    """Run `samples` through the job's method untimed, their results dropped (the module docstring says why); a
    failure ends the warm-up (the timed run of that sample records it), an out-of-memory one frees the cache."""
    oom = False
    for sample in samples:
        try:
            run_sample(handle, sample, settings)
        except Exception as exc:  # the timed samples run regardless
            log.warning("warm-up on sample %s failed: %s", sample.id, redact(f"{type(exc).__name__}: {exc}")[:500])
            oom = is_oom(exc)
            break
    if oom:   # here, not in the except block: the traceback's frames no longer hold the tensors
        free_memory()


def sample_row(handle, sample, settings: Settings, identity: dict, worker: str) -> dict:
    """One sample as a row: its measurements, or its failure (status "error"/"oom" and the error text)."""
    start = time.perf_counter()
    try:
        values, extra = run_sample(handle, sample, settings)
        status, error = "ok", None
    except Exception as exc:  # a sample's failure is its row; the job goes on
        status, error = ("oom" if is_oom(exc) else "error"), redact(f"{type(exc).__name__}: {exc}")[:4000]
        log.warning("sample %s failed (%s): %s", sample.id, status, error)
        values, extra = {}, {"traceback": redact(traceback.format_exc(limit=-6))[-4000:]}
    if status != "ok":
        free_memory()  # here, not in the except block: the traceback's frames no longer hold the tensors
    return schema.empty_row(**identity, row_kind="sample", sample_id=str(sample.id), status=status, error=error,
                            **values, wall_s=time.perf_counter() - start, worker=worker,
                            extra=json.dumps(extra, sort_keys=True, default=str))


def summary_row(rows: list[dict], identity: dict, worker: str, wall_s: float, extra: dict) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] != "ok"]
    status = "oom" if any(r["status"] == "oom" for r in failed) else "error" if failed else "ok"
    values = {c: _mean(r[c] for r in ok) for c in MEAN_COLUMNS}
    for column in ROUNDED_MEAN_COLUMNS:
        mean = _mean(r[column] for r in ok)
        values[column] = None if mean is None else round(mean)
    peaks = [r["peak_mem_bytes"] for r in ok if r["peak_mem_bytes"] is not None]
    values["peak_mem_bytes"] = max(peaks) if peaks else None
    values["ppl"] = math.exp(values["nll"]) if values["nll"] is not None else None
    metrics = {r["metric"] for r in ok}
    values["metric"] = metrics.pop() if len(metrics) == 1 else None
    error = None
    if failed:
        error = f"{len(failed)} of {len(rows)} samples failed; first ({failed[0]['sample_id']}): {failed[0]['error']}"
        extra["failed_samples"] = [r["sample_id"] for r in failed]
    return schema.empty_row(**identity, row_kind="summary", status=status, error=error, **values,
                            n_samples=len(rows), n_failed=len(failed), wall_s=wall_s, worker=worker,
                            extra=json.dumps(extra, sort_keys=True, default=str))


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- one sample ----------------------------------------------------------------------------------------------

def run_sample(handle, sample, settings: Settings) -> tuple[dict, dict]:
    """Measure one sample: (row values, extra) — see the module docstring. Raises on failure."""
    if sample.kind == "lm-eval":
        from smartkv.lmeval.sample import run_lm_eval_sample  # lm-eval is an optional extra
        values, extra = run_lm_eval_sample(handle, sample, settings.method, settings.params,
                                           max_length=settings.max_context_tokens)
        extra.update(sample_meta=sample.meta)
        return values, extra
    ids, truncated = truncate(build_input_ids(sample, handle.tokenizer), settings)
    run = run_generate if sample.kind == "generate" else run_ppl if sample.kind == "ppl" else None
    if run is None:
        raise ValueError(f"sample kind must be 'generate', 'ppl' or 'lm-eval', got {sample.kind!r}")
    values, extra = run(handle, sample, ids, settings)
    extra.update(truncated=truncated, sample_meta=sample.meta)
    return values, extra


def truncate(ids: list[int], settings: Settings) -> tuple[list[int], bool]:
    """Cut the prompt to `max_context_tokens` on the job's side (middle: keep the first and last halves)."""
    limit = settings.max_context_tokens
    if settings.truncation_side == "none" or limit is None or len(ids) <= limit:
        return ids, False
    if settings.truncation_side == "left":
        return ids[-limit:], True
    if settings.truncation_side == "right":
        return ids[:limit], True
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head):], True


def eos_ids(handle, stop_on_newline: bool = False) -> frozenset[int]:
    """Token ids that end generation; with `stop_on_newline` (LongBench's samsum) the newline token too."""
    ids = {getattr(handle.tokenizer, "eos_token_id", None)}
    if stop_on_newline:
        newline = handle.tokenizer.encode("\n", add_special_tokens=False)
        ids |= set(newline[-1:])
    config_eos = getattr(getattr(handle.model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return frozenset(i for i in ids if i is not None)


def sample_seed(seed: int, sample_id) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def timed_run(handle, ids: list[int], settings: Settings, n: int, **kwargs) -> tuple[Decoded, dict, dict]:
    """The measured run through a fresh cache of the method: (decoded, memory report, timing/memory values).

    On CPU the prefill's reconstruction error is measured inside it (holding the prompt's keys costs nothing we
    report); on CUDA it would inflate the peak memory, so callers measure it in an untimed pass instead.
    """
    device = handle.device
    cache = smartkv.make_cache(settings.config, handle.model)
    speed.reset_peak_memory(device)
    run_fn = decode if device.type == "cuda" else decode_measuring_prefill
    decoded = run_fn(handle.model, ids, cache, n, **kwargs)
    peak = speed.peak_memory_bytes(device)
    report = cache.memory_report()
    allocated = report.total_bytes + cache.slack_bytes()
    del cache
    per_token = decoded.decode_ms_per_token
    values = {"context_tokens": len(ids), "new_tokens": len(decoded.tokens), "prefill_ms": decoded.prefill_ms,
              "decode_ms_per_token": per_token,
              "tokens_per_s": speed.tokens_per_s(1, per_token) if per_token else None, "peak_mem_bytes": peak,
              "kv_total_bytes": report.total_bytes, "kv_fp16_bytes": report.fp16_bytes, "kv_allocated_bytes": allocated,
              "payload_ratio": report.payload_ratio, "total_ratio": report.total_ratio, "avg_bits": report.avg_bits,
              "ttft_ms": decoded.ttft_ms, "tpot_ms": per_token, "output_tokens": len(decoded.tokens),
              "e2e_ms": decoded.e2e_ms}
    return decoded, report.as_dict(), values


def check_context(handle, prompt_tokens: int, new_tokens: int) -> None:
    """A prompt past the model's context would run and score 0 as if the method failed: an error row instead."""
    context = context_of(handle.model.config.to_dict())
    if context is not None and prompt_tokens + new_tokens > context:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) + {new_tokens} new tokens exceed the model's context "
                         f"of {context} tokens; lower the length or set truncation.max_context_tokens")


def run_generate(handle, sample, ids: list[int], settings: Settings) -> tuple[dict, dict]:
    n = settings.max_new_tokens or sample.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    check_context(handle, len(ids), n)
    eos = eos_ids(handle, stop_on_newline=bool(sample.meta.get("stop_on_newline")))
    choose = greedy
    if settings.do_sample:
        generator = torch.Generator().manual_seed(sample_seed(settings.seed, sample.id))
        choose = sampler(generator, settings.temperature, settings.top_p, settings.top_k)
    decoded, memory, values = timed_run(handle, ids, settings, n, eos_ids=eos, choose=choose,
                                        keep_logits=settings.compare_fp16)
    text_tokens = decoded.tokens[:-1] if decoded.tokens and decoded.tokens[-1] in eos else decoded.tokens
    prediction = handle.tokenizer.decode(text_tokens, skip_special_tokens=True)
    values.update(prediction=prediction, metric=sample.metric if sample.answers else None,
                  score=task.score(sample.metric, prediction, sample.answers, sample.all_classes)
                  if sample.answers else None)
    extra = {"memory": memory, "decode_mode": decoded.mode,
             "stopped_at_eos": bool(decoded.tokens) and decoded.tokens[-1] in eos}
    errors = decoded.kv_errors
    if settings.compare_fp16:
        ref = fp16_reference(handle, ids, n, eos_ids=eos)
        logits = decoded.logits
        if decoded.tokens != ref.tokens:  # teacher-force the fp16 tokens; the prefill gives the errors for free
            cache = smartkv.make_cache(settings.config, handle.model)
            forced = decode_measuring_prefill(handle.model, ids, cache, len(ref.tokens), forced=ref.tokens)
            logits, errors = forced.logits, errors or forced.kv_errors
        values.update(decode_path_quality(ref.logits, logits))
        extra.update(agreement(decoded.tokens, ref.tokens), teacher_forced=decoded.tokens != ref.tokens,
                     fp16_prediction=handle.tokenizer.decode(ref.tokens, skip_special_tokens=True))
    return _with_errors(handle, ids, settings, values, extra, errors)


def decode_path_quality(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """KL to fp16 and top-1 agreement over the positions that read the cache: the first distribution comes from
    the prefill, which attends to the prompt unquantized (KL 0, agreement 1 for every method), so it is left out
    (kept when it is the only one)."""
    if len(logits) > 1:
        ref_logits, logits = ref_logits[1:], logits[1:]
    return {"kl_to_fp16": quality.kl_divergence(ref_logits, logits).mean().item(),
            "top1_agreement": quality.top1_agreement(ref_logits, logits)}


def run_ppl(handle, sample, ids: list[int], settings: Settings) -> tuple[dict, dict]:
    cont = continuation_ids(sample, handle.tokenizer)  # the prompt set's length: max_new_tokens is for generation
    if not cont:
        raise ValueError(f"perplexity sample {sample.id!r} has an empty continuation")
    check_context(handle, len(ids), len(cont))
    decoded, memory, values = timed_run(handle, ids, settings, len(cont), forced=cont)
    token_nll = quality.nll(decoded.logits, torch.tensor(cont))
    values.update(metric="ppl", nll=token_nll.mean().item(), ppl=quality.perplexity(token_nll))
    extra = {"memory": memory, "decode_mode": decoded.mode}
    if settings.compare_fp16:
        ref = fp16_reference(handle, ids, len(cont), forced=cont)
        values.update(decode_path_quality(ref.logits, decoded.logits))
        extra["fp16_nll"] = quality.nll(ref.logits, torch.tensor(cont)).mean().item()
    return _with_errors(handle, ids, settings, values, extra, decoded.kv_errors)


def _with_errors(handle, ids, settings, values: dict, extra: dict, errors: dict | None) -> tuple[dict, dict]:
    """Add the prefill's reconstruction error, measuring it in an untimed prefill if no pass measured it yet."""
    if errors is None:
        cache = smartkv.make_cache(settings.config, handle.model)
        errors = prefill_errors(handle.model, ids, cache)
    values.update(key_rel_error=errors["key_rel_error"], value_rel_error=errors["value_rel_error"])
    extra.update(key_rel_error_per_layer=errors["key_rel_error_per_layer"],
                 value_rel_error_per_layer=errors["value_rel_error_per_layer"])
    return values, extra


def agreement(tokens: list[int], ref_tokens: list[int]) -> dict:
    """How far a free-running continuation follows the fp16 one: position-wise matches over the fp16 length,
    the length of the common prefix, and exact equality."""
    same = [a == b for a, b in zip(tokens, ref_tokens)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"token_agreement": sum(same) / len(ref_tokens) if ref_tokens else None,
            "prefix_match_tokens": prefix, "exact_match_fp16": tokens == ref_tokens}
