"""The transformers Cache adapter: one `KVLayer` per model layer inside one `SmartKVCache`.

A layer stores keys/values its own way (codes, windows, pools) and on `update` returns the full (B, H, T, D)
keys and values for attention: stored tokens dequantized, the tokens of this call as computed (full precision),
so a prompt is processed exactly and every later token reads the quantized cache.

Attention hook: `make_cache` switches the model to the registered attention function "smartkv". For layers
that need nothing it is exactly transformers' SDPA (so `fp16` equals `DynamicCache`); a layer that needs query
statistics (SmartKV's importance) overrides `KVLayer.attend`.

Fused decode (CUDA): a layer that implements `_decode_segments` and runs where the Triton kernels do
(`smartkv.kernels.kernels_available`, CUDA only unless `FORCE_KERNELS`) takes the fused path on decode
steps (one new token, cache not empty, hook installed, `use_kernels` not False): `update` stores the token
(quantized into preallocated rows) and returns it unchanged as a placeholder, without dequantizing anything;
`attend` runs `decode_attention` over the segments, reading the codes in place. Same numbers as the reference
path (dequantize + SDPA) to fp16-operand accuracy: the new token still attends at full precision. Falls back to
the reference path for prompts (q_len > 1) and, inside `attend`, for a padded batch (an attention mask present:
the kernel takes per-sequence lengths, not left-padding offsets) by dequantizing the same segments.

Sliding-window layers (Gemma 3) hold what DynamicCache's do, whatever the method (cache/sliding.py); they take the
reference path (dequantize + SDPA under the sliding mask).
"""
from __future__ import annotations

import contextlib
import threading

import torch

from smartkv.cache.buffers import StaticDecode
from smartkv.cache.hf_compat import Cache, CacheLayerMixin, register_attention, sdpa_attention_forward, use_attention
from smartkv.cache.sliding import SlidingWindow
from smartkv.core.memory import LayerBytes, MemoryReport, summarize
from smartkv.kernels import KVSegment, decode_attention, kernels_available, torch_only
from smartkv.kernels.reference import segment_kv

ATTENTION_NAME = "smartkv"
_NO_SCOPE = contextlib.nullcontext()
FORCE_KERNELS = False  # tests: run the kernels on CPU tensors too (only with TRITON_INTERPRET=1)
_active = threading.local()  # the layer whose `update` ran last in this thread, and the keys it returned


