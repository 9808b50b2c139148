"""The placement of a first allocation (append.py): the prompt's tokens into their classes, for the layers of one
solve at once (first.py: a group's layers share their solve, so their classes, counts and plan are the same).

Every layer's rows are stacked on the batch dimension, so each step is one launch for the group: the class ids by
rank, the sort into class order, the gathers, one quantization a class and kind straight into the group's class
buffers (one block: each layer's buffers are views of it, aligned, `arena.class_buffers`), the class map, the
window's statistics, the ring's buffers and the demotions' tables. A prefill is bound by its host work a layer
(~90 dispatches a layer where each placed its own; BENCHMARKS.md `runner_h100`). One layer is the same code with
a group of one."""
from __future__ import annotations

import math

import numpy as np
import torch

from smartkv.core.classes import joint_counts, joint_plan, staircase
from smartkv.core.importance import seen_from_ranges
from smartkv.core.policy import counts_for_budgets
from smartkv.core.transfer import host_to
from smartkv.kernels import quantize_pack
from smartkv.methods.smartkv.append import Classes
from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv.arena import (carve, class_buffers, layer_qtensors, layer_rows, qtensor_specs,
                                           stacked_caps, stacked_map_positions, take_qtensor)
from smartkv.methods.smartkv.stacked import Stack


def place(layers: list, first, budgets: list) -> None:
    """The first allocation of `layers` (one solve's: `_app_plan` set on each, the same), after their solve: `first`
    their stacked `FirstInputs` (first.py), budgets each kind's bits a token after the charge (`_append_split`).
    Each kind's counts at its budget, joint classes by weight (`joint_assign`'s, without caps: one ranking), every
    class's tokens quantized once at its widths into its buffer in position order with room for a few flushes
    (`_append_reserve` grows it); then the (empty) ring at its class, the class map, the window's importance codes
    and counts."""
    lead, L = layers[0], len(layers)
    P, lo, hi = lead.config.realloc_every, min(lead.widths), max(lead.widths)
    B, H = lead.batch_size, lead.num_heads
    Tq = first.n
    lead._warm_class_kernels()
    mix, A, plan, top, solver, solved = lead._app_plan
    for layer in layers:
        layer._app_plan = None
    # the demotion plan solved these budgets on this profile (its f = 0 pair); without a ring, solved here
    budgets = [min(max(math.floor(b * Tq + 1e-9) / Tq, lo), hi) for b in budgets]
    counts = [solved.get(b) for b in budgets]
    if None in counts:
        counts = counts_for_budgets(solver, budgets, lead.widths)
    classes = staircase(*counts)
    slots = joint_plan(classes, [Tq] * len(classes))   # nothing stored: every token may take any class
    prompt = {c: m for c, m in joint_counts(slots, Tq, (lo, lo)).items() if m}
    widths = sorted(set(prompt) | {(kw, vw) for kw, vw, _ in mix} | {t for moves in plan for _, t in moves})
    ids = {c: i for i, c in enumerate(widths)}
    per_flush = {(kw, vw): m for kw, vw, m in mix}
    # every row's tokens by weight, heaviest first (ties by position), take the slots' classes in turn and the
    # rest the lowest: `joint_assign` without caps, in one ranking (its class-by-class top-k took ~30 launches)
    by_rank = np.repeat([ids[(kw, vw)] for kw, vw, _ in slots] + [ids[(lo, lo)] if (lo, lo) in ids else 0],
                        [take for _, _, take in slots] + [Tq - sum(take for _, _, take in slots)])
    order = first.order
    cid = torch.empty(order.shape, dtype=torch.uint8, device=lead.device).scatter_(
        1, order, host_to(by_rank, torch.uint8, lead.device).expand(order.shape)).reshape(L * B, H, Tq)
    by_class = torch.argsort(cid, dim=-1, stable=True)   # class after class, each in position order
    ns = [prompt.get(c, 0) for c in widths]
    ks, vs, imps, starts = _quantized(lead, first, by_class, widths, ns,
                                      [n + 4 * per_flush.get(c, 0) for c, n in zip(widths, ns)], bool(A), L)
    positions = Tq + 4 * P
    if L > 1:   # each layer's map aligned in the stacked one
        positions = stacked_map_positions(positions)
    cmap = classmap.new_map(cid, positions)
    # each layer's own rows of every table (a layer's accounting counts what it holds, `_append_slack`)
    rank_class = host_to(np.tile([ids[(kw, vw)] for kw, vw, m in mix for _ in range(m)], (L, 1)), torch.uint8,
                         lead.device)
    mix_len = [0] * len(widths)
    for kw, vw, m in mix:
        mix_len[ids[(kw, vw)]] = m
    mix_len = host_to(np.tile(mix_len, (L, 1)), torch.int32, lead.device)
    # (classes, L, B): a class's lengths of every layer one (L * B,) row (stacked.py), a layer's (classes, B) a view
    length = host_to(np.tile(np.array(ns)[:, None, None], (1, L, B)), torch.int32, lead.device)
    # the window's tokens: their importance codes and observers so far (counted on the host, where the observed
    # ranges are; the group's layers saw the same queries)
    s0 = lead.sink_k.shape[-2]
    imp = first.importance
    wimp = imp[..., s0 + Tq:].clone()   # new tensors: views would keep the whole importance
    seen = _window_seen(layers, s0 + Tq, imp.shape[-1]).expand(-1, B, -1).reshape(L * B, -1).contiguous()   # own rows
    lk, lv = [layer_qtensors(q, B) for q in ks], [layer_qtensors(q, B) for q in vs]
    mix_ids = [(ids[(kw, vw)], m) for kw, vw, m in mix]
    rows = [layer_rows(t, B) for t in (cmap, wimp, seen)]
    for i, (layer, lmap, lwimp, lseen) in enumerate(zip(layers, *rows)):
        layer._app = Classes(list(widths), [q[i] for q in lk], [q[i] for q in lv], list(ns), length[:, i], lmap,
                             list(mix_ids), rank_class[i], mix_len[i], lwimp, lseen, share=L)
    if A:
        _ring(layers, A, top)
        _demotions(layers, plan, ids, imp[..., s0:s0 + Tq].gather(-1, by_class), ns, starts, imps)
        group = lead._first_group
        if L > 1 and any(plan) and group is not None and group.stacked and first.k_scale is not None:
            stack = Stack(layers, ks, vs, imps, length.view(len(widths), L * B), cmap, first.k_scale)
            for layer in layers:
                layer._app.stack = stack
    for layer in layers:
        layer._last_lse = None
        layer.pools, layer.levels = {"k": {}, "v": {}}, {"k": None, "v": None}
        layer._classes, layer._class_major = None, False
        layer.importance = layer.importance.new_empty(B, H, 0)   # new tensors: views would keep the old storage
        layer.observed = layer.observed.new_empty(0, 2)


