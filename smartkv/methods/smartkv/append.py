"""SmartKV's append re-allocation (`realloc="append"` with `joint=True`, on full-attention layers): the first
allocation places every prompt token by weight at the full budget; tokens leaving the window then enter a ring of
the newest `ring_tokens` middle tokens at one class (`core.classes.ring_widths`): while it fills, each flush pays
for its group by demoting prompt tokens (demote.py: counts planned at the first allocation, the least attended tokens
chosen at the flush); once it is full, tokens leaving it take their final class, which they keep for good: every
group of `realloc_every` gets the same class mix (core.classes.flush_mix: solved once, from the first allocation's
weight profile), heaviest tokens first, which spends exactly the budget. So the budget holds flush by flush, and
once the ring is full nothing past it moves:
  - the middle is one buffer per (key width, value width) class, tokens in position order, each class one dense
    segment that the uniform decode kernels read (one `decode_attention` call a step, no positions, no logits
    buffer of the middle's size);
  - importance is needed only for the ring's and window's tokens (a running sum of the attention they receive and
    the count of queries that saw them), so a step asks the kernel for their probabilities alone (and, while the
    ring fills, for every class row's);
  - a flush is a fixed amount of fixed-shape work with offsets read on the device (append_flush.py): a static decode
    step that flushes is one more captured graph (smartkv.cache.graphs), replayed every period, not a host
    re-allocation; while the ring fills, its demotions too (demote.py: fixed shapes, counts from the device), so
    the graphs are captured again once, when the ring is full.
A class map (4 bits a middle token and KV head, classmap.py) keeps each token's class for the reference path, the
demotions' merges and accounting.
docs/smartkv.md ("Append re-allocation") has its measured speed and quality against the re-allocating designs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smartkv.cache.buffers import grown
from smartkv.core.classes import flush_mix_steps, ring_widths_steps
from smartkv.core.counts import ProfileCounts
from smartkv.core.importance import decode_importance, encode_importance, kv_head_mass, seen_counts
from smartkv.core.policy import ranked
from smartkv.core.quant import QTensor
from smartkv.kernels import FoldInto, KVSegment, decode_attention
from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv.arena import class_buffers, copy_rows


@dataclass
class Classes:
    """An append layer's middle. Buffers may hold more rows than tokens (capacity for later flushes)."""
    widths: list            # class id -> (key width, value width)
    k: list                 # class id -> QTensor (B, H, capacity, .) of its keys (stored space), position order
    v: list                 # class id -> QTensor of its values
    n: list                 # class id -> tokens a row holds (host)
    length: torch.Tensor    # (classes, B) int32: the same on the device (static steps' segment lengths)
    cmap: torch.Tensor      # (B, H, map bytes) 4-bit class id of each middle position before the ring (classmap.py)
    mix: list               # (class id, tokens) of every flush, heaviest tokens first
    rank_class: torch.Tensor  # (flush,) uint8: class id of the flush's r-th heaviest token
    mix_len: torch.Tensor   # (classes,) int32: tokens a flush adds to each class
    wimp: torch.Tensor      # (B, H, n_win) uint8: the window tokens' mean importance codes (as the ring's)
    wseen: torch.Tensor     # (B, n_win) uint8: queries that saw each window token, up to 255 (`_count`)
    ring_k: QTensor | None = None   # the ring: the newest `ring_n` middle tokens at the ring's class, slot order
    ring_v: QTensor | None = None
    ring: int = 0           # the ring's capacity (a multiple of the flush; 0: no ring)
    ring_n: int = 0         # tokens it holds: it fills from empty after the first allocation, then stays full
    ring_len: torch.Tensor | None = None   # (B,) int32: ring_n on the device (static steps' segment length)
    head: torch.Tensor | None = None   # (B,) int32: the slot the next token goes to (the oldest once full)
    head_host: int = 0
    rimp: torch.Tensor | None = None   # (B, H, ring) uint8: the ring tokens' mean importance codes (as the classes')
    rseen: torch.Tensor | None = None  # (B, ring) uint8: queries that saw each ring token, up to 255 (`_count`)
    plan: list | None = None   # while the ring fills: per filling flush, [(class id, target id, tokens)] demoted
    cimp: list | None = None   # while the ring fills: class id -> (B, H, capacity) uint8 importance codes, row order
    cseen: torch.Tensor | None = None   # (1,) fp32: queries every middle token counts as seen by (one denominator)
    lse: torch.Tensor | None = None     # while the ring fills: (B, Hq) fp32, the last query's log2-sum-exp per head
    moves: list | None = None   # while the ring fills: every (class id, target id, most tokens a flush moves)
    move_k: torch.Tensor | None = None   # (filling flushes, moves): each flush's count of each move (uint8 or wider)
    buf: dict | None = None  # static steps: window, wimp, wseen buffers and the window's first position
    wbuf: tuple | None = None   # ordinary steps: the window's buffers, which win_k, win_v, wimp, wseen view
    # (`_append_store`: keys, values, codes, counts, and the window's length on the device)
    segs: tuple | None = None   # ordinary steps: (key, [sinks, classes, ring] segments) (`_middle_segments`)
    wseg: object = None         # ordinary steps: the window's segment over `wbuf` (`_window_segment`)
    share: int = 1              # layers whose class buffers (and their importance codes) share one block (place.py)
    ring_share: int = 1         # layers whose rings share one block
    stack: object = None        # while the ring fills: the group's stacked classes (stacked.Stack), or None


