"""What every method shares: a frozen, validated config dataclass that builds cache layers."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from smartkv.core.quant import BITS


@dataclass(frozen=True)
class MethodConfig:
    """Base of all method configs. Fields are the method's hyper-parameters; `validate` checks them."""
    name: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and what is allowed."""

    def make_layer(self, layer_idx: int):
        raise NotImplementedError

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """Short label with the parameters that differ from the defaults, e.g. `kivi(key_bits=2,value_bits=2)`."""
        defaults = type(self)()
        diff = {k: v for k, v in self.params().items() if getattr(defaults, k) != v}
        inner = ",".join(f"{k}={v}" for k, v in sorted(diff.items()))
        return f"{self.name}({inner})" if inner else self.name

    def canonical_json(self) -> str:
        return json.dumps(self.params(), sort_keys=True, separators=(",", ":"))


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_bits_param(name: str, value) -> None:
    check_choice(name, value, BITS)


def check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")


def check_group_size(value) -> None:
    check_choice("group_size", value, (8, 16, 32, 64, 128))


def group_for(group_size: int, head_dim: int) -> int:
    """Channels per quantization group on a model with `head_dim`: the one rule of every method. A group_size
    larger than head_dim is clamped to head_dim (one group per token and head: the same bytes as the largest
    group that fits), so a method's defaults work on any model; a group that does not divide head_dim is an
    error."""
    group = min(group_size, head_dim)
    if head_dim % group:
        raise ValueError(f"group_size must divide head_dim ({head_dim}) or exceed it, got {group_size}")
    return group
