"""What a grid will cost before it runs: time and GPU-hours per method and in total (`submit --dry-run`).

Per job: its samples' prompt tokens (prefilled) and new tokens (decoded one at a time), times the rates measured
for its model and method: prefill milliseconds per prompt token and decode milliseconds per token, each as a
function of context (interpolated between measured contexts for prefill, a straight line for decode, clamped /
extended past the measured range and flagged). Rates come from the results already in the store (any grid's
rows of the same model and method label), else from a short calibration run on this machine (`calibrate`).
Token counts come from finished jobs of the same prompt set (any method), else from the set's options.
Assumptions, stated with the estimate: every generated sample runs the method twice when compared with fp16
(the teacher-forced pass happens when its tokens differ from fp16's; counted always), the fp16 reference runs
once per prompt set, jobs pack perfectly onto the workers, model loads and the driver are not counted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

CALIBRATION_CONTEXTS = (128, 512)
CALIBRATION_DECODE = 8
_LENGTH_KEYS = ("length", "context_tokens", "max_length")
_COUNT_KEYS = ("num_samples", "n_samples")


@dataclass
class Rate:
    """Milliseconds per prompt token (by context) and per decoded token (a line in context), and where from."""
    contexts: list[float]
    prefill_ms_per_token: list[float]
    decode_ms: tuple[float, float]           # (intercept, slope per context token)
    source: str
    cuda: bool = False

    def prefill_ms(self, context: float) -> float:
        return context * float(np.interp(context, self.contexts, self.prefill_ms_per_token))

    def decode_ms_per_token(self, context: float) -> float:
        return max(self.decode_ms[0] + self.decode_ms[1] * context, 1e-3)

    def extrapolated(self, context: float) -> bool:
        return not self.contexts[0] / 2 <= context <= self.contexts[-1] * 2


def fit_rate(samples: pd.DataFrame, source: str) -> Rate | None:
    """A Rate from measured rows (context_tokens, prefill_ms, decode_ms_per_token), None without any."""
    ok = samples.dropna(subset=["context_tokens", "prefill_ms"])
    ok = ok[(ok["context_tokens"] > 0) & (ok["prefill_ms"] > 0)]
    if ok.empty:
        return None
    by_ctx = ok.assign(per_token=ok["prefill_ms"] / ok["context_tokens"]).groupby("context_tokens")["per_token"]
    decode = ok.dropna(subset=["decode_ms_per_token"])
    line = (0.0, 0.0)
    if not decode.empty:
        x, y = decode["context_tokens"].astype(float).values, decode["decode_ms_per_token"].astype(float).values
        slope = max(float(np.polyfit(x, y, 1)[0]), 0.0) if len(set(x)) > 1 else 0.0
        line = (float(y.mean() - slope * x.mean()), slope)
    cuda = "peak_mem_bytes" in ok and ok["peak_mem_bytes"].notna().any()  # only CUDA runs record a peak
    return Rate([float(c) for c in by_ctx.median().index], [float(v) for v in by_ctx.median().values], line,
                source, bool(cuda))


def store_rates(frame: pd.DataFrame) -> dict[tuple[str, str], Rate]:
    """{(model, method label): Rate} from every ok sample row of a results frame."""
    if frame.empty:
        return {}
    rows = frame[(frame["row_kind"] == "sample") & (frame["status"] == "ok")]
    rates = {}
    for (model, label), group in rows.groupby(["model", "method_label"]):
        rate = fit_rate(group, f"store ({len(group)} samples)")
        if rate is not None:
            rates[(model, label)] = rate
    return rates


def calibrate(model_spec: dict, methods: list[dict], max_context: int) -> dict[tuple[str, str], Rate]:
    """Measure each method on the model at two short contexts (random token ids, a few decode steps)."""
    import torch

    import smartkv
    from smartkv.bench.run.generation import decode
    from smartkv.bench.run.runner import load_handle
    from smartkv.bench.spec.grid import method_label

    handle = load_handle(model_spec)
    vocab = int(getattr(handle.model.config, "vocab_size", 512))
    contexts = sorted({min(c, max(16, max_context)) for c in CALIBRATION_CONTEXTS})
    rates = {}
    for method in methods:
        rows = []
        for context in contexts:
            ids = torch.randint(3, vocab, (context,), generator=torch.Generator().manual_seed(0)).tolist()
            for _ in range(2 if context == contexts[0] else 1):  # a first run warms up (allocations, kernels)
                cache = smartkv.make_cache(method["name"], handle.model, **method["params"])
                run = decode(handle.model, ids, cache, CALIBRATION_DECODE, keep_logits=False)
            rows.append({"context_tokens": context, "prefill_ms": run.prefill_ms,
                         "decode_ms_per_token": run.decode_ms_per_token,
                         "peak_mem_bytes": 0 if handle.device.type == "cuda" else None})
        rates[(model_spec["name"], method_label(method))] = fit_rate(
            pd.DataFrame(rows), f"calibrated here ({handle.device.type})")
    return rates


def job_tokens(job: dict, measured: pd.DataFrame) -> tuple[int, float, float, str] | None:
    """(samples, prompt tokens, new tokens per sample, source) of a job, or None when nothing says."""
    if not measured.empty:
        same = measured[(measured["model"] == job["model"]["name"])
                        & (measured["prompt_set_hash"] == job.get("prompt_set_hash"))]
        if not same.empty:
            per_job = same.groupby("job_id")
            new = same["output_tokens"] if same["output_tokens"].notna().any() else same["new_tokens"]
            return (int(per_job.size().median()), float(same["context_tokens"].mean()), float(new.mean()),
                    "measured")
    from smartkv.data import get_prompt_set

    options = get_prompt_set(job["prompt_set"]["name"], **job["prompt_set"]["options"]).options
    length = next((options[k] for k in _LENGTH_KEYS if isinstance(options.get(k), (int, float))), None)
    count = next((options[k] for k in _COUNT_KEYS if isinstance(options.get(k), (int, float))), None)
    if length is None or count is None:
        return None
    new = options.get("continuation") or job["generation"].get("max_new_tokens") or 32
    return int(count), float(length), float(new), "options"


@dataclass
class Line:
    method: str
    jobs: int = 0
    samples: int = 0
    prefill_tokens: float = 0.0
    decode_tokens: float = 0.0
    seconds: float = 0.0
    unknown_jobs: int = 0
    sources: set = field(default_factory=set)
    flags: set = field(default_factory=set)


def sample_seconds(rate: Rate, context: float, new: float, passes: int) -> tuple[float, float, float]:
    decode_ms = new * rate.decode_ms_per_token(context + new / 2)
    return passes * (rate.prefill_ms(context) + decode_ms) / 1000.0, passes * context, passes * new


def estimate(jobs: list[dict], rates: dict, measured: pd.DataFrame) -> dict[str, Line]:
    """{method label: Line} over `jobs`, plus the fp16 references ("fp16 reference") they compare against."""
    from smartkv.bench.spec.grid import method_label

    lines: dict[str, Line] = {}
    references = set()
    for job in jobs:
        label = method_label(job["method"])
        line = lines.setdefault(label, Line(label))
        line.jobs += 1
        rate, tokens = rates.get((job["model"]["name"], label)), job_tokens(job, measured)
        if rate is None or tokens is None:
            line.unknown_jobs += 1
            continue
        count, context, new, token_source = tokens
        compared = job["generation"].get("compare_fp16", True) and job["method"]["name"] != "fp16"
        lm_eval = job["prompt_set"]["name"].startswith("lm-eval:")
        passes = 2 if compared and not lm_eval and job["prompt_set"]["name"] != "prose-ppl" else 1
        seconds, pre, dec = sample_seconds(rate, context, new, passes)
        line.samples += count
        line.seconds += (count + job["generation"].get("warmup", 1)) * seconds   # and the untimed warm-up runs
        line.prefill_tokens += count * pre
        line.decode_tokens += count * dec
        line.sources |= {rate.source, f"tokens: {token_source}"}
        if rate.extrapolated(context):
            line.flags.add(f"context {context:.0f} outside measured {rate.contexts[0]:.0f}-{rate.contexts[-1]:.0f}")
        key = (job["model"]["name"], job["prompt_set_hash"], job["seed"])
        reference = rates.get((job["model"]["name"], "fp16"))
        if compared and not lm_eval and key not in references and reference is not None:
            references.add(key)
            ref = lines.setdefault("fp16 reference", Line("fp16 reference (once per prompt set)"))
            seconds, pre, dec = sample_seconds(reference, context, new, 1)
            ref.samples += count
            ref.seconds += count * seconds
            ref.prefill_tokens += count * pre
            ref.decode_tokens += count * dec
            ref.sources.add(reference.source)
    return lines


def any_cuda(rates: dict) -> bool:
    return any(rate.cuda for rate in rates.values())


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.3g}" if seconds else "0"


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"


def grid_estimate(plan, workers: int | None = None, workers_per_gpu: int = 1, allow_calibration: bool = True,
                  on_calibrate=None) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, notes) of the estimate for a plan's pending jobs; calibrates missing rates when allowed
    (`on_calibrate(model name, methods)` is told first)."""
    from smartkv.bench.results.store import ResultStore
    from smartkv.bench.spec.grid import method_label

    frames = [ResultStore(root).read()[0].to_pandas() for root in _stores_near(plan.store.root)]
    frame = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(
        not f.empty for f in frames) else pd.DataFrame()
    measured = frame[(frame["row_kind"] == "sample") & (frame["status"] == "ok")] if not frame.empty else frame
    rates = store_rates(frame)
    missing: dict[str, tuple[dict, dict[str, dict]]] = {}
    for job in plan.pending:
        for method in (job["method"], {"name": "fp16", "params": {}}):
            label = method_label(method)
            if (job["model"]["name"], label) not in rates:
                missing.setdefault(job["model"]["name"], (job["model"], {}))[1].setdefault(label, method)
    if allow_calibration:
        for name, (model, methods) in missing.items():
            if on_calibrate:
                on_calibrate(name, list(methods))
            rates.update(calibrate(model, list(methods.values()), max(CALIBRATION_CONTEXTS)))
    lines = estimate(plan.pending, rates, measured)
    return _table(lines, rates, workers or _default_workers(), workers_per_gpu)


