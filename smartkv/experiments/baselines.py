"""The original validation experiment's baselines, measured honestly: baselines, prompts, tensor-only memory and error
measurements, and the run of every baseline THROUGH its cache on a model. No printing (the CLI prints).

The public SmartKV repository's `validate_baselines` generated with the model's full-precision cache for every
baseline, measured "reconstruction error" on unrelated random tensors and reported analytic `bits/16` ratios.
Here every number comes from the cache the tokens were generated through: true bytes held (payload and total),
the error of the prompt's keys/values as the cache returns them, agreement with the fp16 cache, and latency.
"""
from __future__ import annotations

import json
import logging
import math
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

import smartkv
from smartkv.bench.run.worker import Settings, run_sample
from smartkv.data import Sample
from smartkv.data.inputs import count_tokens
from smartkv.data.prose import prose_paragraphs
from smartkv.metrics.quality import relative_error
from smartkv.metrics.speed import time_ms
from smartkv.models import EMBEDDED_ALIASES, TINY_MODELS, embedded_target, model_kv_shape, tiny_config

log = logging.getLogger(__name__)

# Display name -> (registered method, parameters): the original table's five rows. KIVI keeps the original
# K2V4 configuration (payload 0.1875x), with KIVI's real grouping (G=32) and residual window (R=128).
BASELINES: dict[str, tuple[str, dict]] = {
    "FP16": ("fp16", {}), "INT8": ("int8", {}), "INT4": ("int4", {}), "KIVI": ("kivi", {}), "SmartKV": ("smartkv", {}),
}
HUB_MODELS = ("gpt2", "gpt2-medium")
MODEL_NAMES = HUB_MODELS + ("smollm2",) + TINY_MODELS
FALLBACK_MODEL = "smollm2"
# (layers, KV heads, head_dim) of the hub models, from their configs (GPT2Config() defaults are gpt2's).
HUB_SHAPES = {"gpt2": (12, 12, 64), "gpt2-medium": (24, 16, 64)}
# published configs (layers, KV heads, head_dim), used if the local copy is not converted yet
EMBEDDED_SHAPES = {"smollm2-135m-instruct": (30, 3, 64), "gemma3-270m": (18, 1, 256)}

NATURAL_PROMPTS = (
    "Summarize the passage above in two sentences.",
    "What is the main idea of the text above? Answer briefly.",
    "Explain the passage above to someone who is new to programming.",
    "List three facts stated in the text above.",
    "Write one question a student might ask about the passage above, and answer it.",
    "Which terms in the passage above would a beginner need defined? Define two of them.",
)


def baseline_name(text: str) -> str:
    """The canonical baseline name for `text`, case-insensitively; ValueError naming the allowed ones."""
    for name in BASELINES:
        if name.lower() == str(text).lower():
            return name
    raise ValueError(f"unknown baseline {text!r}; allowed: {', '.join(BASELINES)} (any case)")


def check_model_name(name: str) -> str:
    if name.lower() in MODEL_NAMES or name.lower() in EMBEDDED_ALIASES or Path(name).is_dir():
        return name.lower() if not Path(name).is_dir() else name
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)} or a local model directory")


def model_shape(name: str) -> dict:
    """Layers, KV heads and head_dim of a model without loading (or downloading) its weights."""
    if name in HUB_SHAPES:
        layers, heads, head_dim = HUB_SHAPES[name]
    elif name in EMBEDDED_ALIASES and not embedded_target(name).is_dir():
        layers, heads, head_dim = EMBEDDED_SHAPES[embedded_target(name).name]
    else:
        if name in TINY_MODELS:
            config = tiny_config(name)
        else:
            from transformers import AutoConfig
            path = embedded_target(name) if name in EMBEDDED_ALIASES else Path(name)
            config = AutoConfig.from_pretrained(path)
        shape = model_kv_shape(config)
        layers, heads, head_dim = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
    return {"num_layers": layers, "num_kv_heads": heads, "head_dim": head_dim}


