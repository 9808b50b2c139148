"""SmartKV's first allocation of a group of append layers at once (append.py has the design it starts).

A prefill is bound by host work a layer (docs/smartkv.md, the prefill's ladder): each append layer's first
allocation waited for the device once, then solved and placed its prompt while the card idled. Here a layer whose
first allocation comes due after its attention (or after `append`, a cache filled without a model) defers it: its
prompt stays in its window at full precision, as DynamicCache holds it, until the group's last layer has attended
(the group's size in layers, or the model's last layer that can defer). Then the fold of the group's prompt
attention runs in one set of launches (`observe`: each layer keeps its last queries and the keys they saw), the
layers alike (`_first_key`: a model's full-attention layers) share one solve on their pooled rank profile
(`pooled`), and everything around it runs for all of them at once: the device work before it (`prepare`: the
layers' rows stacked on the batch dimension), one copy of what the host solve reads, and the placement (place.py).
Solves of different sets run in lock step (`solves.solve_asks`: each round's counts asked together by
`counts.counts_many`). A deferred layer is an ordinary layer whose flush has not run yet: anything that reads or
extends it first runs its group (`_settle`), and a layer flushed on its own (a forward that stopped part way)
takes the per-layer path: a group of one, with its own profile.

SMARTKV_FIRST_GROUP: layers a group holds at most (default 1024: every layer of a model; 1: each layer on its own,
with its own profile); SMARTKV_FIRST_GROUP_MIB: bytes (default 512 MiB) the waiting layers may hold (their prompts at
full precision and the keys their observation keeps), past which the group runs at once. Each group costs the
prefill one wait for the device and one set of host calls (~10 ms on an H100's host), and a group of every layer
solves as well as one of eight (KL 0.99x / 1.00x of groups of eight at int4's / KIVI-2's point, SmolLM2, 8 windows),
so the bytes bound the group, not a count: SmolLM2's 30 layers at 8K tokens hold ~280 MB (one group), and a large
batch's chunked fill (where one layer's chunk is past the bytes) keeps the per-layer transient (and its own profile).
SMARTKV_SOLVES_TOGETHER: 0 answers each set's counts on their own (the A/B baseline; the same state).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from smartkv.core.counts import device_tables
from smartkv.core.importance import add_range, attention_scores, fold_attention, probs_from_scores
from smartkv.core.policy import block_weights
from smartkv.core.solves import solve_asks
from smartkv.methods.smartkv.place import place

DEFAULT_GROUP = 1024
DEFAULT_MIB = 512


def _setting(name: str, default: int, top: int, low: int = 1) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= top:
        raise ValueError(f"{name} must be an integer from {low} to {top}, got {raw!r}")
    return value


def group_size() -> tuple[int, int]:
    """(layers, bytes) one first allocation's group holds at most (`SMARTKV_FIRST_GROUP`,
    `SMARTKV_FIRST_GROUP_MIB`), checked before any work."""
    return _setting("SMARTKV_FIRST_GROUP", DEFAULT_GROUP, 1024), _setting("SMARTKV_FIRST_GROUP_MIB", DEFAULT_MIB,
                                                                          1 << 20) << 20


def solves_together() -> bool:
    """Whether a group's host solves ask their counts together (`SMARTKV_SOLVES_TOGETHER`, default 1; 0: each
    layer's asks answered on their own, the A/B baseline of `solves.solve_asks`), checked before any work."""
    return bool(_setting("SMARTKV_SOLVES_TOGETHER", 1, 1, low=0))


def stacked_demotions() -> bool:
    """Whether a group's filling flushes' demotions run stacked (`SMARTKV_STACKED_DEMOTIONS`, default 1; 0: each
    layer's at its own flush, the A/B baseline of stacked.py), checked before any work."""
    return bool(_setting("SMARTKV_STACKED_DEMOTIONS", 1, 1, low=0))