def _stores_near(root) -> list:
    """The grid's results folder and its siblings (other grids' results under the same parent)."""
    from pathlib import Path

    root = Path(root)
    siblings = sorted(p for p in root.parent.glob("*") if p.is_dir() and not p.name.startswith(("_", ".")))
    return [root] + [p for p in siblings if p != root] if root.parent.is_dir() else [root]


def _default_workers() -> int:
    """What submit starts without --workers: one per GPU, else one per CPU."""
    import os

    import torch

    return torch.cuda.device_count() or os.cpu_count() or 1


def _table(lines: dict[str, Line], rates: dict, workers: int, workers_per_gpu: int):
    unit = "GPU-h" if any_cuda(rates) else "CPU worker-h"
    header = ["method", "jobs", "samples", "prefill tokens", "decode tokens", "time", unit, "from"]
    rows, total = [], Line("total")
    reference = lines.pop("fp16 reference", None)
    lines = {**lines, **({"fp16 reference": reference} if reference else {})}  # the reference row goes last
    for line in lines.values():
        for attr in ("jobs", "samples", "prefill_tokens", "decode_tokens", "seconds", "unknown_jobs"):
            setattr(total, attr, getattr(total, attr) + getattr(line, attr))
        rows.append(_row(line, workers_per_gpu))
    rows.append(_row(total, workers_per_gpu))
    notes = [f"total {clock(total.seconds)} of worker time; on {workers} worker(s), about "
             f"{clock(total.seconds / workers)} wall clock if jobs pack perfectly (model loads not counted)",
             "assumed: a generated sample compared with fp16 runs the method twice (the teacher-forced pass runs "
             "when its tokens differ from fp16's), the fp16 reference once per prompt set, lm-eval documents once; "
             "decode time grows linearly with context, prefill per token as measured at the nearest context",
             f"{unit} = time / {workers_per_gpu} worker(s) per GPU" if unit == "GPU-h" else
             "rates were measured on CPU: GPU-hours need rates from a GPU run (submit there, or calibrate there)"]
    if total.unknown_jobs:
        notes.append(f"{total.unknown_jobs} job(s) have no estimate: no rate for their model and method "
                     "(--no-calibrate) or a prompt set whose size its options do not give (lm-eval before any run)")
    for line in lines.values():
        notes += [f"{line.method}: {flag} (extrapolated)" for flag in sorted(line.flags)]
    return header, rows, notes


def _row(line: Line, workers_per_gpu: int) -> list[str]:
    unknown = f" ({line.unknown_jobs} unknown)" if line.unknown_jobs else ""
    return [line.method, f"{line.jobs}{unknown}", str(line.samples), f"{line.prefill_tokens:,.0f}",
            f"{line.decode_tokens:,.0f}", clock(line.seconds), hours(line.seconds / workers_per_gpu),
            "; ".join(sorted(line.sources))]


def renderables(plan, workers: int | None, workers_per_gpu: int, allow_calibration: bool, on_calibrate) -> list:
    """What `submit --dry-run` prints after the job list: the estimate table, then its notes."""
    from rich.table import Table

    header, rows, notes = grid_estimate(plan, workers, workers_per_gpu, allow_calibration, on_calibrate)
    table = Table(title=f"estimate for the {len(plan.pending)} jobs to run")
    for col in header:
        table.add_column(col)
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=i == len(rows) - 2)
    return [table, *(f"- {note}" for note in notes)]
