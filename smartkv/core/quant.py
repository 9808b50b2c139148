"""Group-wise asymmetric min-max quantization and bit packing. Pure tensor math, CPU and CUDA alike.

Storage layout (shared with the Triton kernels in `smartkv.kernels`):
  - codes are packed along the LAST axis (head_dim), little-endian inside each byte:
      8 bit: one code a byte; 4 bit: c0 | c1 << 4; 2 bit: c0 | c1 << 2 | c2 << 4 | c3 << 6;
      3 bit: eight codes in three bytes, the 24-bit word sum(c_j << 3j) stored low byte first.
    So a (..., D) tensor of b-bit codes is stored as (..., D * b // 8) uint8; D must be a multiple of 8.
  - one fp16 `scale` and one fp16 `zero` (the group minimum) per group; x ~= code * scale + zero.
      axis=-1 (per token): groups of G along D;       scale/zero shape (..., T, D // G)
      axis=-2 (per channel): groups of G along tokens; scale/zero shape (..., T // G, D)
The stored scale and zero are what dequantization uses, so the round-trip bound holds for them:
`zero` is rounded down and `scale` up to fp16 before the codes are computed, so every value lies inside
[zero, zero + (2^b - 1) * scale] and comes back within half a step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


def check_bits(bits: int, name: str = "bits") -> int:
    if bits not in BITS:
        raise ValueError(f"{name} must be one of {BITS}, got {bits!r}")
    return bits


def packed_width(dim: int, bits: int) -> int:
    """Bytes used by `dim` codes of `bits` bits."""
    if dim % 8:
        raise ValueError(f"the packed axis must be a multiple of 8, got {dim}")
    return dim * bits // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (values < 2**bits) along the last axis: (..., D) -> (..., D * bits // 8) uint8."""
    check_bits(bits)
    packed_width(codes.shape[-1], bits)
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if bits == 3:
        c = c.reshape(*c.shape[:-1], c.shape[-1] // 8, 8).to(torch.int32)  # (..., D/8, 8)
        word = (c << (3 * torch.arange(8, device=c.device, dtype=torch.int32))).sum(-1)  # (..., D/8) 24-bit
        out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)  # (..., D/8, 3)
        return out.reshape(*codes.shape[:-1], codes.shape[-1] * 3 // 8).to(torch.uint8)
    per_byte = 8 // bits
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per_byte, per_byte)  # (..., D/per_byte, per_byte)
    shifts = (bits * torch.arange(per_byte, device=c.device, dtype=torch.uint8))
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., D * bits // 8) uint8 -> (..., D) uint8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed
    if bits == 3:
        p = packed.reshape(*packed.shape[:-1], packed.shape[-1] // 3, 3).to(torch.int32)  # (..., D/8, 3)
        word = p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)
        shifts = 3 * torch.arange(8, device=p.device, dtype=torch.int32)
        codes = (word.unsqueeze(-1) >> shifts) & 0x7  # (..., D/8, 8)
        return codes.reshape(*packed.shape[:-1], packed.shape[-1] * 8 // 3).to(torch.uint8)
    per_byte = 8 // bits
    shifts = bits * torch.arange(per_byte, device=packed.device, dtype=torch.uint8)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., D/per_byte, per_byte)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= x (x in fp32)."""
    h = x.clamp(-65504, 65504).half()
    too_big = h.float() > x
    return torch.where(too_big, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (x >= 0 in fp32)."""
    h = x.clamp(0, 65504).half()
    too_small = h.float() < x
    return torch.where(too_small, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


@dataclass
class QTensor:
    """A quantized tensor: packed codes plus fp16 scale and zero per group."""
    codes: torch.Tensor  # (..., T, D * bits // 8) uint8
    scale: torch.Tensor  # fp16, see module docstring for the shape
    zero: torch.Tensor   # fp16, same shape as scale
    bits: int
    group_size: int
    axis: int            # -1: groups along D (per token); -2: groups along T (per channel)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.codes.shape[-1] * 8 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    @property
    def payload_bytes(self) -> int:
        return self.codes.nbytes

    @property
    def metadata_bytes(self) -> int:
        return self.scale.nbytes + self.zero.nbytes


def _grouped(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """View x (..., T, D) as (..., groups, G) along `axis`; axis=-2 also moves T last."""
    if axis == -1:
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)  # (..., T, D/G, G)
    xt = x.transpose(-1, -2)  # (..., D, T)
    return xt.reshape(*xt.shape[:-1], xt.shape[-1] // group_size, group_size)  # (..., D, T/G, G)


def _ungrouped(g: torch.Tensor, axis: int) -> torch.Tensor:
    flat = g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1])  # explicit size: works for empty tensors too
    return flat if axis == -1 else flat.transpose(-1, -2)


