"""Triton bookkeeping of one demotion move of SmartKV's append layers (methods/smartkv/demote.py): which rows of
class c go (flags), where every row of c and of its target t goes, the class map updated, in one launch.

A move takes flagged rows of class c to class t, keeping both in position order. The maps follow from a scan over
the middle's positions (class c's rows are the positions of class c, in order; t's likewise; the class map holds 4
bits a position, two a byte): per position, its row in c or t from running counts, whether it moves (its c row
flagged), and its row in t after the merge. As torch ops these are three prefix sums over every position, two sorts
and a dozen elementwise passes (torch scans a row of 32K positions in one program, 44 us each on the H200); here one
program per (sequence, KV head) row walks its positions in blocks, carrying the counts from block to block, and
another compacts the class's rows.

The rows themselves then move (`move_rows_triton`) in two passes over a grid of (sequence, KV head) x row blocks:
each row whose source differs is staged from its source, then every staged row is put in place (a row that is its
own source is not touched), a row as the widest words its bytes divide into (int64 for packed codes). One program a
(sequence, KV head) row walking its blocks in order could move them in place without the staging buffer, but a walk
of 10K rows is latency-bound: 550 us a move at 32K x 8 on the H200, 15 ms a layer's filling flush; as torch ops each
move gathered both classes' whole buffers into new tensors, concatenated and copied them back (~25 launches).
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from smartkv.core.quant import as_words


@triton.jit(do_not_specialize=["n_all", "Cc", "Ct", "s_cm", "s_g", "s_o", "s_k", "cid", "tid"])
def _merge_plan_kernel(cm_ptr, s_cm, n_all, gone_ptr, s_g, Cc, k_ptr, H, order_ptr, s_o, Ct, keep_ptr, s_k,
                       cid, tid, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    part = tl.program_id(1)   # 0: the position scan; 1: the class's compaction (they share nothing)
    b = bh // H
    cm_row = cm_ptr + bh.to(tl.int64) * s_cm
    g_row = gone_ptr + bh.to(tl.int64) * s_g
    o_row = order_ptr + bh.to(tl.int64) * s_o
    k_row = keep_ptr + bh.to(tl.int64) * s_k
    ar = tl.arange(0, BLOCK)
    rc = 0   # c rows, t rows and moved rows before this block
    rt = 0
    rm = 0
    n_scan = tl.where(part == 0, n_all, 0)
    half = tl.arange(0, BLOCK // 2)
    n_bytes = (n_all + 1) // 2
    for p0 in range(0, n_scan, BLOCK):   # p0 even: a block's positions are whole bytes of the map
        p = p0 + ar
        valid = p < n_all
        j = p0 // 2 + half
        byte = tl.load(cm_row + j, mask=j < n_bytes, other=0).to(tl.int32)
        nib = tl.reshape(tl.join(byte & 15, byte >> 4), [BLOCK])   # positions p0, p0 + 1, ... in order
        cls = tl.where(valid, nib, 255)
        is_c = valid & (cls == cid)
        is_t = valid & (cls == tid)
        c_row = rc + tl.cumsum(is_c.to(tl.int32), 0) - 1
        moved = is_c & (tl.load(g_row + c_row, mask=is_c, other=0) != 0)
        before_t = rt + tl.cumsum(is_t.to(tl.int32), 0)
        before_m = rm + tl.cumsum(moved.to(tl.int32), 0)
        into = is_t | moved
        src = tl.where(is_t, before_t - 1, Ct + before_m - 1)
        dest = before_t + before_m - 1
        tl.store(o_row + dest, src.to(tl.int64), mask=into & (dest < Ct))
        lo, hi = tl.split(tl.reshape(tl.where(moved, tid, nib), [BLOCK // 2, 2]))
        tl.store(cm_row + j, (lo | (hi << 4)).to(tl.uint8), mask=j < n_bytes)   # the pair's other nibble as read
        rc += tl.sum(is_c.to(tl.int32), 0)
        rt += tl.sum(is_t.to(tl.int32), 0)
        rm += tl.sum(moved.to(tl.int32), 0)
    # class c compacted: rows that stay first, in order, then the rows that go, in order (a stable argsort of the
    # flags: rows past the class's length stay)
    stay = Cc - tl.load(k_ptr + b)
    ns = 0
    ng = 0
    n_keep = tl.where(part == 1, Cc, 0)
    for r0 in range(0, n_keep, BLOCK):
        r = r0 + ar
        valid = r < Cc
        g = tl.load(g_row + r, mask=valid, other=0) != 0
        s_ = valid & ~g
        g_ = valid & g
        at = tl.where(g_, stay + ng + tl.cumsum(g_.to(tl.int32), 0) - 1, ns + tl.cumsum(s_.to(tl.int32), 0) - 1)
        tl.store(k_row + at, r.to(tl.int64), mask=valid)
        ns += tl.sum(s_.to(tl.int32), 0)
        ng += tl.sum(g_.to(tl.int32), 0)


def merge_plan_triton(cm: torch.Tensor, n_all: int, gone: torch.Tensor, k: torch.Tensor, cid: int, tid: int,
                      Ct: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H = cm.shape[:2]
    Cc = gone.shape[-1]
    order = torch.zeros(B, H, Ct, dtype=torch.int64, device=cm.device)
    keep = torch.empty(B, H, Cc, dtype=torch.int64, device=cm.device)
    # each program walks a whole row, so few wide blocks: the walk is latency-bound (1024-position blocks took
    # 124 us a move at 32K x 8 on the H200)
    _merge_plan_kernel[(B * H, 2)](cm, cm.stride(1), n_all, gone, gone.stride(1), Cc, k, H, order, order.stride(1),
                                   Ct, keep, keep.stride(1), cid, tid, BLOCK=4096, num_warps=8)
    return order, keep


@triton.jit(do_not_specialize=["C", "F", "s_x", "s_xr", "s_src", "s_f", "s_fr", "s_t", "s_tr"])
def _move_rows_kernel(x_ptr, s_x, s_xr, C, F, src_ptr, s_src, n_ptr, H, f_ptr, s_f, s_fr, t_ptr, s_t, s_tr,
                      HAS_N: tl.constexpr, HAS_FRESH: tl.constexpr, PUT: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_F: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = C
    if HAS_N:
        n = tl.load(n_ptr + bh // H)
    valid = r < n
    s = tl.load(src_ptr + bh.to(tl.int64) * s_src + r, mask=valid, other=0)
    moved = valid & (s != r)   # a row that is its own source is neither read nor written
    cols = tl.arange(0, BLOCK_F)
    m2 = moved[:, None] & (cols < F)[None, :]
    x_row = x_ptr + bh.to(tl.int64) * s_x
    t_row = t_ptr + bh.to(tl.int64) * s_t
    if PUT:   # pass 2: the staged rows into place
        v = tl.load(t_row + r[:, None] * s_tr + cols[None, :], mask=m2)
        tl.store(x_row + r[:, None] * s_xr + cols[None, :], v, mask=m2)
    else:     # pass 1: every moved row's source staged (no row is written before all are read)
        own = s < C
        v = tl.load(x_row + s[:, None] * s_xr + cols[None, :], mask=m2 & own[:, None], other=0)
        if HAS_FRESH:
            f_row = f_ptr + bh.to(tl.int64) * s_f
            vf = tl.load(f_row + (s - C)[:, None] * s_fr + cols[None, :], mask=m2 & ~own[:, None], other=0)
            v = tl.where(own[:, None], v, vf)
        tl.store(t_row + r[:, None] * s_tr + cols[None, :], v, mask=m2)


def move_rows_triton(x: torch.Tensor, src: torch.Tensor, n: torch.Tensor | None, fresh: torch.Tensor | None) -> None:
    x, *rest = as_words(x, *([fresh] if fresh is not None else []))
    fresh = rest[0] if rest else None
    B, H, C, F = x.shape
    block_f = triton.next_power_of_2(F)
    block_r = max(16, min(256, 4096 // block_f))
    f = fresh if fresh is not None else x
    t = torch.empty(B, H, C, F, dtype=x.dtype, device=x.device)   # the moved rows staged, then put in place
    grid = (B * H, triton.cdiv(C, block_r))
    for put in (False, True):
        _move_rows_kernel[grid](x, x.stride(1), x.stride(2), C, F, src, src.stride(1), n if n is not None else src,
                                H, f, f.stride(1), f.stride(2), t, t.stride(1), t.stride(2), HAS_N=n is not None,
                                HAS_FRESH=fresh is not None, PUT=put, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4)
