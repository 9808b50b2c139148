"""Decode steps as one CUDA graph: the whole model's step captured once and replayed, without Python.

At batch 8 an eager decode step of an 8B model spends more time on the host (transformers' Python, kernel
launches) than the GPU needs for it (BENCHMARKS.md, "End-to-end decoding"). A graph replays every launch of a
step at once; what changes between steps (the new tokens, their position, the cache length) lives in device
buffers that the captured kernels read:

    dec = GraphDecoder(model, cache, max_length=n_prompt + new_tokens)  # fp16/int8/int4/smartkv, StaticCache
    logits = dec.step(next_ids)                                            # (B, 1) -> (B, 1, vocab)

Caches: smartkv's `fp16`, `int8`, `int4` and `smartkv` with the kernels (`SmartKVCache.begin_static`: every step
writes and reads through `StaticDecode`'s device positions, attention runs over the reserved capacity up to the
device length), and transformers' `StaticCache`. A step whose work differs (SmartKV's flush with
`realloc="append"`: `cache.static_variant()`) has a graph of its own, captured the first time it comes and replayed
every period after. SmartKV's re-allocating designs re-allocate every `realloc_every` tokens on the host between
two replays (`cache.advance`), and the next step is captured again, so a graph serves one re-allocation period.
KIVI re-organises its window every step and runs ordinary steps.

mode: "graph" (CUDA), "static" (the same static step, run eagerly: what CPU tests check against ordinary steps),
"eager" (ordinary `model(...)` steps; any cache). The default (`default_mode`) is "graph" on CUDA for a cache
that supports it and "eager" otherwise, so the same loop runs on every machine and with every method.
"""
from __future__ import annotations

import torch
from smartkv.cache.hf_compat import StaticCache, cache_kwargs

from smartkv.cache.layer import SmartKVCache

MODES = ("graph", "static", "eager")


def static_capable(cache) -> bool:
    """Whether `cache`'s decode steps can be static (captured as a graph): transformers' StaticCache, or a smartkv
    cache whose `static_problem` is None (fp16 / int8 / int4 / smartkv on the kernels path, attention hooked)."""
    return isinstance(cache, StaticCache) or (isinstance(cache, SmartKVCache) and cache.static_problem() is None)


def default_mode(device: torch.device | str, cache) -> str:
    return "graph" if torch.device(device).type == "cuda" and static_capable(cache) else "eager"


