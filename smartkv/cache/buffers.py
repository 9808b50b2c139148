"""Growable token buffers for cache layers: appends write in place, no concatenation of the whole cache.

A buffer holds `capacity` token rows and uses the first `n`. Growth allocates a larger buffer and copies the used
rows; it grows by GROWTH (not 2x) so that capacity slack stays small next to what quantization saves, and
`reserve` preallocates when the final length is known. Views (`view()`) cover the used rows only and are what
attention, dequantization and memory accounting read; `slack_bytes` is what the capacity adds on top.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from smartkv.core.quant import QTensor, packed_width
from smartkv.kernels import quantize_pack, quantize_pack_kv, quantize_pack_reference

GROWTH = 1.25     # 2x would leave up to half the buffer unused: more than int4 saves over int8
MIN_GROWTH = 256  # tokens


def grown(capacity: int, needed: int, multiple: int = 1) -> int:
    """Capacity after growing `capacity` to hold `needed` tokens, a multiple of `multiple`."""
    cap = max(needed, int(capacity * GROWTH), capacity + MIN_GROWTH)
    return -(-cap // multiple) * multiple


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TokenBuffer:
    """Full-precision tokens, (B, H, capacity, D); rows [start, n) are in use (`start` > 0: a sliding window)."""

    def __init__(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device):
        self.data = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=device)
        self.start = self.n = 0

    def __len__(self) -> int:
        return self.n - self.start

    def view(self, start: int | None = None, end: int | None = None) -> torch.Tensor:
        return self.data[..., self.start if start is None else start:self.n if end is None else end, :]

    def append(self, x: torch.Tensor) -> None:
        T = x.shape[-2]
        if self.n + T > self.data.shape[-2]:
            self._make_room(T)
        self.data[..., self.n:self.n + T, :] = x
        self.n += T

    def drop_front(self, count: int) -> None:
        """Forget the oldest `count` rows (their memory is reused by a later append, never by this one)."""
        self.start += count

    def clear(self) -> None:
        self.start = self.n = 0

    def reserve(self, tokens: int) -> None:
        if tokens > self.data.shape[-2]:
            self._resize(tokens)

    def _make_room(self, T: int) -> None:
        used = len(self)
        if self.start and used + T <= self.data.shape[-2]:  # slide the window back to row 0
            self.data[..., :used, :] = self.view().clone()
            self.start, self.n = 0, used
        else:
            self._resize(grown(self.data.shape[-2], used + T))

    def _resize(self, capacity: int) -> None:
        used = len(self)
        data = self.data.new_empty(*self.data.shape[:2], capacity, self.data.shape[-1])
        data[..., :used, :] = self.view()
        self.data, self.start, self.n = data, 0, used

    @property
    def slack_bytes(self) -> int:
        return _nbytes(self.data) * (self.data.shape[-2] - len(self)) // max(self.data.shape[-2], 1)


class QBuffer:
    """Quantized tokens: a QTensor with spare token rows; `append` quantizes straight into them.

    axis=-1: per-token groups along head_dim; axis=-2: per-channel groups of `group` tokens (appends come in whole
    groups, KIVI's flushed blocks). `kernels`: quantize with the Triton kernel (same bytes as the torch path).
    """

    def __init__(self, bits: int, group: int, axis: int, batch: int, heads: int, head_dim: int, device,
                 kernels: bool = False):
        self.bits, self.group, self.axis, self.kernels = bits, group, axis, kernels
        self.shape = (batch, heads, head_dim)
        self.q = self._alloc(0, device)
        self.n = 0

    def _alloc(self, capacity: int, device) -> QTensor:
        B, H, D = self.shape
        codes = torch.empty(B, H, capacity, packed_width(D, self.bits), dtype=torch.uint8, device=device)
        meta = (B, H, capacity, D // self.group) if self.axis == -1 else (B, H, capacity // self.group, D)
        return QTensor(codes, torch.empty(meta, dtype=torch.float16, device=device),
                       torch.empty(meta, dtype=torch.float16, device=device), self.bits, self.group, self.axis)

    @property
    def capacity(self) -> int:
        return self.q.codes.shape[-2]

    def _meta_rows(self, tokens: int) -> int:
        return tokens if self.axis == -1 else tokens // self.group

    def view(self, tokens: int | None = None) -> QTensor:
        """The first `tokens` rows (default: all used), as a QTensor of views."""
        n = self.n if tokens is None else tokens
        r = self._meta_rows(n)
        q = self.q
        return QTensor(q.codes[..., :n, :], q.scale[..., :r, :], q.zero[..., :r, :], q.bits, q.group_size, q.axis)

    def reserve(self, tokens: int) -> None:
        if tokens > self.capacity:
            self._resize(-(-tokens // self.group) * self.group)

    def _ensure(self, T: int) -> None:
        if self.n + T > self.capacity:
            self._resize(grown(self.capacity, self.n + T, self.group))

    def _resize(self, capacity: int) -> None:
        new, used = self._alloc(capacity, self.q.codes.device), self.view()
        r = used.scale.shape[-2]
        new.codes[..., :self.n, :] = used.codes
        new.scale[..., :r, :] = used.scale
        new.zero[..., :r, :] = used.zero
        self.q = new

    def drop_front(self, count: int) -> None:
        """Forget the first `count` tokens (per-channel groups: a multiple of `group`): the rest move to row 0, and
        a buffer left mostly empty shrinks (a sliding window's storage stays about its size)."""
        if not count:
            return
        if count % (1 if self.axis == -1 else self.group):
            raise ValueError(f"drop_front must forget whole groups of {self.group} tokens, got {count}")
        keep = self.n - count
        r0, r1 = self._meta_rows(count), self._meta_rows(self.n)
        q = self.q
        for t, a, b in ((q.codes, count, self.n), (q.scale, r0, r1), (q.zero, r0, r1)):
            t[..., :b - a, :] = t[..., a:b, :].clone()
        self.n = keep
        if self.capacity > 2 * keep + MIN_GROWTH:
            self._resize(-(-(keep + MIN_GROWTH) // self.group) * self.group)

    def append(self, x: torch.Tensor) -> None:
        """Quantize x (B, H, T, D) into rows [n, n + T)."""
        T = x.shape[-2]
        self._ensure(T)
        if self.kernels:
            quantize_pack(x, self.bits, self.group, self.axis, out=self.q, start=self.n)
        else:
            quantize_pack_reference(x, self.bits, self.group, self.axis, out=self.q, start=self.n)
        self.n += T

    @property
    def slack_bytes(self) -> int:
        unused = self.capacity - self.n
        meta_unused = self._meta_rows(self.capacity) - self._meta_rows(self.n)
        q = self.q
        per_row = q.codes.shape[-1] * q.codes.shape[0] * q.codes.shape[1]
        per_meta_row = 2 * q.scale.shape[-1] * q.scale.shape[0] * q.scale.shape[1] * q.scale.element_size()
        return unused * per_row + meta_unused * per_meta_row


def write_token(buffers, rows: torch.Tensor, tokens) -> None:
    """Write one token per sequence, tokens[i] (B, H, 1, D), into buffers[i] (B, H, capacity, D) at row rows[b]
    ((B,) int tensor, read on the device: a static decode step learns nothing of the length on the host)."""
    B, H, _, D = tokens[0].shape
    at = rows.long().view(B, 1, 1, 1).expand(B, H, 1, D)
    for buf, x in zip(buffers, tokens, strict=True):
        buf.scatter_(-2, at, x.to(buf.dtype))


def append_kv(qk: QBuffer, qv: QBuffer, k: torch.Tensor, v: torch.Tensor) -> None:
    """Keys and values of one per-token format into two buffers of one length: one launch with the kernels."""
    if not qk.kernels or qk.n != qv.n:
        qk.append(k)
        qv.append(v)
        return
    T = k.shape[-2]
    qk._ensure(T)
    qv._ensure(T)
    quantize_pack_kv(k, v, qk.bits, qk.group, out=(qk.q, qv.q), start=qk.n)
    qk.n += T
    qv.n += T


@dataclass
class StaticDecode:
    """Where a static decode step writes and reads, on the device (`SmartKVCache.begin_static`): with it a step
    launches the same kernels with the same arguments whatever the length, so it can be captured once as a CUDA
    graph and replayed (`smartkv.cache.graphs.GraphDecoder`). The caller sets both before each step and calls
    `join()` after it (before the capture ends)."""
    pos: torch.Tensor      # (B,) int32: the row the new token goes to (= tokens stored before it)
    lengths: torch.Tensor  # (B,) int32: pos + 1, the tokens it attends to
    # work the step's output does not wait for (SmartKV's flush) runs here, beside the later layers; CUDA only
    side: torch.cuda.Stream | None = None
    forked: bool = False   # this step put work on `side` (only then may a capture wait for it)

    def fork(self) -> torch.cuda.Stream:
        """The side stream, after the current stream's work so far (inside a capture it joins the capture)."""
        self.side.wait_stream(torch.cuda.current_stream(self.side.device))
        self.forked = True
        return self.side

    def join(self) -> None:
        """The current stream waits for what this step put on the side stream (a capture must join its forks)."""
        if self.forked:
            torch.cuda.current_stream(self.side.device).wait_stream(self.side)
            self.forked = False
