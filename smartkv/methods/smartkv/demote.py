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

import numpy as np
import torch

from smartkv.core.solves import Ask
from smartkv.kernels import demotion_keys, importance_fold, importance_sum, merge_plan, move_rows, requantize_rows
from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv.onepass import _rows


class SmartKVDemote:
    """SmartKVLayer's demotions while an append layer's ring fills (`_app`: append.Classes; its `plan`, `cimp`,
    `cseen` are None once the ring is full)."""

    def _demotion_plan(self, profile, budgets: tuple, top: tuple, A: int, n: int,
                       charge: tuple = (0, 0)) -> tuple[list, dict]:
        """Per filling flush (A / P of them), the demotions {(class, target): tokens}: flush i, when i is a multiple
        of `demote_every` (m), pays ahead for the ring's growth to (i + m) P tokens (at most A), leaving the n
        prompt tokens at most the bits of the budget over n + (i + m) P tokens less those at the ring's class `top`
        (each kind's rank-based classes, as the first allocation solves them on `profile`, the prompt's
        `counts.ProfileCounts`, at the budget left, a token never raised, the changes from the demotions before
        counted per (class, target)); the other flushes demote nothing. `charge`: width-bits a row of each kind
        gives up throughout (`_append_charge`). Returned with {budget: counts} of every budget it solved (the
        first allocation's own pair among them). A solve (`solves.solve_asks`): it yields its counts' `Ask`."""
        P, lo, hi, every = self.config.realloc_every, min(self.widths), max(self.widths), self.config.demote_every

        # each kind's budget left at the first allocation (f = 0) and after each filling flush f
        left = [[min(max((math.floor(b * (n + f * P) + 1e-9) - f * P * w - c) / n, lo), hi)
                 for f in range(A // P + 1)]
                for b, w, c in zip(budgets, top, charge)]
        both = yield Ask(profile, left[0] + left[1])   # one sort for both kinds
        counts = [both[:len(left[0])], both[len(left[0]):]]

        # each planned flush's classes along the ranking, heaviest first, on the segments between every run's edge
        # (a few dozen, whatever n): a token is never raised (the running minimum over the planned flushes), and
        # what changed is counted per (class before, class after), each segment weighing its tokens
        W, F = len(self.widths), A // P
        due = list(range(0, F, every))
        at = [0] + [min(i + every, F) for i in due]
        desc = np.arange(W - 1, -1, -1)                    # width indices, widest first (as `staircase` runs)
        ends = [np.cumsum([[counts[k][f][self.widths[i]] for i in desc.tolist()] for f in at], axis=1)
                for k in (0, 1)]                           # (flushes, W): where each width's run ends
        starts = np.unique(np.concatenate([[0], ends[0].ravel(), ends[1].ravel()]))
        starts = starts[starts < n]
        size = np.diff(np.append(starts, n))
        # each segment's width along each flush's run ends (a searchsorted on the right, all flushes at once)
        path = [np.minimum.accumulate(desc[(e[:, :, None] <= starts).sum(1)], axis=0) for e in ends]
        code = path[0] * W + path[1]                        # (1 + planned flushes, segments): class index
        moved = code[:-1] != code[1:]
        key = (code[:-1] * W * W + code[1:]) + np.arange(len(due))[:, None] * W ** 4
        tally = np.bincount(key[moved], weights=np.broadcast_to(size, key.shape)[moved],
                            minlength=len(due) * W ** 4).reshape(len(due), W ** 4)
        cls = [(self.widths[c // W], self.widths[c % W]) for c in range(W * W)]
        plan: list = [{} for _ in range(F)]
        for j, k in zip(*np.nonzero(tally)):
            plan[due[j]][(cls[k // (W * W)], cls[k % (W * W)])] = int(round(tally[j, k]))
        return plan, dict(zip(left[0] + left[1], both))

    def _cls_positions(self, cid: int, n: int) -> torch.Tensor:
        """Middle positions (B, H, n) of class `cid`'s rows, in row (position) order; no host wait."""
        cm = classmap.read(self._app.cmap, self.n_middle - self._app.ring_n)
        return torch.argsort((cm != cid).to(torch.uint8), dim=-1, stable=True)[..., :n]

    def _cls_rows(self, by_position: torch.Tensor, cid: int, n: int) -> torch.Tensor:
        return by_position.gather(-1, self._cls_positions(cid, n))

    def _flush_demotes(self, f: int) -> bool:
        """Whether filling flush `f` demotes (with `demote_every` > 1, one in that many pays ahead; a flush whose
        plan moves nothing skips the demotions' fixed-shape work)."""
        return self._app.plan is not None and bool(self._app.plan[f])

    @staticmethod
    def _apply_moves(counts: list, moves: list) -> None:
        """Tokens a row holds per class (host counts, in place) after one filling flush's moves, as `_demote`
        moves them on the device (each at most what its class holds then)."""
        for cid, tid, k in moves:
            k = min(k, counts[cid])
            counts[cid], counts[tid] = counts[cid] - k, counts[tid] + k

    def _demote_fold(self, masses: list, queries: int, divisor: float = 1) -> None:
        """Fold the attention class rows received from `queries` more queries (masses: per class, (B, H, n) summed
        over those queries and `divisor` x a group's query heads, or None) into their mean importance."""
        a = self._app
        for cid, m in enumerate(masses):
            if m is not None:   # n: the class's rows (ordinary steps) or its capacity (static steps: fixed shapes)
                importance_fold(a.cimp[cid][..., :m.shape[-1]], m, a.cseen, queries, divisor)
        a.cseen += queries

    def _demote(self, f: torch.Tensor, a=None, k_scale: torch.Tensor | None = None) -> None:
        """Filling flush `f`'s demotions ((1,) long on the device: the same work for every filling flush, so one
        captured graph serves them all) of the layer's classes, or of `a` (a `stacked.Stack`: the classes of a
        group's layers alike stacked on the batch dimension, `k_scale` their key scales, (L * B, H, 1, D)):
        per (class, target) move of the plan, in the plan's order, the k lightest
        rows of the class (importance x sensitivity, as the allocation weighs; k from the device table, at most the
        class's rows) re-quantized from their codes at the target's widths and merged into it in position order;
        the class compacted (both in place), the class map and device lengths updated. Shapes are the buffers'
        capacities and the prompt's n_all positions (constant while the ring fills); the host counts follow in
        `_append_count_flush`. On the kernels' devices a move is about a dozen launches: its rows' weights as
        top-k keys, the top-k, the row maps, the leaving rows re-quantized, and each class's seven tensors moved in
        two passes (as torch ops, ~130)."""
        a, cfg = a or self._app, self.config
        B, H = a.length.shape[-1], self.num_heads
        n_all = sum(a.n)
        ks = a.move_k.index_select(0, f)[0].int()             # (moves,) this flush's counts
        caps = [q.codes.shape[-2] for q in a.k]
        imp_sum = torch.zeros(B, H, device=self.device)
        for c, cap in enumerate(caps):   # the class rows' importance, one launch a class on the kernels' devices
            if cap:
                importance_sum(a.cimp[c][..., :cap], a.length[c], imp_sum, accumulate=True)
        floor = cfg.importance_floor * (imp_sum / max(n_all, 1))   # added to each row's importance (B, H)
        # keys' ranges back in real units (B, H)
        kmul = (self.k_scale if k_scale is None else k_scale).float().mean(-1)[..., 0]
        for i, (cid, tid, k_max) in enumerate(a.moves):
            Cc, Ct = caps[cid], caps[tid]
            k_max = min(k_max, Cc)
            if not k_max or not Ct:
                continue
            k = torch.minimum(ks[i], a.length[cid])                # (B,)
            kq, vq = _rows(a.k[cid], 0, Cc), _rows(a.v[cid], 0, Cc)
            key = demotion_keys(a.cimp[cid][..., :Cc], kq, vq, a.length[cid], floor, kmul, cfg.importance_power,
                                cfg.sensitivity)
            # the k lightest, ties by row (whatever the capacity: a chunk and its tokens one by one agree)
            rows = key.topk(k_max, dim=-1, largest=False).indices
            rows = torch.where(self._arange(k_max) < k[:, None, None], rows, Cc)
            gone = torch.zeros(B, H, Cc + 1, dtype=torch.uint8, device=self.device).scatter_(-1, rows, 1)[..., :Cc]
            # by position: the target's rows after the merge (its own, or the moved ones after them) and the class's
            # kept rows first; the class map updated
            order, keep = merge_plan(a.cmap, n_all, gone, k, cid, tid, Ct)
            fk, fv, fimp = requantize_rows(kq, vq, a.cimp[cid][..., :Cc], keep, k, k_max, a.widths[tid])
            into = (_rows(a.k[tid], 0, Ct), _rows(a.v[tid], 0, Ct))
            move_rows([t for q in (kq, vq) for t in (q.codes, q.scale, q.zero)] + [a.cimp[cid][..., :Cc, None]],
                      keep, Cc - k)                         # the kept rows first
            a.length[cid].sub_(k)   # in place on the row (`x[i] -= k` copies it back onto itself too)
            a.length[tid].add_(k)
            move_rows([t for q in into for t in (q.codes, q.scale, q.zero)] + [a.cimp[tid][..., :Ct, None]],
                      order, a.length[tid], [t for q in (fk, fv) for t in (q.codes, q.scale, q.zero)]
                      + [fimp[..., None]])                  # the target's and the moved rows in position order

    def _demote_done(self) -> None:
        """The ring is full: nothing is demoted from here on (this flush's demotions may still wait in the group's
        stack, which lets its layers go once they ran, `stacked.Stack`)."""
        a = self._app
        a.plan, a.cimp, a.cseen, a.moves, a.move_k, a.lse = None, None, None, None, None, None
        if a.stack is not None:
            a.stack.let_go()