@dataclass
class Observation:
    """A prefill's last queries (B, Hq, W, D) and the keys they saw (B, H, T, D, the attention's own tensor), kept
    until the layer's group folds their attention into its importance (`observe`)."""
    query: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor     # (B, 1, W, T)
    scaling: float
    lse: bool                 # the last query's log2-sum-exp is wanted (class_norm="previous")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.keys))


def observe(layers: list) -> None:
    """Fold each layer's kept `Observation` into its importance, as `attend` folds it (`_observe`): the scores a
    layer, then the mask, softmax and fold of layers alike in one set of launches (rows stacked, each row's
    arithmetic unchanged)."""
    alike: dict = {}
    for layer in layers:
        ob = layer._observe_later
        if ob is not None:
            key = (ob.query.shape, ob.keys.shape[1:], ob.allowed.shape, ob.allowed.dtype, ob.lse, ob.scaling,
                   tuple(layer.importance.shape[1:]), tuple(map(tuple, layer.observed.tolist())))
            alike.setdefault(key, []).append(layer)
    for group in alike.values():
        obs = [layer._observe_later for layer in group]
        B, _, W, _ = obs[0].query.shape
        T = obs[0].keys.shape[-2]
        scores = torch.cat([attention_scores(ob.query, ob.keys, ob.scaling) for ob in obs])
        allowed = torch.cat([ob.allowed for ob in obs])
        probs = probs_from_scores(scores, allowed, return_lse=obs[0].lse)
        probs, lse = probs if obs[0].lse else (probs, None)
        codes = fold_attention(torch.cat([layer.importance for layer in group]), probs, group[0].observed)
        observed = add_range(group[0].observed, T - W, T)
        for i, layer in enumerate(group):
            layer.importance, layer.observed, layer._observe_later = codes[i * B:(i + 1) * B], observed, None
            if lse is not None:   # an append layer's first previous normaliser (place.py), log2
                layer._last_lse = lse[i * B:(i + 1) * B, :, -1].clone()


@dataclass
class FirstInputs:
    """The first allocation of layers alike (`_first_key`: one solve's) between their device work and their host
    solve, the layers' rows stacked on the batch dimension (L layers of B sequences: L * B rows of H heads)."""
    n: int                    # prompt tokens a row places
    weights: torch.Tensor     # (L * B * H, n) their weights
    new_k: torch.Tensor       # (L * B, H, n, D) their keys in stored space, fp32
    new_v: torch.Tensor       # (L * B, H, n, D) their values
    importance: torch.Tensor  # (L * B, H, T) the layers' importance codes
    stats: torch.Tensor       # (L, n + 1) float64 on the device: each layer's `_append_stats`
    order: torch.Tensor       # (L * B * H, n) each row's tokens heaviest first (`_append_stats`)
    k_scale: torch.Tensor | None = None   # (L * B, H, 1, D) the key normalisation's scales (the layers' are views)

    def layer(self, i: int) -> FirstInputs:
        """Layer i's own inputs (views), as `prepare` of it alone would give them."""
        L = self.stats.shape[0]
        return FirstInputs(self.n, *(t.chunk(L)[i] for t in (self.weights, self.new_k, self.new_v, self.importance,
                                                             self.stats, self.order)),
                           None if self.k_scale is None else self.k_scale.chunk(L)[i])


def prepare(layers: list, n: int) -> FirstInputs:
    """The first allocation's device work (no wait) for layers alike (`_first_key`) whose prompt attention is folded
    (`first_allocations` observes them first), in one set of launches: each
    layer's window's oldest n tokens taken out of it (its key normalisation fitted on them), their weights and the
    statistics the host solve reads. The layers' rows are stacked on the batch dimension and worked by a stand-in
    (a shallow copy of the first layer holding the stacked tensors: every step is arithmetic a row); each layer then
    keeps its rows of the results (views)."""
    lead, L = layers[0], len(layers)
    stand = lead if L == 1 else _stand_in(layers)
    stand._stored = {}
    try:
        new_k, new_v = stand._flush_inputs(n)
        weights = block_weights(stand._weights(new_k, new_v), stand.block_tokens)
    finally:
        stand._stored = None
    if stand is not lead:
        for name in ("win_k", "win_v", "k_mu", "k_scale"):
            for layer, rows in zip(layers, getattr(stand, name).chunk(L)):
                setattr(layer, name, rows)
    return FirstInputs(n, weights, new_k, new_v, stand.importance, *lead._append_stats(weights, L), stand.k_scale)


