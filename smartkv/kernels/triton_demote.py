"""Triton kernels of one demotion move of SmartKV's append layers (methods/smartkv/demote.py), a launch or two each:
the class's rows' weights as top-k keys (`demotion_keys_triton`), which rows go and where every row of the class c
and of its target t goes (`merge_plan_triton`), the leaving rows re-quantized at t's widths
(`requantize_rows_triton`) and both classes' rows moved (`move_rows_many_triton`). As torch ops a move was ~130
launches (weights ~25, re-quantization ~25, 28 row moves), ~300 a layer's filling flush: the flush was launch-bound.

A move takes flagged rows of class c to class t, keeping both in position order. The maps follow from a scan over
the middle's positions (class c's rows are the positions of class c, in order; t's likewise; the class map holds 4
bits a position, two a byte): per position, its row in c or t from running counts, whether it moves (its c row
flagged), and its row in t after the merge. As torch ops these are three prefix sums over every position, two sorts
and a dozen elementwise passes (torch scans a row of 32K positions in one program, 44 us each on the H200); here one
program per (sequence, KV head) row walks its positions in blocks, carrying the counts from block to block, and
another compacts the class's rows.

The rows themselves then move (`move_rows_many_triton`) in two passes over a grid of (sequence, KV head) x row
blocks: each row whose source differs is staged from its source, then every staged row is put in place (a row that
is its own source is not touched), a row as the widest words its bytes divide into (int64 for packed codes), all of
a class's tensors (keys' and values' codes, scales, zeros, importance) in one launch a pass, reading the row map
once. One program a
(sequence, KV head) row walking its blocks in order could move them in place without the staging buffer, but a walk
of 10K rows is latency-bound: 550 us a move at 32K x 8 on the H200, 15 ms a layer's filling flush.

The keys and the re-quantized bytes equal the torch paths' (kernels/reference.py) bit for bit: importance decoded
through one table, no fused multiply-adds (`enable_fp_fusion=False`), core's rounding of scales and codes.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from smartkv.core.quant import QTensor, as_words, packed_width
from smartkv.kernels.launch import cdiv, launch, pow2
from smartkv.kernels.triton_pool import _pool_tile
from smartkv.kernels.triton_quant import _codes, _store_packed


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
    launch(_merge_plan_kernel, (B * H, 2), cm, cm.stride(1), n_all, gone, gone.stride(1), Cc, k, H, order,
           order.stride(1), Ct, keep, keep.stride(1), cid, tid, BLOCK=4096, num_warps=8)
    return order, keep


@triton.jit
def _token_range(s_ptr, z_ptr, off, r, m, L: tl.constexpr, NG: tl.constexpr):
    """Each row's range (max - min over its channels) from its groups' fp16 scales and zeros, as
    `core.quant.token_ranges` computes it (a group's largest code is L, its smallest 0)."""
    o = off + r[:, None] * NG + tl.arange(0, NG)[None, :]
    s = tl.load(s_ptr + o, mask=m[:, None], other=0.0).to(tl.float32)
    z = tl.load(z_ptr + o, mask=m[:, None], other=0.0).to(tl.float32)
    return tl.max(z + s * L, axis=1) - tl.min(z, axis=1)


@triton.jit(do_not_specialize=["C", "s_code", "s_k", "s_v"])
def _keys_kernel(code_ptr, s_code, table_ptr, ks_ptr, kz_ptr, s_k, vs_ptr, vz_ptr, s_v, len_ptr, floor_ptr, kmul_ptr,
                 key_ptr, C, H, KL: tl.constexpr, VL: tl.constexpr, KNG: tl.constexpr, VNG: tl.constexpr,
                 POWER: tl.constexpr, SENS: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = r < C
    code = tl.load(code_ptr + bh.to(tl.int64) * s_code + r, mask=inb, other=255)
    x = tl.load(table_ptr + code.to(tl.int32)) + tl.load(floor_ptr + bh)
    if POWER == 0:
        w = tl.full(x.shape, 1.0, tl.float32)
    elif POWER == 1:
        w = x
    else:
        w = x * x
    if SENS:
        a = _token_range(ks_ptr, kz_ptr, bh.to(tl.int64) * s_k, r, inb, KL, KNG) * tl.load(kmul_ptr + bh)
        b = _token_range(vs_ptr, vz_ptr, bh.to(tl.int64) * s_v, r, inb, VL, VNG)
        w = w * (a * a + b * b)
    w = tl.where(r < tl.load(len_ptr + bh // H), w, float("inf"))
    key = (w.to(tl.int32, bitcast=True).to(tl.int64) << 32) | r.to(tl.int64)
    tl.store(key_ptr + bh.to(tl.int64) * C + r, key, mask=inb)


def demotion_keys_triton(codes: torch.Tensor, kq, vq, length: torch.Tensor, floor: torch.Tensor,
                         kmul: torch.Tensor, power: int, sensitivity: bool, table: torch.Tensor) -> torch.Tensor:
    B, H, C = codes.shape
    key = torch.empty(B, H, C, dtype=torch.int64, device=codes.device)
    block = 256
    # no fused multiply-adds: the weights round as torch's separate multiplies and adds do, so both order alike
    launch(_keys_kernel, (B * H, cdiv(C, block)),
           codes, codes.stride(1), table, kq.scale, kq.zero, kq.scale.stride(1), vq.scale, vq.zero, vq.scale.stride(1),
           length, floor, kmul, key, C, H, KL=(1 << kq.bits) - 1, VL=(1 << vq.bits) - 1, KNG=kq.scale.shape[-1],
           VNG=vq.scale.shape[-1], POWER=power, SENS=sensitivity, BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return key


@triton.jit(do_not_specialize=["C", "s_code"])
def _imp_sum_kernel(code_ptr, s_code, table_ptr, len_ptr, out_ptr, C, H, ACC: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    n = tl.minimum(tl.load(len_ptr + bh // H).to(tl.int32), C)
    acc = tl.zeros((BLOCK,), tl.float32)
    for r0 in range(0, n, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        code = tl.load(code_ptr + bh.to(tl.int64) * s_code + r, mask=r < n, other=255)
        acc += tl.where(r < n, tl.load(table_ptr + code.to(tl.int32)), 0.0)
    total = tl.sum(acc, axis=0)
    if ACC:
        total += tl.load(out_ptr + bh)
    tl.store(out_ptr + bh, total)


def importance_sum_triton(codes: torch.Tensor, length: torch.Tensor, out: torch.Tensor, accumulate: bool,
                          table: torch.Tensor) -> torch.Tensor:
    B, H, C = codes.shape
    launch(_imp_sum_kernel, (B * H,), codes, codes.stride(1), table, length, out, C, H, ACC=accumulate, BLOCK=512,
           num_warps=4)
    return out


@triton.jit
def _requant_one(w_ptr, s_ptr, z_ptr, N, bh, rows, valid, oc_ptr, os_ptr, oz_ptr, out_row,
                 SB: tl.constexpr, DB: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Rows `rows` of one (sequence, KV head) row bh of a pool at SB bits, dequantized (codes x scale + zero, as
    `core.quant.dequantize`) and quantized again at DB bits into rows `out_row` of the outputs."""
    c, scale, zero = _pool_tile(w_ptr, s_ptr, z_ptr, N, bh, rows, valid, SB, G, D, BLOCK)
    NG: tl.constexpr = D // G
    x = tl.reshape(c.to(tl.float32), (BLOCK, NG, G)) * scale[:, :, None] + zero[:, :, None]
    codes, sc, zr = _codes(x, tl.min(x, axis=2)[:, :, None], tl.max(x, axis=2)[:, :, None], (1 << DB) - 1)
    _store_packed(oc_ptr, out_row * (D * DB // 8), valid, tl.reshape(codes, (BLOCK, D)), DB, D, BLOCK)
    so = out_row[:, None] * NG + tl.arange(0, NG)[None, :]
    tl.store(os_ptr + so, tl.reshape(sc, (BLOCK, NG)), mask=valid[:, None])
    tl.store(oz_ptr + so, tl.reshape(zr, (BLOCK, NG)), mask=valid[:, None])


@triton.jit(do_not_specialize=["N", "s_keep", "s_code", "K"])
def _requant_kernel(kw, ks, kz, vw, vs, vz, N, keep_ptr, s_keep, k_ptr, H, code_ptr, s_code, K,
                    okc, oks, okz, ovc, ovs, ovz, oimp, KSB: tl.constexpr, KDB: tl.constexpr, VSB: tl.constexpr,
                    VDB: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    k = tl.load(k_ptr + bh // H)
    valid = j < k
    # the rows that leave: the last k of `keep` (rows that stay first, then those that go, each in row order)
    rows = tl.load(keep_ptr + bh.to(tl.int64) * s_keep + N - k + j, mask=valid, other=0)
    out_row = bh.to(tl.int64) * K + j
    if tl.program_id(2) == 0:
        _requant_one(kw, ks, kz, N, bh, rows, valid, okc, oks, okz, out_row, KSB, KDB, G, D, BLOCK)
        imp = tl.load(code_ptr + bh.to(tl.int64) * s_code + rows, mask=valid, other=0)
        tl.store(oimp + out_row, imp, mask=valid)
    else:
        _requant_one(vw, vs, vz, N, bh, rows, valid, ovc, ovs, ovz, out_row, VSB, VDB, G, D, BLOCK)


def requantize_rows_triton(kq, vq, codes: torch.Tensor, keep: torch.Tensor, k: torch.Tensor, k_max: int,
                           bits: tuple[int, int]):
    B, H, N = keep.shape
    G = kq.group_size
    D = kq.scale.shape[-1] * G
    dev = keep.device
    outs = [QTensor(torch.empty(B, H, k_max, packed_width(D, b), dtype=torch.uint8, device=dev),
                    torch.empty(B, H, k_max, D // G, dtype=torch.float16, device=dev),
                    torch.empty(B, H, k_max, D // G, dtype=torch.float16, device=dev), b, G, -1) for b in bits]
    imp = torch.empty(B, H, k_max, dtype=torch.uint8, device=dev)
    block = 32   # 3-bit tiles of 16 rows summed wrong on an H200 (triton_pool._block)
    launch(_requant_kernel, (B * H, cdiv(k_max, block), 2),
           kq.codes.view(torch.int32), kq.scale, kq.zero, vq.codes.view(torch.int32), vq.scale, vq.zero, N, keep,
           keep.stride(1), k, H, codes, codes.stride(1), k_max, *(t for q in outs for t in (q.codes, q.scale, q.zero)),
           imp, KSB=kq.bits, KDB=bits[0], VSB=vq.bits, VDB=bits[1], G=G, D=D, BLOCK=block, num_warps=4,
           enable_fp_fusion=False)
    return outs[0], outs[1], imp


@triton.jit
def _move_slot(x_ptr, s_x, f_ptr, t_ptr, bh, r, s, moved, own, C, K, F: tl.constexpr, BLOCK_F: tl.constexpr,
               HAS_FRESH: tl.constexpr, PUT: tl.constexpr):
    """One tensor's rows of a row block (`_move_many_kernel`): rows F words wide; the staging buffer t and the
    fresh rows dense (B, H, C or K, F)."""
    cols = tl.arange(0, BLOCK_F)
    m2 = moved[:, None] & (cols < F)[None, :]
    x_row = x_ptr + bh.to(tl.int64) * s_x
    t_row = t_ptr + bh.to(tl.int64) * C * F
    if PUT:   # pass 2: the staged rows into place
        v = tl.load(t_row + r[:, None] * F + cols[None, :], mask=m2)
        tl.store(x_row + r[:, None] * F + cols[None, :], v, mask=m2)
    else:     # pass 1: every moved row's source staged (no row is written before all are read)
        v = tl.load(x_row + s[:, None] * F + cols[None, :], mask=m2 & own[:, None], other=0)
        if HAS_FRESH:
            f_row = f_ptr + bh.to(tl.int64) * K * F
            vf = tl.load(f_row + (s - C)[:, None] * F + cols[None, :], mask=m2 & ~own[:, None], other=0)
            v = tl.where(own[:, None], v, vf)
        tl.store(t_row + r[:, None] * F + cols[None, :], v, mask=m2)


@triton.jit(do_not_specialize=["C", "K", "s_src", "s0", "s1", "s2", "s3", "s4", "s5", "s6"])
def _move_many_kernel(src_ptr, s_src, n_ptr, H, C, K,
                      x0, s0, f0, t0, x1, s1, f1, t1, x2, s2, f2, t2, x3, s3, f3, t3, x4, s4, f4, t4,
                      x5, s5, f5, t5, x6, s6, f6, t6,
                      F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr, F4: tl.constexpr,
                      F5: tl.constexpr, F6: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                      P3: tl.constexpr, P4: tl.constexpr, P5: tl.constexpr, P6: tl.constexpr, NX: tl.constexpr,
                      HAS_N: tl.constexpr, HAS_FRESH: tl.constexpr, PUT: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = C
    if HAS_N:
        n = tl.load(n_ptr + bh // H)
    valid = r < n
    s = tl.load(src_ptr + bh.to(tl.int64) * s_src + r, mask=valid, other=0)
    moved = valid & (s != r)   # a row that is its own source is neither read nor written
    own = s < C
    _move_slot(x0, s0, f0, t0, bh, r, s, moved, own, C, K, F0, P0, HAS_FRESH, PUT)
    if NX > 1:
        _move_slot(x1, s1, f1, t1, bh, r, s, moved, own, C, K, F1, P1, HAS_FRESH, PUT)
    if NX > 2:
        _move_slot(x2, s2, f2, t2, bh, r, s, moved, own, C, K, F2, P2, HAS_FRESH, PUT)
    if NX > 3:
        _move_slot(x3, s3, f3, t3, bh, r, s, moved, own, C, K, F3, P3, HAS_FRESH, PUT)
    if NX > 4:
        _move_slot(x4, s4, f4, t4, bh, r, s, moved, own, C, K, F4, P4, HAS_FRESH, PUT)
    if NX > 5:
        _move_slot(x5, s5, f5, t5, bh, r, s, moved, own, C, K, F5, P5, HAS_FRESH, PUT)
    if NX > 6:
        _move_slot(x6, s6, f6, t6, bh, r, s, moved, own, C, K, F6, P6, HAS_FRESH, PUT)


MAX_MOVED = 7   # tensors `move_rows_many_triton` moves in one launch a pass (a class's keys, values, importance)


def move_rows_many_triton(xs: list, src: torch.Tensor, n: torch.Tensor | None, fresh: list | None) -> None:
    """`kernels.move_rows` over up to MAX_MOVED tensors of one (B, H, C) sharing `src`, in two launches (pass 1
    stages every moved row, pass 2 puts them in place), each reading the row map once a row block (a class's 7
    tensors moved one by one took 14 launches, each reading the whole map twice). Every x's rows dense (row stride
    = its last dimension, checked by the caller)."""
    words = [as_words(x, fresh[i]) if fresh is not None else as_words(x) for i, x in enumerate(xs)]
    # every tensor's staging rows from one allocation (a dispatch a tensor was most of a move's host time)
    sizes = [w[0].numel() * w[0].element_size() for w in words]
    block, at, slots = torch.empty(sum(-(-n // 16) * 16 for n in sizes), dtype=torch.uint8, device=src.device), 0, []
    for (x_w, *f), size in zip(words, sizes):
        f_w = f[0].contiguous() if fresh is not None else x_w
        slots.append((x_w, x_w.stride(1), f_w, block[at:at + size].view(x_w.dtype).view(x_w.shape)))
        at += -(-size // 16) * 16
    B, H, C, _ = xs[0].shape
    K = fresh[0].shape[2] if fresh is not None else 1
    widths = [sl[0].shape[-1] for sl in slots]
    slots += [slots[0]] * (MAX_MOVED - len(slots))
    widths += [widths[0]] * (MAX_MOVED - len(widths))
    grid = (B * H, cdiv(C, 64))
    # the widths are constexprs: by keyword, so the launch goes straight to the compiled kernel (`launch.launch`)
    meta = {**{f"F{i}": w for i, w in enumerate(widths)}, **{f"P{i}": pow2(w) for i, w in enumerate(widths)}}
    for put in (False, True):
        launch(_move_many_kernel, grid, src, src.stride(1), n if n is not None else src, H, C, K,
               *(a for sl in slots for a in sl), NX=len(xs), HAS_N=n is not None,
               HAS_FRESH=fresh is not None, PUT=put, BLOCK_R=64, num_warps=4, **meta)
