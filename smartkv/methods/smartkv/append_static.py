"""SmartKV's append layers' windows (append.py): in ordinary steps a view of buffers with room, read as one stable
segment; in static decode steps a fixed buffer, host counts kept in step with what the captured flush did. And
their views and accounting: the middle in position order, each token's widths, every tensor held."""
from __future__ import annotations

import os

import torch

from smartkv.cache.buffers import write_token
from smartkv.core.quant import dequantize
from smartkv.kernels import KVSegment
from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv.arena import padding
from smartkv.methods.smartkv.onepass import _rows


class SmartKVAppendStatic:
    """SmartKVLayer's append part for the window in ordinary and static steps, views and accounting (`_app`:
    append.Classes)."""

    # ---------------------------------------------------------------- ordinary steps
    def _window_buffer(self) -> tuple | None:
        """`_append_store`'s buffers (keys, values, codes, counts, length) while the window is a view of them."""
        a = self._app
        held = a.wbuf
        return held if held is not None and held[0].data_ptr() == self.win_k.data_ptr() else None

    def _append_store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Tokens k, v (B, H, n, D) enter the window (ordinary steps), their statistics at 0 (code 255, no query).
        The window is a view of buffers with room for a full window (`recent_window + realloc_every`), whose rows
        past it hold zeros, code 255 and count 0, and its length is on the device too: a decode step reads it as a
        stable segment (one batched launch, no row of its own to copy), and a flush's copy is a new buffer.
        SMARTKV_STABLE_WINDOW=0 passes the window as a new segment each step instead (A/B runs)."""
        a = self._app
        m, n, held = self.win_k.shape[-2], k.shape[-2], self._window_buffer()
        if held is None or m + n > held[0].shape[-2]:
            B, H, D = self.batch_size, self.num_heads, self.head_dim
            cap = max(m + n, self.config.recent_window + self.config.realloc_every)
            held = a.wbuf = (self.win_k.new_zeros(B, H, cap, D), self.win_v.new_zeros(B, H, cap, D),
                             a.wimp.new_full((B, H, cap), 255), a.wseen.new_zeros(B, cap),
                             torch.zeros(B, dtype=torch.int32, device=self.device))
            held[0][..., :m, :], held[1][..., :m, :], held[2][..., :m], held[3][:, :m] = (
                self.win_k, self.win_v, a.wimp, a.wseen)
            a.wseg = None
        held[0][..., m:m + n, :], held[1][..., m:m + n, :] = k, v
        held[4].fill_(m + n)
        self.win_k, self.win_v = held[0][..., :m + n, :], held[1][..., :m + n, :]
        a.wimp, a.wseen = held[2][..., :m + n], held[3][:, :m + n]

    def _window_segment(self) -> KVSegment:
        """The window as an ordinary step reads it: over `_append_store`'s buffers, its length on the device, the
        same object until the buffers change (so `decode_attention` keeps it in its batched launch's table)."""
        a, held = self._app, self._window_buffer()
        if held is None or os.environ.get("SMARTKV_STABLE_WINDOW", "1") == "0":
            # a window that is no view of the buffers (a static phase's end), or the A/B's "before": its own tensors
            return KVSegment(self.win_k, self.win_v)
        if a.wseg is None or a.wseg.keys is not held[0]:
            a.wseg = KVSegment(held[0], held[1], lengths=held[4], stable=True)
        return a.wseg

    # ---------------------------------------------------------------- static steps
    def _append_static_begin(self, tokens: int) -> None:
        """Capacity for every flush up to `tokens` tokens in all, and the window's buffers (room for one flush)."""
        self._append_flush()
        a, P, rw = self._app, self.config.realloc_every, self.config.recent_window
        n_win = self.win_k.shape[-2]
        self._append_reserve(max(0, (tokens - self.seq_len + n_win - rw) // P + 1), exact=True)
        B, H, D, W = self.batch_size, self.num_heads, self.head_dim, rw + P
        buf = {kind: x.new_zeros(B, H, W, D) for kind, x in (("k", self.win_k), ("v", self.win_v))}
        buf["imp"], buf["seen"] = a.wimp.new_full((B, H, W), 255), a.wseen.new_zeros(B, W)
        buf["k"][..., :n_win, :], buf["v"][..., :n_win, :] = self.win_k, self.win_v
        buf["imp"][..., :n_win], buf["seen"][:, :n_win] = a.wimp, a.wseen
        buf["start"] = torch.full((B,), self.sink_k.shape[-2] + self.n_middle, dtype=torch.int32, device=self.device)
        buf["len"] = torch.zeros(B, dtype=torch.int32, device=self.device)
        a.buf, a.wbuf = buf, None
        self._append_views(n_win)

    def _append_views(self, n_win: int) -> None:
        a = self._app
        buf = a.buf
        if n_win > buf["k"].shape[-2]:
            raise RuntimeError("static steps ran past the window's buffer (a flush was skipped)")
        self.win_k, self.win_v = buf["k"][..., :n_win, :], buf["v"][..., :n_win, :]
        a.wimp, a.wseen = buf["imp"][..., :n_win], buf["seen"][:, :n_win]

    def _append_static_store(self, key_states, value_states, state) -> None:
        buf = self._app.buf
        write_token((buf["k"], buf["v"]), state.pos - buf["start"], (key_states, value_states))

    def _append_advance(self, tokens: int) -> bool:
        """Host counts after static steps: the steps that flushed did it in their graph, demotions included. The
        flush that fills the ring changes what a step does (True: buffers are made again and the graphs captured
        again, once)."""
        P, rw = self.config.realloc_every, self.config.recent_window
        changed = False
        for _ in range(tokens):
            n_win = self.win_k.shape[-2] + 1
            if n_win - rw >= P:
                n_win -= P
                changed |= self._append_count_flush()
            self._append_views(n_win)
        if changed:
            self._append_static_end()
            self._append_static_begin(self._static_tokens)
        return changed

    def _append_static_end(self) -> None:
        a = self._app
        self.win_k, self.win_v = self.win_k.contiguous(), self.win_v.contiguous()
        a.wimp, a.wseen = a.wimp.contiguous(), a.wseen.contiguous()
        a.buf = None

    # ---------------------------------------------------------------- views and accounting
    def _append_middle(self, kind: str) -> torch.Tensor:
        """Dequantized middle (B, H, Tq, D) fp32 in position order, stored space."""
        a, D = self._app, self.head_dim
        out = torch.zeros(self.batch_size, self.num_heads, self.n_middle, D, device=self.device)
        m = self.n_middle - a.ring_n
        parts = [dequantize(_rows((a.k if kind == "k" else a.v)[cid], 0, n)) for cid, n in enumerate(a.n) if n]
        if parts:   # every row holds each class's count, in position order: the classes' rows, concatenated, are
            # the positions sorted by class then position (one scatter, where a masked store a class was slow)
            order = torch.sort(classmap.read(a.cmap, m), dim=-1, stable=True).indices
            out[..., :m, :].scatter_(2, order.unsqueeze(-1).expand(-1, -1, -1, D), torch.cat(parts, 2).float())
        if a.ring_n:   # the middle's last tokens, in the ring's slot order
            slots = self._ring_slots()
            out[..., -a.ring_n:, :] = dequantize(a.ring_k if kind == "k" else a.ring_v)[..., slots, :]
        return out

    def _append_bits(self, kind: str) -> torch.Tensor:
        a = self._app
        j = 0 if kind == "k" else 1
        table = torch.tensor([w[j] for w in a.widths], device=self.device)
        out = table[classmap.read(a.cmap, self.n_middle).long()]
        if a.ring_n:   # the middle's last tokens
            out[..., -a.ring_n:] = (a.ring_k if kind == "k" else a.ring_v).bits
        return out

    def _append_account(self, lb) -> None:
        a = self._app
        parts = [(n, kind, q) for cid, n in enumerate(a.n) for kind, q in (("k", a.k[cid]), ("v", a.v[cid]))]
        if a.ring:
            parts += [(a.ring_n, "k", a.ring_k), (a.ring_n, "v", a.ring_v)]
        for n, kind, q in parts:
            q = _rows(q, 0, n)
            lb.add_codes(q.codes, q.bits, kind)
            lb.add("metadata", q.scale)
            lb.add("metadata", q.zero)
        # the class map, the window's and the ring's statistics (its slots in use, as its codes), the flush's plan
        # and lengths, the key normalisation
        ring_stats = (a.rimp[..., :a.ring_n], a.rseen[:, :a.ring_n]) if a.ring else ()
        cmap = a.cmap[..., :classmap.used_bytes(self.n_middle - a.ring_n)]   # the ring's positions are not marked
        for t in (cmap, a.wimp, a.wseen, a.length, a.rank_class, a.mix_len, self.k_mu, self.k_scale, *ring_stats,
                  a.head, a.ring_len):
            if t is None:
                continue
            lb.add("metadata", t)
        if a.cimp is not None:   # while the ring fills: the class rows' importance codes and their one count,
            for cid, n in enumerate(a.n):   # the demotion counts
                lb.add("metadata", a.cimp[cid][..., :n])
            lb.add("metadata", a.cseen)
            lb.add("metadata", a.move_k)
            if a.lse is not None:
                lb.add("metadata", a.lse)
        for t in (self.sink_k, self.sink_v, self.win_k, self.win_v):
            lb.add("residual", t)

    def _append_slack(self) -> int:
        a, out = self._app, 0
        rows = list(zip(a.k, a.v, a.n)) + ([(a.ring_k, a.ring_v, a.ring_n)] if a.ring else [])
        for k, v, n in rows:   # capacity not yet used (the ring's while it fills)
            for q in (k, v):
                spare = q.codes.shape[-2] - n
                out += sum(spare * t[..., :1, :].numel() * t.element_size() for t in (q.codes, q.scale, q.zero))
        out += (a.cmap.shape[-1] - classmap.used_bytes(self.n_middle - a.ring_n)) * self.batch_size * self.num_heads
        held = self._window_buffer() if a.buf is None else None   # ordinary steps: the window's buffers' spare
        if held is not None:   # rows, and its device length (as a static phase's buffers are counted)
            out += sum(t.numel() * t.element_size() for t in held) - sum(
                t.numel() * t.element_size() for t in (self.win_k, self.win_v, a.wimp, a.wseen))
        if a.ring:   # the ring's statistics in slots not yet filled (it fills from slot 0)
            out += (a.ring - a.ring_n) * sum(t[..., :1].numel() * t.element_size() for t in (a.rimp, a.rseen))
        if a.cimp is not None:
            out += sum((c.shape[-1] - n) * self.batch_size * self.num_heads for c, n in zip(a.cimp, a.n))
            out += padding(a.cimp, a.share)
        out += padding([t for q in a.k + a.v for t in (q.codes, q.scale, q.zero)], a.share)   # the blocks' alignment
        if a.ring:
            out += padding([t for q in (a.ring_k, a.ring_v) for t in (q.codes, q.scale, q.zero)]
                           + [a.rseen, a.head, a.ring_len], a.ring_share) + padding([a.rimp], a.ring_share)
        if a.buf is not None:
            spare = a.buf["k"].shape[-2] - self.win_k.shape[-2]
            row = self.win_k[..., :1, :].numel() * self.win_k.element_size()
            out += spare * (2 * row + self.batch_size * (self.num_heads + 1))
            out += sum(a.buf[k].numel() * a.buf[k].element_size() for k in ("start", "len"))
        return out
