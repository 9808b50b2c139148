"""`fp16`: the reference cache. Stores keys and values as computed, in the model's dtype (like DynamicCache)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache.layer import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig
from smartkv.kernels import KVSegment
from smartkv.cache.buffers import write_token


def _owned(x: torch.Tensor) -> torch.Tensor:
    """`x`, copied when it is a view into a larger tensor (GPT-2's keys and values are views of its fused
    query-key-value projection): held as given, the whole projection would stay allocated beside the bytes the
    cache reports."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class FP16Layer(KVLayer):
    static_capable = True

    def _init_storage(self) -> None:
        self.keys = self.values = None
        self._buf = None  # static steps: (keys, values) of the reserved capacity; keys/values are views of them

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values = _owned(key_states), _owned(value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)

    def _stored_kv(self):
        return self.keys, self.values

    def _evict(self, count: int) -> int:
        self.keys, self.values = self.keys[..., count:, :], self.values[..., count:, :]  # as DynamicCache slices
        return count

    # static decode steps (smartkv.cache.graphs): preallocated rows, the new token written at state.pos
    def _static_begin(self, tokens: int) -> None:
        if self._buf is None or self._buf[0].shape[-2] < tokens:
            n = self.keys.shape[-2]
            self._buf = tuple(x.new_empty(*x.shape[:2], tokens, x.shape[-1]) for x in (self.keys, self.values))
            self._buf[0][..., :n, :] = self.keys
            self._buf[1][..., :n, :] = self.values
            self.keys, self.values = (b[..., :n, :] for b in self._buf)

    def _static_store(self, key_states, value_states, state) -> None:
        write_token(self._buf, state.pos, (key_states, value_states))

    def _static_segments(self, key_states, value_states, state):
        return [KVSegment(self._buf[0], self._buf[1], lengths=state.lengths)]

    def _advance(self, tokens: int) -> bool:
        n = self.keys.shape[-2] + tokens
        if n > self._buf[0].shape[-2]:
            raise RuntimeError(f"static steps ran past the reserved {self._buf[0].shape[-2]} tokens")
        self.keys, self.values = (b[..., :n, :] for b in self._buf)
        return False

    def _static_end(self) -> None:
        self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        self._buf = None

    def _slack_bytes(self) -> int:
        if self._buf is None or self._buf[0].data_ptr() != self.keys.data_ptr():
            return 0
        unused = self._buf[0].shape[-2] - self.keys.shape[-2]
        return 2 * unused * self.keys[..., :1, :].numel() * self.keys.element_size()

    def _account(self, lb) -> None:
        lb.add_full(self.keys, "k")
        lb.add_full(self.values, "v")


@register
@dataclass(frozen=True)
class FP16(MethodConfig):
    """Full precision reference (no parameters)."""
    name = "fp16"

    def make_layer(self, layer_idx: int):
        return FP16Layer(self, layer_idx)