def _stand_in(layers: list):
    """A shallow copy of the first of `layers` (alike, `_first_key`) holding their windows, importance codes and
    key normalisation (all fitted or none) stacked on the batch dimension."""
    stand = copy.copy(layers[0])
    stand.batch_size = len(layers) * stand.batch_size
    names = ("win_k", "win_v", "importance") + (("k_mu", "k_scale") if stand.k_mu is not None else ())
    for name in names:
        setattr(stand, name, torch.cat([getattr(layer, name) for layer in layers]))
    return stand


class FirstGroup:
    """The layers of one cache whose first allocation waits (shared by them: `SmartKV.bind`)."""

    def __init__(self, layers: list, size: tuple[int, int], together: bool = True, stacked: bool = True):
        self.layers, self.pending, self.together = layers, [], together
        self.stacked = stacked   # its layers' filling flushes' demotions run stacked (stacked.py)
        self.size, self.max_bytes = size
        self._end = None   # (the last layer that can defer,), found at the first deferral

    def defer(self, layer) -> None:
        """Take `layer`'s due first allocation: queued, or run with its group's now."""
        if layer not in self.pending:
            self.pending.append(layer)
        if self._end is None:   # the last layer that can defer (later ones are sliding, or not SmartKV's)
            able = [x for x in self.layers if getattr(x, "_first_group", None) is self and x._append_wanted()]
            self._end = (able[-1] if able else None,)
        if len(self.pending) >= self.size or layer is self._end[0] or self._held() >= self.max_bytes:
            self.run()

    def _held(self) -> int:
        """Bytes the waiting layers hold for their first allocations: prompts at full precision, kept keys."""
        return sum(t.numel() * t.element_size() for layer in self.pending for t in (layer.win_k, layer.win_v)) + sum(
            layer._observe_later.nbytes() for layer in self.pending if layer._observe_later is not None)

    def run(self) -> None:
        """Every pending layer's first allocation (a layer whose allocation is no longer due is skipped)."""
        due, self.pending = [(layer, layer._first_due()) for layer in self.pending], []
        first_allocations([layer for layer, n in due if n], [n for _, n in due if n], self.together)


def first_allocations(layers: list, ns: list, together: bool = True) -> None:
    """The first allocations of `layers` (n prompt tokens each, `ns`): the fold of their prompt attention, then the
    device work of each set of layers alike (`prepare`: one for the group's layers), one copy of all the
    statistics to the host, then each set's solve and placement (`finish`)."""
    observe(layers)
    sets: dict = {}
    for layer, n in zip(layers, ns):
        sets.setdefault(layer._first_key(n), []).append(layer)
    finish(list(sets.values()), [prepare(group, key[0]) for key, group in sets.items()], together)


def pooled(stats: torch.Tensor, n: int) -> torch.Tensor:
    """One solve's statistics for a set of layers from each one's (`_append_stats`, (L, n + 1) float64): the mean
    of their rank profiles (and of their newest tokens' mean weights), each layer's scaled to sum 1 first, so that
    each layer's ranking counts alike whatever its weights' scale (a layer's solve is scale-free: the counts
    minimise sum w 4^-bits under a bit budget). One layer's are its own, unscaled (the per-layer path)."""
    if stats.shape[0] == 1:
        return stats[0]
    return (stats / stats[:, :n].sum(-1, keepdim=True).clamp_min(torch.finfo(stats.dtype).tiny)).mean(0)


