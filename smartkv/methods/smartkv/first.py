"""SmartKV's first allocation of a group of append layers at once (append.py has the design it starts).

A prefill is bound by host work a layer (docs/smartkv.md, the prefill's ladder): each append layer's first
allocation waited for the device once, then solved and placed its prompt while the card idled. Here a layer whose
first allocation comes due after its attention (or after `append`, a cache filled without a model) defers it: its
prompt stays in its window at full precision, as DynamicCache holds it, until the group's last layer has attended
(the group's size in layers, or the model's last layer that can defer). Then the fold of the group's prompt
attention runs in one set of launches (`observe`: each layer keeps its last queries and the keys they saw), each
layer's device work is queued (its weights, rank profile and solve tables: `counts.device_tables`), everything the
host solves read reaches it in one copy, and the layers' solves run in lock step, each ending in its placement
(`solves.solve_asks`: each round's counts, the flush mixes', the ring widths', the demotion plans', asked for every
layer at once by `counts.counts_many`, whose host calls are about one layer's). A deferred layer is an
ordinary layer whose flush has not run yet: anything that reads or extends it first runs its group (`_settle`),
and a layer flushed on its own (a forward that stopped part way) takes the per-layer path, which gives the same
state, bit for bit.

SMARTKV_FIRST_GROUP: layers a group holds at most (default 8; 1: each layer on its own, the A/B baseline);
SMARTKV_FIRST_GROUP_MIB: bytes (default 256 MiB) the waiting layers may hold (their prompts at full precision and
the keys their observation keeps), past which the group runs at once. A layer's prompt keys and values are 2 x
KV heads x head_dim values a token against the MLP activations its prefill holds anyway (SmolLM2: 384 against 3072
and more), so a short prompt's group of eight stays within one layer's working set, and a large batch's chunked
fill (where one layer's chunk is past the bytes) keeps the per-layer transient. SMARTKV_SOLVES_TOGETHER: 0 answers
each layer's counts on their own (the A/B baseline; the same state).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from smartkv.core.counts import device_tables
from smartkv.core.importance import add_range, attention_scores, fold_attention, probs_from_scores
from smartkv.core.policy import block_weights
from smartkv.core.solves import solve_asks
from smartkv.methods.smartkv.place import place

DEFAULT_GROUP = 8
DEFAULT_MIB = 256


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
    """A layer's first allocation between its device work and its host solve: the n prompt tokens' weights
    (R, n), kinds as `_flush` builds them, and `_append_stats` still on the device."""
    n: int
    weights: torch.Tensor
    kinds: tuple
    stats: torch.Tensor
    order: torch.Tensor       # (R, n) each row's tokens heaviest first (`_append_stats`)


class FirstGroup:
    """The layers of one cache whose first allocation waits (shared by them: `SmartKV.bind`)."""

    def __init__(self, layers: list, size: tuple[int, int], together: bool = True):
        self.layers, self.pending, self.together = layers, [], together
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
        """Every pending layer's first allocation: the device work of all, one copy of their statistics to the
        host, then each layer's solve and placement (a layer whose allocation is no longer due is skipped)."""
        due, self.pending = [(layer, layer._first_due()) for layer in self.pending], []
        layers = [layer for layer, n in due if n]
        observe(layers)
        finish(layers, [layer._first_prepare(n) for layer, n in due if n], self.together)


def pooled(stats: list[torch.Tensor], n: int) -> torch.Tensor:
    """One solve's statistics for a group's layers (`_append_stats` of each, (n + 1,) float64): the mean of their
    rank profiles (and of their newest tokens' mean weights), each layer's scaled to sum 1 first, so that each
    layer's ranking counts alike whatever its weights' scale (a layer's solve is scale-free: the counts minimise
    sum w 4^-bits under a bit budget). One layer's are its own, unscaled (the per-layer path)."""
    if len(stats) == 1:
        return stats[0]
    st = torch.stack(stats)
    return (st / st[:, :n].sum(-1, keepdim=True).clamp_min(torch.finfo(st.dtype).tiny)).mean(0)


def finish(layers: list, firsts: list, together: bool = True) -> None:
    """The first allocations of `layers` after their device work (`firsts`, a `FirstInputs` each; one layer on its
    own alike). Layers of one shape, prompt and settings (`_first_key`) share one solve on their pooled profile
    (`pooled`): SmartKV already gives every row of a layer the same counts (heads of one layer share its rank
    profile), and a group extends that to its layers, so its host solve (~1 ms of Python a layer) runs once. Every
    solve's tables in one set of launches, one copy of all the host reads (the group's one wait for the device),
    then the solves in lock step, each placing its layers."""
    if not firsts:
        return
    shared: dict = {}
    for layer, first in zip(layers, firsts):
        shared.setdefault(layer._first_key(first.n), []).append((layer, first))
    members = list(shared.values())
    stats = [pooled([first.stats for _, first in group], group[0][1].n) for group in members]
    tables: list = [None] * len(members)
    alike: dict = {}
    for i, group in enumerate(members):
        alike.setdefault((group[0][1].n, group[0][0].widths), []).append(i)
    for (n, widths), rows in alike.items():
        for i, t in zip(rows, device_tables(torch.stack([stats[i][:n] for i in rows]), widths)):
            tables[i] = t
    host = torch.cat([x for st, t in zip(stats, tables) for x in (st, t)]).cpu()
    solves, at = [], 0
    for group, st, t in zip(members, stats, tables):
        size = st.numel() + t.numel()
        solves.append(_group_finish(group, host[at:at + size]))
        at += size
    solve_asks(solves, together)


def _group_finish(group: list, stats: torch.Tensor):
    """One solve (`_append_split` of the group's first layer on the pooled `stats`, on the host), then every
    layer's placement at its plan and budgets."""
    lead, first = group[0]
    _, kinds = yield from lead._append_split(first.weights, first.kinds, stats)
    for layer, first in group:
        layer._app_plan = lead._app_plan
        layer.n_middle += first.n
    place([layer for layer, _ in group], [(first.kinds[0][1], first.kinds[1][1]) for _, first in group],
          [first.order for _, first in group], [b for _, _, b in kinds])


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
        """Run this layer's group when its first allocation waits in it: before anything reads or extends it."""
        group = self._first_group
        if group is not None and self in group.pending:
            group.run()

    def _first_prepare(self, n: int) -> FirstInputs:
        """The first allocation's device work (no wait): the window's oldest n tokens out of it, their weights and
        the statistics the host solve reads."""
        observe([self])   # a kept observation (flushed without its group): folded as the group would
        self._stored = {}
        try:
            new_k, new_v = self._flush_inputs(n)
            weights = block_weights(self._weights(new_k, new_v), self.block_tokens)
        finally:
            self._stored = None
        kinds = (("k", new_k, self.budget_k), ("v", new_v, self.budget_v))
        return FirstInputs(n, weights, kinds, *self._append_stats(weights))

    def _first_key(self, n: int) -> tuple:
        """What an append layer's solve reads besides its profile (`_append_split`, `_append_charge`): layers with
        the same key may share one."""
        return (n, tuple(self.widths), self.budget_k, self.budget_v, self.config, self.batch_size, self.num_heads,
                self.head_dim, self._group_heads, self.group)
