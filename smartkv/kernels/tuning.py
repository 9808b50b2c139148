"""Every launch config of the kernels, one table per card, and `override` to try another.

The kernels read `current()` at each launch; nothing else holds a launch choice. Benchmarks and tests change a
config only through `override(...)` (a context manager) or `use(table)`, never by editing module globals.

    with tuning.override(split={TOK: Tuning(block_n=64)}, pool={"values_warps": 4}):
        ...   # launches in here use the changed entries; the table is restored on exit

Numbers behind the defaults are in BENCHMARKS.md (decode attention, SmartKV cache step) and the sweeps that
chose them are `benchmarks/bench_attention.py --sweep` and `benchmarks/sweep_pool_configs.sh`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from smartkv.kernels.launch import cdiv

FP, TOK, CHAN = 0, 1, 2  # key layouts: full precision, per-token groups, per-channel groups (KIVI keys)
WIDE = "wide"            # (TOK, WIDE): per-token keys whose dots have more than 16 columns


@dataclass(frozen=True)
class Tuning:
    """Launch choices of the split-K decode kernel for one key layout."""
    block_n: int = 64          # tokens per inner step (per-channel keys: 0 for as many groups as the query has
                               # column sets, 16 / query heads per KV head; or fewer whole groups)
    num_warps: int = 4
    num_stages: int = 2
    prefetch: int = 1          # 1: scales/zeros loaded one block ahead; 2: code words too; 0: at use; 3: pipelined
    maxnreg: int | None = None # register cap (more programs per SM, maybe spills)
    programs_per_sm: int = 0   # 0: splits by whole waves (split._splits); n > 0: until the grid has ~n per SM
    min_split_tokens: int = 256
    # 1: 0x6400 trick (exact fp16 integers); 0: codes as fp16 subnormals; 2: as 0, two codes per word op;
    # 3: as 2, shifting by whole bytes only (codes read as code * 2^(place in byte * bits), undone per channel)
    code_mode: int = 3
    # The merge launch (one program per sequence and query head over every split of every segment) reads
    # merge_block_s partials a step with merge_warps warps; the largest of the segments' settings wins. With
    # fewer merge programs than SMs (batch 1) the merge is one latency-bound wave and the few_ settings apply:
    # 128 / 4 is faster there and slower at batch 8 and 48 (H200).
    merge_block_s: int = 16
    merge_warps: int = 1
    few_merge_block_s: int = 128
    few_merge_warps: int = 4


@dataclass(frozen=True)
class PoolTuning:
    """SmartKV's two passes (triton_pool): tokens per block of the scores pass and of the values pass's loop, warps
    of each, the fewest tokens per split of the values pass (its split size is planned by whole waves of the
    card, splits_of), and whether pools pack query heads into their dots' columns."""
    scores_block: int = 128
    values_block: int = 32
    num_warps: int = 4
    values_warps: int = 1
    split_tokens: int = 128
    pack_heads: int = 1


@dataclass(frozen=True)
class PositionsTuning:
    """SmartKV's pool positions (triton_pool): tokens per program of the level-count and positions launches."""
    block: int = 1024
    warps: int = 4


@dataclass(frozen=True)
class CudaTuning:
    """The CUDA decode-attention path (cuda_attn): warps per block, stages in each warp's cp.async ring, blocks
    per SM its registers must allow (a register cap), and the fewest cached tokens (batch x tokens) it takes:
    below, the Triton kernels do."""
    warps: int = 4
    stages: int = 2
    min_blocks: int = 3
    min_tokens: int = 16384


@dataclass(frozen=True)
class Table:
    """All launch configs for one card."""
    split: dict = field(default_factory=dict)  # key layout, or (layout, key bits | WIDE) -> Tuning
    pool: PoolTuning = PoolTuning()
    positions: PositionsTuning = PositionsTuning()
    quant_warps: int = 4                       # quantize-and-pack kernels (triton_quant)
    cuda: CudaTuning = CudaTuning()


# Hopper (H100, H200): the fastest of the sweeps at batch 8 / 32K. Per-token keys: one-warp programs of 32
# tokens (H200: int4 12%, int8 25% faster than 4 warps x 128 tokens), splits down to 64 tokens; int8 loads its
# words at use (prefetching them spills). (TOK, WIDE): where a one-warp program would hold a 32-row accumulator
# alone and spill (sm_90 SASS, 8 query heads per KV head: 72 bytes of stack), 4 warps x 128 tokens. Pools:
# scores blocks of 128 (132 us at 32K x 8 against 148 at 64), values one warp over blocks of 32 with splits
# planned by waves of 128 tokens at least. CUDA path (H200, 2026-12-02, bench_ladder at 32K x 8): 4 warps x 2
# stages at 3 blocks per SM, int4 105.6 us against 110.4 (3 stages, no cap), 111.0 (4 blocks: 128 registers),
# 113.7 (8 warps), 125.0 (2 warps); below 16K cached tokens Triton is faster (4K x 1: int4 12.1 us vs 13.8,
# kivi2 13.7 vs 23.5; from 4K x 8 the CUDA path wins).
HOPPER = Table(split={FP: Tuning(block_n=64, prefetch=0),
                      TOK: Tuning(block_n=32, num_warps=1, prefetch=2, min_split_tokens=64),
                      (TOK, 8): Tuning(block_n=32, num_warps=1, prefetch=0, min_split_tokens=64),
                      (TOK, WIDE): Tuning(block_n=128, prefetch=2),
                      CHAN: Tuning(block_n=0, num_stages=1, code_mode=1, prefetch=2)})

