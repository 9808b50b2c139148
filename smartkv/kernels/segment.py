"""What a decode-attention call reads: one `KVSegment` per run of cached tokens stored one way."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from smartkv.core.quant import QTensor

KVPart = torch.Tensor | QTensor


def _tokens(x: KVPart | None) -> int:
    if x is None:
        return 0
    return x.codes.shape[-2] if isinstance(x, QTensor) else x.shape[-2]


@dataclass(frozen=True)
class KVSegment:
    """Keys and values of `num_tokens` cached tokens, (batch, kv_heads, tokens, head_dim) each.

    keys / values: a full-precision tensor or a `QTensor`. Keys may be per-token (axis=-1) or per-channel
    (axis=-2, KIVI) groups; values per-token groups. A quantized part may be followed by full-precision tokens
    (`key_residual`, `value_residual`: KIVI's streaming window), and keys and values may split at different
    token counts, as long as both cover the same tokens: quantized + residual is the same count for each.
    lengths: (B,) int, valid tokens of this segment per sequence (ragged batch); None = all.
    key_scale / key_shift: (B, kv_heads, 1, head_dim); the stored keys (all of them) are (k - shift) / scale,
    so the kernel uses q * scale and adds q . shift (SmartKV's per-channel key normalisation).
    residual_last: the residuals (one token each) are every sequence's last valid token, position
    lengths[b] - 1, which the quantized rows also cover (and which it replaces); the quantized parts are
    per-token and may be a whole buffer's capacity. A static decode step (CUDA graphs): nothing about the
    current length is known on the host, yet the new token still attends at full precision.
    stable: the caller passes this same object call after call, its tensors changed only in place, until what it
    covers changes (SmartKV's sinks, classes and ring between flushes): a small call takes such segments in one
    launch from a descriptor table built at their first call (`kernels.batched`), and what the call checks of
    them (shapes, strides, dtypes) is checked at that call only (a step of a batch of one is bound by host work).
    """
    keys: KVPart
    values: KVPart
    key_residual: torch.Tensor | None = None
    value_residual: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    key_scale: torch.Tensor | None = None
    key_shift: torch.Tensor | None = None
    residual_last: bool = False
    stable: bool = False

    def __post_init__(self):
        for name in ("key_residual", "value_residual"):
            part = "keys" if name == "key_residual" else "values"
            if getattr(self, name) is not None and not isinstance(getattr(self, part), QTensor):
                raise ValueError(f"{name} follows quantized {part}; got full-precision {part} and a {name}")
        nk = _tokens(self.keys) + _tokens(self.key_residual)
        nv = _tokens(self.values) + _tokens(self.value_residual)
        object.__setattr__(self, "_num_tokens", nk)   # asked many times a call: a decode step is host-bound
        if nk != nv:
            raise ValueError(f"keys cover {nk} tokens but values cover {nv}; a segment's keys and values must "
                             f"cover the same tokens")
        if isinstance(self.values, QTensor) and self.values.axis != -1:
            raise ValueError(f"values must be quantized per token (axis=-1), got axis={self.values.axis}")
        if (self.key_scale is None) != (self.key_shift is None):
            raise ValueError("key_scale and key_shift go together; got only one of them")
        if self.residual_last and (self.lengths is None or _tokens(self.key_residual) != 1
                                   or _tokens(self.value_residual) != 1 or not isinstance(self.keys, QTensor)
                                   or self.keys.axis != -1):
            raise ValueError("residual_last needs lengths, per-token quantized keys and values, and a one-token "
                             "key_residual and value_residual")

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def known(self, name: str):
        """What a call worked out about this segment under `name` at an earlier call, kept only for a stable one
        (its tensors change only in place: shapes, strides and dtypes stay); None when nothing is kept."""
        return self.__dict__.get(name) if self.stable else None

    def keep(self, name: str, value):
        """Keep `value` under `name` for later calls (`known`), on a stable segment only; returns it."""
        if self.stable:
            self.__dict__[name] = value
        return value

    @property
    def quantized_keys(self) -> int:
        return _tokens(self.keys) if isinstance(self.keys, QTensor) else 0

    @property
    def quantized_values(self) -> int:
        return _tokens(self.values) if isinstance(self.values, QTensor) else 0

    @property
    def nbytes(self) -> int:
        """Bytes stored for this segment (codes, scales, zeros, full-precision tokens)."""
        parts = (self.keys, self.values, self.key_residual, self.value_residual)
        return sum(p.nbytes if isinstance(p, QTensor) else p.numel() * p.element_size()
                   for p in parts if p is not None)


@dataclass(frozen=True)
class FoldInto:
    """A `decode_attention` probs_out entry that folds its segment's token probabilities into importance codes in
    place of returning them (SmartKV's append ring and window: one launch a segment, where probabilities, a fold
    and a count's update took five): codes (B, kv_heads, >= T_seg) uint8, the mean over `seen` queries of each
    token's probability summed over its group's query heads and divided by `divisor` (`importance_fold`'s), become
    the mean after this query; seen (B, >= T_seg) uint8 (one count a sequence and token, saturating at 255) gains
    one for each valid token (a segment's or the call's lengths). Both last dimensions contiguous."""
    codes: torch.Tensor
    seen: torch.Tensor
    divisor: float = 1.0

    def check(self, batch: int, kv_heads: int, tokens: int, index: int) -> None:
        c, s = self.codes, self.seen
        if (c.dtype != torch.uint8 or c.dim() != 3 or tuple(c.shape[:2]) != (batch, kv_heads) or c.shape[-1] < tokens
                or c.stride(-1) != 1 or s.dtype != torch.uint8 or s.dim() != 2 or s.shape[0] != batch
                or s.shape[-1] < tokens or s.stride(-1) != 1 or s.device != c.device):
            raise ValueError(f"probs_out[{index}] folds into codes uint8 ({batch}, {kv_heads}, >= {tokens}) and seen "
                             f"uint8 ({batch}, >= {tokens}), last dimensions contiguous, on one device; got codes "
                             f"{c.dtype} {tuple(c.shape)}, seen {s.dtype} {tuple(s.shape)}")


def check_inputs(q: torch.Tensor, segments: Sequence[KVSegment]) -> None:
    if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[2] != 1):
        raise ValueError(f"q must be (batch, q_heads, head_dim) or (batch, q_heads, 1, head_dim), got "
                         f"{tuple(q.shape)}")
    if not segments:
        raise ValueError("decode attention needs at least one segment")
    B, Hq, D = q.shape[0], q.shape[1], q.shape[-1]
    for i, seg in enumerate(segments):
        if seg.known("_fits") == (B, Hq, D):   # checked at an earlier call
            continue
        shape = seg.keys.shape if isinstance(seg.keys, QTensor) else tuple(seg.keys.shape)
        if shape[0] != B or shape[-1] != D or Hq % shape[1]:
            raise ValueError(f"segment {i}: keys {tuple(shape)} do not fit q {tuple(q.shape)} (batch, head_dim, "
                             f"and q_heads a multiple of kv_heads must agree)")
        seg.keep("_fits", (B, Hq, D))