# --- tensors only: memory and reconstruction error ------------------------------------------------------------

def synthetic_kv(num_kv_heads: int, head_dim: int, tokens: int, seed: int, dtype=torch.float16):
    """Keys and values shaped like real ones, (1, H, T, D) each. Keys: per-channel offsets and a few outlier
    channels ten times larger (the structure that breaks per-token low-bit keys); values: per-token scales."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, num_kv_heads, tokens, head_dim)
    channel_scale = torch.ones(1, num_kv_heads, 1, head_dim)
    outliers = torch.randint(0, head_dim, (num_kv_heads, max(1, head_dim // 16)), generator=g)
    channel_scale[0].scatter_(-1, outliers.unsqueeze(1), 10.0)  # (H, 1, D): a few channels per head
    offset = torch.randn(1, num_kv_heads, 1, head_dim, generator=g) * channel_scale * 0.5
    keys = torch.randn(shape, generator=g) * channel_scale + offset
    token_scale = torch.exp(0.5 * torch.randn(1, num_kv_heads, tokens, 1, generator=g))
    values = torch.randn(shape, generator=g) * token_scale
    return keys.to(dtype), values.to(dtype)


def fill_cache(baseline: str, shape: dict, tokens: int, seed: int = 0):
    """A baseline's cache holding `tokens` tokens of synthetic K/V in every layer, written as a prefill of all but
    the last token and one decode step (so windows and re-allocations behave as while generating).
    Returns (cache, [(keys, values)] per layer)."""
    method, params = BASELINES[baseline]
    cache = smartkv.make_cache(method, num_layers=shape["num_layers"], **params)
    kv = [synthetic_kv(shape["num_kv_heads"], shape["head_dim"], tokens, seed + layer)
          for layer in range(shape["num_layers"])]
    for layer, (k, v) in enumerate(kv):
        cache.update(k[..., :-1, :], v[..., :-1, :], layer)
    for layer, (k, v) in enumerate(kv):
        cache.update(k[..., -1:, :], v[..., -1:, :], layer)
    return cache, kv


def measure_tensors(baseline: str, shape: dict, tokens: int = 1024, seed: int = 0) -> dict:
    """Memory report and reconstruction error of one baseline on synthetic K/V of a model's shape."""
    return measure_filled(baseline, *fill_cache(baseline, shape, tokens, seed))


def measure_filled(baseline: str, cache, kv: list) -> dict:
    """Memory report and reconstruction error of a cache `fill_cache` made."""
    report = cache.memory_report()
    k_err, v_err = [], []
    for layer, (k, v) in enumerate(kv):
        stored_k, stored_v = cache.stored_kv(layer)
        k_err.append(relative_error(k, stored_k))
        v_err.append(relative_error(v, stored_v))
    return {"baseline": baseline, "method": BASELINES[baseline][0],
            **{k: v for k, v in report.as_dict().items() if k != "per_layer"},
            "key_rel_error": sum(k_err) / len(k_err), "value_rel_error": sum(v_err) / len(v_err)}


def decode_step_ms(cache, kv: list, repeats: int = 5) -> float:
    """Median milliseconds of one decode step's cache work at the cache's context: append a token to every
    layer and get back the full keys/values, as attention reads them. Grows the cache by repeats + 1 tokens."""
    step = [(k[..., -1:, :], v[..., -1:, :]) for k, v in kv]

    def one_step():
        for layer, (k, v) in enumerate(step):
            cache.update(k, v, layer)
    return time_ms(one_step, repeats=repeats, warmup=1)


# --- a model: prompts and the run through every baseline ------------------------------------------------------

