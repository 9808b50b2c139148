"""SmartKV's append layers' flushes (append.py has the design): tokens leaving the window go through the ring to
their final classes, a group of `realloc_every` at a time, in fixed shapes with offsets on the device (a static
step's flush runs inside its captured graph); a prefill's chunk longer than the ring is placed in one go."""
from __future__ import annotations

import torch

from smartkv.core.importance import decode_importance, token_weights
from smartkv.core.quant import QTensor, dequantize
from smartkv.kernels import quantize_pack_at
from smartkv.methods.smartkv import classmap


def _to_front(rows: list, n: int, m: int) -> None:
    """A window's tokens [n, m) to the front of its buffers, in place, after its first n left (flushed): each
    (tensor, token dimension, empty) has its rows moved, and the n rows they open up take `empty` (importance code
    255, count 0: no attention, no query yet; None: left as they are, past the window's length)."""
    for t, dim, empty in rows:
        t.narrow(dim, 0, m - n).copy_(t.narrow(dim, n, m - n).clone())
        if empty is not None:
            t.narrow(dim, m - n, n).fill_(empty)


class SmartKVAppendFlush:
    """SmartKVLayer's append flushes (`_app`: append.Classes)."""

    def _append_place(self, k_st: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, seen: torch.Tensor,
                      mid_at: torch.Tensor) -> None:
        """Give F groups of P tokens at once (keys, values (B, H, F * P, D) fp32, stored space; their statistics:
        mean importance codes (B, H, F * P) and counts (B, F * P)) their final classes: each group's tokens get the
        mix's classes by weight, and are written at the end of their class buffers (rows from the device lengths),
        groups in order, and into the class map at middle position `mid_at` ((1,) long, on the device)."""
        cfg, a, P = self.config, self._app, self.config.realloc_every
        B, H, T, D = k_st.shape
        F = T // P
        if cfg.importance == "uniform":
            imp = torch.ones(B, H, T, device=v.device)
        elif cfg.importance == "keynorm":
            imp = (k_st * self.k_scale.float() + self.k_mu.float()).norm(dim=-1)
        elif cfg.importance == "sum":
            imp = decode_importance(codes) * seen[:, None, :].float()
        else:
            imp = decode_importance(codes)
        sens = None
        if cfg.sensitivity:   # as `_weights`
            sens = self._sensitivity(k_st.amax(-1) - k_st.amin(-1), v.amax(-1) - v.amin(-1)).reshape(-1, P)
        # one row per (sequence, head, group): the floor's row mean is the group's, as a lone flush's
        w = token_weights(imp.reshape(-1, P), cfg.importance_floor, cfg.importance_power, sens)
        RF = w.shape[0]
        order = torch.argsort(w, dim=-1, descending=True, stable=True)
        cls = torch.empty_like(order).scatter_(1, order, a.rank_class.long().expand(RF, P))   # each token's class
        by_cls = torch.argsort(cls, dim=-1, stable=True)          # class after class, positions ascending in each
        by_cls = by_cls + self._arange(F).repeat(B * H)[:, None] * P   # (B * H * F, P) token index within its row
        by_cls = by_cls.reshape(B * H, F, P)
        start = 0
        for cid, m in a.mix:
            idx = by_cls[..., start:start + m].reshape(B * H, F * m, 1).expand(-1, -1, D)   # groups in order
            start += m
            for x, buf in ((k_st, a.k[cid]), (v, a.v[cid])):   # written at the class's device length
                quantize_pack_at(x.reshape(B * H, T, D).gather(1, idx).reshape(B, H, F * m, D), buf.bits,
                                 self.group, buf, a.length[cid])
        a.length += a.mix_len[:, None] * F
        classmap.write(a.cmap, mid_at, cls.reshape(B, H, T))

    def _append_push(self, k_st: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, seen: torch.Tensor,
                     mid_at: torch.Tensor, full: bool) -> None:
        """Flush n tokens (a multiple of P, at most the ring's room before its end) into the middle at position
        `mid_at`: through the ring when there is one (when it is `full`, the n oldest ring tokens first take
        their final classes, `_append_place`; the new ones take their slots at the ring's class, while it fills
        after their flushes' demotions), else straight to their classes."""
        a = self._app
        if not a.ring:
            return self._append_place(k_st, v, codes, seen, mid_at)
        n = k_st.shape[-2]
        P = self.config.realloc_every
        slots = a.head[:1].long() + self._arange(n)
        if full:
            self._append_place(*self._ring_tokens(slots), *self._ring_stats(slots), mid_at - a.ring)
        else:   # each group that fills the ring is paid for by demotions (counts read from the device), at its
            first = a.ring_len[:1].long() // P   # flush or ahead of it: the host knows which flushes demote
            for i in range(n // P):
                if not self._flush_demotes(a.ring_n // P + i):
                    continue
                if a.stack is not None and n == P and self.static is None:   # with the group's (stacked.py)
                    a.stack.take(self, a.ring_n // P, first)
                else:
                    self._demote(first + i)
            a.ring_len += n
        quantize_pack_at(k_st, a.ring_k.bits, self.group, a.ring_k, a.head)
        quantize_pack_at(v, a.ring_v.bits, self.group, a.ring_v, a.head)
        a.rimp.index_copy_(2, slots, codes)
        a.rseen.index_copy_(1, slots, seen)
        a.head.add_(n).remainder_(a.ring)
        a.head_host = (a.head_host + n) % a.ring

    def _stored_space(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (k.float() - self.k_mu.float()) / self.k_scale.float(), v.float()

    def _ring_slots(self) -> torch.Tensor:
        """The ring's slots in position order (oldest first, from the host's head)."""
        a = self._app
        return (a.head_host - a.ring_n + torch.arange(a.ring_n, device=self.device)) % a.ring

    @staticmethod
    def _count(seen: torch.Tensor) -> torch.Tensor:
        """A window or ring token's count of the queries that saw it, in one byte: past 255 its mean importance is a
        moving average over about the last 255 queries (a ring token is seen by about ring_tokens + recent_window)."""
        return seen.clamp(max=255).to(torch.uint8)

    def _ring_stats(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring tokens' statistics at `slots`, as the window's are kept: mean importance codes, counts."""
        a = self._app
        return a.rimp.index_select(2, slots), a.rseen.index_select(1, slots)

    def _ring_tokens(self, slots: torch.Tensor) -> list[torch.Tensor]:
        """The ring's keys and values at `slots` (the same in every row), dequantized (stored space)."""
        a = self._app
        return [dequantize(QTensor(*(t.index_select(2, slots) for t in (q.codes, q.scale, q.zero)), q.bits,
                                   q.group_size, -1)) for q in (a.ring_k, a.ring_v)]

    def _arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def _append_flush(self) -> None:
        """Ordinary steps: flush every whole group of `realloc_every` tokens past the recent window, in one go.
        Static steps flush inside their graph (`_append_flush_static`) and never here."""
        if self.static is not None:
            return
        a, P = self._app, self.config.realloc_every
        F = (self.win_k.shape[-2] - self.config.recent_window) // P
        if F <= 0:
            return
        n = F * P
        cfg = self.config   # sized once for the reserved length (`_append_reserve`), at least for these flushes
        ahead = (self.reserved_tokens - cfg.sink_tokens - cfg.recent_window - self.n_middle) // P
        self._append_reserve(max(F, ahead), tight=ahead > F)
        k_st, v = self._stored_space(self.win_k[..., :n, :], self.win_v[..., :n, :])
        base, done, counted = self.n_middle, 0, 0
        while done < n:   # through the ring, as far as its end (or filling it, as far as full) at a time
            filling = a.ring_n < a.ring
            if a.ring and not filling and n - done >= a.ring:   # a prefill's chunk: one placement, not one a ring
                self._append_pass(k_st[..., done:, :], v[..., done:, :], a.wimp[..., done:n], a.wseen[:, done:n],
                                  base + done)
                break
            g = n - done if not a.ring else min(n - done, a.ring - (a.ring_n if filling else a.head_host))
            mid_at = torch.full((1,), base + done, dtype=torch.long, device=self.device)
            self._append_push(k_st[..., done:done + g, :], v[..., done:done + g, :], a.wimp[..., done:done + g],
                              a.wseen[:, done:done + g], mid_at, full=not filling)
            done += g
            if filling:   # the filling flushes' demotions, before any token leaves the ring
                for _ in range(g // P):
                    self._append_count_flush()
                counted += g // P
        self._window_drop(n)
        for _ in range(F - counted):
            self._append_count_flush()

    def _window_drop(self, n: int) -> None:
        """The window's oldest n tokens leave it (flushed). In `_append_store`'s buffers, the rest move to their
        front and the rows they leave take code 255 and count 0 again: the buffers, and the stable segment the
        steps read over them, stay the same objects, so the step after a flush builds no batched table again."""
        a, held, m = self._app, self._window_buffer(), self.win_k.shape[-2]
        if held is None or held[0].shape[-2] > self.config.recent_window + self.config.realloc_every:
            # no buffers, or a prefill chunk's (sized for the chunk): the rest copied out, the buffers let go
            self.win_k, self.win_v = self.win_k[..., n:, :].contiguous(), self.win_v[..., n:, :].contiguous()
            a.wimp, a.wseen, a.wbuf = a.wimp[..., n:].contiguous(), a.wseen[:, n:].contiguous(), None
            return
        _to_front([(held[0], -2, None), (held[1], -2, None), (held[2], -1, 255), (held[3], -1, 0)], n, m)
        held[4].fill_(m - n)
        self.win_k, self.win_v = held[0][..., :m - n, :], held[1][..., :m - n, :]
        a.wimp, a.wseen = held[2][..., :m - n], held[3][:, :m - n]

    def _append_pass(self, k_st: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, seen: torch.Tensor,
                     at: int) -> None:
        """r >= ring tokens (a multiple of P) past a full ring, from middle position `at`: the ring's tokens and the
        first r - ring of them take their final classes in one placement (as r / P flushes would place them: no
        query comes between), the last `ring` become the ring, in position order from slot 0."""
        a, R, r = self._app, self._app.ring, k_st.shape[-2]
        slots = self._ring_slots()
        old, stats = self._ring_tokens(slots), self._ring_stats(slots)
        self._append_place(torch.cat([old[0], k_st[..., :r - R, :]], 2), torch.cat([old[1], v[..., :r - R, :]], 2),
                           torch.cat([stats[0], codes[..., :r - R]], -1), torch.cat([stats[1], seen[:, :r - R]], -1),
                           torch.full((1,), at - R, dtype=torch.long, device=self.device))
        a.head.zero_()
        a.head_host = 0
        quantize_pack_at(k_st[..., r - R:, :], a.ring_k.bits, self.group, a.ring_k, a.head)
        quantize_pack_at(v[..., r - R:, :], a.ring_v.bits, self.group, a.ring_v, a.head)
        a.rimp.copy_(codes[..., r - R:])
        a.rseen.copy_(seen[:, r - R:])

    def _append_count_flush(self) -> bool:
        """Host counts after one flush (its device work done): it filled the ring by a group, which its demotions
        paid for (True when that filled the ring: from then on a step neither demotes nor observes the classes),
        or (ring full or none) added the mix."""
        a, P = self._app, self.config.realloc_every
        self.n_middle += P
        if a.ring_n < a.ring:
            self._apply_moves(a.n, a.plan[a.ring_n // P] if a.plan is not None else [])
            if any(n > q.codes.shape[-2] for n, q in zip(a.n, a.k)):
                raise RuntimeError("an append class buffer had no room for its demotions (_append_reserve)")
            a.ring_n += P
            if a.ring_n == a.ring:
                self._demote_done()
                return True
            return False
        for cid, m in a.mix:
            a.n[cid] += m
        return False

    def _append_flush_static(self) -> None:
        """A static step's flush, after its attention: the window buffer's first P tokens into their classes, the
        rest of the window moved to the front; every offset on the device."""
        a, P = self._app, self.config.realloc_every
        buf = a.buf
        W = buf["k"].shape[-2]
        mid_at = (buf["start"][:1] - self.sink_k.shape[-2]).long()
        self._append_push(*self._stored_space(buf["k"][..., :P, :], buf["v"][..., :P, :]), buf["imp"][..., :P],
                          buf["seen"][:, :P], mid_at, full=a.ring_n >= a.ring)
        _to_front([(buf["k"], -2, None), (buf["v"], -2, None), (buf["imp"], -1, 255), (buf["seen"], -1, 0)], P, W)
        buf["start"] += P

    def _append_flush_due(self) -> bool:
        """Whether this static step flushes (host counts: the window before the step's token)."""
        return self.win_k.shape[-2] + 1 - self.config.recent_window >= self.config.realloc_every
