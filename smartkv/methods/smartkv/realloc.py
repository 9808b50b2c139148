"""SmartKV's re-allocation: the window's oldest tokens move into the middle and the middle's widths are chosen
again under the budget (policy.rank_profile, counts_for, cascade_assign); only demoted and new tokens are
(de)quantized, kept tokens keep their codes."""
from __future__ import annotations

import torch

from smartkv.core.importance import decode_importance, seen_from_ranges, token_weights
from smartkv.core.policy import (Candidates, block_weights, cascade_assign, cascade_plan, counts_for,
                                 incremental_assign, incremental_candidates, pack_levels, plan_counts, rank_profile)
from smartkv.core.quant import QTensor, dequantize, quantize, take_rows, token_ranges
from smartkv.kernels import quantize_pack
from smartkv.methods.smartkv.first import first_allocations
from smartkv.methods.smartkv.storage import inverse_order


class SmartKVRealloc:
    """SmartKVLayer's re-allocation part: `_flush` and the steps it takes."""

    def _before_update(self) -> None:
        self._settle()
        self._flush(evict=False)  # when no attention hook ran; forgetting now would break this call's mask

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().append(key_states, value_states)
        # no attention follows (a cache filled without a model): flush now, as `attend` does after its attention,
        # not at the next call, or every layer holds its last chunk at full precision meanwhile (a 2K chunk at 32K
        # x 36 sequences: 9 GiB across 32 layers, the largest batch's transient)
        self._flush(evict=False, defer=True)

    def _flush(self, evict: bool = True, defer: bool = False) -> None:
        """Move the window's oldest tokens into the middle and re-allocate the middle's widths. Only tokens that
        change width (demotions) and the new ones are dequantized or quantized; the rest is index work on the
        level maps and a copy of the kept codes (the weights read stored tokens' ranges from scales and zeros).
        On a sliding layer (with `evict`: after the call's attention) first forget what left the window. With
        `defer`, an append layer's first allocation may wait for its group's (first.py)."""
        if self._app is not None:
            return self._append_flush()
        if defer and self._first_defers():
            return
        cfg = self.config
        n = self.win_k.shape[-2] - cfg.recent_window
        if n < self._flush_at() or n <= 0:
            return
        n = self._flush_count(n)
        if not n:
            return
        self._stored = {}
        try:
            if self._class_major:   # class-major ranks read both kinds' level maps: take them before either changes
                for kind in ("k", "v"):
                    self._stored_ranks(kind)
            stored_before = self.n_middle
            n -= self._forget_front(n) if evict else 0
            # a sliding layer that just forgot middle tokens keeps their stale pool entries until re-pooled, so
            # its pools' sizes are no longer its counts: the re-allocation then reads them from the device
            sizes_known = self.n_middle == stored_before or not self.n_middle
            if not sizes_known:   # forgetting took different classes from different rows: no joint placement
                self._classes = None
            if n <= 0:
                return
            if not self.n_middle and self._append_wanted():   # append.py: the prompt into class buffers, a ring
                return first_allocations([self], [n])
            new_k, new_v = self._flush_inputs(n)
            weights = block_weights(self._weights(new_k, new_v), self.block_tokens)
            kinds = (("k", new_k, self.budget_k), ("v", new_v, self.budget_v))
            incremental = cfg.realloc in ("incremental", "append") and self.n_middle
            if sizes_known and (incremental or not self.n_middle):
                (self._reallocate_joint if self._joint_ready() else self._reallocate_candidates)(weights, kinds)
            else:
                self._classes = None
                self._reallocate_reading_sizes(weights, kinds, incremental)
            self.n_middle += n
        finally:
            self._stored = None

    @property
    def block_tokens(self) -> int:
        """Tokens sharing one width: the config's on full-attention layers, 1 on sliding-window layers, whose
        forgetting (token by token at the window's edge) does not keep blocks whole."""
        return 1 if self.sliding_window is not None else self.config.block_tokens

    def _flush_at(self) -> int:
        """Tokens past the recent window that trigger a re-allocation (at least one block)."""
        return max(self.config.realloc_every, self.block_tokens)

    def _flush_count(self, n: int) -> int:
        """Tokens of the window's `n` past `recent_window` that move: whole blocks, rounded up (taking the newest
        tokens from the recent window) when that leaves at least half the recent window, so the window holds no
        more full-precision tokens on average than with per-token widths; else rounded down."""
        bt = self.block_tokens
        short = -n % bt
        return n + short if short <= self.config.recent_window // 2 else n - n % bt

    def _weights(self, new_k: torch.Tensor, new_v: torch.Tensor) -> torch.Tensor:
        """Allocation weights (B * H, T) of the middle's tokens and the `n` new ones (stored space (B, H, n, D))."""
        cfg = self.config
        B, H = self.batch_size, self.num_heads
        start, T = self.sink_k.shape[-2], self.n_middle + new_k.shape[-2]
        imp = decode_importance(self.importance[..., start:start + T])  # (B, H, T)
        if cfg.importance == "sum":     # raw accumulated mass: favours early tokens (seen by more queries)
            imp = imp * seen_from_ranges(self.observed.to(imp.device), start + T)[start:].float()
        elif cfg.importance == "keynorm":
            k_all = torch.cat([self._middle_part("k"), new_k], -2)
            imp = self._from_stored(k_all, k_all[..., :0, :])[0].norm(dim=-1)
        elif cfg.importance == "uniform":
            imp = torch.ones_like(imp)
        sens = None
        if cfg.sensitivity:  # each token's range (max - min over its channels)
            sens = self._sensitivity(self._ranges("k", new_k), self._ranges("v", new_v)).reshape(B * H, T)
        return token_weights(imp.reshape(B * H, T), cfg.importance_floor, cfg.importance_power, sens)

    def _sensitivity(self, k_rng: torch.Tensor, v_rng: torch.Tensor) -> torch.Tensor:
        """A token's sensitivity weight from its key and value ranges as stored: squared ranges summed, keys back
        in real units (stored keys are normalised per channel)."""
        return (k_rng * self.k_scale.float().mean(-1)).pow(2) + v_rng.pow(2)

    def _ranges(self, kind: str, new: torch.Tensor) -> torch.Tensor:
        """max - min over the channels of each middle token (B, H, Tq) as stored, read from its groups' scales and
        zeros (a group's largest code is 2^bits - 1 and its smallest 0: quantize maps the group's max and min
        there), then of each new token (B, H, n, D): (B, H, Tq + n) fp32, without dequantizing the middle."""
        B, H, Tq = self.batch_size, self.num_heads, self.n_middle
        lo, hi = torch.aminmax(new, dim=-1)
        if not Tq:   # a first allocation: the new tokens' alone (a prefill is bound by its launches a layer)
            return hi - lo
        out = torch.zeros(B * H, Tq, device=self.device)
        bits, rank = self._stored_ranks(kind)
        bits = bits.reshape(B * H, Tq)
        for b, q in self.pools[kind].items():  # gathered through each token's pool entry: no device sync
            rng = token_ranges(q).reshape(B * H, -1)
            out = torch.where(bits == b, rng.gather(1, rank.clamp(max=rng.shape[1] - 1)), out)
        return torch.cat([out.reshape(B, H, Tq), hi - lo], -1)

    def _allocate(self, kind: str, weights: torch.Tensor, old_bits: torch.Tensor, budget: float,
                  profile: torch.Tensor | None) -> torch.Tensor:
        """New widths (B, H, T) under `budget` from block weights (B * H, T // block_tokens), one width per block;
        every row has the same count of each width. With `profile` (policy.rank_profile of the weights) every
        block is re-allocated; without, only the new ones and a few demotion candidates (incremental_assign)."""
        B, H, Tq = old_bits.shape
        bt = self.block_tokens
        R, nb = weights.shape
        old_b = old_bits.reshape(R, Tq)[:, ::bt]
        if profile is None:
            stored = {w: c // bt for w, c in zip(self.widths, self._counts(kind))}
            out = incremental_assign(weights, old_b, stored, budget, self.widths, per_width=nb - Tq // bt)
        else:
            caps = torch.full((R, nb), max(self.widths), dtype=torch.long, device=weights.device)
            caps[:, :Tq // bt] = old_b
            out = cascade_assign(weights, caps, counts_for(profile, budget, self.widths))
        return (out.repeat_interleave(bt, -1) if bt > 1 else out).reshape(B, H, nb * bt)

    def _reallocate_reading_sizes(self, weights: torch.Tensor, kinds: tuple, incremental: bool) -> None:
        """A full re-allocation, or an incremental one whose pools' sizes are not the counts (a sliding layer that
        forgot middle tokens): sizes read from the device (`_repool`)."""
        # full: one device->host copy per re-allocation, shared by keys and values
        profile = None if incremental else rank_profile(weights).cpu()
        old = [self._stored_ranks(kind)[0] for kind, _, _ in kinds]
        for (kind, new, budget), old_bits in zip(kinds, old):
            new_bits = self._allocate(kind, weights, old_bits, budget, profile)
            level = torch.searchsorted(self._width_values, new_bits)   # index into widths, (B, H, T)
            self.pools[kind] = self._repool(kind, old_bits, new_bits, level, new)
            self.levels[kind] = pack_levels(level.to(torch.uint8))
        self._class_major = False

    def _reallocate_candidates(self, weights: torch.Tensor, kinds: tuple) -> None:
        """An incremental re-allocation, or the first allocation (nothing stored: every unit is a candidate), of
        keys and values: `kinds` ((kind, new tokens (B, H, n, D), budget), ...). The counts' solve runs on the
        host from one device->host copy of both kinds' candidate rank profiles; every other size is known on the
        host (`Candidates`, cascade_plan), so nothing else waits for the device."""
        bt, R = self.block_tokens, weights.shape[0]
        # each kind's stored units' widths (R, Tq / bt) and tokens per width: read once, used by every step below
        stored = [(self._stored_ranks(kind)[0].reshape(R, self.n_middle)[:, ::bt],
                   dict(zip(self.widths, self._counts(kind)))) for kind, _, _ in kinds]
        cands = [self._candidates(weights, budget, *st) for (_, _, budget), st in zip(kinds, stored)]
        sizes = [c.idx.shape[1] for c in cands]
        if self.n_middle:
            profiles = torch.cat([rank_profile(c.weights) for c in cands]).cpu().split(sizes)
        else:  # every row's units are the candidates of both kinds
            profiles = [rank_profile(weights).cpu()] * len(cands)
        for (kind, new, _), cand, profile, (old_b, held) in zip(kinds, cands, profiles, stored):
            counts = counts_for(profile, cand.budget, self.widths)
            plan = cascade_plan(counts, cand.capped)
            cand_bits = cascade_assign(cand.weights, cand.caps, counts, cand.capped)
            placed = plan_counts(plan, cand.idx.shape[1], self.widths)   # candidate units placed at each width
            level = self._new_level(cand, cand_bits, old_b)
            self._place(kind, cand, cand_bits, placed, held, new, level)
        self._class_major = False

    def _new_level(self, cand: Candidates, cand_bits: torch.Tensor, old_b: torch.Tensor) -> torch.Tensor:
        """Level indices (R, T) of every token after the candidates get widths `cand_bits` (R, C), from the stored
        units' widths `old_b`."""
        bt, R = self.block_tokens, old_b.shape[0]
        out = torch.cat([old_b, old_b.new_full((R, cand.new), max(self.widths))], -1)
        out = out.scatter_(1, cand.idx, cand_bits)
        return torch.searchsorted(self._width_values, out.repeat_interleave(bt, -1) if bt > 1 else out)

    def _place(self, kind: str, cand: Candidates, cand_bits: torch.Tensor, placed: dict, held: dict,
               new: torch.Tensor, level: torch.Tensor, other: torch.Tensor | None = None) -> None:
        """Give one kind's candidates their widths `cand_bits` (R, C): its level map `level` (`_new_level`) and
        pools (`_repool_candidates`), from the tokens per width it `held` and the candidate units `placed` at each
        width, all known on the host. `other`: the other kind's new levels, for class-major pools (each width's
        tokens ordered by the other kind's width, then position); None: position order."""
        bt = self.block_tokens
        after = {w: c + bt * (placed[w] - cand.sources.get(w, 0)) for w, c in held.items()}
        self.pools[kind] = self._repool_candidates(kind, cand, cand_bits, after, placed, level, new, other)
        self.levels[kind] = pack_levels(level.reshape(self.batch_size, self.num_heads, -1).to(torch.uint8))

    def _candidates(self, weights: torch.Tensor, budget: float, old_b: torch.Tensor, held: dict) -> Candidates:
        """The units a re-allocation places (policy.incremental_candidates) given the stored units' widths `old_b`
        (R, Tq / bt) and tokens per width `held`; with nothing stored, all."""
        bt, widest = self.block_tokens, max(self.widths)
        R, nb = weights.shape
        if not self.n_middle:
            idx = torch.arange(nb, device=weights.device).expand(R, nb)
            return Candidates(idx, weights, torch.full_like(idx, widest), [nb] * (len(self.widths) - 1), budget,
                              nb, {})
        stored = {w: c // bt for w, c in held.items()}
        return incremental_candidates(weights, old_b, stored, budget, self.widths, per_width=nb - self.n_middle // bt)

    def _repool_candidates(self, kind: str, cand, cand_bits: torch.Tensor, counts: dict, placed: dict,
                           level: torch.Tensor, new: torch.Tensor, other: torch.Tensor | None = None) -> dict:
        """`_repool` for `_place`'s re-allocations: the candidates (new tokens, then the stored ones of each width)
        are the only tokens that may change width; each one whose width changed (and every new one) is quantized
        at its new width, the rest keep their codes. Sizes come from `counts` and the candidates' structure,
        positions from gathers: no wait for the device."""
        B, H, Tq = self.batch_size, self.num_heads, self.n_middle
        R, T, bt, D = B * H, level.shape[-1], self.block_tokens, self.head_dim
        level = level.reshape(R, T)
        C = cand.idx.shape[1] * bt
        pos = (cand.idx[..., None] * bt + torch.arange(bt, device=level.device)).reshape(R, C)  # token positions
        tok_bits = cand_bits.repeat_interleave(bt, -1) if bt > 1 else cand_bits
        rank = self._stored_ranks(kind)[1]                                 # (R, Tq) entry in its width's pool
        vals, old, col = [new.reshape(R, -1, D)], {}, new.shape[-2]
        for w, m in cand.sources.items():                                  # stored candidates, by source width
            entry = rank.gather(1, pos[:, col:col + m * bt])
            old[w] = (col, _rows(self.pools[kind][w], entry))
            vals.append(dequantize(QTensor(*old[w][1], w, self.group, -1)))
            col += m * bt
        vals = torch.cat(vals, 1)                                          # (R, C, D) stored space, fp32
        by_width = torch.argsort(torch.searchsorted(self._width_values, tok_bits), dim=-1, stable=True)
        # each width's positions in the pool's order: by position, or class-major (by the other kind's width first)
        order = torch.argsort(level if other is None else level * len(self.widths) + other.reshape(R, T), dim=-1,
                              stable=True)
        slot = inverse_order(order)
        pools, out, start, c_start = self.pools[kind], {}, 0, 0
        for b in self.widths:
            n_b, k_b = counts[b], bt * placed[b]                           # tokens at b after; candidates' among them
            cols = by_width[:, c_start:c_start + k_b]
            c_start += k_b
            p_b = order[:, start:start + n_b]
            start += n_b
            if not n_b:
                continue
            fresh = None
            if k_b:
                fresh = self._quantize(vals.gather(1, cols[..., None].expand(-1, -1, D)), b)
                fresh = (fresh.codes, fresh.scale, fresh.zero)
                if b in old:  # candidates that kept width b keep their codes
                    c0, fields = old[b]
                    same = (cols >= c0) & (cols < c0 + fields[0].shape[1])
                    at = (cols - c0).clamp(0, fields[0].shape[1] - 1)
                    fresh = tuple(torch.where(same[..., None], take_rows(f, at), g) for f, g in zip(fields, fresh))
            # the pool in position order: the rest gathered from pool b, then the candidates (`fresh`, in candidate
            # order) written over their places, found in p_b (a row's positions at b, ascending): one pool-sized
            # tensor a field, no temporaries of the pool's size
            if k_b == n_b:
                fields = tuple(torch.empty_like(g) for g in fresh)
            else:
                fields = _rows(pools[b], rank.gather(1, p_b.clamp(max=max(Tq - 1, 0))))
            if k_b:
                at = slot.gather(1, pos.gather(1, cols)) - (start - n_b)      # each candidate's entry in pool b
                for f, g in zip(fields, fresh):
                    f.scatter_(1, at[..., None].expand(-1, -1, f.shape[-1]), g)
            out[b] = QTensor(*(f.reshape(B, H, n_b, f.shape[-1]) for f in fields), b, self.group, -1)
        return out

    def _repool(self, kind: str, old_bits: torch.Tensor, new_bits: torch.Tensor, level: torch.Tensor,
                new: torch.Tensor) -> dict:
        """Pools for the widths `new_bits` (B, H, Tq + n) (`level`: their indices into `widths`): tokens whose width
        is unchanged keep their codes; the others (demoted stored tokens, dequantized from their own pools, and the
        n `new` tokens (B, H, n, D)) are quantized at their new width. The sizes come from one host read and the
        pools are assembled by gathers, so on CUDA this waits for the GPU three times (that read, the fresh tokens'
        indices, `_gather_values`' read), however many widths there are."""
        B, H, Tq = old_bits.shape
        R, T, k = B * H, new_bits.shape[-1], len(self.widths)
        level = level.reshape(R, T)
        kept = torch.zeros(R, T, dtype=torch.bool, device=new_bits.device)
        kept[:, :Tq] = (old_bits == new_bits[..., :Tq]).reshape(R, Tq)
        levels = torch.arange(k, device=level.device)
        per_row = (level[:1] == levels[:, None]).sum(-1)                   # tokens per level (equal in every row)
        # (a scatter_add into k counters from every token takes ~1 ms on an H200 at 32K x 8: all atomics on 4 words)
        fresh_per_level = ((level.flatten() == levels[:, None]) & ~kept.flatten()).sum(-1)
        sizes = torch.cat([per_row, fresh_per_level]).tolist()               # the one read of this function
        per_row, fresh_per_level = sizes[:k], sizes[k:]
        fresh_idx = _indices((~kept).flatten())                            # row-major, as every pool orders them
        values = self._gather_values(kind, fresh_idx, new)
        by_level = torch.argsort(level.flatten()[fresh_idx], stable=True)   # fresh tokens grouped by new level
        order = torch.argsort(level, dim=-1, stable=True)                   # each level's positions, in order
        old_rank = self._stored_ranks(kind)[1]                             # (R, Tq) entry of each stored token
        pools, out, start, fresh_start = self.pools[kind], {}, 0, 0
        for b, n_b, f_b in zip(self.widths, per_row, fresh_per_level):
            pos = order[:, start:start + n_b]                               # (R, n_b) the pool's positions
            start += n_b
            rows = by_level[fresh_start:fresh_start + f_b]
            fresh_start += f_b
            if not n_b:
                continue
            fresh = self._quantize(values.index_select(0, rows), b) if f_b else None
            fields = (fresh.codes, fresh.scale, fresh.zero) if f_b else None
            if f_b < R * n_b:  # some entries keep their old codes: pool b existed
                keep = kept.gather(1, pos).flatten()                        # (R * n_b,)
                stored = pos.clamp(max=max(Tq - 1, 0))
                src = (torch.arange(R, device=pos.device)[:, None] * pools[b].codes.shape[-2]
                       + old_rank.gather(1, stored)).flatten()
                dst = ((~keep).long().cumsum(0) - 1).clamp(min=0)           # entry -> its row among the fresh
                merged = []
                for i_f, name in enumerate(("codes", "scale", "zero")):
                    old_t = getattr(pools[b], name)
                    old_t = old_t.reshape(-1, old_t.shape[-1])
                    old_t = old_t.index_select(0, src.clamp(max=old_t.shape[0] - 1))  # fresh entries: any row
                    if fields is not None:
                        old_t = torch.where(keep[:, None], old_t, fields[i_f].index_select(0, dst))
                    merged.append(old_t)
                fields = merged
            shape = lambda t: t.reshape(B, H, -1, t.shape[-1])  # equal counts per row: dense pool
            out[b] = QTensor(*map(shape, fields), b, self.group, -1)
        return out

    def _gather_values(self, kind: str, idx: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Stored-space values (M, D) fp32 of the tokens at flat indices `idx` (M,) of (B, H, Tq + n): stored ones
        dequantized from their pools, new ones (B, H, n, D) as they are. Grouped by source with one host read."""
        old_bits, rank = self._stored_ranks(kind)
        Tq = old_bits.shape[-1]
        n, D = new.shape[-2], self.head_dim
        out = new.new_empty(idx.numel(), D)
        if not idx.numel():
            return out
        row, t = idx // (Tq + n), idx % (Tq + n)
        stored = t < Tq
        k = len(self.widths)
        flat_bits = old_bits.reshape(-1)
        if Tq:
            at = row * Tq + t.clamp(max=Tq - 1)
            source = torch.where(stored, torch.searchsorted(self._width_values, flat_bits[at]), k)
        else:
            source = torch.full_like(idx, k)
        by_source = torch.argsort(source, stable=True)
        counts = torch.bincount(source, minlength=k + 1).tolist()            # the one read of this function
        rank = rank.reshape(-1)
        start = 0
        for s_i, count in enumerate(counts):
            sel = by_source[start:start + count]
            start += count
            if not count:
                continue
            r, ts = row.index_select(0, sel), t.index_select(0, sel)
            if s_i == k:
                out[sel] = new.reshape(-1, D).index_select(0, r * n + ts - Tq)
                continue
            pool = self.pools[kind][self.widths[s_i]]
            src = r * pool.codes.shape[-2] + rank.index_select(0, r * Tq + ts)
            q = QTensor(*(getattr(pool, f).reshape(-1, getattr(pool, f).shape[-1]).index_select(0, src)
                          for f in ("codes", "scale", "zero")), pool.bits, self.group, -1)
            out[sel] = dequantize(q)
        return out

    def _quantize(self, x: torch.Tensor, bits: int) -> QTensor:
        """x (..., n, D) quantized per token at `bits` in the layer's groups. With the kernels, one Triton launch
        (byte-exact with core's `quantize`, which dispatches ~30 ops: the first allocation and re-allocations are
        launch-bound on a GPU, and in torch quantizing is about half of a first allocation's ops)."""
        if not self.kernels:
            return quantize(x, bits, self.group, axis=-1)
        lead, (n, D) = x.shape[:-2], x.shape[-2:]
        q = quantize_pack(x.reshape(1, -1, n, D), bits, self.group, -1)
        return QTensor(*(t.reshape(*lead, n, t.shape[-1]) for t in (q.codes, q.scale, q.zero)), bits, self.group, -1)


def _indices(mask: torch.Tensor) -> torch.Tensor:
    """Positions (k,) of the set entries of a flat bool mask (one device sync on CUDA)."""
    return mask.nonzero().squeeze(1)


def _rows(pool: QTensor, entry: torch.Tensor) -> tuple:
    """(codes, scale, zero) of a pool's entries `entry` (R, k), each (R, k, F); entries past the pool's end (where
    the caller takes another source) read its last entry."""
    R = entry.shape[0]
    entry = entry.clamp(max=pool.codes.shape[-2] - 1)
    return tuple(take_rows(getattr(pool, f).reshape(R, -1, getattr(pool, f).shape[-1]), entry)
                 for f in ("codes", "scale", "zero"))