# card name (a substring of torch.cuda.get_device_name) -> table; other cards use DEFAULT, which is the only
# table measured so far.
TABLES = {"H100": HOPPER, "H200": HOPPER}
DEFAULT = HOPPER

_active: Table | None = None   # set by use()/override(); None: the table of the current card
_by_device: dict[int, Table] = {}


def for_card(name: str) -> Table:
    return next((t for key, t in TABLES.items() if key in name), DEFAULT)


def current() -> Table:
    """The table launches use now: an override if one is active, else the current CUDA card's."""
    if _active is not None:
        return _active
    if not torch.cuda.is_available():
        return DEFAULT
    idx = torch.cuda.current_device()
    if idx not in _by_device:
        _by_device[idx] = for_card(torch.cuda.get_device_name(idx))
    return _by_device[idx]


def use(table: Table | None) -> Table | None:
    """Make `table` the active one (None: back to the card's); returns the previous active table."""
    global _active
    previous, _active = _active, table
    return previous


def with_changes(table: Table, split: dict | None = None, pool: dict | None = None,
                 positions: dict | None = None, quant_warps: int | None = None, cuda: dict | None = None) -> Table:
    """`table` with some entries replaced: `split` maps keys to whole Tunings, or to dicts of changed fields."""
    new_split = dict(table.split)
    for key, value in (split or {}).items():
        new_split[key] = value if isinstance(value, Tuning) else dataclasses.replace(table.split[key], **value)
    return Table(split=new_split,
                 pool=dataclasses.replace(table.pool, **(pool or {})),
                 positions=dataclasses.replace(table.positions, **(positions or {})),
                 quant_warps=table.quant_warps if quant_warps is None else quant_warps,
                 cuda=dataclasses.replace(table.cuda, **(cuda or {})))


@contextlib.contextmanager
def override(table: Table | None = None, **changes):
    """Launch with `table` (default: the current one) changed by `changes` (see `with_changes`) inside the block."""
    previous = use(with_changes(table or current(), **changes))
    try:
        yield _active
    finally:
        use(previous)


def split_tuning(kind: int, bits: int, columns: int = 16) -> Tuning:
    """Split-kernel config for keys of `kind` at `bits`, whose dots have `columns` columns (per-token kinds)."""
    table = current().split
    tune = table.get((kind, bits), table[kind])
    return table[(TOK, WIDE)] if kind == TOK and tune.num_warps == 1 and columns > 16 else tune


# the card's programs at once and the split-size cost model, shared by the specialised and the batched kernels
_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def programs_per_sm(num_warps: int) -> int:
    """Programs of `num_warps` warps an SM is taken to hold at once before a kernel's own residency is known: 8
    warps' worth (the split kernels take ~240 registers a thread)."""
    return max(1, 8 // num_warps)


SPLIT_OVERHEAD_BLOCKS = 1.5  # a program's fixed cost (query, value-scale pass, partial store) in blocks of tokens


def _splits(blocks: int, programs: int, slots: int, min_blocks: int) -> int:
    """Blocks per split for `programs` (batch x KV heads) sequences of `blocks` blocks each, when `slots`
    programs run at once on the card: the fewest waves' worth of time, ceil(programs x splits / slots) x
    (blocks per split + SPLIT_OVERHEAD_BLOCKS). A last wave that is mostly empty costs as much as a full one:
    at 32K x 48 (384 sequences, 264 slots) 3 splits take 5 waves where 2 take 3 (measured 10% apart)."""
    return splits_of((blocks,), programs, slots, min_blocks)


@functools.lru_cache(maxsize=4096)
def splits_of(blocks: tuple[int, ...], programs: int, slots: int, min_blocks: int) -> int:
    """`_splits` for one launch whose programs cover several segments of `blocks` blocks per sequence each, all
    cut at one split size (SmartKV's values pass). Under the cost model the best size is the smallest one that
    gives some segment a given split count, so only those are tried: O(sum sqrt(blocks)) candidates."""
    sizes = {max(min_blocks, 1)}
    for b in blocks:
        n = 1
        while (per := cdiv(b, n)) > min_blocks:   # each distinct size of b's splits once
            sizes.add(per)
            n = cdiv(b, per - 1)
    best = None
    for per in sorted(sizes, reverse=True):
        n_splits = sum(cdiv(b, per) for b in blocks)
        cost = cdiv(programs * n_splits, slots) * (per + SPLIT_OVERHEAD_BLOCKS)
        if best is None or cost < best[0] + 1e-9:  # ties: the smaller split
            best = (cost, per)
    return best[1]
