"""An append layer's class buffers as views of one allocation (append.py: the first allocation and `_append_reserve`).

Every class's keys and values (codes, scales, zero points) come from one zeroed block and, while the ring fills, its
rows' importance codes from another (the ring's buffers from a third): a first allocation makes three allocations
and fills where it made six a class, two more a class for the importance codes and nine for the ring. A prefill is
bound by host work a layer, each dispatch ~15 us on the GPU host (docs/smartkv.md, the prefill's ladder). A class
that outgrows its buffers regrows every class into a new block, so no block outlives its views with rows that
nothing reads; what the views leave of a block for alignment is counted as slack (`padding`)."""
from __future__ import annotations

import math

import torch

from smartkv.core.quant import QTensor
from smartkv.methods.smartkv import classmap

ALIGN = 16   # bytes: each view starts where the kernels' vector loads and Triton's alignment specialization ask


def carve(specs: list, device, fill: int = 0) -> list[torch.Tensor]:
    """Tensors of `specs` ((shape, dtype) each) as views of one block, each 16-byte aligned, every byte `fill`."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // ALIGN) * ALIGN
    block = torch.full((total,), fill, dtype=torch.uint8, device=device)
    return [block[at:at + size].view(dtype).view(shape) for (shape, dtype), at, size in zip(specs, offsets, sizes)]


def qtensor_specs(layer, rows: int, bits: int, layers: int = 1) -> list:
    """`carve` specs of a per-token QTensor of `layer`'s (B, H, rows, .) at `bits`: codes, scales, zero points (of
    `layers` such layers stacked on the batch dimension)."""
    B, H, D = layer.batch_size * layers, layer.num_heads, layer.head_dim
    return [((B, H, rows, D * bits // 8), torch.uint8)] + [((B, H, rows, D // layer.group), torch.float16)] * 2


def take_qtensor(views, layer, bits: int) -> QTensor:
    """The next three views of `views` (an iterator over `carve`'s, laid out by `qtensor_specs`) as a QTensor."""
    return QTensor(next(views), next(views), next(views), bits, layer.group, -1)


def class_buffers(layer, widths: list, caps: list, importance: bool, layers: int = 1) -> tuple[list, list, list]:
    """Empty buffers of `layer`'s classes (`widths` (key width, value width), `caps` rows each): per-token QTensors
    of keys and values (B, H, cap, .) and, with `importance`, (B, H, cap) uint8 importance codes (else None); with
    `layers`, those of that many layers alike stacked on the batch dimension (place.py)."""
    specs = [spec for (kw, vw), cap in zip(widths, caps) for bits in (kw, vw)
             for spec in qtensor_specs(layer, cap, bits, layers)]
    views = iter(carve(specs, layer.device))
    ks, vs = [], []
    for kw, vw in widths:
        ks.append(take_qtensor(views, layer, kw))
        vs.append(take_qtensor(views, layer, vw))
    # the importance codes in a block of their own: they go when the ring is full, the classes stay
    B, H = layer.batch_size * layers, layer.num_heads
    imps = carve([((B, H, cap), torch.uint8) for cap in caps], layer.device) if importance else [None] * len(caps)
    return ks, vs, imps


def stacked_caps(caps: list) -> list:
    """Class capacities in a group's stacked block (place.py, stacked.py): rows a multiple of 16, so each layer's
    rows of a buffer start ALIGN-aligned."""
    return [-(-cap // 16) * 16 for cap in caps]


def stacked_map_positions(positions: int) -> int:
    """Positions a layer's class map holds in a group's stacked map, at least `positions`: its bytes a multiple of
    16, so each layer's map starts ALIGN-aligned."""
    return 2 * (-(-classmap.map_bytes(positions) // 16) * 16 - 1)


def layer_rows(t: torch.Tensor, B: int) -> list[torch.Tensor]:
    """Each layer's (B, ...) rows of a group's stacked (L * B, ...) tensor: views."""
    return list(t.split(B))


def layer_qtensors(q: QTensor, B: int) -> list[QTensor]:
    """Each layer's (B, ...) rows of a group's stacked QTensor: views."""
    return [QTensor(c, s, z, q.bits, q.group_size, q.axis) for c, s, z in zip(*(layer_rows(t, B) for t in
                                                                                 (q.codes, q.scale, q.zero)))]


def copy_rows(old: QTensor, new: QTensor, rows: int) -> None:
    """A per-token QTensor's first `rows` rows (codes, scales, zero points) into `new`'s (a class's grown buffers)."""
    for src, dst in zip((old.codes, old.scale, old.zero), (new.codes, new.scale, new.zero)):
        dst[..., :rows, :] = src[..., :rows, :]


def padding(views: list, share: int = 1) -> int:
    """Bytes of the block under `views` (all of one block, `carve`'s) that none of them covers: held, and counted
    as slack; with `share`, the block holds that many layers' views alike (place.py) and this is one's part (the
    block's spare bytes split evenly, rounded down)."""
    if not views:
        return 0
    return (views[0].untyped_storage().nbytes() - share * sum(t.numel() * t.element_size() for t in views)) // share
