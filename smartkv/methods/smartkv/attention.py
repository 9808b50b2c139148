"""SmartKV's attention: the reference path (dequantize, attention probabilities in torch) and the fused decode
step (two Triton passes over the width pools), both folding the probabilities into the importance statistics."""
from __future__ import annotations

import torch

from smartkv.cache.hf_compat import sdpa_attention_forward
from smartkv.core.importance import add_range, allowed_from_mask, attention_probs, fold_attention
from smartkv.kernels import pool_positions, pool_scores, pool_values
from smartkv.methods.smartkv.first import Observation
from smartkv.methods.smartkv.storage import hadamard


class SmartKVAttention:
    """SmartKVLayer's attention part: `attend` (the model's attention hook) and the two-pass decode step."""

    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, Hq, q_len, D = query.shape
        scaling = D ** -0.5 if scaling is None else scaling
        self._group_heads = Hq // self.num_heads
        app = self._app
        if app is not None and app.lse is not None and app.lse.shape != (B, Hq):
            # a first allocation that ran before any attention (a cache filled by `update` alone, as benchmarks fill
            # it) sized the previous normaliser by one query head a KV head: none is known yet, as the prompt's is not
            app.lse = torch.zeros(B, Hq, device=self.device)
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
        # (B, Hq, W, T); an append layer's fold also reads the queries' normalisers
        lse = None
        want_lse = self.config.class_norm == "previous" and (self._app is not None or self._append_wanted())
        if q_len > 1 and self._app is None and self._first_waits():
            # the first allocation this attention brings due waits for its group's, and so does the fold of these
            # queries' attention, which only it reads (first.py: one fold for the group)
            self._observe_later = Observation(query[:, :, -W:], key, allowed, scaling, want_lse)
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
            self._flush(defer=True)
            return out, None
        if want_lse:
            probs, lse = attention_probs(query[:, :, -W:], key, allowed, scaling, return_lse=True)
        else:
            probs = attention_probs(query[:, :, -W:], key, allowed, scaling)
        if q_len == 1:  # decoding: the probabilities we need are the whole attention
            G = Hq // self.num_heads
            out = (probs.reshape(B, self.num_heads, G, T) @ value.float())  # (B, Hkv, G, D)
            out = out.reshape(B, Hq, 1, D).transpose(1, 2).to(query.dtype).contiguous()
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if self._app is not None:
            self._append_observe(probs, allowed, lse)
        else:
            self._observe(probs, T, W)
            if lse is not None:   # an append layer's first previous normaliser (place.py), log2
                self._last_lse = lse[..., -1].clone()
        self._flush(defer=True)   # a prefill's first allocation may wait for its group's (first.py)
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
        Returns (output (B, 1, Hq, D) in query's dtype, probabilities (B, Hq, 1, T) fp32, or None from the
        one-pass step over class-major pools, `_one_pass_decode`, which takes this call when it can)."""
        if self._app is not None:
            return self._append_decode(query, scaling, observe), None
        if self._one_pass():
            return self._one_pass_decode(query, scaling, observe), None
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

    def _pool_orders(self, counts: dict) -> torch.Tensor:
        """(2, B, H, n_middle) int32: for keys then values, each width's positions in order, widths lowest first,
        as the pools hold them: a stable sort of the level indices (derived each step in one launch for both
        kinds, never stored: kernels.pool_positions). `counts`: `_counts` of each kind."""
        if not self.n_middle:
            return torch.empty(2, self.batch_size, self.num_heads, 0, dtype=torch.int32, device=self.device)
        if self._class_major:   # each width's tokens by the other kind's width, then position
            return torch.stack([self._class_positions(kind) for kind in ("k", "v")]).int()
        return pool_positions([self.levels["k"], self.levels["v"]], self.n_middle, [counts["k"], counts["v"]])
