"""`fp16`: the reference cache. Stores keys and values as computed, in the model's dtype (like DynamicCache)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache import KVLayer
from smartkv.methods import register
from smartkv.methods.base import MethodConfig


class FP16Layer(KVLayer):
    def _init_storage(self) -> None:
        self.keys = self.values = None

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)

    def _stored_kv(self):
        return self.keys, self.values

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
