"""smartkv: quantized KV caches (fp16, int8, int4, kivi, smartkv) that drop into transformers models.

    cache = smartkv.make_cache("smartkv", model, budget=4)
    out = model.generate(ids, **smartkv.cache_kwargs(model, cache), max_new_tokens=32)  # cache= or past_key_values=
    cache.memory_report()

Layout (imports point downwards only): core (pure quantization, policy, importance, memory accounting) <- kernels
(decode attention: torch reference, Triton) <- cache (the transformers Cache adapter, buffers, CUDA graphs) <-
methods (registered configs and their layers) <- models, data, metrics <- bench (spec, run, results, cli).
"""
from smartkv.cache.hf_compat import cache_kwargs
from smartkv.cache.layer import SmartKVCache
from smartkv.methods import list_methods, make_cache, make_config, method_fields, validate_method

__version__ = "0.1.0"
__all__ = ["SmartKVCache", "cache_kwargs", "make_cache", "list_methods", "make_config", "method_fields",
           "validate_method", "__version__"]
