"""SmartKV's first allocation of a group of append layers at once (append.py has the design it starts).

A prefill is bound by host work a layer (docs/smartkv.md, the prefill's ladder): each append layer's first
allocation waited for the device once, then solved and placed its prompt while the card idled. Here a layer whose
first allocation comes due after its attention (or after `append`, a cache filled without a model) defers it: its
prompt stays in its window at full precision, as DynamicCache holds it, until the group's last layer has attended
(the group's size in layers, or the model's last layer that can defer). Then the group's device work is queued
for every layer, its statistics reach the host in one copy, and each layer's solve and placement follow. A
deferred layer is an ordinary layer whose flush has not run yet: anything that reads or extends it first runs
its group (`_settle`), and a layer flushed on its own (a forward that stopped part way) takes the per-layer path,
which gives the same state.

SMARTKV_FIRST_GROUP: layers a group holds at most (default 8; 1: each layer on its own, the A/B baseline). The
group bounds the transient: a layer's prompt keys and values are 2 x KV heads x head_dim values a token against
the MLP activations a layer's prefill holds anyway (SmolLM2: 384 against 3072 and more; Llama-3-8B 2048 against
28672), so eight layers' deferred prompts stay within one layer's working set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from smartkv.core.policy import block_weights

DEFAULT_GROUP = 8


def group_size() -> int:
    """Layers one first allocation batches (`SMARTKV_FIRST_GROUP`), checked before any work."""
    raw = os.environ.get("SMARTKV_FIRST_GROUP", str(DEFAULT_GROUP))
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= 1024:
        raise ValueError(f"SMARTKV_FIRST_GROUP must be an integer from 1 to 1024, got {raw!r}")
    return size


@dataclass
class FirstInputs:
    """A layer's first allocation between its device work and its host solve: the n prompt tokens' weights
    (R, n), kinds as `_flush` builds them, and `_append_stats` still on the device."""
    n: int
    weights: torch.Tensor
    kinds: tuple
    stats: torch.Tensor


class FirstGroup:
    """The layers of one cache whose first allocation waits (shared by them: `SmartKV.bind`)."""

    def __init__(self, layers: list, size: int):
        self.layers, self.size, self.pending = layers, size, []
        self._end = None   # (the last layer that can defer,), found at the first deferral

    def defer(self, layer) -> bool:
        """Whether `layer`'s due first allocation is taken here (queued, or run with its group's now)."""
        if self.size <= 1:
            return False
        if layer not in self.pending:
            self.pending.append(layer)
        if self._end is None:   # the last layer that can defer (later ones are sliding, or not SmartKV's)
            able = [x for x in self.layers if getattr(x, "_first_group", None) is self and x._append_wanted()]
            self._end = (able[-1] if able else None,)
        if len(self.pending) >= self.size or layer is self._end[0]:
            self.run()
        return True

    def run(self) -> None:
        """Every pending layer's first allocation: the device work of all, one copy of their statistics to the
        host, then each layer's solve and placement (a layer whose allocation is no longer due is skipped)."""
        layers, self.pending = [layer for layer in self.pending if layer._first_due()], []
        firsts = [layer._first_prepare(layer._first_due()) for layer in layers]
        if not firsts:
            return
        stats = torch.cat([f.stats for f in firsts]).cpu()   # the group's one wait for the device
        at = 0
        for layer, first in zip(layers, firsts):
            layer._first_finish(first, stats[at:at + first.stats.numel()])
            at += first.stats.numel()


class SmartKVFirst:
    """SmartKVLayer's part in its group's first allocation (`_first_group`: the cache's FirstGroup, or None)."""

    _first_group: FirstGroup | None = None

    def _first_due(self) -> int:
        """Tokens the first allocation of an append layer would place now (0: it is not due)."""
        if self._app is not None or self.n_middle or not self.is_initialized or not self._append_wanted():
            return 0
        n = self.win_k.shape[-2] - self.config.recent_window
        return n if n > 0 and n >= self._flush_at() else 0

    def _first_defers(self) -> bool:
        """Whether this layer's due first allocation waits for (or just ran with) its group's."""
        group = self._first_group
        return group is not None and bool(self._first_due()) and group.defer(self)

    def _settle(self) -> None:
        """Run this layer's group when its first allocation waits in it: before anything reads or extends it."""
        group = self._first_group
        if group is not None and self in group.pending:
            group.run()

    def _first_prepare(self, n: int) -> FirstInputs:
        """The first allocation's device work (no wait): the window's oldest n tokens out of it, their weights and
        the statistics the host solve reads."""
        self._stored = {}
        try:
            new_k, new_v = self._flush_inputs(n)
            weights = block_weights(self._weights(new_k, new_v), self.block_tokens)
        finally:
            self._stored = None
        kinds = (("k", new_k, self.budget_k), ("v", new_v, self.budget_v))
        return FirstInputs(n, weights, kinds, self._append_stats(weights))

    def _first_finish(self, first: FirstInputs, stats: torch.Tensor) -> None:
        """The host solve and the placement, `stats`: `first.stats` on the host."""
        weights, kinds = self._append_split(first.weights, first.kinds, stats)
        self.n_middle += first.n
        self._append_begin(weights, kinds)
