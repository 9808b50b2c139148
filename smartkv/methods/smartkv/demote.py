"""SmartKV's append layers while their ring fills (append.py): the ring starts empty after the first allocation,
which places every prompt token at the full budget, and each flush that fills it by a group pays for that group's
tokens at the ring's class by demoting prompt tokens. How many go from which class to which is planned at the first
allocation, the same in every row (so every class stays one dense segment); which ones go is decided at the flush,
by the importance every middle token has received since (the re-allocating design's information: chosen by the
first allocation's weights instead, KL at KIVI-2's point was 1.27x the default's, by fresh importance 0.96x;
docs/smartkv.md, "Append re-allocation"). Once the ring is full nothing is demoted and the middle's importance is
dropped: the step asks the kernel for the ring's and window's probabilities only."""
from __future__ import annotations

import math

import torch

from smartkv.core.classes import staircase
from smartkv.core.importance import decode_importance, encode_importance
from smartkv.core.policy import counts_for
from smartkv.core.quant import QTensor, cat, dequantize, token_ranges
from smartkv.methods.smartkv.onepass import _rows


def _take(q: QTensor, idx: torch.Tensor) -> QTensor:
    """Rows idx (B, H, k) of a per-token QTensor (B, H, ., F)."""
    return QTensor(*(t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1])) for t in (q.codes, q.scale, q.zero)),
                   q.bits, q.group_size, q.axis)


def _write(buf: QTensor, q: QTensor) -> None:
    n = q.codes.shape[-2]
    for dst, src in zip((buf.codes, buf.scale, buf.zero), (q.codes, q.scale, q.zero)):
        dst[..., :n, :] = src


