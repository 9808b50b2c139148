"""The manual decode loop every measurement goes through, the fp16 reference it is compared with, and the
reconstruction error of a prefill.

`decode` runs a prompt through a cache the way a server would: one prefill call, then one forward call per token,
so each later token reads what the cache stored (dequantized), and each step is timed on its own, eagerly; with
`SMARTKV_DECODE_MODE=auto` (or graph) a cache whose steps can be captured decodes through CUDA graphs
(`smartkv.cache.graphs.GraphDecoder`, as serving engines do: an eager step of a batch of one is mostly kernel
launches), its captures counted in the decode time (each request's cache is new, so its graphs are too). It chooses
tokens (greedy or sampled) or is fed them (`forced`: teacher forcing, perplexity). Never `model.generate`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

import smartkv
from smartkv.cache.graphs import MODES, GraphDecoder, default_mode, static_capable
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.metrics import quality
from smartkv.metrics.speed import Timer

REFERENCE_ATTR = "_smartkv_fp16_references"   # the per-handle memo of fp16 references
REFERENCE_CACHE_MB = int(os.environ.get("SMARTKV_REFERENCE_CACHE_MB", "2048"))
DECODE_MODES = ("auto",) + MODES

Chooser = Callable[[torch.Tensor], int]        # logits (vocab,) -> next token id


@dataclass
class Decoded:
    tokens: list[int]                # chosen or forced tokens; tokens[i] was chosen from logits[i]
    logits: torch.Tensor | None      # (n, vocab) float32 on CPU, or None when not kept
    prefill_ms: float
    decode_ms: float                 # all forward calls after the prefill, together
    decode_steps: int                # how many there were (n - 1 unless stopped at EOS)
    kv_errors: dict | None = None    # what `after_prefill` returned (reconstruction errors)
    ttft_ms: float | None = None     # serving view: request start to the first token chosen (None: no token)
    e2e_ms: float | None = None      # request start to the last token chosen, host work included
    mode: str = "eager"              # how the decode steps ran: graph, static or eager (see decode_mode)

    @property
    def decode_ms_per_token(self) -> float | None:
        return self.decode_ms / self.decode_steps if self.decode_steps else None

    @property
    def nbytes(self) -> int:
        return 0 if self.logits is None else self.logits.numel() * self.logits.element_size()


def greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax(-1))


def sampler(generator: torch.Generator, temperature: float | None = None, top_p: float | None = None,
            top_k: int | None = None) -> Chooser:
    """Multinomial sampling with temperature, top-k and nucleus (top-p) filtering, drawn from `generator` (CPU)."""
    def choose(logits: torch.Tensor) -> int:
        scores = logits.float().cpu() / (temperature or 1.0)
        if top_k:
            kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = sorted_scores.softmax(-1)
            drop = probs.cumsum(-1) - probs >= top_p    # keep the smallest prefix whose mass reaches top_p
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
    return choose


def decode_mode(device: torch.device, wanted: str | None = None) -> str:
    """How `decode` is asked to run its steps: `wanted`, default $SMARTKV_DECODE_MODE, else "eager" ("auto": "graph"
    on CUDA for a cache whose steps can be captured, else "eager", `resolve_mode` once the prompt is in). Eager stays
    the default until the graphed runner is measured on a GPU (per-request captures weigh on short generations)."""
    wanted = wanted or os.environ.get("SMARTKV_DECODE_MODE") or "eager"
    if wanted not in DECODE_MODES:
        raise ValueError(f"SMARTKV_DECODE_MODE must be one of {', '.join(DECODE_MODES)}, got {wanted!r}")
    if wanted == "graph" and torch.device(device).type != "cuda":
        raise ValueError(f"decode mode 'graph' needs a CUDA device, got {device}")
    return wanted


def resolve_mode(device: torch.device, cache, wanted: str) -> str:
    """`wanted` for `cache` holding its prompt: "auto" becomes graph or eager; a static mode the cache cannot run
    is an error."""
    if wanted == "auto":
        return default_mode(device, cache)
    if wanted != "eager" and not static_capable(cache):
        raise ValueError(f"decode mode {wanted!r} needs a cache whose steps can be static (fp16, int8, int4 or "
                         f"smartkv on the kernels path, full-attention layers), got {type(cache).__name__}")
    return wanted


def decode(model, input_ids: list[int], cache, max_new_tokens: int, *, forced: list[int] | None = None,
           eos_ids=frozenset(), choose: Chooser = greedy, keep_logits: bool = True,
           after_prefill: Callable[[object], dict] | None = None,
           stop: Callable[[list[int]], bool] | None = None, mode: str | None = None) -> Decoded:
    """Prefill `input_ids` into `cache`, then produce up to `max_new_tokens` tokens one forward call at a time.

    With `forced`, token i is forced[i] (no EOS stop) and logits[i] is the model's distribution for it.
    `after_prefill(cache)` runs between prefill and decode, outside the timed parts; its result lands in
    `kv_errors`. `stop(tokens)` ends a free-running generation early (stop strings). `mode`: see `decode_mode`
    (graphed steps count their captures, and the static buffers made after the prefill, in `decode_ms`). Timings
    are wall clock around each forward call, synchronised on CUDA; `ttft_ms` and `e2e_ms` also count the host's
    token choices.
    """
    device = next(model.parameters()).device
    kw = {**cache_kwargs(model, cache), "use_cache": True}
    n = min(max_new_tokens, len(forced)) if forced is not None else max_new_tokens
    mode = decode_mode(device, mode)
    tokens, kept, decode_ms, steps, kv_errors, ttft_ms, dec = [], [], 0.0, 0, None, None, None
    try:
        with torch.inference_mode():
            ids = torch.tensor([input_ids], device=device)
            with Timer(device) as prefill:
                start = time.perf_counter()  # after the timer's synchronisation: the request starts here
                logits = model(input_ids=ids, logits_to_keep=1, **kw).logits[0, -1]
            if after_prefill is not None:
                untimed = time.perf_counter()
                kv_errors = after_prefill(cache)
                start += time.perf_counter() - untimed  # the measurement is not the request's
            mode = resolve_mode(device, cache, mode)
            for i in range(n):
                token = forced[i] if forced is not None else choose(logits)
                tokens.append(token)
                if i == 0:
                    ttft_ms = (time.perf_counter() - start) * 1000.0
                if keep_logits:
                    kept.append(logits.float())
                if i == n - 1 or (forced is None and (token in eos_ids or (stop is not None and stop(tokens)))):
                    break
                step = torch.tensor([[token]], device=device)
                with Timer(device) as timer:
                    if mode == "eager":
                        logits = model(input_ids=step, **kw).logits[0, -1]
                    else:   # the static buffers, made once the first step is due, count as decoding
                        dec = dec or GraphDecoder(model, cache, max_length=len(input_ids) + n, mode=mode)
                        logits = dec.step(step)[0, -1]
                decode_ms += timer.ms
                steps += 1
    finally:
        if dec is not None:   # the cache back to ordinary steps (it keeps every token)
            dec.close()
    e2e_ms = (time.perf_counter() - start) * 1000.0 if tokens else None
    stacked = torch.stack(kept).cpu() if kept else None
    return Decoded(tokens, stacked, prefill.ms, decode_ms, steps, kv_errors, ttft_ms, e2e_ms, mode)


# --- reconstruction error ------------------------------------------------------------------------------------

@contextmanager
def capture_prefill(cache):
    """Record, per layer, the keys and values of the first `update` (the prefill): exactly what an fp16 cache
    stores for the prompt. Yields {layer_idx: (keys, values)}, (B, H, T, D) each; holds them until cleared."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    inner = cache.update

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        captured.setdefault(layer_idx, (key_states, value_states))
        return inner(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = update  # instance attribute, shadows the method
    try:
        yield captured
    finally:
        del cache.update
        captured.clear()


def kv_errors(cache, captured: dict) -> dict:
    """Relative error of what the cache returns for the prompt against the prompt's own keys and values,
    per layer and averaged over layers (on a sliding-window layer, over the prompt tokens it still holds)."""
    per_k, per_v = [], []
    for layer_idx in sorted(captured):
        ref_k, ref_v = captured[layer_idx]
        k, v = cache.stored_kv(layer_idx)
        first = getattr(cache.layers[layer_idx], "evicted", 0)   # the position of the first token held
        T = ref_k.shape[-2] - first
        per_k.append(quality.relative_error(ref_k[..., first:, :], k[..., :T, :]))
        per_v.append(quality.relative_error(ref_v[..., first:, :], v[..., :T, :]))
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"key_rel_error": mean(per_k), "value_rel_error": mean(per_v),
            "key_rel_error_per_layer": per_k, "value_rel_error_per_layer": per_v}