def validation_samples(tokenizer, num_prompts: int, context_tokens: int = 384, max_new_tokens: int = 32):
    """`num_prompts` generation samples: prose from CPython's docs (about `context_tokens` tokens, a different
    passage each) followed by one of the fixed natural prompts. No references: agreement with fp16 is the
    measure."""
    paragraphs = prose_paragraphs()
    stride = max(1, len(paragraphs) // (num_prompts + 1))
    samples = []
    for i in range(num_prompts):
        chosen, used, start = [], 0, (i + 1) * stride
        while used < context_tokens:
            paragraph = paragraphs[(start + len(chosen)) % len(paragraphs)]
            chosen.append(paragraph)
            used += count_tokens(tokenizer, paragraph)
        instruction = NATURAL_PROMPTS[i % len(NATURAL_PROMPTS)]
        samples.append(Sample(id=f"p{i}", prompt="\n\n".join(chosen) + "\n\n" + instruction, answers=(),
                              metric="", max_new_tokens=max_new_tokens, kind="generate",
                              meta={"instruction": instruction, "first_paragraph": start}))
    return samples


def warm_up(handle) -> None:
    """One short untimed decode, so the first baseline does not pay for allocator and kernel start-up."""
    from smartkv.bench.run.generation import decode
    decode(handle.model, [1, 2, 3, 4], smartkv.make_cache("fp16", handle.model), 2, keep_logits=False)


@dataclass
class BaselineResult:
    baseline: str
    method: str
    label: str
    samples: list[dict]      # per sample: status, error, row values, extra

    def summary(self) -> dict:
        ok = [s for s in self.samples if s["status"] == "ok"]
        keys = ("payload_ratio", "total_ratio", "avg_bits", "key_rel_error", "value_rel_error", "token_agreement",
                "exact_match_fp16", "top1_agreement", "kl_to_fp16", "prefill_ms", "decode_ms_per_token",
                "tokens_per_s", "context_tokens", "new_tokens")
        out = {k: _mean([s.get(k) for s in ok]) for k in keys}
        out.update(n_samples=len(self.samples), n_failed=len(self.samples) - len(ok))
        return out


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def run_baseline(handle, baseline: str, samples: list, seed: int = 0) -> BaselineResult:
    """Generate every sample THROUGH the baseline's cache (worker.run_sample: the same code as the runner)."""
    method, params = BASELINES[baseline]
    settings = Settings(method=method, params=params, seed=seed, compare_fp16=True)
    results = []
    for sample in samples:
        try:
            values, extra = run_sample(handle, sample, settings)
            results.append({"sample_id": sample.id, "status": "ok", **values,
                            **{k: extra.get(k) for k in ("token_agreement", "exact_match_fp16", "prefix_match_tokens",
                                                         "fp16_prediction", "teacher_forced")},
                            "extra": extra})
        except Exception as exc:  # one failing sample is a row of the table, not the end of the experiment
            log.warning("%s on %s failed: %s: %s", baseline, sample.id, type(exc).__name__, exc)
            results.append({"sample_id": sample.id, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
    return BaselineResult(baseline, method, smartkv.make_config(method, **params).label(), results)


def hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def load_for_validation(name: str, device: str, dtype: str = "auto"):
    """(handle, note): the model, or the embedded one when a hub model cannot be loaded offline (note says so)."""
    from smartkv.models import load_model

    if name in HUB_MODELS:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
        if not cached and not hub_reachable():
            note = (f"{name} is not in the local Hugging Face cache and the hub is unreachable (offline): "
                    f"using the embedded model {FALLBACK_MODEL} instead")
            return load_model(FALLBACK_MODEL, device=device, dtype=dtype), note
        try:
            return load_model(name, device=device, dtype=dtype), None
        except OSError as exc:
            note = f"{name} cannot be loaded ({str(exc).splitlines()[0]}): using the embedded model {FALLBACK_MODEL}"
            return load_model(FALLBACK_MODEL, device=device, dtype=dtype), note
    return load_model(name, device=device, dtype=dtype), None


def to_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=False, default=str)
