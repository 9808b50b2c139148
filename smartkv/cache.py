"""The transformers Cache adapter: one `KVLayer` per model layer inside one `SmartKVCache`.

A layer stores keys/values its own way (codes, windows, pools) and on `update` returns the full (B, H, T, D)
keys and values for attention: stored tokens dequantized, the tokens of this call as computed (full precision),
so a prompt is processed exactly and every later token reads the quantized cache.

Attention hook: `make_cache` switches the model to the registered attention function "smartkv". For layers
that need nothing it is exactly transformers' SDPA (so `fp16` equals `DynamicCache`); a layer that needs query
statistics (SmartKV's importance) or has a fused kernel (CUDA) overrides `KVLayer.attend`.
"""
from __future__ import annotations

import threading

import torch

from smartkv.hf_compat import Cache, CacheLayerMixin, register_attention, sdpa_attention_forward, use_attention
from smartkv.memory import LayerBytes, MemoryReport, summarize

ATTENTION_NAME = "smartkv"
_active = threading.local()  # the layer whose `update` ran last in this thread, and the keys it returned


class KVLayer(CacheLayerMixin):
    """Base cache layer. Subclasses implement `_store` (append new tokens), `_stored_kv` (dequantized stored
    tokens, in order) and `_account` (the tensors they hold)."""
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.seq_len = 0

    # --- transformers' layer interface -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        # full-precision windows are kept in 16 bits, as a real KV cache would (fp16 when the model runs in fp32)
        self.window_dtype = torch.float16 if self.dtype == torch.float32 else self.dtype
        self.is_initialized = True
        self._init_storage()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._before_update()
        past_k, past_v = self._stored_kv() if self.seq_len else (None, None)
        self._store(key_states, value_states)
        self.seq_len += key_states.shape[-2]
        if past_k is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([past_k.to(key_states.dtype), key_states], dim=-2)
            values = torch.cat([past_v.to(value_states.dtype), value_states], dim=-2)
        _active.layer, _active.keys_id = self, id(keys)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seq_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seq_len = 0
        self.is_initialized = False

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

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """Attention over what `update` returned. Default: transformers' SDPA, unchanged."""
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # --- accounting ----------------------------------------------------------------------------------------
    def layer_bytes(self) -> LayerBytes:
        lb = LayerBytes()
        if self.is_initialized and self.seq_len:
            lb.elements = 2 * self.batch_size * self.num_heads * self.seq_len * self.head_dim
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
        return layer.attend(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


register_attention(ATTENTION_NAME, smartkv_attention)


class SmartKVCache(Cache):
    """A transformers `Cache` holding one `KVLayer` per model layer; use as `past_key_values=`."""

    def __init__(self, method_config, num_layers: int):
        super().__init__(layers=[method_config.make_layer(i) for i in range(num_layers)])
        self.method_config = method_config

    @property
    def method(self) -> str:
        return self.method_config.name

    def memory_report(self) -> MemoryReport:
        """Bytes actually held, by category, against an fp16 cache of the same tokens (see MemoryReport)."""
        return summarize([layer.layer_bytes() for layer in self.layers], tokens=self.get_seq_length())

    def stored_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].stored_kv()

    def __repr__(self) -> str:
        return f"SmartKVCache({self.method_config!r}, layers={len(self.layers)})"


def make_cache(method: str, model=None, num_layers: int | None = None, **params) -> SmartKVCache:
    """Build the cache of a registered method for `model` (or for `num_layers` layers, without a model).

    `smartkv.make_cache("kivi", model, key_bits=2)` -> a Cache to pass as `past_key_values=`. Unknown methods or
    parameters raise ValueError naming what is allowed. Switches the model's attention to the "smartkv" hook,
    which is plain SDPA for methods that do not need it.
    """
    from smartkv.methods import make_config
    from smartkv.models import model_kv_shape

    config = make_config(method, **params)
    if model is not None:
        num_layers = model_kv_shape(model)["num_layers"]
        use_attention(model, ATTENTION_NAME)
    if num_layers is None:
        raise ValueError("make_cache needs a model or num_layers")
    return SmartKVCache(config, num_layers)
