"""SmartKV's joint re-allocation (`joint=True`): keys and values placed along one ranking, class by class (key
width, value width), so every row (sequence x KV head) holds the same number of tokens of each class. That is
what lets each class be one dense segment of the uniform decode kernels (docs/smartkv.md, "Joint classes"): the
width pools are written class-major, each class one slice of its key pool and of its value pool (onepass.py reads
them)."""
from __future__ import annotations

import torch

from smartkv.core.classes import (JointCandidates, joint_assign, joint_candidates, joint_counts, joint_plan,
                                  staircase)
from smartkv.core.policy import Candidates, counts_for_budgets, rank_profile


class SmartKVJoint:
    """SmartKVLayer's joint re-allocation part. `_classes`: tokens of a row in each class, known on the host while
    every row holds the same counts (None when a per-kind re-allocation ran since, e.g. a sliding layer that
    forgot tokens: the joint path then waits for the next first allocation)."""

    def _joint_ready(self) -> bool:
        return self.config.joint and (not self.n_middle or self._classes is not None)

    def _reallocate_joint(self, weights: torch.Tensor, kinds: tuple) -> None:
        """`_reallocate_candidates` with both kinds placed together (`kinds`: keys', then values' (kind, new
        tokens (B, H, n, D), budget)): the same candidates for both, one device->host copy of their rank profile,
        each kind's counts solved from it, merged along the ranking into classes (classes.staircase) and placed
        class by class under both kinds' caps."""
        bt, R, lo = self.block_tokens, weights.shape[0], min(self.widths)
        nb = weights.shape[1]
        old = [self._stored_ranks(kind)[0].reshape(R, self.n_middle)[:, ::bt] for kind, _, _ in kinds]
        held_classes = self._classes if self.n_middle else {}     # a first allocation (also after a reset)
        if not self.n_middle:
            self._warm_class_kernels()
        stored = {c: m // bt for c, m in held_classes.items() if m}
        cand = joint_candidates(weights, *old, stored, (kinds[0][2], kinds[1][2]), self.widths,
                                per_width=nb - self.n_middle // bt)
        profile = rank_profile(cand.weights).cpu()                  # the one wait for the device
        classes = staircase(*counts_for_budgets(profile, list(cand.budgets), self.widths))
        plan = joint_plan(classes, cand.capped(classes))
        bits = joint_assign(cand.weights, cand.caps_k, cand.caps_v, plan, (lo, lo))
        placed = joint_counts(plan, cand.idx.shape[1], (lo, lo))
        views = [self._kind_view(cand, i) for i in range(2)]
        cand_bits = [kind_bits.index_select(1, order) for kind_bits, (_, order) in zip(bits, views)]
        levels = [self._new_level(view, cb, old_b) for (view, _), cb, old_b in zip(views, cand_bits, old)]
        for i, (kind, new, _) in enumerate(kinds):
            per_width = dict.fromkeys(self.widths, 0)
            for c, m in placed.items():
                per_width[c[i]] += m
            # class-major pools: each class (key width, value width) one slice of its key pool and of its value pool
            self._place(kind, views[i][0], cand_bits[i], per_width, dict(zip(self.widths, self._counts(kind))), new,
                        levels[i], levels[1 - i])
        self._class_major = True
        classes_after = {c: m - bt * cand.sources.get(c, 0) for c, m in held_classes.items()}
        for c, m in placed.items():
            classes_after[c] = classes_after.get(c, 0) + bt * m
        self._classes = {c: m for c, m in classes_after.items() if m}

    @staticmethod
    def _kind_view(cand: JointCandidates, i: int) -> tuple[Candidates, torch.Tensor]:
        """The candidates as `_repool_candidates` takes them for kind i (0 keys, 1 values): the new units, then the
        stored ones grouped by that kind's width, ascending; and the column order that gives it."""
        sources = sorted(cand.sources.items(), key=lambda cm: (cm[0][i], cm[0]))
        starts, col = {}, cand.new
        for c, m in sorted(cand.sources.items()):      # the candidates' own order: by class
            starts[c] = col
            col += m
        dev = cand.idx.device       # made on the device from host ints: no copy for the step to wait on
        order = torch.cat([torch.arange(cand.new, device=dev)]
                          + [torch.arange(starts[c], starts[c] + m, device=dev) for c, m in sources])
        by_width: dict[int, int] = {}
        for c, m in sources:
            by_width[c[i]] = by_width.get(c[i], 0) + m
        caps = cand.caps_k if i == 0 else cand.caps_v
        view = Candidates(cand.idx.index_select(1, order), cand.weights.index_select(1, order),
                          caps.index_select(1, order), [], cand.budgets[i], cand.new, by_width)
        return view, order