def decode_measuring_prefill(model, input_ids: list[int], cache, max_new_tokens: int, **kwargs) -> Decoded:
    """`decode` that also measures the prefill's reconstruction error (`Decoded.kv_errors`). Holding the
    prompt's keys and values until the prefill ends costs their memory: never inside a peak-memory measurement."""
    with capture_prefill(cache) as captured:
        def measure(c):
            errors = kv_errors(c, captured)
            captured.clear()
            return errors
        return decode(model, input_ids, cache, max_new_tokens, after_prefill=measure, **kwargs)


def prefill_errors(model, input_ids: list[int], cache) -> dict:
    """Reconstruction error of one untimed prefill into `cache`."""
    return decode_measuring_prefill(model, input_ids, cache, 0, keep_logits=False).kv_errors


# --- the fp16 reference, computed once per (model, prompt) -----------------------------------------------------

class ReferenceMemo:
    """Least-recently-used fp16 references of one model, bounded by the bytes of their logits."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, Decoded] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> Decoded | None:
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return found

    def put(self, key: str, value: Decoded) -> None:
        self.items[key] = value
        while len(self.items) > 1 and sum(v.nbytes for v in self.items.values()) > self.max_bytes:
            self.items.popitem(last=False)


def reference_memo(handle) -> ReferenceMemo:
    memo = getattr(handle, REFERENCE_ATTR, None)
    if memo is None:
        memo = ReferenceMemo(REFERENCE_CACHE_MB << 20)
        setattr(handle, REFERENCE_ATTR, memo)
    return memo


def fp16_reference(handle, input_ids: list[int], max_new_tokens: int, *, forced: list[int] | None = None,
                   eos_ids=frozenset()) -> Decoded:
    """The fp16 cache's greedy continuation (or its logits over `forced` tokens) of `input_ids`, memoised on the
    handle so that a worker running many methods over the same prompts computes it once."""
    spec = [input_ids, max_new_tokens, forced, sorted(eos_ids)]
    key = hashlib.sha256(json.dumps(spec).encode()).hexdigest()
    memo = reference_memo(handle)
    found = memo.get(key)
    if found is None:
        cache = smartkv.make_cache("fp16", handle.model)
        found = decode(handle.model, input_ids, cache, max_new_tokens, forced=forced, eos_ids=eos_ids)
        memo.put(key, found)
    return found