class SmartKVAppend:
    """SmartKVLayer's append part. `_app`: the layer's `Classes` once its first allocation ran, else None."""

    def _append_wanted(self) -> bool:
        """Append classes need joint classes of single tokens in the model's basis, on a layer that never forgets
        (a sliding layer's middle loses its oldest tokens); elsewhere "append" re-allocates incrementally."""
        cfg = self.config
        return (cfg.realloc == "append" and cfg.joint and self.block_tokens == 1 and cfg.rotate == "none"
                and self.sliding_window is None)

    # ---------------------------------------------------------------- from the first allocation
    def _append_stats(self, weights: torch.Tensor, layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """What `_append_split` reads of the weights (R, n) on the host, (layers, n + 1) float64 on their device (the
        rows of `layers` layers alike stacked, first.py): each one's rank profile and the mean weight of the
        prompt's newest `ring_tokens` (the profile's solve tables follow them, `device_tables`); and each row's tokens
        heaviest first (ties by position), the order the placement (place.py) hands out classes in: both from one
        sort (`policy.ranked`), since a prefill's device time counts where the runner's workers share a card."""
        n, A = weights.shape[1], self.config.ring_tokens // self.config.realloc_every * self.config.realloc_every
        profile, order = ranked(weights, layers)
        newest = weights[:, -max(min(A, n), 1):].double().reshape(layers, -1).mean(1)
        return torch.cat([profile.reshape(layers, n), newest[:, None]], 1), order

    def _append_split(self, weights: torch.Tensor, kinds: tuple, stats: torch.Tensor) -> tuple:
        """Before an append layer's first allocation (weights (R, n), kinds as `_flush` builds them, returned with
        each kind's budget less the layer's bookkeeping, `_append_charge`; `stats`: `_append_stats` on the host,
        then the profile's `device_tables`):
        solve the flush mix on the n tokens' profile, choose the ring's class (`ring_widths`), size the ring
        (`ring_tokens`, less where the n tokens cannot pay for it) and plan the demotions that pay for it as it
        fills (`_demotion_plan`). A solve (`solves.solve_asks`: a group's layers asked at once)."""
        cfg, P, lo = self.config, self.config.realloc_every, min(self.widths)
        n, A = weights.shape[1], cfg.ring_tokens // P * P
        profile = stats[:n]
        # sorted once, its tables made on the device: the ring's and the plan's solves
        solver = ProfileCounts(profile, self.widths, tables=stats[n + 1:])
        budgets = (self.budget_k, self.budget_v)
        mix = yield from flush_mix_steps(profile, budgets, self.widths, P)
        top = (yield from ring_widths_steps(solver, float(stats[n]), budgets, self.widths, A)) if A else mix[0][:2]
        while A and any(b * (n + A) - A * w < lo * n for b, w in zip(budgets, top)):
            A -= P
        (_, _, bk), (_, _, bv) = kinds
        # the layer's bookkeeping comes out of the prompt's bits: charged for a plan table of 2 x widths - 1 moves
        # (SmolLM2 plans 3-7 with 4 widths), the plan at that charge, then checked against the plan's own table
        room = [math.floor(b * n + 1e-9) - lo * n for b in (bk, bv)]   # bits each kind's rows can give up
        charge, pairs, plan, solved = (0, 0), 2 * len(self.widths) - 1, None, {}
        for _ in range(3):
            want = self._append_charge(A, pairs, plan)
            if plan is not None and want <= sum(charge):
                break
            cv = min(room[1], max(want // 2, want - room[0]))   # split between the kinds as far as each can pay
            if plan is not None and (min(room[0], want - cv), cv) == charge:
                break
            charge = (min(room[0], want - cv), cv)
            plan, solved = (yield from self._demotion_plan(solver, (bk, bv), top, A, n, charge)) if A else ([], {})
            pairs = len({m for moves in plan for m in moves})
        kinds = tuple((kind, new, (math.floor(b * n + 1e-9) - c) / n) for (kind, new, b), c in zip(kinds, charge))
        self._app_plan = (mix, A, plan, top, solver, solved)
        return weights, kinds

    def _append_charge(self, A: int, pairs: int, plan: list | None) -> int:
        """Width-bits a row (of keys and of values together) gives up for what an append layer holds besides its
        tokens' codes and the per-token statistics the default holds too (class map, importance codes): the
        window's and the full ring's one-byte counts a sequence, the filling flushes' count table (A / P rows of
        `pairs` moves, entries as wide as `plan`'s largest count needs) and the device lengths and tables (at most
        len(widths)^2 classes; with class_norm="previous" a log2-sum-exp a query head while the ring fills), less
        what a re-allocating layer holds that it does not (the sinks' codes, the level maps over the full ring's
        positions), so that it holds no more bytes than that layer."""
        B, P, C = self.batch_size, self.config.realloc_every, len(self.widths) ** 2
        top = max((k for moves in plan or [] for k in moves.values()), default=0)
        item = 1 if top <= 255 else 2 if top <= 32767 else 4
        H, cfg = self.num_heads, self.config
        held = (B * (A + cfg.recent_window + P) + A // P * pairs * item + 4 * (C * B + C + 2 * B + 1) + P
                - B * H * (cfg.sink_tokens + A // 2))
        if cfg.class_norm == "previous" and A:
            held += 4 * B * H * self._group_heads
        return max(0, -(-8 * held // (B * H * self.head_dim)))

    def _append_reserve(self, flushes: int, exact: bool = False, tight: bool = False) -> None:
        """Capacity for `flushes` more flushes in every class buffer and the class map: grown as the uniform caches'
        buffers grow (`grown`: a quarter, not double, so a long chunked prefill does not hold up to twice its
        bytes), or to exactly that (`exact`: static steps, whose kernels plan their work over a segment's whole
        capacity). The flushes that fill the ring add nothing to the classes. Eager flushes ask for the flushes up to
        the length `reserve` announced (a chunked prefill's, a decoder's) at once, `tight`: grown to exactly that,
        never shrunk; grown by a quarter chunk after chunk, the buffers of every layer held up to a quarter more
        than their classes at a prefill's end (about 2 GiB of the peak at 32K x 36, bench_e2e's largest batch)."""
        a, P = self._app, self.config.realloc_every
        if a.stack is not None and (exact or not a.stack.holds(self)):
            a.stack.dissolve()   # a static phase's exact buffers are each layer's own (stacked.py)
        count, need, fill, left = list(a.n), list(a.n), a.ring_n // P, flushes
        while left and fill < a.ring // P:   # the filling flushes: demotions move tokens between classes
            self._apply_moves(count, a.plan[fill] if a.plan is not None else [])
            need = [max(x, y) for x, y in zip(need, count)]
            fill, left = fill + 1, left - 1
        for cid, m in a.mix:   # then every flush adds the mix: the counts only grow
            count[cid] += left * m
        need = [max(x, y) for x, y in zip(need, count)]
        caps = [k.codes.shape[-2] for k in a.k]
        change = [cap < want or exact and cap > want for cap, want in zip(caps, need)]
        if any(change):
            new = [cap if not c else want if exact or tight else grown(cap, want)
                   for cap, want, c in zip(caps, need, change)]
            if a.stack is not None:
                a.stack.regrow(new)   # every layer of the group's at once: the stack stays whole
            else:
                self._append_regrow(new)
        need = self.n_middle + flushes * P
        if a.cmap.shape[-1] < classmap.map_bytes(need):
            if a.stack is not None:
                a.stack.grow_map(grown(2 * a.cmap.shape[-1], need))
            else:
                a.cmap = classmap.grown(a.cmap, grown(2 * a.cmap.shape[-1], need))

    def _append_regrow(self, caps: list) -> None:
        """Every class into a new block (arena.py) of `caps` rows, its rows copied: the old block goes with its last
        view."""
        a = self._app
        ks, vs, imps = class_buffers(self, a.widths, caps, importance=a.cimp is not None)
        for cid, n in enumerate(a.n):
            if n:
                copy_rows(a.k[cid], ks[cid], n)
                copy_rows(a.v[cid], vs[cid], n)
                if a.cimp is not None:
                    imps[cid][..., :n] = a.cimp[cid][..., :n]
        a.k, a.v, a.share = ks, vs, 1
        if a.cimp is not None:
            a.cimp = imps

    # ---------------------------------------------------------------- a decode step
    def _append_decode(self, query: torch.Tensor, scaling: float, observe: bool) -> torch.Tensor:
        """One `decode_attention` over [sinks, each class, ring, window]; with `observe`, the ring's and window's
        probabilities folded into their importance codes. A static step reads class and window lengths from the
        device."""
        a, static = self._app, self.static is not None
        ring = bool(a.ring)   # its segment read from the first step on (`_middle_segments`)
        segs = self._middle_segments(static)
        if static:
            buf = a.buf
            torch.sub(self.static.lengths, buf["start"], out=buf["len"])
            segs.append(KVSegment(buf["k"], buf["v"], lengths=buf["len"]))
            wimp, wseen = buf["imp"], buf["seen"]
        else:
            segs.append(self._window_segment())
            wimp, wseen = (a.wbuf[2], a.wbuf[3]) if segs[-1] is a.wseg else (a.wimp, a.wseen)
        if not observe:
            out = decode_attention(query, segs, scaling)
        else:
            # the ring's and window's probabilities folded into their codes and counts where they are computed
            # (a static window's rows past its length keep code 255 and count 0: a new token's start)
            G = self._group_heads
            rfold = [FoldInto(a.rimp, a.rseen, G)] if ring else []
            # while the ring fills, every class row's importance too (the demotions'): its probabilities, or with
            # class_norm="previous" folded in the pass with the previous query's normaliser (no (B, Hq, T) logits)
            held = [cid for cid in range(len(a.widths)) if a.k[cid].codes.shape[-2]]
            fold = cls = None
            if a.cimp is not None and a.lse is not None:
                fold = [None] + [(a.cimp[cid], a.cseen) for cid in held] + [None] * (len(rfold) + 1)
            elif a.cimp is not None:
                cls = [torch.zeros(*segs[1 + i].keys.codes.shape[:3], device=self.device) for i in range(len(held))]
            out, _ = decode_attention(query, segs, scaling, return_token_probs=True,
                                      probs_out=[None] + (cls or [None] * len(held)) + rfold
                                      + [FoldInto(wimp, wseen, G)],
                                      fold=fold, lse_io=a.lse if fold else None)
            if fold:
                a.cseen += 1
            elif cls:
                it = iter(cls)
                self._demote_fold([next(it) if cid in held else None for cid in range(len(a.widths))], 1,
                                  self._group_heads)
        if static and self._append_flush_due():
            if self.static.side is None:
                self._append_flush_static()
            else:   # the flush feeds the next step only: beside the later layers' work
                with torch.cuda.stream(self.static.fork()):
                    self._append_flush_static()
        return out.transpose(1, 2)

    def _middle_segments(self, static: bool) -> list:
        """[sinks, each class held, the ring when there is one] as a step reads them: each class's buffers whole,
        their lengths on the device, as a static step's; the ring's from the first step on (its length 0 until the
        first flush). An ordinary step's are the same objects until a buffer grows, flush after flush, so
        `decode_attention` plans their launches and builds their batched table once (`kernels.batched`): an eager
        step of a batch of one is bound by its host work, and a table built again after a flush cost the step after
        it ~11-15 ms on the H100 host."""
        a = self._app
        key = None
        if not static:
            key = (self.sink_k.data_ptr(), self.sink_k.shape[-2], self.k_scale.data_ptr(),
                   a.ring_k.codes.data_ptr() if a.ring_k is not None else 0,
                   tuple((k.codes.shape[-2], k.codes.data_ptr(), v.codes.data_ptr()) for k, v in zip(a.k, a.v)))
            if a.segs is not None and a.segs[0] == key:
                return list(a.segs[1])
        kept = not static   # an ordinary step's segments are passed again until a buffer grows: one batched launch
        segs = [KVSegment(self.sink_k, self.sink_v, stable=kept)]
        for cid in range(len(a.widths)):   # each class's buffers whole, its length read on the device: the same
            if a.k[cid].codes.shape[-2]:      # segments flush after flush, until a buffer grows
                segs.append(KVSegment(a.k[cid], a.v[cid], key_scale=self.k_scale, key_shift=self.k_mu,
                                      lengths=a.length[cid], stable=kept))
        if a.ring:
            segs.append(KVSegment(a.ring_k, a.ring_v, key_scale=self.k_scale, key_shift=self.k_mu,
                                  lengths=a.ring_len, stable=kept))
        a.segs = None if static else (key, segs)
        return list(segs)

    def _append_observe(self, probs: torch.Tensor, allowed: torch.Tensor, lse: torch.Tensor) -> None:
        """The reference path's fold (probs (B, Hq, W, T), allowed (B, 1, W, T), lse (B, Hq, W) the queries'
        log2-sum-exp): into the ring's and window's codes (and while the ring fills, the class rows', as the fused
        step folds them: a decode query's probabilities rescaled to the previous query's normaliser)."""
        a, n = self._app, self.win_k.shape[-2]
        mass, seen = kv_head_mass(probs, self.num_heads), seen_counts(allowed).float()
        if a.cimp is not None:   # while the ring fills: every class row's attention (each middle token seen by all)
            s0, W = self.sink_k.shape[-2], probs.shape[-2]
            mid = mass[..., s0:s0 + self.n_middle]
            if a.lse is not None:   # class_norm="previous": the class rows' only (the ring's and window's are exact)
                if W == 1:
                    prev = torch.where(a.lse > -1e30, a.lse, torch.zeros_like(a.lse))
                    rescaled = probs[..., s0:s0 + self.n_middle] * torch.exp2(lse[..., -1] - prev)[..., None, None]
                    mid = kv_head_mass(rescaled, self.num_heads)
                a.lse = lse[..., -1].clone()
            self._demote_fold([self._cls_rows(mid, cid, n) if n else None for cid, n in enumerate(a.n)], W)
        codes, counts = self._fold_mean(a.wimp, a.wseen, mass[..., -n:], seen[:, -n:])
        a.wimp.copy_(codes)   # in place: views of `_append_store`'s buffers
        a.wseen.copy_(counts)
        if a.ring_n:   # the ring's positions just before the window, oldest first
            slots = self._ring_slots()
            codes, counts = self._fold_mean(a.rimp.index_select(2, slots), a.rseen.index_select(1, slots),
                                            mass[..., -n - a.ring_n:-n], seen[:, -n - a.ring_n:-n])
            a.rimp.index_copy_(2, slots, codes)
            a.rseen.index_copy_(1, slots, counts)

    def _fold_mean(self, codes: torch.Tensor, counts: torch.Tensor, mass: torch.Tensor, queries: torch.Tensor):
        """Mean importance codes (B, H, n) and counts (B, n) after `queries` (B, n) more queries per token gave them
        `mass` (B, H, n: `kv_head_mass`): `importance_fold` with a count of queries a token."""
        s = counts.float()
        mean = (decode_importance(codes) * s[:, None, :] + mass) / (s + queries).clamp_min(1)[:, None, :]
        return encode_importance(mean), self._count(s + queries)
