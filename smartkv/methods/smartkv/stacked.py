"""A group's filling flushes' demotions in one set of launches (demote.py has the demotions, first.py the group).

The layers of one first allocation's group share their solve, so they hold the same classes, capacities and plan,
and place.py stacks their class buffers, importance codes, class map and device lengths on the batch dimension of
one block each. An eager step flushes every layer in turn, and a filling flush's demotions are ~19 launches and ~50
torch operations a layer, host-bound at the runner's shape (docs/smartkv.md, What is left 6: a flushing step of
SmolLM2's 30 layers took 109-238 ms against an ordinary step's 27 on an H100's host, the runner's decode gap). Here
each layer's demotions wait in the stack until the group's last layer has flushed, then run once over the L x B
rows: the same arithmetic a row (every kernel and torch operation works row by row), the same state bit for bit.
Nothing reads a layer's classes between its flush and the step's end; anything that does first runs what waits
(`SmartKVFirst._settle`), each layer's own demotions when the group's are not all there (a forward stopped part
way).

A layer whose buffers stop being the stack's views (grown on its own, a static phase's exact buffers) leaves it, and
the stack dissolves: every layer takes the per-layer path from then on. Growth while the ring fills goes through the
stack instead (`regrow`, `grow_map`: every layer's buffers into one new block, as place.py made them).

SMARTKV_STACKED_DEMOTIONS (`first.stacked_demotions`, beside the group's other settings): 0 runs each layer's
demotions at its own flush (the A/B baseline; the same state)."""
from __future__ import annotations

import torch

from smartkv.methods.smartkv import classmap
from smartkv.methods.smartkv.arena import (class_buffers, copy_rows, layer_qtensors, layer_rows, stacked_caps,
                                           stacked_map_positions)


class Stack:
    """The stacked classes of a group's append layers while their rings fill: what `SmartKVDemote._demote` reads
    and writes (keys, values, importance codes: a QTensor or tensor a class of L * B rows; `length` (classes, L *
    B); the class map (L * B, H, bytes); the plan's `moves` and `move_k`; `n`, the host counts of the flush that
    runs; `k_scale`, the layers' key scales), and the layers' demotions waiting for the group's last flush."""

    def __init__(self, layers: list, k: list, v: list, cimp: list, length: torch.Tensor, cmap: torch.Tensor,
                 k_scale: torch.Tensor):
        lead = layers[0]
        self.layers, self.B = layers, lead.batch_size
        self.k, self.v, self.cimp, self.length, self.cmap = k, v, cimp, length, cmap
        self.k_scale = k_scale   # (L * B, H, 1, D): the layers' key scales are its views (first.prepare)
        self.widths, self.moves, self.move_k = lead._app.widths, lead._app.moves, lead._app.move_k
        self.n: list = []
        self.waiting: list = []   # (layer, flush index, f)
        self.alive = True
        self._views = [self._held(layer) for layer in layers]

    @staticmethod
    def _held(layer) -> tuple:
        a = layer._app
        return a.k, a.v, a.cimp, a.length, a.cmap, layer.k_scale

    def holds(self, layer) -> bool:
        """Whether `layer`'s classes are still the stack's views (else the stack dissolves)."""
        if not self.alive:
            return False
        i = self.layers.index(layer)
        if all(x is y for x, y in zip(self._held(layer), self._views[i])):
            return True
        self.dissolve()
        return False

    def take(self, layer, flush: int, f: torch.Tensor) -> None:
        """`layer`'s filling flush `flush` demotes (`f`: its index on the device): queued until every layer of the
        group has taken its own (then run once over every row), or run now on the per-layer path."""
        if self.waiting and (self.waiting[0][1] != flush or any(x is layer for x, _, _ in self.waiting)):
            self.settle()   # a flush before the last one's group was whole
        if not self.holds(layer):
            return layer._demote(f)
        self.waiting.append((layer, flush, f))
        if len(self.waiting) == len(self.layers):
            self._run()

    def _run(self) -> None:
        lead, f = self.waiting[0][0], self.waiting[0][2]
        self.n, self.waiting = list(lead._app.n), []
        lead._demote(f, self, self.k_scale)
        self.let_go()

    def let_go(self) -> None:
        """The stack goes once a layer's ring is full and nothing waits: the group's last filling flush has run (or
        some layers' ran on their own, and the rest take their own paths)."""
        if not self.waiting and any(layer._app is not None and layer._app.plan is None for layer in self.layers):
            self.dissolve()

    def settle(self, layer=None) -> None:
        """Run what waits (of any layer, or when `layer` waits), each layer's own: the group's are not all there."""
        if self.waiting and (layer is None or any(x is layer for x, _, _ in self.waiting)):
            waiting, self.waiting = self.waiting, []
            # a read outside the decode's inference mode (a memory report) may settle: the in-place updates of
            # inference tensors need it
            with torch.inference_mode(self.length.is_inference()):
                for x, _, f in waiting:
                    x._demote(f)
            self.let_go()

    def dissolve(self) -> None:
        """Every layer on the per-layer path from here on (what waits runs first)."""
        if self.alive:
            self.alive = False
            self.settle()
            for layer in self.layers:
                if layer._app is not None and layer._app.stack is self:
                    layer._app.stack = None

    def regrow(self, caps: list) -> None:
        """Every layer's classes into one new block of `caps` rows a class (aligned as place.py's, `stacked_caps`),
        their rows copied (all of them: the layers that flushed this step and those that did not)."""
        caps = stacked_caps(caps)
        lead = self.layers[0]
        k, v, cimp = class_buffers(lead, self.widths, caps, importance=True, layers=len(self.layers))
        for old, new in zip(self.k + self.v, k + v):
            copy_rows(old, new, min(old.codes.shape[-2], new.codes.shape[-2]))
        for old, new in zip(self.cimp, cimp):
            rows = min(old.shape[-1], new.shape[-1])
            new[..., :rows] = old[..., :rows]
        self.k, self.v, self.cimp = k, v, cimp
        lk, lv = [layer_qtensors(q, self.B) for q in k], [layer_qtensors(q, self.B) for q in v]
        lc = [layer_rows(c, self.B) for c in cimp]
        for i, layer in enumerate(self.layers):
            a = layer._app
            a.k, a.v, a.cimp = [q[i] for q in lk], [q[i] for q in lv], [c[i] for c in lc]
            self._views[i] = self._held(layer)

    def grow_map(self, positions: int) -> None:
        """Every layer's class map with room for `positions` (each layer's bytes a multiple of 16: aligned)."""
        self.cmap = classmap.grown(self.cmap, stacked_map_positions(positions))
        for i, (layer, rows) in enumerate(zip(self.layers, layer_rows(self.cmap, self.B))):
            layer._app.cmap = rows
            self._views[i] = self._held(layer)
