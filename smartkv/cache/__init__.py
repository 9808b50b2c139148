"""The transformers Cache adapter (`layer`), the growable quantized buffers layers store into (`buffers`), whole
decode steps as CUDA graphs (`graphs`), and `hf_compat`, the one module that names transformers internals."""
from smartkv.cache.layer import KVLayer, SmartKVCache, StaticDecode

__all__ = ["KVLayer", "SmartKVCache", "StaticDecode"]