class SmartKVDemote:
    """SmartKVLayer's demotions while an append layer's ring fills (`_app`: append.Classes; its `plan`, `cimp`,
    `cseen` are None once the ring is full)."""

    def _demotion_plan(self, profile: torch.Tensor, budgets: tuple, top: tuple, A: int, n: int) -> list:
        """Per filling flush f (A / P of them), the demotions {(class, target): tokens} that leave the n prompt
        tokens at most the bits of the budget over n + fP tokens less fP tokens at the ring's class `top`: each
        kind's rank-based classes (as the first allocation solves them on `profile`) at the budget left, a token
        never raised, the changes from the flush before counted per (class, target)."""
        P, lo, hi = self.config.realloc_every, min(self.widths), max(self.widths)

        def ranks(bs):
            return [(kw, vw) for kw, vw, m in staircase(*(counts_for(profile, b, self.widths) for b in bs))
                    for _ in range(m)]
        prev = ranks([min(max(math.floor(b * n + 1e-9) / n, lo), hi) for b in budgets])
        plan = []
        for f in range(1, A // P + 1):
            now = ranks([min(max((math.floor(b * (n + f * P) + 1e-9) - f * P * w) / n, lo), hi)
                         for b, w in zip(budgets, top)])
            now = [(min(p[0], c[0]), min(p[1], c[1])) for p, c in zip(prev, now)]
            moves: dict = {}
            for p, c in zip(reversed(prev), reversed(now)):   # lightest first: the lowest targets first
                if p != c:
                    moves[(p, c)] = moves.get((p, c), 0) + 1
            plan.append(moves)
            prev = now
        return plan

    def _demote_begin(self, plan: list, ids: dict) -> None:
        """After `_append_begin` made the class buffers: the plan in class ids and each class row's importance (the
        prompt's mean attention, as 8-bit codes in class-row order), every token counted as seen by the prompt's
        `observe_window` queries (one denominator: the ranking within a row needs no per-token count)."""
        a, Tq = self._app, self.n_middle
        a.plan = [[(ids[c], ids[t], k) for (c, t), k in sorted(moves.items(), key=lambda e: (e[0][0], e[0][1]))]
                  for moves in plan]
        s0 = self.sink_k.shape[-2]
        codes = self.importance[..., s0:s0 + Tq]
        a.cimp = [self._cls_rows(codes, cid, n) for cid, n in enumerate(a.n)]
        a.cimp = [self._grow_rows(c, q.codes.shape[-2]) for c, q in zip(a.cimp, a.k)]
        a.cseen = torch.full((1,), float(self.config.observe_window), device=self.device)

    def _cls_positions(self, cid: int, n: int) -> torch.Tensor:
        """Middle positions (B, H, n) of class `cid`'s rows, in row (position) order; no host wait."""
        cm = self._app.cmap[..., :self.n_middle]
        return torch.argsort((cm != cid).to(torch.uint8), dim=-1, stable=True)[..., :n]

    def _cls_rows(self, by_position: torch.Tensor, cid: int, n: int) -> torch.Tensor:
        return by_position.gather(-1, self._cls_positions(cid, n))

    @staticmethod
    def _grow_rows(t: torch.Tensor, cap: int) -> torch.Tensor:
        if t.shape[-1] >= cap:
            return t
        out = t.new_zeros(*t.shape[:-1], cap)
        out[..., :t.shape[-1]] = t
        return out

    def _demote_fold(self, masses: list, queries: int) -> None:
        """Fold the attention class rows received from `queries` more queries (masses: per class, (B, H, n) summed
        over those queries, mean over a group's query heads, or None) into their mean importance."""
        a = self._app
        s = a.cseen
        for cid, m in enumerate(masses):
            if m is None or not a.n[cid]:
                continue
            n = a.n[cid]
            mean = (decode_importance(a.cimp[cid][..., :n]) * s + m[..., :n]) / (s + queries)
            a.cimp[cid][..., :n] = encode_importance(mean)
        a.cseen += queries

    def _demote(self, moves: list) -> None:
        """One filling flush's demotions: per (class, target, k), the k lightest rows of the class (importance x
        sensitivity, as the allocation weighs) re-quantized from their codes at the target's widths and merged
        into it in position order; the class compacted, the class map and counts updated."""
        a, cfg = self._app, self.config
        B, H = self.batch_size, self.num_heads
        n_all = sum(a.n)
        imp_sum = sum(decode_importance(a.cimp[c][..., :n]).sum(-1) for c, n in enumerate(a.n) if n)
        floor_ref = (imp_sum / max(n_all, 1))[..., None]     # the rows' mean importance, for the floor
        for cid, tid, k in moves:
            nc, nt = a.n[cid], a.n[tid]
            k = min(k, nc)
            if not k:
                continue
            kq, vq = _rows(a.k[cid], 0, nc), _rows(a.v[cid], 0, nc)
            imp = decode_importance(a.cimp[cid][..., :nc]).double()
            w = (imp + cfg.importance_floor * floor_ref.double()).pow(cfg.importance_power)
            if cfg.sensitivity:
                w = w * self._sensitivity(token_ranges(kq), token_ranges(vq)).double()
            rows = torch.topk(w, k, dim=-1, largest=False).indices.sort(-1).values       # (B, H, k)
            pos_c, pos_t = self._cls_positions(cid, nc), self._cls_positions(tid, nt)
            moved_pos = pos_c.gather(-1, rows)
            gone = torch.zeros(B, H, nc, dtype=torch.uint8, device=self.device).scatter_(-1, rows, 1)
            keep = torch.argsort(gone, dim=-1, stable=True)[..., :nc - k]
            order = torch.argsort(torch.cat([pos_t, moved_pos], -1), dim=-1)
            for i, (bufs, q) in enumerate(((a.k, kq), (a.v, vq))):
                moved = self._quantize(dequantize(_take(q, rows)), a.widths[tid][i])
                tq = bufs[tid]
                merged = _take(cat([_rows(tq, 0, nt), moved]), order)
                _write(bufs[cid], _take(q, keep))
                if tq.codes.shape[-2] < nt + k:
                    raise RuntimeError("an append class buffer has no room for its demotions (_append_reserve)")
                _write(tq, merged)
            ci, ti = a.cimp[cid][..., :nc], a.cimp[tid][..., :nt]
            a.cimp[tid][..., :nt + k] = torch.cat([ti, ci.gather(-1, rows)], -1).gather(-1, order)
            a.cimp[cid][..., :nc - k] = ci.gather(-1, keep)
            a.cmap[..., :self.n_middle].scatter_(-1, moved_pos, tid)
            a.n[cid], a.n[tid] = nc - k, nt + k
            a.length[cid] -= k
            a.length[tid] += k

    def _demote_done(self) -> None:
        """The ring is full: nothing is demoted from here on."""
        a = self._app
        a.plan, a.cimp, a.cseen = None, None, None
