"""SmartKV's one-pass decode step over joint classes: with class-major pools (`joint=True`) every (key width, value
width) class is one slice of its key pool and one of its value pool, so the step is one `decode_attention` call
over [sinks, one segment a class, window] (the uniform caches' kernels: no positions, logits buffer or softmax of
its own), and its token probabilities come back per segment, folded into the position-indexed importance through
each class's positions (docs/smartkv.md, "Joint classes")."""
from __future__ import annotations

import itertools

import torch

from smartkv.core.importance import add_range
from smartkv.core.policy import unpack_levels
from smartkv.core.quant import QTensor
from smartkv.kernels import KVSegment, decode_attention, importance_update


def _rows(q: QTensor, start: int, n: int) -> QTensor:
    """Tokens [start, start + n) of a per-token QTensor (B, H, T, .): views, no copy."""
    return QTensor(q.codes[..., start:start + n, :], q.scale[..., start:start + n, :], q.zero[..., start:start + n, :],
                   q.bits, q.group_size, q.axis)


def _class_offsets(classes: dict) -> dict:
    """{(key width, value width): (k0, v0, n)} in class order: where each class's n tokens start in its key pool
    (after the classes of narrower value widths) and in its value pool (after those of narrower key widths), the
    class-major layout a joint re-allocation writes."""
    out = {}
    for kw, vw in sorted(classes):
        out[(kw, vw)] = (sum(m for (k, v), m in classes.items() if k == kw and v < vw),
                         sum(m for (k, v), m in classes.items() if v == vw and k < kw), classes[(kw, vw)])
    return out


class SmartKVOnePass:
    """SmartKVLayer's one-pass decode part (see the module docstring)."""

    def _one_pass(self) -> bool:
        """Class-major pools with keys and values in the model's basis (a rotation has no place in a segment)."""
        return self._class_major and self._classes is not None and not (self.rot_k or self.rot_v)

    def _class_segments(self, win_k: torch.Tensor, win_v: torch.Tensor) -> list[KVSegment]:
        """[sinks, each class in (key width, value width) order, window]: a class's keys from key pool kw after
        the classes of narrower value widths, its values from value pool vw after those of narrower key widths."""
        segs = [KVSegment(self.sink_k, self.sink_v)]
        for (kw, vw), (k0, v0, n) in _class_offsets(self._classes).items():
            segs.append(KVSegment(_rows(self.pools["k"][kw], k0, n), _rows(self.pools["v"][vw], v0, n),
                                  key_scale=self.k_scale, key_shift=self.k_mu))
        segs.append(KVSegment(win_k, win_v))
        return segs

    def _class_positions(self, kind: str = "k") -> torch.Tensor:
        """(B, H, n_middle) int64: the middle's positions ordered by `kind`'s width, then the other kind's, then
        position (a stable sort of the two level maps). For keys that is `_class_segments`' order, classes in
        (key width, value width) order; for either kind, its class-major pools' order, width after width."""
        own, other = (unpack_levels(self.levels[k], self.n_middle).long() for k in (kind, "v" if kind == "k" else "k"))
        return torch.argsort(own * len(self.widths) + other, dim=-1, stable=True)

    def _one_pass_decode(self, query: torch.Tensor, scaling: float, observe: bool) -> torch.Tensor:
        """The decode step (B, 1, Hq, D) in query's dtype. With `observe`, the query's token probabilities (mean
        over each KV group's query heads, as `_observe` folds them) go into the importance codes."""
        B, Hq = query.shape[:2]
        H, n_sink, Tm = self.num_heads, self.sink_k.shape[-2], self.n_middle
        static = self.static is not None
        # static steps: the window's whole buffer; `lengths` masks what lies past each sequence's token
        win_k, win_v = (self._sbuf["k"], self._sbuf["v"]) if static else (self.win_k, self.win_v)
        segs = self._class_segments(win_k, win_v)
        lengths = self.static.lengths if static else None
        if not observe:
            return decode_attention(query, segs, scaling, lengths).transpose(1, 2)
        T = n_sink + Tm + win_k.shape[-2]
        by_class = torch.zeros(B, H, T, device=query.device)
        bounds = [0, *itertools.accumulate(s.num_tokens for s in segs)]
        out, _ = decode_attention(query, segs, scaling, lengths, return_token_probs=True,
                                  probs_out=[by_class[..., a:b] for a, b in zip(bounds, bounds[1:])])
        G = Hq // H
        probs = by_class / G                                   # the mean over a group's query heads
        if Tm:
            where = self._sbuf["pos"] if static else self._class_positions()
            probs[..., n_sink:n_sink + Tm].scatter_(-1, where, by_class[..., n_sink:n_sink + Tm] / G)
        if static:  # the decode queries' range ends at this query's position, on the device
            importance_update(self._sbuf["imp"], probs, self._sbuf["ranges"], self.static.pos)
        else:
            importance_update(self.importance, probs, self.observed.tolist())
            self.observed = add_range(self.observed, T - 1, T)
        return out.transpose(1, 2)
