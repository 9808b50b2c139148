"""SmartKV's static decode steps (smartkv.cache.graphs): between two re-allocations only the window, the importance
codes and the decode queries' range grow, so fixed-shape buffers for them let one captured CUDA graph serve every
step of that period."""
from __future__ import annotations

import torch

from smartkv.cache.buffers import write_token
from smartkv.core.importance import add_range
from smartkv.kernels import pool_kernels_ok
from smartkv.kernels.reference import MAX_RANGES
from smartkv.methods.smartkv.storage import UNSEEN


class SmartKVStatic:
    """SmartKVLayer's static-step part: the hooks `SmartKVCache.begin_static` and `GraphDecoder` call."""

    def static_blocker(self) -> str | None:
        """Sinks filled, room for the decode range among the fold's ranges, and every width on the kernels (the
        torch path of a pool pass reads sizes on the host, which a captured step cannot)."""
        if self._app is not None:   # one decode_attention call: sinks are full once the middle exists
            return None
        if (self.sink_k.shape[-2] >= self.config.sink_tokens and len(self._split_ranges()[0]) < MAX_RANGES
                and all(pool_kernels_ok(self._empty_pool(w)) for w in self.widths)):
            return None
        return (f"static decode steps need the {self.config.sink_tokens} attention sinks stored, at most "
                f"{MAX_RANGES - 1} observed query ranges besides the decode queries', and widths the pool kernels "
                f"take (3-bit pools: at most 2 groups per token)")

    def _split_ranges(self) -> tuple[list, int]:
        """(observed ranges other than the decode queries' one, where that one starts)."""
        obs, n = [tuple(map(int, r)) for r in self.observed.tolist()], self.seq_len
        return (obs[:-1], obs[-1][0]) if obs and obs[-1][1] == n else (obs, n)

    def _static_begin(self, tokens: int) -> None:
        """Buffers for one phase: the window's K/V (room for it to grow to a re-allocation) and the importance
        codes up to the window's end, zero / UNSEEN beyond what is stored; the observed ranges split into fixed
        ones and the decode queries' range, whose end each static step reads from the device (`begin_static` has
        checked `static_blocker`; a re-allocation keeps it clear)."""
        self._static_tokens = tokens or self._static_tokens
        self._settle()
        self._flush()  # a window over-full from `update` without attention (the next ordinary step flushes it too)
        if self._app is not None:
            self._sbuf = None
            return self._append_static_begin(self._static_tokens)
        cfg = self.config
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        W, n_win = cfg.recent_window + self._flush_at(), self.win_k.shape[-2]
        start = self.sink_k.shape[-2] + self.n_middle
        buf = {kind: x.new_zeros(B, H, W, D) for kind, x in (("k", self.win_k), ("v", self.win_v))}
        buf["k"][..., :n_win, :] = self.win_k
        buf["v"][..., :n_win, :] = self.win_v
        buf["imp"] = self.importance.new_full((B, H, start + W), UNSEEN)
        buf["imp"][..., :self.importance.shape[-1]] = self.importance
        buf["at"] = torch.arange(start + W, device=self.device)
        fixed, s_dec = self._split_ranges()
        buf["ranges"] = fixed + [(0, 0)] * (MAX_RANGES - 1 - len(fixed)) + [(s_dec, 0)]
        buf["start"] = start
        if self._one_pass() and self.n_middle:   # class positions change only at re-allocations: once a phase
            buf["pos"] = self._class_positions()
        self._sbuf = buf
        self.win_k, self.win_v = buf["k"][..., :n_win, :], buf["v"][..., :n_win, :]
        self.importance = buf["imp"][..., :self.importance.shape[-1]]

    def _static_store(self, key_states, value_states, state) -> None:
        if self._app is not None:
            return self._append_static_store(key_states, value_states, state)
        write_token((self._sbuf["k"], self._sbuf["v"]), state.pos - self._sbuf["start"], (key_states, value_states))

    def _static_segments(self, key_states, value_states, state) -> list:
        return []  # `attend` runs the two passes (see _decode_segments)

    def _advance(self, tokens: int) -> bool:
        if self._app is not None:
            return self._append_advance(tokens)
        for _ in range(tokens):
            n_win, T = self.win_k.shape[-2] + 1, self.importance.shape[-1] + 1
            if n_win > self._sbuf["k"].shape[-2]:
                raise RuntimeError("static steps ran past the window's buffer (a re-allocation was skipped)")
            self.win_k, self.win_v = self._sbuf["k"][..., :n_win, :], self._sbuf["v"][..., :n_win, :]
            self.importance = self._sbuf["imp"][..., :T]
            self.observed = add_range(self.observed, T - 1, T)
        if self.win_k.shape[-2] - self.config.recent_window < self._flush_at():
            return False
        self._flush()  # what the ordinary step does after its attention, here between two static steps
        self._static_begin(0)
        return True

    def _static_variant(self):
        if self._app is None or not self._append_flush_due():
            return None
        a = self._app
        if a.ring_n >= a.ring:
            return "flush"
        # a filling flush moves no ring tokens; the ones that demote have their own graph
        return "demote" if self._flush_demotes(a.ring_n // self.config.realloc_every) else "fill"

    def _static_end(self) -> None:
        if self._app is not None:
            return self._append_static_end()
        self.win_k, self.win_v, self.importance = (x.contiguous() for x in (self.win_k, self.win_v, self.importance))
        self._sbuf = None

    def _slack_bytes(self) -> int:
        self._settle()
        if self._app is not None:
            return self._append_slack()
        if self._sbuf is None or self.static is None:
            return 0
        unused = self._sbuf["k"].shape[-2] - self.win_k.shape[-2]
        row = self.win_k[..., :1, :].numel() * self.win_k.element_size()
        pos = self._sbuf.get("pos")     # the one-pass step's class positions: working memory of the phase
        return 2 * unused * row + (self._sbuf["imp"].shape[-1] - self.importance.shape[-1]) * self.batch_size \
            * self.num_heads + (pos.numel() * pos.element_size() if pos is not None else 0)
