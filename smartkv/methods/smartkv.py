"""`smartkv`: attention-importance mixed precision. Tokens that receive much attention keep more bits.

Layout of one layer, positions in order:
  sinks   - the first `sink_tokens` tokens, full precision (attention sinks)
  middle  - quantized per token (groups of `group_size` channels), each (KV head, token) at a width in `widths`;
            `bits` (B, H, Tq) says which; one dense pool per width holds the codes of its tokens in position
            order, every (batch, head) row has the same count per width (see policy.cascade_assign)
  window  - the most recent tokens, full precision; every `realloc_every` tokens the oldest leave the window
            (keeping `recent_window`) and the whole middle is re-allocated: new tokens get any width, stored
            tokens can only be demoted (re-quantized from their codes), the budget holds over the middle.
Keys are normalised per channel before per-token quantization (`key_norm`): centring and scaling each channel
by statistics of the prompt removes the outlier channels that wreck low-bit per-token keys (KIVI's reason for
per-channel keys), while keeping the per-token layout that mixed precision needs. The query-side cost is nil:
q . (s * k_hat + mu) = (q * s) . k_hat + q . mu.
Importance: smartkv.importance (mean attention received while visible); allocation: smartkv.policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache import KVLayer
from smartkv.hf_compat import sdpa_attention_forward
from smartkv.importance import (allowed_from_mask, attention_probs, kv_head_mass, seen_counts, token_weights,
                                update_mean)
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, check_int
from smartkv.policy import WIDTHS, cascade_assign, check_budget, counts_for, rank_profile
from smartkv.quant import QTensor, dequantize, quantize


class SmartKVLayer(KVLayer):
    def _init_storage(self) -> None:
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        empty = torch.empty(B, H, 0, D, dtype=self.window_dtype, device=self.device)
        self.sink_k, self.sink_v = empty, empty.clone()
        self.win_k, self.win_v = empty.clone(), empty.clone()
        self.bits = torch.empty(B, H, 0, dtype=torch.uint8, device=self.device)
        self.pools: dict[int, tuple[QTensor, QTensor]] = {}
        self.importance = torch.empty(B, H, 0, dtype=torch.float16, device=self.device)  # mean attention received
        self.seen = torch.empty(B, 0, dtype=torch.int32, device=self.device)              # queries that saw it
        self.k_mu = self.k_scale = None                                                   # (B, H, 1, D) fp16
        self.group = min(self.config.group_size, D)

    # --- storage ---------------------------------------------------------------------------------------------
    def _store(self, key_states, value_states) -> None:
        n_sink = max(0, min(self.config.sink_tokens - self.sink_k.shape[-2], key_states.shape[-2]))
        if n_sink:
            self.sink_k = torch.cat([self.sink_k, key_states[..., :n_sink, :].to(self.window_dtype)], -2)
            self.sink_v = torch.cat([self.sink_v, value_states[..., :n_sink, :].to(self.window_dtype)], -2)
        self.win_k = torch.cat([self.win_k, key_states[..., n_sink:, :].to(self.window_dtype)], -2)
        self.win_v = torch.cat([self.win_v, value_states[..., n_sink:, :].to(self.window_dtype)], -2)
        n = key_states.shape[-2]
        B, H = self.batch_size, self.num_heads
        self.importance = torch.cat([self.importance, self.importance.new_zeros(B, H, n)], -1)
        self.seen = torch.cat([self.seen, self.seen.new_zeros(B, n)], -1)

    def _middle(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized middle region, keys still normalised: (B, H, Tq, D) fp32 each."""
        B, H, Tq = self.bits.shape
        k = torch.zeros(B, H, Tq, self.head_dim, device=self.device)
        v = torch.zeros_like(k)
        for b, (qk, qv) in self.pools.items():
            mask = self.bits == b
            k[mask] = dequantize(qk).reshape(-1, self.head_dim)
            v[mask] = dequantize(qv).reshape(-1, self.head_dim)
        return k, v

    def _denorm(self, k_hat: torch.Tensor) -> torch.Tensor:
        return k_hat * self.k_scale.float() + self.k_mu.float() if self.k_mu is not None else k_hat

    def _stored_kv(self):
        k_hat, v = self._middle()
        keys = torch.cat([self.sink_k.to(self.dtype), self._denorm(k_hat).to(self.dtype), self.win_k.to(self.dtype)], -2)
        values = torch.cat([self.sink_v.to(self.dtype), v.to(self.dtype), self.win_v.to(self.dtype)], -2)
        return keys, values

    def _account(self, lb) -> None:
        for qk, qv in self.pools.values():
            for q, kind in ((qk, "k"), (qv, "v")):
                lb.add_codes(q.codes, q.bits, kind)
                lb.add("metadata", q.scale)
                lb.add("metadata", q.zero)
        for t in (self.bits, self.importance, self.seen, self.k_mu, self.k_scale):
            lb.add("metadata", t)
        for t in (self.sink_k, self.sink_v, self.win_k, self.win_v):
            lb.add("residual", t)

    # --- attention and statistics ----------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, Hq, q_len, D = query.shape
        scaling = D ** -0.5 if scaling is None else scaling
        W = min(self.config.observe_window, q_len)
        allowed = allowed_from_mask(attention_mask, W, key.shape[-2], B, query.device)
        probs = attention_probs(query[:, :, -W:], key, allowed, scaling)  # (B, Hq, W, T)
        if q_len == 1:  # decoding: the probabilities we need are the whole attention
            G = Hq // self.num_heads
            out = (probs.reshape(B, self.num_heads, G, key.shape[-2]) @ value.float())  # (B, Hkv, G, D)
            out = out.reshape(B, Hq, 1, D).transpose(1, 2).to(query.dtype).contiguous()
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        mass = kv_head_mass(probs, self.num_heads)
        mean, self.seen = update_mean(self.importance, self.seen, mass, seen_counts(allowed))
        self.importance = mean.to(torch.float16)
        self._flush()
        return out, None

    def _before_update(self) -> None:
        self._flush()  # when no attention hook ran (e.g. another attention implementation)

    # --- flush and re-allocation -----------------------------------------------------------------------------
    def _flush(self) -> None:
        cfg = self.config
        n = self.win_k.shape[-2] - cfg.recent_window
        if n < cfg.realloc_every or n <= 0:
            return
        new_k, new_v = self.win_k[..., :n, :].float(), self.win_v[..., :n, :].float()
        self.win_k, self.win_v = self.win_k[..., n:, :].contiguous(), self.win_v[..., n:, :].contiguous()
        if self.k_mu is None:
            self._fit_key_norm(new_k)
        old_k, old_v = self._middle()
        Tq = old_k.shape[-2]
        k_hat = torch.cat([old_k, (new_k - self.k_mu.float()) / self.k_scale.float()], -2)  # (B, H, Tq+n, D)
        v_all = torch.cat([old_v, new_v], -2)
        new_bits = self._allocate(k_hat, v_all, Tq)
        self._rebuild(new_bits, k_hat, v_all, Tq)

    def _fit_key_norm(self, keys: torch.Tensor) -> None:
        B, H, _, D = keys.shape
        mode = self.config.key_norm
        mu = keys.mean(-2, keepdim=True) if mode in ("channel", "center") else keys.new_zeros(B, H, 1, D)
        if mode == "channel":
            scale = (keys - mu).abs().amax(-2, keepdim=True).clamp_min(1e-3)
        else:
            scale = keys.new_ones(B, H, 1, D)
        self.k_mu, self.k_scale = mu.half(), scale.half()

    def _allocate(self, k_hat: torch.Tensor, v_all: torch.Tensor, Tq: int) -> torch.Tensor:
        cfg = self.config
        B, H, T, _ = k_hat.shape
        start = self.sink_k.shape[-2]
        imp = self.importance[..., start:start + T].reshape(B * H, T)
        sens = None
        if cfg.sensitivity:
            k_rng = (k_hat.amax(-1) - k_hat.amin(-1)) * self.k_scale.float().mean(-1)  # keys back in real units
            v_rng = v_all.amax(-1) - v_all.amin(-1)
            sens = (k_rng.pow(2) + v_rng.pow(2)).reshape(B * H, T)
        weights = token_weights(imp, cfg.importance_floor, cfg.importance_power, sens)
        caps = torch.full((B * H, T), max(cfg.widths), dtype=torch.long, device=k_hat.device)
        caps[:, :Tq] = self.bits.reshape(B * H, Tq).long()
        counts = counts_for(rank_profile(weights).cpu(), cfg.budget, cfg.widths)
        return cascade_assign(weights, caps, counts).reshape(B, H, T)

    def _rebuild(self, new_bits: torch.Tensor, k_hat: torch.Tensor, v_all: torch.Tensor, Tq: int) -> None:
        B, H, T, D = k_hat.shape
        old_bits = self.bits
        pools = {}
        for b in sorted(set(new_bits.unique().tolist())):
            sel = new_bits == b                                    # (B, H, T)
            from_old = torch.zeros_like(sel)
            from_old[..., :Tq] = (old_bits == b) & sel[..., :Tq]   # tokens that keep their codes
            parts = []
            for src, old in ((k_hat, 0), (v_all, 1)):
                fresh = quantize(src[sel & ~from_old].reshape(-1, D), b, self.group, axis=-1)
                if b in self.pools and bool(from_old.any()):
                    kept_mask = sel[..., :Tq][old_bits == b]       # old pool entries that stay at width b
                    q_old = self.pools[b][old]
                    take = from_old[sel]                           # (N,) which new entries are kept ones
                    fields = []
                    for name in ("codes", "scale", "zero"):
                        old_t = getattr(q_old, name).reshape(-1, getattr(q_old, name).shape[-1])[kept_mask]
                        new_t = getattr(fresh, name)
                        t = new_t.new_empty(take.shape[0], new_t.shape[-1])
                        t[take], t[~take] = old_t, new_t
                        fields.append(t)
                    codes, scale, zero = fields
                else:
                    codes, scale, zero = fresh.codes, fresh.scale, fresh.zero
                shape = lambda t: t.reshape(B, H, -1, t.shape[-1])  # equal counts per row: dense pool
                parts.append(QTensor(shape(codes), shape(scale), shape(zero), b, self.group, -1))
            pools[b] = tuple(parts)
        self.pools = pools
        self.bits = new_bits.to(torch.uint8)


@register
@dataclass(frozen=True)
class SmartKV(MethodConfig):
    """Attention-importance mixed precision under an average code-width `budget` (bits per quantized element)."""
    name = "smartkv"
    budget: float = 7.0
    widths: tuple = WIDTHS
    group_size: int = 32
    sink_tokens: int = 4
    recent_window: int = 32
    realloc_every: int = 16
    observe_window: int = 32
    key_norm: str = "channel"
    importance_floor: float = 0.1
    importance_power: float = 2.0
    sensitivity: bool = True

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
        if not isinstance(self.importance_floor, (int, float)) or not 0 <= self.importance_floor <= 1e6:
            raise ValueError(f"importance_floor must be a number >= 0, got {self.importance_floor!r}")
        if not isinstance(self.importance_power, (int, float)) or not 0 <= self.importance_power <= 8:
            raise ValueError(f"importance_power must be a number in [0, 8], got {self.importance_power!r}")
        check_choice("sensitivity", self.sensitivity, (True, False))

    def make_layer(self, layer_idx: int):
        return SmartKVLayer(self, layer_idx)
