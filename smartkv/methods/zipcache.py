"""`zipcache`: ZipCache, He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", NeurIPS 2024 (arXiv:2405.14256; reference code ThisisBillhe/ZipCache).

Saliency: the normalised attention score, the attention a token receives divided by the number of queries that
could see it (a late token is seen by fewer queries and is not penalised for it), per KV head (mean over the
query heads of its group). At a prompt it is estimated from probe queries only, `probe_ratio` of the prompt:
half the most recent queries, half drawn at random (seeded) from the rest, the paper's hybrid choice.
Precision: per block and KV head, the `salient_ratio` most salient tokens are stored at `high_bits`, the rest at
`low_bits` (the paper's GSM8K setting: 4/2 bits; the demo marks 40% of tokens unimportant, so 60% salient).
Quantization, each bit-width set of a block apart:
  keys   - channel-wise: one fp16 scale and zero per channel over the set's tokens;
  values - channel-separable token-wise (CSTQuant): each channel divided by c = sqrt(max |v|) over the block,
           then one fp16 scale and zero per token (and KV head) over the normalised channels.
Streaming: tokens generated after the prompt stay in 16 bits while decode queries score them (running normalised
attention, every decode query a probe); every `streaming_gap` tokens (the paper's 100) they are compressed as a
new block with their own saliency split and parameters. Unlike the reference code, compressed blocks are never
re-quantized (it dequantizes and re-quantizes the whole cache at every flush).
Sliding-window layers (smartkv.cache.sliding): blocks leave whole, so there a prompt is compressed in blocks of
`streaming_gap` tokens (each with its own salient split) and a layer holds at most `streaming_gap - 1` tokens past
its window; uncompressed tokens leave one by one.

Layout differences from the reference code, both in ZipCache's favour or neutral: token-wise parameters are per
(token, KV head) rather than per token over all heads (the salient sets differ between heads), and the salient
set is a packed 1-bit map per (token, KV head) (metadata, counted). Prompt probes: queries of a multi-token call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.cache.buffers import TokenBuffer
from smartkv.cache.hf_compat import sdpa_attention_forward
from smartkv.cache.layer import KVLayer
from smartkv.core.importance import attention_probs, kv_head_mass
from smartkv.core.quant import BITS, QTensor, dequantize, quantize
from smartkv.methods import register
from smartkv.methods.base import MethodConfig, check_choice, check_int


# ---- saliency ---------------------------------------------------------------------------------------------------

def probe_rows(q_len: int, probe_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Which of a call's `q_len` queries probe: round(probe_ratio * q_len) (at least 1), half of them the most
    recent, the rest drawn without replacement from the earlier ones. Sorted (P,) int64."""
    n = min(q_len, max(1, round(probe_ratio * q_len)))
    recent = n - n // 2
    earlier = q_len - recent
    drawn = torch.randperm(earlier, generator=generator)[:n - recent] if earlier else torch.empty(0, dtype=torch.long)
    return torch.cat([drawn.sort().values, torch.arange(earlier, q_len)])


def visible(attention_mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int,
            batch: int) -> torch.Tensor:
    """(B, 1, P, T) bool: which keys the queries `rows` of this call (the last q_len of kv_len positions) see."""
    rows = rows.to(attention_mask.device if attention_mask is not None else "cpu")
    if attention_mask is None:
        pos = kv_len - q_len + rows                                      # absolute positions of the probes
        allowed = torch.arange(kv_len, device=rows.device).unsqueeze(0) <= pos.unsqueeze(-1)   # (P, T)
        return allowed.expand(batch, 1, *allowed.shape)
    m = attention_mask[..., -q_len:, -kv_len:][..., rows, :]
    allowed = m if m.dtype == torch.bool else m == 0
    return allowed.expand(batch, *allowed.shape[1:]) if allowed.shape[0] == 1 else allowed


def attention_received(query: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, scaling: float):
    """Attention mass each key receives from `query` (B, Hq, P, D), per KV head, and how many of the queries saw it:
    -> (mass (B, Hkv, T) fp32, seen (B, T) int32). mass / seen is ZipCache's normalised score."""
    probs = attention_probs(query, keys, allowed.to(query.device), scaling)             # (B, Hq, P, T)
    return kv_head_mass(probs, keys.shape[1]), allowed.sum(dim=(1, 2)).to(torch.int32).to(query.device)


# ---- one compressed block --------------------------------------------------------------------------------------

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., ceil(n / 8)) uint8, little-endian within a byte."""
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -n % 8))
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    return (padded.reshape(*mask.shape[:-1], -1, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], -1)[..., :n].bool()


@dataclass
class ZipBlock:
    """Tokens compressed together: salient (`hi`) and regular (`lo`) sets, each key set channel-wise and each value
    set token-wise after the block's channel scaling. Sets are stored in token order within each KV head."""
    n: int
    mask: torch.Tensor                   # (B, H, ceil(n / 8)) uint8: salient bit per token
    keys: tuple[QTensor | None, QTensor | None]     # (hi, lo): codes (B, H, n_set, D*b/8), scale (B, H, 1, D)
    values: tuple[QTensor | None, QTensor | None]   # (hi, lo): codes (B, H, n_set, D*b/8), scale (B, H, n_set, 1)
    value_channel: torch.Tensor          # (B, H, 1, D) fp16: c = sqrt(max |v|) per channel


