"""The SmartKV cache layer, composed of its four concerns (each a mixin over the same layer state):
storage (sinks, width pools, window, accounting), attention (reference and fused two-pass decode, importance
statistics; the one-pass step over joint classes), static decode steps (CUDA graphs) and re-allocation (flushing
the window into the pools; jointly for keys and values with `joint=True`; by appending classes with
`realloc="append"`)."""
from __future__ import annotations

from smartkv.cache.layer import KVLayer
from smartkv.methods.smartkv.append import SmartKVAppend
from smartkv.methods.smartkv.append_flush import SmartKVAppendFlush
from smartkv.methods.smartkv.append_static import SmartKVAppendStatic
from smartkv.methods.smartkv.attention import SmartKVAttention
from smartkv.methods.smartkv.demote import SmartKVDemote
from smartkv.methods.smartkv.first import SmartKVFirst
from smartkv.methods.smartkv.joint import SmartKVJoint
from smartkv.methods.smartkv.onepass import SmartKVOnePass
from smartkv.methods.smartkv.realloc import SmartKVRealloc
from smartkv.methods.smartkv.static import SmartKVStatic
from smartkv.methods.smartkv.storage import SmartKVStorage
from smartkv.methods.smartkv.window import SmartKVWindow


# the parts come before KVLayer so that their hooks (_store, attend, _static_begin, _before_update...) override its
# defaults; no two parts define the same method, so their own order does not matter (the window part: sliding
# layers, smartkv.cache.sliding)
class SmartKVLayer(SmartKVStorage, SmartKVAttention, SmartKVOnePass, SmartKVStatic, SmartKVRealloc, SmartKVJoint,
                   SmartKVAppend, SmartKVAppendFlush, SmartKVAppendStatic, SmartKVDemote, SmartKVFirst, SmartKVWindow,
                   KVLayer):
    static_capable = True
