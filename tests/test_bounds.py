"""Every number a grid or a command line gives is bounded before any work starts: no option can ask for an
allocation the machine cannot hold."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from smartkv.bench.spec.fields import OPTION_BOUNDS
from smartkv.data.base import PROMPT_SETS
from smartkv.models import TINY_BOUNDS, TINY_DEFAULTS, load_tiny, tiny_config_problem


def test_every_integer_option_of_every_prompt_set_has_a_bound():
    unbounded = []
    for name in PROMPT_SETS.names():
        cls = PROMPT_SETS.get(name)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.init and "int" in str(hints.get(field.name)) and field.name not in OPTION_BOUNDS:
                unbounded.append(f"{name}.{field.name}")
    assert unbounded == []


def test_every_tiny_model_setting_has_a_bound_and_the_defaults_pass():
    for kind, defaults in TINY_DEFAULTS.items():
        assert set(defaults) <= set(TINY_BOUNDS)
        assert tiny_config_problem(kind, {}) is None


@pytest.mark.parametrize("overrides,says", [({"hidden_size": 65536}, "[8, 8192]"),
                                            ({"vocab_size": 10**9}, "vocab_size"),
                                            ({"hidden_size": 8192, "num_hidden_layers": 64}, "parameters")])
def test_a_huge_tiny_model_is_refused_before_allocating(overrides, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_tiny("tiny-llama", **overrides)