def _set_order(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, n) bool -> (B, H, n) token indices: salient ones ascending, then the regular ones ascending."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices


def compress_block(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, high_bits: int, low_bits: int,
                   salient_ratio: float) -> ZipBlock:
    """keys, values (B, H, n, D); scores (B, H, n), higher = more salient."""
    B, H, n, D = keys.shape
    k = round(salient_ratio * n)
    mask = torch.zeros(B, H, n, dtype=torch.bool, device=keys.device)
    if k:
        mask.scatter_(-1, scores.float().topk(k, dim=-1).indices, True)
    order = _set_order(mask).unsqueeze(-1).expand(B, H, n, D)
    k_sorted, v_sorted = keys.float().gather(2, order), values.float().gather(2, order)    # (B, H, n, D)
    amax = values.float().abs().amax(-2, keepdim=True).sqrt().half()                        # (B, H, 1, D)
    channel = torch.where(amax > 0, amax, torch.ones_like(amax))
    v_sorted = v_sorted / channel.float()
    key_sets, value_sets = [], []
    for bits, lo, hi in ((high_bits, 0, k), (low_bits, k, n)):
        if hi == lo:
            key_sets.append(None)
            value_sets.append(None)
            continue
        key_sets.append(quantize(k_sorted[..., lo:hi, :], bits, hi - lo, axis=-2))
        value_sets.append(quantize(v_sorted[..., lo:hi, :], bits, D, axis=-1))
    return ZipBlock(n, pack_bits(mask), tuple(key_sets), tuple(value_sets), channel)


