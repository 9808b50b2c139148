"""SmartKV on sliding-window layers (smartkv.cache.sliding): what leaves the window is forgotten at re-allocations.

A layer's middle lives in dense per-width pools (every row the same count per width), so single tokens cannot
leave it between re-allocations. Each re-allocation (every `realloc_every` tokens, after the attention of the
call) first forgets the tokens past the last window - 1 (sinks, then the middle's oldest, then the oldest of
those leaving the recent window), then re-allocates the budget over what stays. In between, a layer holds at
most `eviction_lag` tokens more, which the sliding mask hides. Importance codes and the observed query ranges
are position-indexed: they drop the same prefix.
"""
from __future__ import annotations

import torch

from smartkv.core.quant import dequantize


def shift_ranges(ranges: torch.Tensor, count: int) -> torch.Tensor:
    """Observed query ranges (n, 2) [start, end) after the first `count` positions are forgotten."""
    out = (ranges - count).clamp_min(0)
    return out[out[:, 1] > out[:, 0]]


class SmartKVWindow:
    """What SmartKVLayer adds for sliding-window layers (the layer's fields: see SmartKVStorage._init_storage)."""

    def _evict(self, count: int) -> int:
        return 0  # nothing between re-allocations: `_flush` forgets (see `_forget_front`)

    @property
    def eviction_lag(self) -> int:
        cfg = self.config
        # between re-allocations; before the first one the sinks and the recent window may exceed a tiny window
        return cfg.realloc_every - 1 + max(0, cfg.sink_tokens + cfg.recent_window - (self.sliding_window - 1))

    def _forget_front(self, leaving: int) -> int:
        """At a re-allocation (inside `_flush`, with `self._stored` set): forget the oldest tokens past the last
        window - 1: sinks, then the middle's oldest, then the oldest of the `leaving` tokens about to leave the
        recent window. Returns how many of those were forgotten (the re-allocation quantizes the rest)."""
        if self.sliding_window is None:
            return 0
        excess = self.held - (self.sliding_window - 1)
        if excess <= 0:
            return 0
        d_sink = min(excess, self.sink_k.shape[-2])
        d_mid = min(excess - d_sink, self.n_middle)
        d_win = min(excess - d_sink - d_mid, leaving)
        self.sink_k, self.sink_v = self.sink_k[..., d_sink:, :], self.sink_v[..., d_sink:, :]
        if d_mid:  # the pools stay as they are until re-pooled; the stored ranks now skip the forgotten entries
            for kind in ("k", "v"):
                bits, rank = self._stored_ranks(kind)
                self._stored[kind] = (bits[..., d_mid:], rank[:, d_mid:].contiguous())
            self.n_middle -= d_mid
        self.win_k, self.win_v = self.win_k[..., d_win:, :], self.win_v[..., d_win:, :]
        forgotten = d_sink + d_mid + d_win
        self.importance = self.importance[..., forgotten:]
        self.observed = shift_ranges(self.observed, forgotten)
        self.evicted += forgotten
        if not self.n_middle:
            self.pools, self.levels = {"k": {}, "v": {}}, {"k": None, "v": None}
            self._class_major = False
        return d_win

    def _middle_by_rank(self, kind: str) -> torch.Tensor:
        """Dequantized middle (B, H, Tq, D) fp32 read through the stored ranks: right also while a re-allocation
        holds ranks that skip forgotten pool entries."""
        bits, rank = self._stored_ranks(kind)
        B, H, D, Tq = self.batch_size, self.num_heads, self.head_dim, self.n_middle
        out = torch.zeros(B * H, Tq, D, device=self.device)
        rows = torch.arange(B * H, device=self.device)[:, None]
        for b, q in self.pools[kind].items():
            at = (bits == b).reshape(B * H, Tq)
            entries = rows * q.codes.shape[-2] + rank                       # (B * H, Tq) into the pool's rows
            out[at] = dequantize(q).reshape(-1, D)[entries[at]]
        return out.reshape(B, H, Tq, D)
