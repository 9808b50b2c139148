"""SmartKV's storage: full-precision sinks and window, one dense pool per width for the middle (keys and values
apart) with 2-bit level maps, the importance codes and observed query ranges, the key normalisation; the stored
space (normalised, rotated) and the accounting of every tensor held."""
from __future__ import annotations

import functools

import torch

from smartkv.core.policy import kv_budgets, unpack_levels
from smartkv.core.quant import QTensor, dequantize
from smartkv.kernels import warm_decode_kernels
from smartkv.methods.base import group_for


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


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """Where each entry lands, per row, when a row is permuted by `order` (R, T): the inverse permutation."""
    R, T = order.shape
    return torch.empty_like(order).scatter_(1, order, torch.arange(T, device=order.device).expand(R, T))


class SmartKVStorage:
    """SmartKVLayer's storage part: the layer state every other part reads, and the views of it."""

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
        self.budget_k, self.budget_v = kv_budgets(self.config.budget, self.config.key_value_gap, self.widths)
        self.rot_k = self.config.rotate in ("keys", "both")
        self.rot_v = self.config.rotate == "both"
        self._empty_pools: dict[int, QTensor] = {}
        self._stored: dict[str, tuple] | None = None  # during a re-allocation: _stored_ranks of each kind
        self._classes: dict[tuple[int, int], int] | None = None  # joint=True: tokens a row holds per class
        # pools' order: each width's tokens by position, or class-major (by the other kind's width, then position:
        # joint re-allocations write it, so a class is one slice of its key pool and of its value pool)
        self._class_major = False
        self._sbuf = None  # static steps: window K/V and importance buffers of the phase (see _static_begin)
        self._app = None   # realloc="append": the class buffers once the first allocation ran (append.Classes)
        # (flush mix, ring size, demotion plan, ring class, the prompt's host rank profile, {budget: counts} solved
        # on it): `_append_split` to `_append_begin`
        self._app_plan = None
        self._observe_later = None   # a prefill's attention kept for its first-allocation group's fold (first.py)
        self._group_heads = 1      # query heads per KV head (set by `attend`)
        self._last_lse = None      # an append layer's prompt: its last query's log2-sum-exp (B, Hq) until used
        self._static_tokens = 0    # static steps: tokens per sequence reserved (begin_static)

    @functools.cached_property
    def _width_values(self) -> torch.Tensor:
        """Level index -> width on the layer's device, made at first use (only the re-allocating path reads it) and
        copied without waiting: a blocking copy at each layer's first call would hold the host there until the device
        has run every layer queued before it (on a shared GPU, the other processes' work too)."""
        return torch.tensor(self.widths).to(self.device, non_blocking=True)

    def _store(self, key_states, value_states) -> None:
        # the sequence's first tokens (a sliding layer forgets them once they leave its window)
        n_sink = max(0, min(self.config.sink_tokens - self.seq_len, key_states.shape[-2]))
        if n_sink:
            self.sink_k = torch.cat([self.sink_k, key_states[..., :n_sink, :].to(self.window_dtype)], -2)
            self.sink_v = torch.cat([self.sink_v, value_states[..., :n_sink, :].to(self.window_dtype)], -2)
        if self._app is not None:   # a view of buffers with room; only the window's tokens keep importance statistics
            return self._append_store(key_states[..., n_sink:, :], value_states[..., n_sink:, :])
        self.win_k = torch.cat([self.win_k, key_states[..., n_sink:, :].to(self.window_dtype)], -2)
        self.win_v = torch.cat([self.win_v, value_states[..., n_sink:, :].to(self.window_dtype)], -2)
        B, H = self.batch_size, self.num_heads
        unseen = self.importance.new_full((B, H, key_states.shape[-2]), UNSEEN)  # encode_importance(0)
        self.importance = torch.cat([self.importance, unseen], -1)

    def level_bits(self, kind: str) -> torch.Tensor:
        """Widths (B, H, Tq) of the middle's keys ("k") or values ("v")."""
        B, H = self.batch_size, self.num_heads
        if self._app is not None:
            return self._append_bits(kind)
        if self.levels[kind] is None:
            return torch.empty(B, H, 0, dtype=torch.long, device=self.device)
        idx = unpack_levels(self.levels[kind], self.n_middle)
        return self._width_values[idx.long()]

    def _middle_part(self, kind: str) -> torch.Tensor:
        """Dequantized middle keys or values in the stored (normalised, rotated) space: (B, H, Tq, D) fp32."""
        if self._app is not None and self.n_middle:   # before allocating: it fills its own
            return self._append_middle(kind)
        D = self.head_dim
        out = torch.zeros(self.batch_size, self.num_heads, self.n_middle, D, device=self.device)
        if not self.n_middle:
            return out
        if self._stored is not None or self._class_major:  # a re-allocation may have forgotten pool entries
            return self._middle_by_rank(kind)
        bits = self.level_bits(kind)
        for b, q in self.pools[kind].items():
            out[bits == b] = dequantize(q).reshape(-1, D)
        return out

    def _flush_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's oldest `n` tokens, taken out of it, in stored space (B, H, n, D) fp32 (the key
        normalisation fitted on them when none is yet)."""
        new_k, new_v = self.win_k[..., :n, :].float(), self.win_v[..., :n, :].float()
        self.win_k, self.win_v = self.win_k[..., n:, :].contiguous(), self.win_v[..., n:, :].contiguous()
        if self.k_mu is None:
            self._fit_key_norm(new_k)
        return self._to_stored(new_k, new_v)

    def _fit_key_norm(self, keys: torch.Tensor) -> None:
        B, H, _, D = keys.shape
        mode = self.config.key_norm
        mu = keys.mean(-2, keepdim=True) if mode in ("channel", "center") else keys.new_zeros(B, H, 1, D)
        if mode == "channel":
            scale = (keys - mu).abs().amax(-2, keepdim=True).clamp_min(1e-3)
        else:
            scale = keys.new_ones(B, H, 1, D)
        self.k_mu, self.k_scale = mu.half(), scale.half()

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
        self._settle()
        k, v = self._from_stored(self._middle_part("k"), self._middle_part("v"))
        dt = self.dtype
        keys = torch.cat([self.sink_k.to(dt), k.to(dt), self.win_k.to(dt)], -2)
        values = torch.cat([self.sink_v.to(dt), v.to(dt), self.win_v.to(dt)], -2)
        return keys, values

    def _account(self, lb) -> None:
        self._settle()
        if self._app is not None:
            return self._append_account(lb)
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

    def _counts(self, kind: str) -> list[int]:
        """Tokens per row in each width's pool of `kind`, widths lowest first (0 for a width with no pool)."""
        return [self.pools[kind][w].codes.shape[-2] if w in self.pools[kind] else 0 for w in self.widths]

    def _stored_ranks(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(widths (B, H, Tq), entries (B * H, Tq) long) of the stored keys or values: each token's width and its
        entry in that width's pool row (a pool holds a row's tokens of one width in position order, or class-major:
        `_class_major`). Computed once
        per re-allocation (`_flush` holds them while it runs), on each call outside one."""
        if self._stored is not None and kind in self._stored:
            return self._stored[kind]
        bits = self.level_bits(kind)
        flat = bits.reshape(self.batch_size * self.num_heads, bits.shape[-1])
        if self._class_major:   # a width's entries by the other kind's width, then position
            other = self.level_bits("v" if kind == "k" else "k").reshape(flat.shape)
            rank = self._class_slots(flat * 16 + other)
        else:
            rank = torch.zeros_like(flat)
            for b in self.pools[kind]:
                m = flat == b
                rank += m * (m.cumsum(-1) - 1)
        if self._stored is not None:
            self._stored[kind] = (bits, rank)
        return bits, rank

    @staticmethod
    def _class_slots(key: torch.Tensor) -> torch.Tensor:
        """Each token's entry (R, T) in its pool when a pool holds the tokens of one `key` // 16 (own width) ordered
        by `key` (own width x 16 + the other kind's width), then position."""
        order = torch.argsort(key, dim=-1, stable=True)
        slot = inverse_order(order)
        first = torch.searchsorted(key.gather(1, order), key - key % 16)   # where the token's width starts
        return slot - first

    def _warm_class_kernels(self) -> None:
        """A first allocation's: with the kernels, every (key width, value width) class the layer may hold compiled
        before any decode step."""
        if self.kernels:
            warm_decode_kernels(self.device, self.head_dim, [(a, b) for a in self.widths for b in self.widths],
                                self.group)

    def _empty_pool(self, bits: int) -> QTensor:
        """A pool of no tokens at `bits` (made once per width: decode steps ask for it every call)."""
        if bits not in self._empty_pools:
            B, H, D = self.batch_size, self.num_heads, self.head_dim
            codes = torch.empty(B, H, 0, D * bits // 8, dtype=torch.uint8, device=self.device)
            meta = torch.empty(B, H, 0, D // self.group, dtype=torch.float16, device=self.device)
            self._empty_pools[bits] = QTensor(codes, meta, meta, bits, self.group, -1)
        return self._empty_pools[bits]
