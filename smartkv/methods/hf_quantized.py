"""`quanto` (and `hqq`): transformers' own `QuantizedCache`, configured as a transformers user configures it,
inside our cache container so that its bytes are counted like ours. Registered only where the backend package
is installed (`pip install smartkv[quanto]` installs optimum-quanto).

What it does (transformers' QuantizedLayer): the whole prompt is quantized at once and the prompt's own forward
pass sees it unquantized; later tokens go to a full-precision residual; when the residual reaches
`residual_length` the whole cache is dequantized, concatenated with it and quantized again. Defaults are
transformers' own (`QuantizedCache(backend="quanto", config=...)`): nbits 4, q_group_size 64, residual_length 128,
axis 0 for keys and values (per token, groups of 64 channels).
Bytes: the backend's packed codes (payload), its scales and shifts (metadata, in the dtype the backend keeps them:
the model's), the residual (residual). The dequantized copy made every step is transient and not counted, as for
every method here.
On a sliding-window layer (smartkv.cache.sliding) what left the window is forgotten where the backend quantizes
(the prompt, and each flush, which re-quantizes the whole cache anyway), so the layer holds at most
`residual_length - 1` tokens past its window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from smartkv.cache.hf_compat import (quantized_backend_available, quantized_layer, quantized_layer_state,
                                     quantized_layer_window_update)
from smartkv.cache.layer import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_int


def _leaf_tensors(q) -> list[tuple[str, torch.Tensor]]:
    """(role, tensor) pairs a backend's quantized tensor holds: ("codes", packed ints) or ("meta", scales...)."""
    if isinstance(q, tuple):  # hqq: (packed codes, meta dict)
        codes, meta = q
        return [("codes", codes)] + [("meta", meta[k]) for k in ("scale", "zero") if isinstance(meta.get(k), torch.Tensor)]
    data = q._data  # optimum-quanto WeightQBitsTensor: a PackedTensor of uint8 codes, float scale and shift
    return [("codes", getattr(data, "_data", data)), ("meta", q._scale), ("meta", q._shift)]


class HFQuantizedLayer(KVLayer):
    def _init_storage(self) -> None:
        cfg = self.config
        self.inner = quantized_layer(cfg.backend, nbits=cfg.nbits, axis_key=cfg.axis_key, axis_value=cfg.axis_value,
                                     q_group_size=cfg.q_group_size, residual_length=cfg.residual_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # transformers' layer returns what attention needs (one dequantization a step); plain SDPA attends over it
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self._inner_update(key_states, value_states)
        self.seq_len += key_states.shape[-2]
        return keys, values

    def _inner_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if not self.is_sliding:
            return self.inner.update(key_states, value_states)
        keys, values, forgotten = quantized_layer_window_update(self.inner, key_states, value_states,
                                                                self.sliding_window - 1)
        self.evicted += forgotten
        return keys, values

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._inner_update(key_states, value_states)

    def _evict(self, count: int) -> int:
        return 0   # only where the backend quantizes (_inner_update)

    @property
    def eviction_lag(self) -> int:
        return self.config.residual_length - 1

    def _stored_kv(self):
        qk, qv, rk, rv = quantized_layer_state(self.inner)
        keys, values = self.inner._dequantize(qk), self.inner._dequantize(qv)
        if rk is not None and rk.shape[-2]:
            keys, values = torch.cat([keys, rk], -2), torch.cat([values, rv], -2)
        return keys.to(self.dtype), values.to(self.dtype)

    def _account(self, lb) -> None:
        qk, qv, rk, rv = quantized_layer_state(self.inner)
        for q, kind in ((qk, "k"), (qv, "v")):
            for role, t in _leaf_tensors(q):
                if role == "codes":
                    lb.add_codes(t, self.config.nbits, kind)
                else:
                    lb.add("metadata", t)
        lb.add("residual", rk)
        lb.add("residual", rv)


@dataclass(frozen=True)
class HFQuantized(MethodConfig):
    nbits: int = 4
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0
    backend: ClassVar[str] = ""
    nbits_allowed: ClassVar[tuple] = ()
    axes_allowed: ClassVar[tuple] = ()

    def validate(self) -> None:
        check_choice("nbits", self.nbits, self.nbits_allowed)
        check_choice("q_group_size", self.q_group_size, (16, 32, 64, 128))
        check_int("residual_length", self.residual_length, 1)
        check_choice("axis_key", self.axis_key, self.axes_allowed)
        check_choice("axis_value", self.axis_value, self.axes_allowed)

    def make_layer(self, layer_idx: int):
        return HFQuantizedLayer(self, layer_idx)


if quantized_backend_available("quanto"):
    @register
    @dataclass(frozen=True)
    class Quanto(HFQuantized):
        """transformers QuantizedCache, optimum-quanto backend (int2/int4, MaxOptimizer scale and shift)."""
        name = "quanto"
        backend = "quanto"
        nbits_allowed = (2, 4)
        axes_allowed = (0, -1)

if quantized_backend_available("hqq"):
    @register
    @dataclass(frozen=True)
    class HQQ(HFQuantized):
        """transformers QuantizedCache, HQQ backend (half-quadratic optimised zero points)."""
        name = "hqq"
        backend = "hqq"
        nbits_allowed = (1, 2, 3, 4, 8)
        axes_allowed = (0, 1)