class KVLayer(SlidingWindow, CacheLayerMixin):
    """Base cache layer. Subclasses implement `_store` (append new tokens), `_stored_kv` (dequantized stored
    tokens, in order) and `_account` (the tensors they hold); for the fused decode path also `_decode_segments`
    (and `_reserve`, `_slack_bytes` when they hold growable buffers); on sliding-window layers `_evict`."""
    is_sliding = False
    is_compileable = False
    is_croppable = False
    static_capable = False  # implements _static_store / _static_segments / _advance (static decode steps)

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.seq_len = 0
        self.attention_hooked = False   # set by make_cache once the model runs the "smartkv" attention
        self.reserved_tokens = 0
        self._pending: list[KVSegment] | None = None
        self.static: StaticDecode | None = None
        self._torch_only = False   # the kernels run here but this layer does not use them (lazy_initialization)

    # --- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        # full-precision windows are kept in 16 bits, as a real KV cache would (fp16 when the model runs in fp32)
        self.window_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.is_initialized = True
        # Triton for storing (quantize into preallocated rows) and, with the hook, for decode attention
        self.kernels = (getattr(self.config, "use_kernels", True) and kernels_available(self.device)
                        and (self.device.type == "cuda" or FORCE_KERNELS))
        # then its storing, flushes and attention run in torch throughout (kernels.torch_only), the helpers they
        # call included: not Triton's interpreter on CPU tensors, nor Triton with use_kernels=False
        self._torch_only = not self.kernels and kernels_available(self.device)
        self._init_storage()
        if self.reserved_tokens:
            self._reserve(self.reserved_tokens)

    @property
    def fused(self) -> bool:
        """Whether decode steps take the fused kernel path (see the module docstring)."""
        return (self.is_initialized and self.kernels and self.attention_hooked and not self.is_sliding
                and type(self)._decode_segments is not KVLayer._decode_segments)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        with self._kernel_scope():
            return self._update(key_states, value_states)

    def _kernel_scope(self):
        """Where this layer's work runs: `kernels.torch_only` when the kernels run here but the layer does not use
        them, else no scope at all (one reused null context: the eager step is host-bound)."""
        return torch_only() if self._torch_only else _NO_SCOPE

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self._pending is not None:
            raise RuntimeError("the last fused decode step's attention never ran: the model must use the 'smartkv' "
                               "attention (smartkv.make_cache(method, model)), or pass use_kernels=False")
        self._before_update()
        if self.static is not None and key_states.shape[-2] == 1:
            # static step: rows and lengths come from the device; the host's counts move in `advance`
            self._static_store(key_states, value_states, self.static)
            self._pending = self._static_segments(key_states, value_states, self.static)
            _active.layer, _active.keys_id = self, id(key_states)
            return key_states, value_states
        if key_states.shape[-2] == 1 and self.seq_len and self.fused:
            self._store(key_states, value_states)
            self._pending = self._decode_segments(key_states, value_states)
            self.seq_len += 1
            _active.layer, _active.keys_id = self, id(key_states)
            return key_states, value_states  # placeholders: `attend` reads the segments
        past_k, past_v = self._stored_kv() if self.held else (None, None)
        self._store(key_states, value_states)
        self.seq_len += key_states.shape[-2]
        if past_k is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([past_k.to(key_states.dtype), key_states], dim=-2)
            values = torch.cat([past_v.to(value_states.dtype), value_states], dim=-2)
        self._trim()  # once `keys` holds the window: this call's queries still see all of it
        _active.layer, _active.keys_id = self, id(keys)
        return keys, values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store tokens without computing attention inputs (filling a cache, e.g. with synthetic K/V)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        with self._kernel_scope():
            self._before_update()
            self._store(key_states, value_states)
            self.seq_len += key_states.shape[-2]
            self._trim()

    def reserve(self, tokens: int) -> None:
        """Preallocate room for `tokens` tokens in all (growable buffers grow by `storage.GROWTH` otherwise); a
        sliding layer never holds more than its window."""
        if self.sliding_window is not None:
            tokens = min(tokens, self.sliding_window + self.eviction_lag)
        self.reserved_tokens = tokens
        if self.is_initialized:
            self._reserve(tokens)

    def slack_bytes(self) -> int:
        """Bytes allocated beyond the stored tokens (buffer capacity); not part of `layer_bytes`."""
        return self._slack_bytes() if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def reset(self) -> None:
        self.seq_len = self.evicted = 0
        self.is_initialized = False
        self._pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support beam search (reorder_cache)")

    def offload(self):  # quantized storage stays where it is
        pass

    def prefetch(self):
        pass

    # --- what subclasses provide ---------------------------------------------------------------------------
    def _init_storage(self) -> None:
        raise NotImplementedError

    def _before_update(self) -> None:
        """Hook run before new tokens arrive (e.g. flush work deferred from the last attention call)."""

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise NotImplementedError

    def _stored_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _account(self, lb: LayerBytes) -> None:
        raise NotImplementedError

    def _reserve(self, tokens: int) -> None:
        """Preallocate storage for `tokens` tokens (layers with growable buffers)."""

    def _slack_bytes(self) -> int:
        return 0

    def _static_store(self, key_states: torch.Tensor, value_states: torch.Tensor, state: StaticDecode) -> None:
        """Store one token per sequence at row state.pos[b], reading nothing of the length on the host."""
        raise NotImplementedError

    def _static_segments(self, key_states, value_states, state: StaticDecode) -> list[KVSegment]:
        """Segments over the whole reserved capacity, valid up to state.lengths (see KVSegment.residual_last)."""
        raise NotImplementedError

    def _advance(self, tokens: int) -> bool:
        """Count `tokens` stored by static steps in the host-side bookkeeping (buffer lengths); True when the layer
        re-organised its storage doing so (SmartKV's re-allocation), so that a captured step no longer applies."""
        raise NotImplementedError

    def _static_variant(self):
        """The next static step's variant (see SmartKVCache.static_variant): None, the common step."""
        return None

    def _static_end(self) -> None:
        """Leave static steps: hold the stored tokens in ordinary tensors again, freeing phase buffers."""

    def static_blocker(self) -> str | None:
        """Why static steps cannot start now, given that the layer supports them (None: they can)."""
        return None

    def _static_begin(self, tokens: int) -> None:
        """Make room for `tokens` tokens in all before static steps start (no buffer may move after)."""
        self.reserve(tokens)

    def _decode_segments(self, key_states: torch.Tensor, value_states: torch.Tensor) -> list[KVSegment]:
        """What the fused decode attention reads: segments over all cached tokens, in order, ending with this
        step's token at full precision. Implementing it turns the fused path on for a layer.

        Called right after `_store` stored this step's token; key_states / value_states (B, H, 1, D) are that
        token as computed. Return views of the storage, no copies (`_store` must leave the memory they cover
        alone until the next step; kernels are stream-ordered after it). The new token attends unquantized, as
        on the reference path: attach it as the last segment's `key_residual` / `value_residual` when that
        segment is quantized without one (int8/int4: one launch), point at a full-precision window that holds
        it (KIVI), or add `KVSegment(key_states, value_states)`.

        Mixed layouts (SmartKV) return one segment per run stored one way, e.g. full-precision sinks, one
        segment per bit-width pool, and the recent window with the new token: `KVSegment(sink_k, sink_v)`,
        `KVSegment(pool_k, pool_v, lengths=valid_per_sequence, key_scale=k_scale, key_shift=k_mu)` (stored keys
        are (k - shift) / scale; keys rotated into another basis need the query rotated the same way first), and
        `KVSegment(win_k, win_v)`. A layer that also needs attention statistics overrides `attend`, takes
        `self._pending` (and sets it to None) and calls `decode_attention(..., return_token_probs=True,
        probs_out=...)` on it itself; with a mask present it falls back as `_fused_attend` does.
        A layer whose keys and values do not pair token for token (SmartKV: a token's key and value sit in pools
        of different widths) returns `[]` and runs its own passes in `attend`.
        """
        raise NotImplementedError

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """Attention over what `update` returned: the fused kernel on a fused decode step, else SDPA."""
        if self._pending is not None:
            return self._fused_attend(module, query, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    @staticmethod
    def _kernel_attends(attention_mask, kwargs: dict) -> bool:
        """Whether the decode kernels compute this attention call: no mask (a padded batch has one), no softcap,
        no sliding window; otherwise the caller takes the reference path over the same stored tokens."""
        return attention_mask is None and not kwargs.get("softcap") and not kwargs.get("sliding_window")

    def _static_mask(self, kwargs: dict) -> None:
        """The attention mask of a static step: none. Static steps (smartkv.cache.graphs) pass no mask; the causal one
        transformers builds anyway while a CUDA graph is captured covers every stored token, which the device
        lengths already say. Softcap and sliding windows have no static path: an error, never the reference."""
        if not self._kernel_attends(None, kwargs):
            raise ValueError("static decode steps support plain attention only (no softcap, no sliding window)")
        return None

    def _fused_attend(self, module, query, attention_mask, **kwargs):
        segments, self._pending = self._pending, None
        if self.static is not None:
            attention_mask = self._static_mask(kwargs)
        if self._kernel_attends(attention_mask, kwargs):
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            out = decode_attention(query, segments, scaling)           # (B, Hq, 1, D)
            return out.transpose(1, 2), None                           # (B, 1, Hq, D), as SDPA returns
        # a mask (padded batch): the reference path over the same segments
        kv = [segment_kv(seg, query.dtype) for seg in segments]
        keys = torch.cat([k for k, _ in kv], -2)                       # (B, H, T, D)
        values = torch.cat([v for _, v in kv], -2)
        return sdpa_attention_forward(module, query, keys, values, attention_mask, **kwargs)

    # --- accounting ----------------------------------------------------------------------------------------
    def layer_bytes(self) -> LayerBytes:
        """What the layer holds; `elements`: what DynamicCache's layer holds for the same tokens (the reference)."""
        lb = LayerBytes()
        if self.is_initialized and self.seq_len:
            lb.elements = 2 * self.batch_size * self.num_heads * self.reference_tokens * self.head_dim
            lb.tokens = self.held
            self._account(lb)
        return lb

    def stored_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as the cache would return them now (dequantized), (B, H, T, D)."""
        return self._stored_kv()


def smartkv_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: routes to the cache layer that produced `key`, else plain SDPA."""
    layer = getattr(_active, "layer", None)
    if layer is not None and getattr(_active, "keys_id", None) == id(key):
        _active.layer = None
        with layer._kernel_scope():
            return layer.attend(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


register_attention(ATTENTION_NAME, smartkv_attention)


class SmartKVCache(Cache):
    """A transformers `Cache` holding one `KVLayer` per model layer; pass it with `cache_kwargs`."""

    def __init__(self, method_config, num_layers: int, attention_hooked: bool = False,
                 sliding_windows: list[int | None] | None = None):
        windows = sliding_windows or [None] * num_layers   # per layer (hf_compat.sliding_windows)
        super().__init__(layers=[method_config.build_layer(i, w) for i, w in enumerate(windows[:num_layers])])
        self.method_config = method_config
        for layer in self.layers:
            layer.attention_hooked = attention_hooked
        method_config.bind(self.layers)

    @property
    def method(self) -> str:
        return self.method_config.name

    def memory_report(self) -> MemoryReport:
        """Bytes actually held, by category, against DynamicCache's for the same model and tokens at 16 bits (on a
        sliding-window layer, its last window - 1 tokens; see MemoryReport)."""
        return summarize([layer.layer_bytes() for layer in self.layers], tokens=self.get_seq_length())

    def slack_bytes(self) -> int:
        """Bytes of buffer capacity allocated beyond the stored tokens (not in `memory_report`)."""
        return sum(layer.slack_bytes() for layer in self.layers)

    def reserve(self, tokens: int) -> None:
        """Preallocate every layer for `tokens` tokens (prompt + new tokens), so that decoding never regrows."""
        for layer in self.layers:
            layer.reserve(tokens)

    def stored_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].stored_kv()

    # --- static decode steps (CUDA graphs) -------------------------------------------------------------------
    def begin_static(self, max_tokens: int) -> StaticDecode:
        """Switch decode steps to static ones, for up to `max_tokens` tokens per sequence in all (reserved now,
        so no buffer moves while a graph holds its address). The cache must hold a prompt already, on the
        fused path (kernels and the "smartkv" attention), of a method whose layers support it (fp16, int8, int4,
        smartkv).
        Before each step set `state.pos` and `state.lengths`; after it call `state.join()`, then `advance(1)`."""
        problem = self.static_problem()
        if problem:
            raise ValueError(problem)
        layers = self.layers
        n = self.get_seq_length()
        if max_tokens <= n:
            raise ValueError(f"max_tokens must exceed the {n} tokens already cached, got {max_tokens}")
        for layer in layers:
            layer._static_begin(max_tokens)
        first = layers[0]
        make = dict(dtype=torch.int32, device=first.device)
        side = torch.cuda.Stream(first.device) if first.device.type == "cuda" else None
        state = StaticDecode(torch.full((first.batch_size,), n, **make), torch.full((first.batch_size,), n + 1, **make),
                             side)
        for layer in layers:
            layer.static = state
        return state

    def static_problem(self) -> str | None:
        """Why decode steps cannot be static now (`begin_static`'s error), or None when they can."""
        layers = self.layers
        if not all(layer.static_capable for layer in layers):
            return (f"method must be one of ('fp16', 'int8', 'int4', 'smartkv') for static decode steps, got "
                    f"{self.method!r}")
        if any(layer.is_sliding for layer in layers):
            return "static decode steps cover full-attention layers only; this model has sliding-window layers"
        if not all(layer.is_initialized and layer.seq_len for layer in layers):
            return "static decode steps need a cache that holds a prompt already (run the prompt first)"
        if not all(layer.kernels and layer.attention_hooked for layer in layers):
            return ("static decode steps need the fused kernels: a CUDA device (or FORCE_KERNELS under "
                    "TRITON_INTERPRET=1), use_kernels=True and a cache made with the model")
        return next((p for p in (layer.static_blocker() for layer in layers) if p), None)

    def advance(self, tokens: int = 1) -> bool:
        """Count tokens that static steps stored (host bookkeeping: lengths, memory accounting). Returns True when
        a layer re-organised its storage (SmartKV re-allocating): the next static step launches other kernels
        arguments, so a captured graph must be captured again."""
        changed = False
        if self.layers and self.layers[0].static is not None:
            self.layers[0].static.join()   # a caller that skipped it: nothing may overtake a step's side work
        for layer in self.layers:
            layer.seq_len += tokens
            changed |= bool(layer._advance(tokens))
        return changed

    def static_variant(self) -> tuple:
        """What the next static step does beyond the common step, per layer (`_static_variant`): steps of one
        variant launch the same kernels with the same arguments, so one captured graph serves them all."""
        return tuple(layer._static_variant() for layer in self.layers)

    def end_static(self) -> None:
        """Back to ordinary decode steps (the cache keeps every token stored so far)."""
        for layer in self.layers:
            if layer.static is not None:
                layer.static = None
                layer._static_end()

    def __repr__(self) -> str:
        return f"SmartKVCache({self.method_config!r}, layers={len(self.layers)})"