def _quantized(lead, first, by_class: torch.Tensor, widths: list, ns: list, caps: list, importance: bool,
               L: int) -> tuple:
    """The class buffers of L layers stacked (`arena.class_buffers`: `caps` rows a class; with `importance`, its
    rows' importance codes) with each class's `ns` tokens quantized at its widths: each kind's tokens gathered once,
    class after class (`by_class`), so a class's rows are one slice of them, quantized straight into its buffer.
    -> keys, values, importance codes (a QTensor or tensor a class, L * B rows) and each class's first row."""
    at = by_class[..., None].expand(-1, -1, -1, lead.head_dim)
    by_k, by_v = first.new_k.gather(2, at), first.new_v.gather(2, at)
    if L > 1:   # each layer's rows of a buffer aligned in the stacked one
        caps = stacked_caps(caps)
    ks, vs, imps = class_buffers(lead, widths, caps, importance=importance, layers=L)
    starts, start = [], 0
    for (kw, vw), n, kq, vq in zip(widths, ns, ks, vs):
        if n:   # quantized in place: no copy of the class's rows into its buffer
            quantize_pack(by_k[..., start:start + n, :], kw, lead.group, -1, out=kq)
            quantize_pack(by_v[..., start:start + n, :], vw, lead.group, -1, out=vq)
        starts.append(start)
        start += n
    return ks, vs, imps, starts