def decompress_block(block: ZipBlock, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mask = unpack_bits(block.mask, block.n)
    B, H, n = mask.shape
    parts = [(dequantize(kq), dequantize(vq)) for kq, vq in zip(block.keys, block.values, strict=True)
             if kq is not None]
    k_sorted = torch.cat([k for k, _ in parts], -2)                                          # (B, H, n, D)
    v_sorted = torch.cat([v for _, v in parts], -2) * block.value_channel.float()
    order = _set_order(mask).unsqueeze(-1).expand(*k_sorted.shape)
    keys = torch.empty_like(k_sorted).scatter_(2, order, k_sorted)
    values = torch.empty_like(v_sorted).scatter_(2, order, v_sorted)
    return keys.to(dtype), values.to(dtype)


# ---- the cache layer -------------------------------------------------------------------------------------------

class ZipCacheLayer(KVLayer):
    def _init_storage(self) -> None:
        B, H, D = self.batch_size, self.num_heads, self.head_dim
        self.blocks: list[ZipBlock] = []
        empty = torch.empty(B, H, 0, D, dtype=self.window_dtype, device=self.device)
        self.win_k = self._window_buffer(empty)   # (B, H, w, D): tokens not yet compressed, 16 bits
        self.win_v = self._window_buffer(empty)
        self.win_mass = torch.zeros(B, H, 0, device=self.device)            # attention received by window tokens
        self.win_seen = torch.zeros(B, 0, dtype=torch.int32, device=self.device)  # queries that saw each one
        self.calls = 0
        self.unscored = 0   # window tokens stored by the last call whose attention has not been observed yet

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.win_k.append(key_states.to(self.window_dtype))
        self.win_v.append(value_states.to(self.window_dtype))
        T = key_states.shape[-2]
        self.win_mass = torch.cat([self.win_mass, self.win_mass.new_zeros(*self.win_mass.shape[:2], T)], -1)
        self.win_seen = torch.cat([self.win_seen, self.win_seen.new_zeros(self.win_seen.shape[0], T)], -1)
        self.unscored = T

    def _before_update(self) -> None:
        if self.is_initialized and self.unscored:  # no attention observed for the last call (no hook)
            self._flush(len(self.win_k))

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().append(key_states, value_states)
        self._flush(len(self.win_k))  # no queries: equal saliency (recency breaks ties)

    def _stored_kv(self):
        parts = [decompress_block(b, self.dtype) for b in self.blocks]
        parts.append((self.win_k.view().to(self.dtype), self.win_v.view().to(self.dtype)))
        return torch.cat([k for k, _ in parts], -2), torch.cat([v for _, v in parts], -2)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        self._observe(query, key, attention_mask, kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return out

    def _observe(self, query, key, attention_mask, scaling: float) -> None:
        """Fold this call's attention into the window's statistics; compress what is due."""
        q_len, kv_len, w = query.shape[-2], key.shape[-2], len(self.win_k)
        self.calls += 1
        if q_len > 1:  # a prompt: probe queries, then the whole window becomes one block
            gen = torch.Generator().manual_seed(hash((self.config.seed, self.layer_idx, self.calls)) % (2**62))
            rows = probe_rows(q_len, self.config.probe_ratio, gen)
        else:          # decode: the query is a probe of the streaming window
            rows = torch.zeros(1, dtype=torch.long)
        allowed = visible(attention_mask, rows, q_len, kv_len, query.shape[0])
        mass, seen = attention_received(query[:, :, rows.to(query.device)], key, allowed, scaling)
        self.win_mass = self.win_mass + mass[..., kv_len - w:]
        self.win_seen = self.win_seen + seen[..., kv_len - w:]
        self.unscored = 0
        if q_len > 1:
            self._flush(w)
        elif w >= self.config.streaming_gap:
            self._flush(self.config.streaming_gap)

    def _evict(self, count: int) -> int:
        # whole blocks, oldest first; once none is left, uncompressed tokens one by one
        dropped = 0
        while self.blocks and self.blocks[0].n <= count - dropped:
            dropped += self.blocks.pop(0).n
        if not self.blocks:
            n = min(count - dropped, len(self.win_k))
            self.win_k.drop_front(n)
            self.win_v.drop_front(n)
            self.win_mass, self.win_seen = self.win_mass[..., n:].clone(), self.win_seen[:, n:].clone()
            self.unscored = min(self.unscored, len(self.win_k))
            dropped += n
        return dropped

    @property
    def eviction_lag(self) -> int:
        return self.config.streaming_gap - 1

    def _flush(self, count: int) -> None:
        """Compress the window's first `count` tokens into a block (on a sliding layer: blocks of at most
        `streaming_gap` tokens, so that each leaves the window soon after its last token does)."""
        gap = self.config.streaming_gap
        if self.is_sliding and count > gap:
            for done in range(0, count, gap):
                self._flush(min(gap, count - done))
            return
        if count <= 0:
            return
        start = self.win_k.start
        scores = self.win_mass[..., :count] / self.win_seen[:, None, :count].clamp_min(1).float()
        scores = scores + 1e-12 * torch.arange(count, device=scores.device)   # ties (nothing observed): recency
        cfg = self.config
        self.blocks.append(compress_block(self.win_k.view(start, start + count), self.win_v.view(start, start + count),
                                          scores, cfg.high_bits, cfg.low_bits, cfg.salient_ratio))
        self.win_k.drop_front(count)
        self.win_v.drop_front(count)
        # copies, not views: a view would keep the flushed tokens' statistics allocated (uncounted bytes)
        self.win_mass, self.win_seen = self.win_mass[..., count:].clone(), self.win_seen[:, count:].clone()
        self.unscored = 0
        if self.win_k.data.shape[-2] > 2 * (cfg.streaming_gap + 1):  # a prompt passed through: give its room back
            self.win_k, self.win_v = (self._window_buffer(buf.view()) for buf in (self.win_k, self.win_v))

    def _window_buffer(self, rows: torch.Tensor) -> TokenBuffer:
        """A window buffer holding `rows`, with room for a streaming block and the token that completes it."""
        buf = TokenBuffer(self.batch_size, self.num_heads, self.head_dim, self.window_dtype, self.device)
        buf.reserve(max(self.config.streaming_gap + 1, rows.shape[-2]))
        buf.append(rows)
        return buf

    def _slack_bytes(self) -> int:
        return self.win_k.slack_bytes + self.win_v.slack_bytes

    def _account(self, lb) -> None:
        for b in self.blocks:
            for sets, kind in ((b.keys, "k"), (b.values, "v")):
                for q in sets:
                    if q is not None:
                        lb.add_codes(q.codes, q.bits, kind)
                        lb.add("metadata", q.scale)
                        lb.add("metadata", q.zero)
            lb.add("metadata", b.mask)
            lb.add("metadata", b.value_channel)
        lb.add("residual", self.win_k.view())
        lb.add("residual", self.win_v.view())
        lb.add("metadata", self.win_mass)
        lb.add("metadata", self.win_seen)


@register
@dataclass(frozen=True)
class ZipCache(MethodConfig):
    """ZipCache: normalised-attention saliency from probe queries; salient tokens at high bits, the rest at low."""
    name = "zipcache"
    high_bits: int = 4
    low_bits: int = 2
    salient_ratio: float = 0.6
    probe_ratio: float = 0.1
    streaming_gap: int = 100
    seed: int = 0

    def validate(self) -> None:
        check_choice("high_bits", self.high_bits, BITS)
        check_choice("low_bits", self.low_bits, BITS)
        if self.low_bits > self.high_bits:
            raise ValueError(f"low_bits must be <= high_bits ({self.high_bits}), got {self.low_bits}")
        for name, lo in (("salient_ratio", 0.0), ("probe_ratio", 1e-9)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= 1:
                raise ValueError(f"{name} must be a number in {'[0, 1]' if lo == 0 else '(0, 1]'}, got {value!r}")
        check_int("streaming_gap", self.streaming_gap, 1)
        check_int("seed", self.seed, 0)

    def make_layer(self, layer_idx: int):
        return ZipCacheLayer(self, layer_idx)
