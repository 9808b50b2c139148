"""True-byte accounting: every number comes from the nbytes of tensors a cache actually holds.

Layers with growable buffers (`smartkv.cache.buffers`: preallocated rows that appends write into) count the rows in
use only, so a report is the same whichever path filled the cache and however much room was reserved. The
unused capacity is reported apart, by `SmartKVCache.slack_bytes()` (bounded by `storage.GROWTH`, or by what
`SmartKVCache.reserve` asked for).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

CATEGORIES = ("payload", "metadata", "residual")


@dataclass
class MemoryReport:
    """What a cache holds, in bytes, against what DynamicCache holds for the same model and tokens at 16 bits.

    fp16_bytes: that reference: 2 bytes per key and value element DynamicCache's layers hold, i.e. every token on
        full-attention layers and the last window - 1 on sliding-window ones (Gemma 3's 15 of 18 layers).
    payload_bytes: quantization codes (for `fp16`, the stored tensors themselves).
    metadata_bytes: scales, zeros, bit maps, offsets, importance statistics, normalisation vectors.
    residual_bytes: full-precision windows (recent tokens, sinks, KIVI's residual) in the model dtype.
    payload_ratio: avg_bits / 16, the nominal ratio papers quote (KIVI 2/4: 0.1875).
    total_ratio: total_bytes / fp16_bytes: the honest ratio, everything counted; comparisons use this one.
    avg_bits: mean over keys and values of the average code width of their quantized elements (16 when
        nothing is quantized), the "effective bits" convention of the memory math in the KIVI paper.
    """
    tokens: int = 0
    fp16_bytes: int = 0
    payload_bytes: int = 0
    metadata_bytes: int = 0
    residual_bytes: int = 0
    total_bytes: int = 0
    payload_ratio: float = 0.0
    total_ratio: float = 0.0
    avg_bits: float = 0.0
    quantized_elements: int = 0
    per_layer: list[dict] = field(default_factory=list, repr=False)

    def as_dict(self, per_layer: bool = False) -> dict:
        d = asdict(self)
        if not per_layer:
            d.pop("per_layer")
        return d


@dataclass
class LayerBytes:
    payload: int = 0
    metadata: int = 0
    residual: int = 0
    quantized_elements: int = 0   # elements stored as codes
    code_bits: int = 0            # sum of code widths over those elements
    k_elements: int = 0           # the same, keys and values apart
    k_bits: int = 0
    v_elements: int = 0
    v_bits: int = 0
    elements: int = 0             # K and V elements DynamicCache's layer holds (tokens x heads x dim x 2 x batch)
    tokens: int = 0               # tokens this layer holds (on a sliding layer: about its window)

    def add(self, category: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
        setattr(self, category, getattr(self, category) + tensor.numel() * tensor.element_size())

    def add_codes(self, codes: torch.Tensor | None, bits: int, kind: str) -> None:
        """Packed codes of keys (kind "k") or values ("v"): payload bytes and the elements they stand for."""
        if codes is None or codes.numel() == 0:
            return
        self.add("payload", codes)
        self._count(codes.numel() * 8 // bits, bits, kind)

    def _count(self, n: int, bits: int, kind: str) -> None:
        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        self.quantized_elements += n
        self.code_bits += n * bits
        setattr(self, f"{kind}_elements", getattr(self, f"{kind}_elements") + n)
        setattr(self, f"{kind}_bits", getattr(self, f"{kind}_bits") + n * bits)


    def add_full(self, tensor: torch.Tensor | None, kind: str) -> None:
        """Unquantized storage that IS the payload (the `fp16` method): its width counts as its code width."""
        if tensor is None or tensor.numel() == 0:
            return
        self.add("payload", tensor)
        self._count(tensor.numel(), tensor.element_size() * 8, kind)


def summarize(layers: list[LayerBytes], tokens: int) -> MemoryReport:
    payload = sum(lb.payload for lb in layers)
    metadata = sum(lb.metadata for lb in layers)
    residual = sum(lb.residual for lb in layers)
    elements = sum(lb.elements for lb in layers)
    q_elems = sum(lb.quantized_elements for lb in layers)
    fp16_bytes = elements * 2
    total = payload + metadata + residual
    widths = []
    for kind in ("k", "v"):
        n = sum(getattr(lb, f"{kind}_elements") for lb in layers)
        if n:
            widths.append(sum(getattr(lb, f"{kind}_bits") for lb in layers) / n)
    avg_bits = sum(widths) / len(widths) if widths else 16.0
    return MemoryReport(
        tokens=tokens, fp16_bytes=fp16_bytes, payload_bytes=payload, metadata_bytes=metadata,
        residual_bytes=residual, total_bytes=total, payload_ratio=avg_bits / 16,
        total_ratio=total / fp16_bytes if fp16_bytes else 0.0, avg_bits=avg_bits, quantized_elements=q_elems,
        per_layer=[vars(lb).copy() for lb in layers])