def finish(sets: list, firsts: list, together: bool = True) -> None:
    """The first allocations of `sets` of layers alike after their device work (`firsts`, a `FirstInputs` a set).
    A set shares one solve on its pooled profile (`pooled`): SmartKV already gives every row of a layer the same
    counts (the heads of one layer share its rank profile), and a group extends that to its layers, so its host
    solve (~1 ms of Python a layer) runs once. Every solve's tables in one set of launches, one copy of all the host
    reads (the group's one wait for the device), then the solves in lock step, each placing its set."""
    if not firsts:
        return
    stats = [pooled(first.stats, first.n) for first in firsts]
    tables: list = [None] * len(firsts)
    alike: dict = {}
    for i, (layers, first) in enumerate(zip(sets, firsts)):
        alike.setdefault((first.n, layers[0].widths), []).append(i)
    for (n, widths), rows in alike.items():
        for i, t in zip(rows, device_tables(torch.stack([stats[i][:n] for i in rows]), widths)):
            tables[i] = t
    host = torch.cat([x for st, t in zip(stats, tables) for x in (st, t)]).cpu()
    solves, at = [], 0
    for layers, first, st, t in zip(sets, firsts, stats, tables):
        size = st.numel() + t.numel()
        solves.append(_set_finish(layers, first, host[at:at + size]))
        at += size
    solve_asks(solves, together)


def _set_finish(layers: list, first: FirstInputs, stats: torch.Tensor):
    """One solve (`_append_split` of the set's first layer on the pooled `stats`, on the host), then the set's
    placement at its plan and budgets."""
    lead = layers[0]
    kinds = (("k", first.new_k, lead.budget_k), ("v", first.new_v, lead.budget_v))
    _, kinds = yield from lead._append_split(first.weights, kinds, stats)
    for layer in layers:
        layer._app_plan = lead._app_plan
        layer.n_middle += first.n
    place(layers, first, [b for _, _, b in kinds])


class SmartKVFirst:
    """SmartKVLayer's part in its group's first allocation (`_first_group`: the cache's FirstGroup, or None)."""

    _first_group: FirstGroup | None = None
    _observe_later: Observation | None = None

    def _first_waits(self) -> bool:
        """Whether a first allocation due now would wait for its group (`_first_defers`), told before the flush."""
        group = self._first_group
        return group is not None and group.size > 1 and bool(self._first_due())

    def _first_due(self) -> int:
        """Tokens the first allocation of an append layer would place now (0: it is not due)."""
        if self._app is not None or self.n_middle or not self.is_initialized or not self._append_wanted():
            return 0
        n = self.win_k.shape[-2] - self.config.recent_window
        return n if n > 0 and n >= self._flush_at() else 0

    def _first_defers(self) -> bool:
        """Whether this layer's due first allocation waits for (or just ran with) its group's."""
        if not self._first_waits():
            return False
        self._first_group.defer(self)
        return True

    def _settle(self) -> None:
        """Run this layer's group when its first allocation waits in it, or its demotions wait in their stack:
        before anything reads or extends it."""
        group = self._first_group
        if group is not None and self in group.pending:
            group.run()
        stack = self._app.stack if self._app is not None else None
        if stack is not None:   # its flush's demotions waiting for the group's (stacked.py)
            stack.settle(self)

    def _first_key(self, n: int) -> tuple:
        """What an append layer's solve reads besides its profile (`_append_split`, `_append_charge`): layers with
        the same key may share one."""
        return (n, tuple(self.widths), self.budget_k, self.budget_v, self.config, self.batch_size, self.num_heads,
                self.head_dim, self._group_heads, self.group, self.k_mu is None, self.win_k.shape,
                self.importance.shape, self.sink_k.shape[-2], self.rot_k, self.rot_v)
