"""The ONE place that names transformers internals (they move between 5.x releases; tested on 5.17 and 5.24).

Everything else in smartkv imports these names from here.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticCache
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = ["Cache", "CacheLayerMixin", "StaticCache", "attn_implementation", "cache_arg", "cache_kwargs",
           "model_kv_shape", "quantized_backend_available", "quantized_layer", "quantized_layer_state",
           "quantized_layer_window_update",
           "register_attention", "repeat_kv", "sdpa_attention_forward", "sliding_windows", "use_attention"]

# Layer types whose DynamicCache layer is DynamicSlidingWindowLayer (transformers' DYNAMIC_LAYER_TYPE_MAPPING:
# chunked attention keeps the same tokens, only its mask differs), and those that hold a growing K/V history.
_WINDOWED = ("sliding_attention", "chunked_attention")
_FULL = ("full_attention",)


def register_attention(name: str, fn) -> None:
    """Register an attention function under `name`, with the SDPA mask builder (our functions take SDPA masks)."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, fn)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, sdpa_mask)


def attn_implementation(model: torch.nn.Module) -> str:
    return model.config._attn_implementation


def use_attention(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded model to the registered attention function `name` (all its sub-configs too)."""
    if attn_implementation(model) == name:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older 5.x
        model.config._attn_implementation = name


def model_kv_shape(model) -> dict:
    """Layers, KV heads and head_dim of a loaded model or a config."""
    cfg = getattr(model, "config", model)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    return {"num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def sliding_windows(model_or_config, num_layers: int) -> list[int | None]:
    """Per layer, the sliding window whose last `window - 1` tokens DynamicCache keeps for it (None: every token),
    decided as `DynamicCache(config=...)` decides it. ValueError for layer types without a K/V history (linear
    attention, shared caches): our caches have no layer for them."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
        types, kwargs = get_layer_types_and_kwargs(config)
        windows = [kw.get("sliding_window") if t in _WINDOWED else None for t, kw in zip(types, kwargs)]
    except (ImportError, AttributeError):  # releases before per-layer configs: the config's own fields
        types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        chunk = getattr(config, "attention_chunk_size", None)
        if types is None:
            types = ["sliding_attention" if window is not None else "chunked_attention" if chunk is not None
                     else "full_attention"] * num_layers
        windows = [window if t == "sliding_attention" else chunk if t == "chunked_attention" else None
                   for t in types]
    unsupported = sorted({t for t in types if t not in _WINDOWED + _FULL})
    if unsupported:
        raise ValueError(f"layer types must be among {_WINDOWED + _FULL} for a smartkv cache, got {unsupported}")
    windows = list(windows)[:num_layers]
    return windows + [None] * (num_layers - len(windows))


# ---- transformers' own QuantizedCache layers (the `quanto` / `hqq` methods wrap them) -------------------------

QUANTIZED_BACKENDS = ("quanto", "hqq")


def quantized_backend_available(backend: str) -> bool:
    """Whether transformers' QuantizedCache can use `backend` here (its package is installed)."""
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    return {"quanto": is_optimum_quanto_available, "hqq": is_hqq_available}[backend]()


def quantized_layer(backend: str, **kwargs):
    """One layer of `QuantizedCache(backend=...)`, built with the same keyword arguments a user passes it."""
    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    return {"quanto": QuantoQuantizedLayer, "hqq": HQQQuantizedLayer}[backend](**kwargs)


def quantized_layer_state(layer) -> tuple:
    """What a QuantizedCache layer holds: (quantized keys, quantized values, residual keys, residual values);
    the quantized ones in the backend's own type, the residual ones as tensors (empty before the first flush)."""
    residual = [t if isinstance(t, torch.Tensor) and t.dim() == 4 else None for t in (layer.keys, layer.values)]
    return layer._quantized_keys, layer._quantized_values, *residual


def quantized_layer_window_update(layer, key_states: torch.Tensor, value_states: torch.Tensor, keep: int):
    """`layer.update` (transformers' QuantizedLayer) on a sliding-window layer: the same, except that where it
    quantizes (the first call; each flush of the residual, which re-quantizes the whole cache) it quantizes only
    the last `keep` tokens and forgets the rest. -> (keys, values: what this call attends over, as `update` returns
    them; how many tokens were forgotten)."""
    layer.cumulative_length += key_states.shape[-2]
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
        keys, values = key_states, value_states
    else:
        old_k, old_v = layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)
        reorder = getattr(layer, "_apply_pending_reorder", None)
        if reorder is not None:
            old_k, old_v = reorder(old_k, old_v)
        keys = torch.cat([old_k, layer.keys, key_states], dim=-2)
        values = torch.cat([old_v, layer.values, value_states], dim=-2)
        residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
        if residual + key_states.shape[-2] < layer.residual_length:
            layer.keys = torch.cat([layer.keys, key_states], dim=-2)
            layer.values = torch.cat([layer.values, value_states], dim=-2)
            return keys, values, 0
    drop = max(0, keys.shape[-2] - keep)
    layer._quantized_keys = layer._quantize(keys[..., drop:, :].contiguous(), axis=layer.axis_key)
    layer._quantized_values = layer._quantize(values[..., drop:, :].contiguous(), axis=layer.axis_value)
    layer.keys = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
    layer.values = torch.tensor([], dtype=key_states.dtype, device=key_states.device)
    if hasattr(layer, "_pending_beam_idx"):
        layer._pending_beam_idx = None
    return keys, values, drop


def cache_arg(model) -> str:
    """The keyword a model's forward (and generate) takes the cache by: `cache` where the installed transformers
    names it so (5.2x, which warns that `past_key_values` will be removed), `past_key_values` where it does not."""
    return _cache_arg(type(model))


@functools.lru_cache(maxsize=None)
def _cache_arg(model_type: type) -> str:
    forward = getattr(model_type, "forward", model_type)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{cache_arg(model): cache}`: `model(ids, **cache_kwargs(model, cache), use_cache=True)`, or with generate."""
    return {cache_arg(model): cache}
