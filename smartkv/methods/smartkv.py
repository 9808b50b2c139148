"""`smartkv`: attention-importance mixed precision. Tokens that receive much attention keep more bits.

Layout of one layer, positions in order:
  sinks   - the first `sink_tokens` tokens, full precision (attention sinks)
  middle  - quantized per token (groups of `group_size` channels); keys and values each have their own width
            per (KV head, token) from `widths`, kept as 2-bit level maps; one dense pool per width holds the
            codes of its tokens in position order, every (batch, head) row has the same count per width
            (see policy.cascade_assign)
  window  - the most recent tokens, full precision; every `realloc_every` tokens the oldest leave the window
            (keeping `recent_window`) and the whole middle is re-allocated: new tokens get any width, stored
            tokens can only be demoted (re-quantized from their codes), the budget holds over the middle.
Keys decide quality (an error in a key moves the softmax, an error in a value is averaged away), so:
  - keys get `key_value_gap` more bits than values on average (the mean of the two stays `budget`);
  - keys are normalised per channel (`key_norm`) with statistics of the prompt, removing the outlier channels
    that wreck low-bit per-token keys (KIVI's reason for per-channel keys) while keeping the per-token layout
    mixed precision needs; q . (s * k_hat + mu) = (q * s) . k_hat + q . mu, so the query side pays nothing;
  - `rotate` applies a Hadamard rotation to the normalised keys (and values) before per-token quantization,
    spreading what outliers remain over all channels of a group (orthogonal: the query is rotated alike).
Importance (smartkv.core.importance): the mean attention a token received from the queries that could see it,
stored as 8-bit log codes; the number of queries that saw each token is derived from the observed positions.
Metadata counted in `_account`: group scales and zeros, the level maps, importance codes, the observed query
ranges, the key normalisation vectors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from smartkv.cache.layer import KVLayer
from smartkv.cache.hf_compat import sdpa_attention_forward
from smartkv.core.importance import (add_range, allowed_from_mask, attention_probs, decode_importance, fold_attention,
                                seen_from_ranges, token_weights)
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, check_int, group_for
from smartkv.core.policy import (WIDTHS, cascade_assign, check_budget, counts_for, kv_budgets, pack_levels,
                            rank_profile, unpack_levels)
from smartkv.core.quant import QTensor, dequantize, quantize
from smartkv.kernels import pool_kernels_ok, pool_positions, pool_scores, pool_values
from smartkv.kernels.reference import MAX_RANGES
from smartkv.cache.buffers import write_token


UNSEEN = 255  # importance code of a token no query has seen yet (encode_importance(0))


@functools.cache
def hadamard(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix (dim, dim), dim a power of two; symmetric, its own inverse. Cached per
    device: decode steps use it every call, and a host-to-device copy each time would wait for the GPU."""
    if dim & (dim - 1):
        raise ValueError(f"rotate needs a power-of-two head_dim, got {dim}")
    if torch.device(device).type != "cpu":
        return hadamard(dim).to(device)
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim ** 0.5


