"""SmartKV's hyper-parameters: one frozen dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from smartkv.core.policy import WIDTHS, check_budget
from smartkv.methods.base import MethodConfig, check_choice, check_group_size, check_int
from smartkv.methods.smartkv.first import FirstGroup, group_size, solves_together, stacked_demotions
from smartkv.methods.smartkv.layer import SmartKVLayer


@dataclass(frozen=True)
class SmartKV(MethodConfig):
    """Attention-importance mixed precision under an average code-width `budget` (bits per quantized element,
    the mean of keys' and values' averages). Measured effect of each option: docs/smartkv.md."""
    name = "smartkv"
    # block_tokens=1 is the per-token design results were stored under; `realloc` is not neutral: its default
    # changes what a config computes, so SmartKV's job ids change with it. A neutral value is the default (params()
    # leaves it out, so make_config rebuilds it): joint and class_norm are neutral at append's (True, "previous"),
    # and a config naming their former defaults gets a new id, as one naming neither computes something new.
    ID_NEUTRAL: ClassVar[dict] = {**MethodConfig.ID_NEUTRAL, "block_tokens": 1, "joint": True, "ring_tokens": 256,
                                  "demote_every": 1, "class_norm": "previous"}
    budget: float = 7.0
    widths: tuple = WIDTHS
    group_size: int = 64
    sink_tokens: int = 4
    recent_window: int = 32
    realloc_every: int = 16
    block_tokens: int = 1      # middle tokens (consecutive, per KV head) sharing one width; the middle grows by blocks
    # "append": a ring of recent tokens at one class, then each group a fixed class mix kept for good (append.py;
    # ~1.1x int4's graphed step, KL 1.02x / 1.08x "incremental"'s at int4's / KIVI-2's bytes: docs/smartkv.md), on
    # full-attention layers with joint classes, per-token widths and no rotation (else "incremental");
    # "incremental": new blocks and one demotion candidate per width and new block (a re-allocation every
    # `realloc_every` tokens, 4-5x int4's graphed step); "full": every block
    realloc: str = "append"
    joint: bool = True         # keys and values placed together: equal (key width, value width) counts in every row
    ring_tokens: int = 256     # realloc="append": the newest middle tokens, held at the top class before their own
    # realloc="append": while the ring fills, one flush in `demote_every` demotes, paying ahead for the ring's growth
    # until the next one (each demoting flush passes over whole class buffers: fewer of them, less time, but demotions
    # made before later queries show which tokens matter: KL 1.28x the default's at 4, docs/smartkv.md)
    demote_every: int = 1
    # realloc="append", while the ring fills: each decode query's attention to the class rows (their demotion
    # importance) normalised by its own log-sum-exp ("exact": the attention pass writes (B, Hq, T) logits, read
    # twice more) or by the previous query's ("previous": folded in the pass, no logits; KL on the evaluation part
    # 0.99x / 1.05x exact's at int4's / KIVI-2's points, docs/smartkv.md)
    class_norm: str = "previous"
    observe_window: int = 32
    key_norm: str = "channel"
    importance: str = "mean"
    importance_floor: float = 0.1
    importance_power: float = 2.0
    sensitivity: bool = True
    key_value_gap: float = 2.0
    rotate: str = "none"
    use_kernels: bool = True   # False: never the Triton kernels (dequantize + attention in torch even on CUDA)

    def validate(self) -> None:
        if not self.widths or any(w not in WIDTHS for w in self.widths) or len(set(self.widths)) != len(self.widths):
            raise ValueError(f"widths must be distinct values from {WIDTHS}, got {self.widths!r}")
        check_budget(self.budget, self.widths)
        check_group_size(self.group_size)
        check_int("sink_tokens", self.sink_tokens, 0, 1024)
        check_int("recent_window", self.recent_window, 0, 1 << 20)
        check_int("realloc_every", self.realloc_every, 1, 1 << 20)
        check_int("observe_window", self.observe_window, 1, 1 << 16)
        check_int("block_tokens", self.block_tokens, 1, 1024)
        check_int("ring_tokens", self.ring_tokens, 0, 1 << 20)
        check_int("demote_every", self.demote_every, 1, 1 << 16)
        check_choice("realloc", self.realloc, ("append", "incremental", "full"))
        check_choice("class_norm", self.class_norm, ("exact", "previous"))
        check_choice("joint", self.joint, (True, False))
        check_choice("key_norm", self.key_norm, ("channel", "center", "none"))
        check_choice("importance", self.importance, ("mean", "sum", "keynorm", "uniform"))
        if not isinstance(self.importance_floor, (int, float)) or not 0 <= self.importance_floor <= 1e6:
            raise ValueError(f"importance_floor must be a number >= 0, got {self.importance_floor!r}")
        if not isinstance(self.importance_power, (int, float)) or not 0 <= self.importance_power <= 8:
            raise ValueError(f"importance_power must be a number in [0, 8], got {self.importance_power!r}")
        check_choice("sensitivity", self.sensitivity, (True, False))
        if not isinstance(self.key_value_gap, (int, float)) or not 0 <= self.key_value_gap <= 6:
            raise ValueError(f"key_value_gap must be a number in [0, 6] bits, got {self.key_value_gap!r}")
        check_choice("rotate", self.rotate, ("none", "keys", "both"))
        check_choice("use_kernels", self.use_kernels, (True, False))

    def make_layer(self, layer_idx: int):
        return SmartKVLayer(self, layer_idx)

    def bind(self, layers: list) -> None:
        """One cache's layers share the group their first allocations wait in (first.py)."""
        group = FirstGroup(layers, group_size(), solves_together(), stacked_demotions())
        for layer in layers:
            if isinstance(layer, SmartKVLayer):
                layer._first_group = group