class GraphDecoder:
    """One new token per sequence per `step`, through `cache`, for up to `max_length` tokens in all. While it is
    open (static modes) the cache's one-token steps write where its device position says: decode through `step`
    only, and `close()` before calling the model on the cache directly again."""

    def __init__(self, model, cache, max_length: int, mode: str | None = None, warmup: int = 2):
        device = next(model.parameters()).device
        mode = mode if mode is not None else default_mode(device, cache)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"mode 'graph' needs the model on a CUDA device, got {device}")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1 (eager steps before the capture), got {warmup!r}")
        self.hf_static = isinstance(cache, StaticCache)
        if not self.hf_static and not isinstance(cache, SmartKVCache):
            raise ValueError(f"cache must be a smartkv cache or transformers' StaticCache, got {type(cache).__name__}")
        n = int(cache.get_seq_length())  # StaticCache may answer with a tensor
        if n == 0:
            raise ValueError("the cache must hold the prompt already (run the prompt through the model first)")
        if not isinstance(max_length, int) or max_length <= n:
            raise ValueError(f"max_length must be an integer above the {n} cached tokens, got {max_length!r}")
        cap = getattr(cache, "max_cache_len", None) or getattr(cache.layers[0], "max_cache_len", None) \
            if self.hf_static else None  # on the cache in older 5.x, on each layer in newer ones
        if cap is not None and max_length > cap:
            raise ValueError(f"max_length must be at most the StaticCache's max_cache_len ({cap}), got {max_length}")
        self.model, self.cache, self.max_length, self.mode = model, cache, max_length, mode
        self.device = device
        self.length = n          # tokens per sequence in the cache (host count)
        self.captures = 0        # graphs captured (SmartKV: one per re-allocation period, or one per variant)
        self._eager_left = warmup
        self.graphs: dict = {}   # the cache's static_variant() -> (graph, its logits buffer)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.state = None
        if mode != "eager" and not self.hf_static:
            self.state = cache.begin_static(max_length)
        self._ids = self._positions = self._logits = None
        self._pool = None
        self._cache_kw = cache_kwargs(model, cache)  # once: the step is host-bound

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, vocab) of the next token after `input_ids` (B, 1), which the cache then holds."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"input_ids must be (batch, 1), got {tuple(input_ids.shape)}")
        if self.length + 1 > self.max_length:
            raise ValueError(f"max_length ({self.max_length}) reached: the cache holds {self.length} tokens")
        with torch.inference_mode():
            if self.mode == "eager":
                logits = self.model(input_ids, **self._cache_kw, use_cache=True, logits_to_keep=1).logits
            else:
                logits = self._static_step(input_ids)
        self.length += 1
        return logits

    def _buffers(self, input_ids: torch.Tensor) -> None:
        B = input_ids.shape[0]
        self._ids = torch.zeros(B, 1, dtype=input_ids.dtype, device=self.device)
        self._positions = torch.zeros(B, 1, dtype=torch.long, device=self.device)  # position_ids

    def _forward(self) -> torch.Tensor:
        # no attention_mask: the layers' device lengths say what is valid (a mask built while capturing would
        # carry this step's length on the host into every replay; static layers ignore the causal one)
        logits = self.model(self._ids, **self._cache_kw, use_cache=True, position_ids=self._positions,
                            logits_to_keep=1).logits
        if self.state is not None:
            self.state.join()
        return logits

    def _static_step(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._ids is None:
            self._buffers(input_ids)
        if input_ids.shape != self._ids.shape:
            raise ValueError(f"input_ids must keep the shape of the first step, {tuple(self._ids.shape)}, got "
                             f"{tuple(input_ids.shape)}")
        n = self.length
        self._ids.copy_(input_ids)
        self._positions.fill_(n)
        if self.state is not None:
            self.state.pos.fill_(n)
            self.state.lengths.fill_(n + 1)
        if self.mode == "static":
            logits = self._forward()
        elif self._variant() in self.graphs:
            self.graph, self._logits = self.graphs[self._variant()]
            self.graph.replay()
            logits = self._logits
        elif self._eager_left > 0:  # real steps on a side stream first, as torch.cuda.graphs asks
            self._eager_left -= 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            variant = self._variant()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=self._pool):
                self._logits = self._forward()
            self._pool = self.graph.pool()   # the variants share one memory pool
            self.graphs[variant] = (self.graph, self._logits)
            self.captures += 1
            self.graph.replay()
            logits = self._logits
        logits = logits.clone() if self.graph is not None else logits
        if self.state is not None and self.cache.advance(1):
            # a layer re-organised its storage (SmartKV's re-allocation, run here on the host as an ordinary step
            # runs it after its attention): the next step launches other arguments, so capture again after one
            # eager step (kernels for new pool widths compile outside the capture)
            self.graph, self.graphs, self._pool = None, {}, None
            self._eager_left = 1
        return logits

    def _variant(self):
        return None if self.hf_static else self.cache.static_variant()

    def close(self) -> None:
        """Release the graph and return the cache to ordinary steps (it keeps every token)."""
        self.graph, self.graphs, self._pool = None, {}, None
        if self.state is not None:
            self.cache.end_static()
            self.state = None


def generate_greedy(model, cache, input_ids: torch.Tensor, max_new_tokens: int,
                    mode: str | None = None, stop_ids=None, until=None) -> torch.Tensor:
    """Greedy decoding through `GraphDecoder` steps: the prompt (B, T) through the model, then one token per step.
    Returns the new tokens (B, n): `model.generate(..., do_sample=False)`'s, up to the kernels' rounding, with
    n = max_new_tokens, or fewer when `stop_ids` (token ids, e.g. the end-of-sequence ones) are given and every
    sequence has produced one of them (the step that produced the last is kept; tokens a sequence makes after
    its own stop token are not meaningful, as with `generate`'s padding), or when `until(tokens so far)` returns
    True (a caller's test that nothing later can change what it needs; one host sync a step). Unpadded batches only
    (graphed steps carry no attention mask; use `generate` for padded ones)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stops = None
    if stop_ids is not None:
        stops = torch.tensor(sorted({int(t) for t in stop_ids}), dtype=torch.long, device=input_ids.device)
        if stops.numel() == 0:
            raise ValueError("stop_ids must name at least one token id, or be None")
    with torch.inference_mode():
        logits = model(input_ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
    dec = GraphDecoder(model, cache, max_length=input_ids.shape[1] + max_new_tokens, mode=mode)
    out = []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    try:
        for i in range(max_new_tokens):
            out.append(logits[:, -1].argmax(-1, keepdim=True))
            if stops is not None:  # one host sync a step: the price of not decoding past the answer
                done |= torch.isin(out[-1][:, 0], stops)
                if bool(done.all()):
                    break
            if until is not None and until(torch.cat(out, 1)):
                break
            if i + 1 < max_new_tokens:  # the last token is returned, not fed (as generate does)
                logits = dec.step(out[-1])
    finally:
        dec.close()
    return torch.cat(out, 1)