def _window_seen(layers: list, start: int, T: int) -> torch.Tensor:
    """(L, 1, n_win) uint8: each layer's window tokens' observers so far (of T tokens; one copy when the layers saw
    the same queries, as a group's do)."""
    lead = layers[0]
    same = all(torch.equal(layer.observed, lead.observed) for layer in layers[1:])
    counts = [lead._count(seen_from_ranges(layer.observed, T)[start:]) for layer in (layers[:1] if same else layers)]
    out = host_to(torch.stack(counts), torch.uint8, lead.device)[:, None]
    return out.expand(len(layers), -1, -1) if same else out


def _ring(layers: list, A: int, top: tuple) -> None:
    """Each layer's (empty) ring at the class `top`: its buffers, counts, head and length from one block (every view
    aligned: the CUDA kernel's checks), its importance codes from another."""
    lead = layers[0]
    B, H = lead.batch_size, lead.num_heads
    specs = [spec for w in top for spec in qtensor_specs(lead, A, w)] + [((B, A), torch.uint8), ((B,), torch.int32),
                                                                         ((B,), torch.int32)]
    ring = iter(carve(specs * len(layers), lead.device))
    rimp = iter(carve([((B, H, A), torch.uint8)] * len(layers), lead.device, fill=255))
    for layer in layers:
        a = layer._app
        a.ring_k, a.ring_v = (take_qtensor(ring, layer, w) for w in top)
        a.ring, a.rseen, a.head, a.ring_len = A, *(next(ring) for _ in range(3))
        a.rimp, a.ring_share = next(rimp), len(layers)


def _demotions(layers: list, plan: list, ids: dict, codes: torch.Tensor, ns: list, starts: list, imps: list) -> None:
    """After the class buffers: the plan in class ids and each class row's importance (the prompt's mean attention,
    as 8-bit codes in class-row order: `codes` (L * B, H, n) the middle positions class after class, each class's
    rows from `starts`), every token counted as seen by the prompt's `observe_window` queries (one denominator: the
    ranking within a row needs no per-token count)."""
    lead = layers[0]
    B = lead.batch_size
    plan = [[(ids[c], ids[t], k) for (c, t), k in sorted(moves.items(), key=lambda e: (e[0][0], e[0][1]))]
            for moves in plan]
    # every flush's moves as one table (a flush without a move has count 0): the device work of a filling
    # flush is the same whichever it is. A target is narrower than its class (a lower id), so in this order a
    # class passes rows on before it receives any: it never holds more than after the flush
    pairs = sorted({(c, t) for moves in plan for c, t, _ in moves})
    col = {p: i for i, p in enumerate(pairs)}
    table = [[0] * max(len(pairs), 1) for _ in range(max(len(plan), 1))]   # host lists: no op per entry
    for f, moves in enumerate(plan):
        for c, t, k in moves:
            table[f][col[(c, t)]] = k
    moves = [(c, t, max(row[i] for row in table)) for i, (c, t) in enumerate(pairs)]
    # in the narrowest dtype that holds them (the table is held while the ring fills; read only)
    top = max(max(row) for row in table)
    dtype = next(t for t in (torch.uint8, torch.int16, torch.int32) if top <= torch.iinfo(t).max)
    move_k = host_to(np.tile(np.array(table), (len(layers), 1, 1)), dtype, lead.device)
    for s, n, imp in zip(starts, ns, imps):   # into the class buffers' block (arena.py), rows past n zero
        if n:
            imp[..., :n] = codes[..., s:s + n]
    cimp = [layer_rows(imp, B) for imp in imps]
    cseen = torch.full((len(layers),), float(lead.config.observe_window), device=lead.device)
    for i, layer in enumerate(layers):
        a = layer._app
        a.plan, a.moves, a.move_k, a.cimp, a.cseen = plan, moves, move_k[i], [c[i] for c in cimp], cseen[i:i + 1]
        if layer.config.class_norm == "previous":   # the first step's previous normaliser: the prompt's last
            last = layer._last_lse                  # query's
            a.lse = (last.float() if last is not None and last.shape[0] == B else
                     torch.zeros(B, layer.num_heads * layer._group_heads, device=layer.device))