class SmartKVLayer(KVLayer):
    static_capable = True

    def _init_storage(self) -> None:
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        empty = torch.empty(B, H, 0, D, dtype=self.window_dtype, device=self.device)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.n_middle = 0
        self.levels = {"k": None, "v": None}            # packed 2-bit indices into widths, (B, H, ceil8(Tq)/4)
        self.pools: dict[str, dict[int, QTensor]] = {"k": {}, "v": {}}
        self.importance = torch.empty(B, H, 0, dtype=torch.uint8, device=self.device)  # encode_importance codes
        self.observed = torch.empty(0, 2, dtype=torch.int64)  # query ranges [start, end), on the CPU: read each step
        self.k_mu = self.k_scale = None                                                 # (B, H, 1, D) fp16
        self.group = group_for(self.config.group_size, D)
        self.widths = tuple(sorted(self.config.widths))
        self._width_values = torch.tensor(self.widths, device=self.device)  # level index -> width, made once
        self.budget_k, self.budget_v = kv_budgets(self.config.budget, self.config.key_value_gap, self.widths)
        self.rot_k = self.config.rotate in ("keys", "both")
        self.rot_v = self.config.rotate == "both"
        self._empty_pools: dict[int, QTensor] = {}
        self._stored: dict[str, tuple] | None = None  # during a re-allocation: _stored_ranks of each kind
        self._sbuf = None  # static steps: window K/V and importance buffers of the phase (see _static_begin)

    # --- storage ---------------------------------------------------------------------------------------------
    def _store(self, key_states, value_states) -> None:
        n_sink = max(0, min(self.config.sink_tokens - self.sink_k.shape[-2], key_states.shape[-2]))
        if n_sink:
            self.sink_k = torch.cat([self.sink_k, key_states[..., :n_sink, :].to(self.window_dtype)], -2)
            self.sink_v = torch.cat([self.sink_v, value_states[..., :n_sink, :].to(self.window_dtype)], -2)
        self.win_k = torch.cat([self.win_k, key_states[..., n_sink:, :].to(self.window_dtype)], -2)
        self.win_v = torch.cat([self.win_v, value_states[..., n_sink:, :].to(self.window_dtype)], -2)
        B, H = self.batch_size, self.num_heads
        unseen = self.importance.new_full((B, H, key_states.shape[-2]), UNSEEN)  # encode_importance(0)
        self.importance = torch.cat([self.importance, unseen], -1)

    def level_bits(self, kind: str) -> torch.Tensor:
        """Widths (B, H, Tq) of the middle's keys ("k") or values ("v")."""
        B, H = self.batch_size, self.num_heads
        if self.levels[kind] is None:
            return torch.empty(B, H, 0, dtype=torch.long, device=self.device)
        idx = unpack_levels(self.levels[kind], self.n_middle)
        return self._width_values[idx.long()]

    def _middle_part(self, kind: str) -> torch.Tensor:
        """Dequantized middle keys or values in the stored (normalised, rotated) space: (B, H, Tq, D) fp32."""
        D = self.head_dim
        out = torch.zeros(self.batch_size, self.num_heads, self.n_middle, D, device=self.device)
        if not self.n_middle:
            return out
        bits = self.level_bits(kind)
        for b, q in self.pools[kind].items():
            out[bits == b] = dequantize(q).reshape(-1, D)
        return out

    def _to_stored(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = (k - self.k_mu.float()) / self.k_scale.float()
        if self.rot_k:
            k = k @ hadamard(self.head_dim, k.device)
        if self.rot_v:
            v = v @ hadamard(self.head_dim, v.device)
        return k, v

    def _from_stored(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rot_k:
            k = k @ hadamard(self.head_dim, k.device)
        if self.rot_v:
            v = v @ hadamard(self.head_dim, v.device)
        if self.k_mu is not None:
            k = k * self.k_scale.float() + self.k_mu.float()
        return k, v

    def _stored_kv(self):
        k, v = self._from_stored(self._middle_part("k"), self._middle_part("v"))
        dt = self.dtype
        keys = torch.cat([self.sink_k.to(dt), k.to(dt), self.win_k.to(dt)], -2)
        values = torch.cat([self.sink_v.to(dt), v.to(dt), self.win_v.to(dt)], -2)
        return keys, values

    def _account(self, lb) -> None:
        for kind in ("k", "v"):
            for q in self.pools[kind].values():
                lb.add_codes(q.codes, q.bits, kind)
                lb.add("metadata", q.scale)
                lb.add("metadata", q.zero)
            lb.add("metadata", self.levels[kind])
        for t in (self.importance, self.observed, self.k_mu, self.k_scale):
            lb.add("metadata", t)
        for t in (self.sink_k, self.sink_v, self.win_k, self.win_v):
            lb.add("residual", t)

    # --- attention and statistics ----------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, Hq, q_len, D = query.shape
        scaling = D ** -0.5 if scaling is None else scaling
        if self._pending is not None:  # a fused decode step: `update` stored the token and returned it alone
            self._pending = None
            if self.static is not None:  # no flush here: `_advance` re-allocates between static steps
                self._static_mask(kwargs)
                return self._fused_decode(query, scaling, observe=True)[0], None
            if self._kernel_attends(attention_mask, kwargs):
                out, _ = self._fused_decode(query, scaling, observe=True)
                self._flush()
                return out, None
            key, value = (t.to(query.dtype) for t in self._stored_kv())  # a mask (padded batch): reference path
        T = key.shape[-2]
        W = min(self.config.observe_window, q_len)
        allowed = allowed_from_mask(attention_mask, W, T, B, query.device)
        probs = attention_probs(query[:, :, -W:], key, allowed, scaling)  # (B, Hq, W, T)
        if q_len == 1:  # decoding: the probabilities we need are the whole attention
            G = Hq // self.num_heads
            out = (probs.reshape(B, self.num_heads, G, T) @ value.float())  # (B, Hkv, G, D)
            out = out.reshape(B, Hq, 1, D).transpose(1, 2).to(query.dtype).contiguous()
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        self._observe(probs, T, W)
        self._flush()
        return out, None

    def _observe(self, probs: torch.Tensor, T: int, W: int) -> None:
        """Fold the attention of the last W queries, probs (B, Hq, W, T), into the running importance."""
        self.importance = fold_attention(self.importance, probs, self.observed)
        self.observed = add_range(self.observed, T - W, T)

    def _decode_segments(self, key_states, value_states) -> list:
        """Turns the fused path on. SmartKV's pools do not pair keys with values (a token's key and value widths
        differ), so `attend` runs `_fused_decode`'s two passes instead of one segment-wise kernel."""
        return []

    def _fused_decode(self, query: torch.Tensor, scaling: float,
                      observe: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode attention read from the packed pools in two passes of one launch each (kernels.pool_scores /
        pool_values over every width pool plus the full-precision sinks and recent window, which holds this
        step's token): scores into position-ordered logits, softmax, probability-weighted values. With
        `observe`, the values pass also folds the probabilities into the importance (`_observe` of one query).
        Returns (output (B, 1, Hq, D) in query's dtype, probabilities (B, Hq, 1, T) fp32)."""
        B, Hq, _, D = query.shape
        H = self.num_heads
        q = query[:, :, 0].float()                                             # (B, Hq, D)
        static = self.static is not None
        # static steps: the window's whole buffer, the rows past each sequence's length masked below
        win_k, win_v = (self._sbuf["k"], self._sbuf["v"]) if static else (self.win_k, self.win_v)
        n_sink, Tm, n_win = self.sink_k.shape[-2], self.n_middle, win_k.shape[-2]
        logits = torch.empty(B, Hq, n_sink + Tm + n_win, dtype=torch.float32, device=query.device)
        q_st = bias = None
        if Tm:  # stored keys are (k - mu) / scale: q . k = (q * scale) . stored + q . mu
            qg = q.reshape(B, H, Hq // H, D)
            q_st = qg * self.k_scale                  # fp16 scale and mean promoted inside the multiply: no cast launch
            bias = (qg * self.k_mu).sum(-1).reshape(B, Hq)
            if self.rot_k:
                q_st = q_st @ hadamard(D, q.device)
            q_st = q_st.reshape(B, Hq, D)
        fp = ((self.sink_k, 0), (win_k, n_sink + Tm))
        counts = {kind: self._counts(kind) for kind in ("k", "v")}
        order = self._pool_orders(counts)
        pool_scores(q if q_st is None else q_st, self._pool_segments("k", order[0], counts["k"]), logits, scaling,
                    bias, q, fp)
        if static:
            logits = logits.masked_fill(self._sbuf["at"] >= self.static.lengths.view(B, 1, 1), float("-inf"))
        probs = torch.softmax(logits, -1)                                      # (B, Hq, T)
        fp = ((self.sink_v, 0), (win_v, n_sink + Tm))
        if not observe:
            importance = None
        elif static:  # the decode queries' range ends at this query's position, on the device
            importance = (self._sbuf["imp"], self._sbuf["ranges"], self.static.pos)
        else:
            importance = (self.importance, self.observed.tolist())
        mid, out = pool_values(probs, self._pool_segments("v", order[1], counts["v"]), fp, importance=importance)
        if observe and not static:  # static steps count their query in `_advance`
            self.observed = add_range(self.observed, probs.shape[-1] - 1, probs.shape[-1])
        if Tm:
            out = out + (mid @ hadamard(D, mid.device) if self.rot_v else mid)
        return out.to(query.dtype).unsqueeze(1), probs.unsqueeze(2)

    def _pool_segments(self, kind: str, order: torch.Tensor, counts: list[int]) -> list:
        """The key or value pools as `pool_scores` / `pool_values` take them: (pool, positions (B, H, N) in the
        middle, n_sink), one per width in `widths`, lowest first, empty ones included (the kernels then compile
        once for the layer's widths, not again whenever a width's pool empties or fills). `order`: the kind's
        row of `_pool_orders`; `counts`: the kind's `_counts`."""
        pools, n_sink = self.pools[kind], self.sink_k.shape[-2]
        out, start = [], 0
        for w, n in zip(self.widths, counts):
            out.append((pools[w] if n else self._empty_pool(w), order[..., start:start + n], n_sink))
            start += n
        return out

    def _counts(self, kind: str) -> list[int]:
        """Tokens per row in each width's pool of `kind`, widths lowest first (0 for a width with no pool)."""
        return [self.pools[kind][w].codes.shape[-2] if w in self.pools[kind] else 0 for w in self.widths]

    def _pool_orders(self, counts: dict) -> torch.Tensor:
        """(2, B, H, n_middle) int32: for keys then values, each width's positions in order, widths lowest first,
        as the pools hold them: a stable sort of the level indices (derived each step in one launch for both
        kinds, never stored: kernels.pool_positions). `counts`: `_counts` of each kind."""
        if not self.n_middle:
            return torch.empty(2, self.batch_size, self.num_heads, 0, dtype=torch.int32, device=self.device)
        return pool_positions([self.levels["k"], self.levels["v"]], self.n_middle, [counts["k"], counts["v"]])

    def _empty_pool(self, bits: int) -> QTensor:
        """A pool of no tokens at `bits` (made once per width: decode steps ask for it every call)."""
        if bits not in self._empty_pools:
            B, H, D = self.batch_size, self.num_heads, self.head_dim
            codes = torch.empty(B, H, 0, D * bits // 8, dtype=torch.uint8, device=self.device)
            meta = torch.empty(B, H, 0, D // self.group, dtype=torch.float16, device=self.device)
            self._empty_pools[bits] = QTensor(codes, meta, meta, bits, self.group, -1)
        return self._empty_pools[bits]

    def _before_update(self) -> None:
        self._flush()  # when no attention hook ran (e.g. another attention implementation)

    # --- static decode steps (smartkv.cache.graphs): between two re-allocations only the window grows ----------------
    def static_blocker(self) -> str | None:
        """Sinks filled, room for the decode range among the fold's ranges, and every width on the kernels (the
        torch path of a pool pass reads sizes on the host, which a captured step cannot)."""
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
        self._flush()  # a window over-full from `append` (the next ordinary step would flush it first too)
        cfg = self.config
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        W, n_win = cfg.recent_window + cfg.realloc_every, self.win_k.shape[-2]
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
        self._sbuf = buf
        self.win_k, self.win_v = buf["k"][..., :n_win, :], buf["v"][..., :n_win, :]
        self.importance = buf["imp"][..., :self.importance.shape[-1]]

    def _static_store(self, key_states, value_states, state) -> None:
        write_token((self._sbuf["k"], self._sbuf["v"]), state.pos - self._sbuf["start"], (key_states, value_states))

    def _static_segments(self, key_states, value_states, state) -> list:
        return []  # `attend` runs the two passes (see _decode_segments)

    def _advance(self, tokens: int) -> bool:
        for _ in range(tokens):
            n_win, T = self.win_k.shape[-2] + 1, self.importance.shape[-1] + 1
            if n_win > self._sbuf["k"].shape[-2]:
                raise RuntimeError("static steps ran past the window's buffer (a re-allocation was skipped)")
            self.win_k, self.win_v = self._sbuf["k"][..., :n_win, :], self._sbuf["v"][..., :n_win, :]
            self.importance = self._sbuf["imp"][..., :T]
            self.observed = add_range(self.observed, T - 1, T)
        if self.win_k.shape[-2] - self.config.recent_window < self.config.realloc_every:
            return False
        self._flush()  # what the ordinary step does after its attention, here between two static steps
        self._static_begin(0)
        return True

    def _static_end(self) -> None:
        self.win_k, self.win_v, self.importance = (x.contiguous() for x in (self.win_k, self.win_v, self.importance))
        self._sbuf = None

    def _slack_bytes(self) -> int:
        if self._sbuf is None or self.static is None:
            return 0
        unused = self._sbuf["k"].shape[-2] - self.win_k.shape[-2]
        row = self.win_k[..., :1, :].numel() * self.win_k.element_size()
        return 2 * unused * row + (self._sbuf["imp"].shape[-1] - self.importance.shape[-1]) * self.batch_size \
            * self.num_heads

    # --- flush and re-allocation -----------------------------------------------------------------------------
    def _flush(self) -> None:
        """Move the window's oldest tokens into the middle and re-allocate the middle's widths. Only tokens that
        change width (demotions) and the new ones are dequantized or quantized; the rest is index work on the
        level maps and a copy of the kept codes (the weights read stored tokens' ranges from scales and zeros)."""
        cfg = self.config
        n = self.win_k.shape[-2] - cfg.recent_window
        if n < cfg.realloc_every or n <= 0:
            return
        self._stored = {}
        try:
            new_k, new_v = self.win_k[..., :n, :].float(), self.win_v[..., :n, :].float()
            self.win_k, self.win_v = self.win_k[..., n:, :].contiguous(), self.win_v[..., n:, :].contiguous()
            if self.k_mu is None:
                self._fit_key_norm(new_k)
            new_k, new_v = self._to_stored(new_k, new_v)
            weights = self._weights(new_k, new_v)
            profile = rank_profile(weights).cpu()  # one device->host copy per re-allocation, shared by keys and values
            for kind, new, budget in (("k", new_k, self.budget_k), ("v", new_v, self.budget_v)):
                old_bits = self._stored_ranks(kind)[0]
                new_bits = self._allocate(weights, old_bits, budget, profile)
                level = torch.searchsorted(self._width_values, new_bits)   # index into widths, (B, H, T)
                self.pools[kind] = self._repool(kind, old_bits, new_bits, level, new)
                self.levels[kind] = pack_levels(level.to(torch.uint8))
            self.n_middle += n
        finally:
            self._stored = None

    def _fit_key_norm(self, keys: torch.Tensor) -> None:
        B, H, _, D = keys.shape
        mode = self.config.key_norm
        mu = keys.mean(-2, keepdim=True) if mode in ("channel", "center") else keys.new_zeros(B, H, 1, D)
        if mode == "channel":
            scale = (keys - mu).abs().amax(-2, keepdim=True).clamp_min(1e-3)
        else:
            scale = keys.new_ones(B, H, 1, D)
        self.k_mu, self.k_scale = mu.half(), scale.half()

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
        if cfg.sensitivity:  # each token's range (max - min over its channels), keys back in real units
            k_rng = self._ranges("k", new_k) * self.k_scale.float().mean(-1)
            sens = (k_rng.pow(2) + self._ranges("v", new_v).pow(2)).reshape(B * H, T)
        return token_weights(imp.reshape(B * H, T), cfg.importance_floor, cfg.importance_power, sens)

    def _ranges(self, kind: str, new: torch.Tensor) -> torch.Tensor:
        """max - min over the channels of each middle token (B, H, Tq) as stored, read from its groups' scales and
        zeros (a group's largest code is 2^bits - 1 and its smallest 0: quantize maps the group's max and min
        there), then of each new token (B, H, n, D): (B, H, Tq + n) fp32, without dequantizing the middle."""
        B, H, Tq = self.batch_size, self.num_heads, self.n_middle
        out = torch.zeros(B * H, Tq, device=self.device)
        if Tq:
            bits, rank = self._stored_ranks(kind)
            bits = bits.reshape(B * H, Tq)
            for b, q in self.pools[kind].items():  # gathered through each token's pool entry: no device sync
                scale, zero = q.scale.float(), q.zero.float()
                rng = ((scale * ((1 << b) - 1) + zero).amax(-1) - zero.amin(-1)).reshape(B * H, -1)
                out = torch.where(bits == b, rng.gather(1, rank.clamp(max=rng.shape[1] - 1)), out)
        return torch.cat([out.reshape(B, H, Tq), new.amax(-1) - new.amin(-1)], -1)

    def _allocate(self, weights: torch.Tensor, old_bits: torch.Tensor, budget: float,
                  profile: torch.Tensor) -> torch.Tensor:
        """New widths (B, H, T) under `budget`, counts per width from `profile` (policy.rank_profile of the
        weights); every row has the same count of each width."""
        B, H, Tq = old_bits.shape
        T = weights.shape[-1]
        caps = torch.full((B * H, T), max(self.widths), dtype=torch.long, device=weights.device)
        caps[:, :Tq] = old_bits.reshape(B * H, Tq)
        counts = counts_for(profile, budget, self.widths)
        return cascade_assign(weights, caps, counts).reshape(B, H, T)

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
        # (a scatter_add into k counters from every token took ~1 ms on an H200 at 32K x 8: all atomics on 4 words)
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
            fresh = quantize(values.index_select(0, rows), b, self.group, axis=-1) if f_b else None
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

    def _stored_ranks(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(widths (B, H, Tq), entries (B * H, Tq) long) of the stored keys or values: each token's width and its
        entry in that width's pool row (a pool holds a row's tokens of one width in position order). Computed once
        per re-allocation (`_flush` holds them while it runs), on each call outside one."""
        if self._stored is not None and kind in self._stored:
            return self._stored[kind]
        bits = self.level_bits(kind)
        flat = bits.reshape(self.batch_size * self.num_heads, bits.shape[-1])
        rank = torch.zeros_like(flat)
        for b in self.pools[kind]:
            m = flat == b
            rank += m * (m.cumsum(-1) - 1)
        if self._stored is not None:
            self._stored[kind] = (bits, rank)
        return bits, rank

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


def _indices(mask: torch.Tensor) -> torch.Tensor:
    """Positions (k,) of the set entries of a flat bool mask (one device sync on CUDA)."""
    return mask.nonzero().squeeze(1)


@register
@dataclass(frozen=True)
class SmartKV(MethodConfig):
    """Attention-importance mixed precision under an average code-width `budget` (bits per quantized element,
    the mean of keys' and values' averages). Measured effect of each option: docs/smartkv.md."""
    name = "smartkv"
    budget: float = 7.0
    widths: tuple = WIDTHS
    group_size: int = 64
    sink_tokens: int = 4
    recent_window: int = 32
    realloc_every: int = 16
    observe_window: int = 32
    key_norm: str = "channel"
    importance: str = "mean"
    importance_floor: float = 0.1
    importance_power: float = 2.0
    sensitivity: bool = True
    key_value_gap: float = 2.0
    rotate: str = "none"
    use_kernels: bool = True   # False: never the Triton kernels (dequantize + attention in torch even on CUDA)

    def validate(self) -> None:
        if not self.widths or any(w not in WIDTHS for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct values from {WIDTHS}, got {self.widths!r}")
        check_budget(self.budget, self.widths)
        check_group_size(self.group_size)
        check_int("sink_tokens", self.sink_tokens, 0, 1024)
        check_int("recent_window", self.recent_window, 0, 1 << 20)
        check_int("realloc_every", self.realloc_every, 1, 1 << 20)
        check_int("observe_window", self.observe_window, 1, 1 << 16)
        check_choice("key_norm", self.key_norm, ("channel", "center", "none"))
        check_choice("importance", self.importance, ("mean", "sum", "keynorm", "uniform"))
        if not isinstance(self.importance_floor, (int, float)) or not 0 <= self.importance_floor <= 1e6:
            raise ValueError(f"importance_floor must be a number >= 0, got {self.importance_floor!r}")
        if not isinstance(self.importance_power, (int, float)) or not 0 <= self.importance_power <= 8:
            raise ValueError(f"importance_power must be a number in [0, 8], got {self.importance_power!r}")
        check_choice("sensitivity", self.sensitivity, (True, False))
        if not isinstance(self.key_value_gap, (int, float)) or not 0 <= self.key_value_gap <= 6:
            raise ValueError(f"key_value_gap must be a number in [0, 6] bits, got {self.key_value_gap!r}")
        check_choice("rotate", self.rotate, ("none", "keys", "both"))
        check_choice("use_kernels", self.use_kernels, (True, False))

    def make_layer(self, layer_idx: int):
        return SmartKVLayer(self, layer_idx)