def check_group(dim: int, group_size: int, what: str) -> None:
    if group_size <= 0 or dim % group_size:
        raise ValueError(f"group_size must be a positive divisor of the {what} ({dim}), got {group_size}")


def quantize(x: torch.Tensor, bits: int, group_size: int, axis: int = -1) -> QTensor:
    """Asymmetric min-max quantization of x (..., T, D) in groups of `group_size` along `axis` (-1 or -2)."""
    check_bits(bits)
    if axis not in (-1, -2):
        raise ValueError(f"axis must be -1 (per token) or -2 (per channel), got {axis}")
    check_group(x.shape[axis], group_size, "head_dim" if axis == -1 else "token count")
    g = _grouped(x.float(), group_size, axis)
    lo, hi = g.amin(-1), g.amax(-1)
    levels = (1 << bits) - 1
    zero = _fp16_down(lo)
    # a tensor divisor: CUDA torch divides by a Python scalar as a multiply by its reciprocal (one bit off at
    # times), which would make the same tensor quantize to other bytes on a GPU than on the CPU or in the kernels
    scale = _fp16_up((hi - zero.float()) / torch.full_like(hi, levels))
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round((g - zero.float().unsqueeze(-1)) / safe), torch.zeros_like(g))
    codes = codes.clamp_(0, levels).to(torch.uint8)
    codes = _ungrouped(codes, axis)
    if axis == -2:  # store (..., T/G, D) so a token block's scales are contiguous
        scale, zero = scale.transpose(-1, -2), zero.transpose(-1, -2)
    return QTensor(pack(codes, bits), scale.contiguous(), zero.contiguous(), bits, group_size, axis)


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes * scale + zero, computed in fp32, returned as (..., T, D) in `dtype`."""
    codes = unpack(q.codes, q.bits).float()  # (..., T, D)
    scale, zero = q.scale.float(), q.zero.float()
    if q.axis == -1:
        g = codes.reshape(*codes.shape[:-1], codes.shape[-1] // q.group_size, q.group_size)  # (..., T, D/G, G)
        out = g * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return out.reshape(codes.shape).to(dtype)
    # per channel: scale (..., T/G, D) broadcast over the G tokens of each block
    g = codes.reshape(*codes.shape[:-2], codes.shape[-2] // q.group_size, q.group_size, codes.shape[-1])  # (..., T/G, G, D)
    out = g * scale.unsqueeze(-2) + zero.unsqueeze(-2)
    return out.reshape(codes.shape).to(dtype)


def token_ranges(q: QTensor) -> torch.Tensor:
    """Each token's range (max - min over its channels) of a per-token QTensor (..., n, groups) as stored, read from
    its groups' scales and zeros (quantize maps a group's max to code 2^bits - 1 and its min to 0): (..., n) fp32,
    without dequantizing."""
    zero = q.zero.float()
    return (zero + q.scale.float() * ((1 << q.bits) - 1)).amax(-1) - zero.amin(-1)


_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def as_words(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors (last dimension contiguous) viewed as the widest words that every one's row bytes, strides and
    address divide into, the same for all (as they are): a row moved or gathered element by element moves a word
    an element, so packed codes byte by byte run at a fraction of the copy bandwidth."""
    g = 8   # the widest word (8, 4 or 2 bytes) dividing all of them divides their gcd with 8
    for t in ts:
        es = t.element_size()
        g = math.gcd(g, t.shape[-1] * es, t.data_ptr(), *(st * es for st in t.stride()[:-1]))
    w = _WORDS.get(g)
    return [t.view(w) for t in ts] if w is not None else list(ts)


def take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` (..., k) of `t` (..., n, F) along its token axis: (..., k, F). Each row is gathered in the widest
    words its bytes divide into (`as_words`): a gather reads one 8-byte index an element, so byte by byte (packed
    codes) it reads 9 bytes a byte moved (on the H200, 70% of append's demotion time; whole rows by `index_select`
    were slower still)."""
    words, = as_words(t if t.stride(-1) == 1 else t.contiguous())
    out = words.gather(-2, idx[..., None].expand(*idx.shape, words.shape[-1]))
    return out.view(t.dtype)


def cat(parts: list[QTensor]) -> QTensor:
    """Concatenate quantized tensors of one format along the token axis."""
    first = parts[0]
    if len(parts) == 1:
        return first
    return QTensor(torch.cat([p.codes for p in parts], -2), torch.cat([p.scale for p in parts], -2),
                   torch.cat([p.zero for p in parts], -2), first.bits, first.group_size, first.axis)
