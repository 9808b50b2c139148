"""The append layers' class map (append.py): each middle position's class id (< 16: the classes are (key width,
value width) pairs) as a 4-bit code, two positions a byte (position p in byte p // 2, the low nibble for even p), so
it costs what the re-allocating design's two 2-bit level maps cost. The ring's positions (the middle's last `ring_n`)
are not written until their tokens leave the ring: a reader takes the positions before them."""
from __future__ import annotations

import torch


def map_bytes(positions: int) -> int:
    """Bytes of a map with room for `positions`: one spare byte, so that a write of T positions at any offset reads
    and writes T // 2 + 1 whole bytes."""
    return (positions + 1) // 2 + 1


def used_bytes(positions: int) -> int:
    """Bytes that hold positions 0..positions - 1."""
    return (positions + 1) // 2


def pack_ids(ids: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 ids < 16 -> (..., ceil(n / 2)) bytes (an odd n padded with a 0 nibble)."""
    if ids.shape[-1] % 2:
        ids = torch.cat([ids, ids.new_zeros(*ids.shape[:-1], 1)], -1)
    return ids[..., 0::2] | (ids[..., 1::2] << 4)


def unpack_ids(packed: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """(..., m) bytes -> (..., n) uint8 ids (n <= 2 m; all 2 m without n)."""
    out = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)
    return out if n is None else out[..., :n]


def new_map(ids: torch.Tensor, positions: int) -> torch.Tensor:
    """A map (B, H, map_bytes(positions)) holding `ids` (B, H, n) at positions 0..n - 1 (the rest 0)."""
    out = ids.new_zeros(*ids.shape[:-1], map_bytes(positions))
    body = pack_ids(ids)
    out[..., :body.shape[-1]] = body
    return out


def read(cmap: torch.Tensor, n: int) -> torch.Tensor:
    """Positions 0..n - 1's ids (B, H, n) uint8."""
    return unpack_ids(cmap[..., :used_bytes(n)], n)


def write(cmap: torch.Tensor, at: torch.Tensor, ids: torch.Tensor) -> None:
    """ids (B, H, T) into positions at..at + T - 1 (at: (1,) long on the map's device, so a captured graph replays
    it at the offset of the moment): the T // 2 + 1 bytes that hold them read, their nibbles replaced, written back."""
    T = ids.shape[-1]
    ar = torch.arange(T // 2 + 1, device=cmap.device)
    idx = at // 2 + ar
    nib = unpack_ids(cmap.index_select(-1, idx))                      # (B, H, T + 1 or T + 2)
    nib.index_copy_(-1, at % 2 + torch.arange(T, device=cmap.device), ids.to(torch.uint8))
    cmap.index_copy_(-1, idx, pack_ids(nib))


def grown(cmap: torch.Tensor, positions: int) -> torch.Tensor:
    """The map with room for `positions` (its bytes copied in front)."""
    out = cmap.new_zeros(*cmap.shape[:-1], map_bytes(positions))
    out[..., :cmap.shape[-1]] = cmap
    return out
