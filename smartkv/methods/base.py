"""What every method shares: a frozen, validated config dataclass that builds cache layers."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

from smartkv.core.quant import BITS


SLIDING_LAYERS = ("quantized", "fp16")


@dataclass(frozen=True)
class MethodConfig:
    """Base of all method configs. Fields are the method's hyper-parameters; `validate` checks them.

    sliding_layers: how sliding-window layers (hybrid models: Gemma 3's 15 of 18) spend memory. Either way such a
    layer holds only DynamicCache's last window - 1 tokens (smartkv.cache.sliding). "quantized" (the default): the
    method stores them like every other layer, so a method's bits mean the same on every model and every layer
    (at Gemma 3's 1.5K tokens its sliding layers hold most of the cache). "fp16": kept as the `fp16` method
    keeps them (the model's dtype, exactly DynamicCache's layer); the method's budget then buys the
    full-attention layers only, which dominate at long context. Models without sliding layers ignore it.
    """
    name: ClassVar[str] = ""
    sliding_layers: str = dataclasses.field(default="quantized", kw_only=True)
    # Fields added after results were stored under job ids that hash every parameter: at these values they stay
    # out of `params()`, so a config that does not set them keeps the id (and label) it had before they existed.
    ID_NEUTRAL: ClassVar[dict] = {"sliding_layers": "quantized"}

    def __post_init__(self):
        check_choice("sliding_layers", self.sliding_layers, SLIDING_LAYERS)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the parameter and what is allowed."""

    def make_layer(self, layer_idx: int):
        raise NotImplementedError

    def bind(self, layers: list) -> None:
        """State one cache's layers share, made once they are built (none by default)."""

    def build_layer(self, layer_idx: int, sliding_window: int | None = None):
        """The cache layer of model layer `layer_idx`, which attends to its last `sliding_window` tokens (None:
        to all of them)."""
        if sliding_window is not None and self.sliding_layers == "fp16":
            from smartkv.methods import METHODS  # the registry: this module is below the methods it holds
            layer = METHODS.get("fp16")().make_layer(layer_idx)
        else:
            layer = self.make_layer(layer_idx)
        layer.set_sliding_window(sliding_window)
        return layer

    def params(self) -> dict:
        """Every parameter, less those at their ID_NEUTRAL value; `make_config(name, **params())` rebuilds it."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in self.ID_NEUTRAL or self.ID_NEUTRAL[k] != v}

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
