"""Checks of each field of a grid file: every failure is a GridError naming the file, the field and what is
allowed (see grid.py for the format)."""
from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

from smartkv.bench.spec.catalog import Catalog
from smartkv.core.registry import did_you_mean

MAX_REPEATS = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MODEL_KEYS = ("name", "revision", "dtype", "device", "trust_remote_code", "config")
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": None, "do_sample": False, "temperature": None,
                                       "top_p": None, "top_k": None, "compare_fp16": True, "warmup": 1}
TRUNCATION_DEFAULTS: dict[str, Any] = {"side": "middle", "max_context_tokens": None}
TRUNCATION_SIDES = ("left", "right", "middle", "none")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2})$")
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
TINY_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head",
                    "n_positions")
# Every integer option of every prompt set, bounded before anything is built (tests/test_bounds.py checks that a
# new option cannot slip through without a bound here).
OPTION_BOUNDS = {"length": (16, 1_048_576), "max_length": (16, 1_048_576), "context_tokens": (16, 1_048_576),
                 "num_samples": (1, 100_000), "n_samples": (1, 100_000), "seed": (0, 2**31 - 1),
                 "continuation": (1, 65_536), "num_needles": (1, 1_000), "num_chains": (1, 100),
                 "num_hops": (1, 100), "num_fewshot": (0, 1_000), "fewshot_seed": (0, 2**31 - 1)}


class GridError(ValueError):
    """A bad grid file: `file: field: what is allowed, got what`."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{self.file}: {field}: {message}")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def short(value: Any) -> str:
    return canonical_json(value) if isinstance(value, (list, dict)) else str(value)


def fmt(params: dict) -> str:
    return "(" + ", ".join(f"{k}={short(v)}" for k, v in params.items()) + ")" if params else ""


def check_keys(mapping: dict, allowed: tuple[str, ...], path: Path, where: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or key not in allowed:
            fld = f"{where}.{key}" if where else str(key)
            raise GridError(path, fld, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


def grid_name(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise GridError(path, "name", "must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                                      f"with a letter or digit (it names the results folder), got {value!r}")
    return value


def int_in(value: Any, path: Path, fld: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise GridError(path, fld, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def seeds(value: Any, path: Path) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(path, "seeds", "must be an integer or a non-empty list of integers in [0, 2147483647]")
    out = [int_in(v, path, f"seeds[{i}]", 0, 2**31 - 1) for i, v in enumerate(values)]
    if len(set(out)) != len(out):
        raise GridError(path, "seeds", f"duplicate seeds in {out}")
    return out


def model_list(value: Any, path: Path, catalog: Catalog) -> list[tuple[str, dict]]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GridError(path, "models", "must be a non-empty list of model names or mappings with keys "
                                        f"{', '.join(MODEL_KEYS)}, got {value!r}")
    models, seen = [], {}
    for i, entry in enumerate(value):
        fld = f"models[{i}]"
        model = model_entry(entry, path, fld, catalog)
        key = canonical_json(model)
        if key in seen:
            raise GridError(path, fld, f"duplicate model: the same as {seen[key]}")
        seen[key] = fld
        models.append((fld, model))
    return models


def model_entry(entry: Any, path: Path, fld: str, catalog: Catalog) -> dict:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise GridError(path, fld, f"must be a model name or a mapping with keys {', '.join(MODEL_KEYS)}")
    check_keys(entry, MODEL_KEYS, path, fld)
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GridError(path, f"{fld}.name", "required: a model name, HF id or local directory")
    problem = catalog.check_model(name)
    if problem:
        raise GridError(path, f"{fld}.name", problem)
    revision = entry.get("revision")
    if revision is not None and (not isinstance(revision, (str, int)) or not re.match(r"^[\w./-]{1,100}$",
                                                                                       str(revision))):
        raise GridError(path, f"{fld}.revision", f"must be a branch, tag or commit hash, got {revision!r}")
    dtype = entry.get("dtype", "auto")
    if dtype not in DTYPES:
        raise GridError(path, f"{fld}.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}"
                                              f"{did_you_mean(dtype, DTYPES)}")
    device = entry.get("device", "auto")
    if not isinstance(device, str) or not DEVICE_RE.match(device):
        raise GridError(path, f"{fld}.device", f"must be one of auto, cpu, cuda, cuda:N, got {device!r}")
    trust = entry.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise GridError(path, f"{fld}.trust_remote_code", f"must be true or false, got {trust!r}")
    config = tiny_config(entry.get("config"), name, path, f"{fld}.config", catalog)
    return {"name": name, "revision": None if revision is None else str(revision), "dtype": dtype,
            "device": device, "trust_remote_code": trust, "config": config}


def tiny_config(value: Any, name: str, path: Path, fld: str, catalog: Catalog) -> dict | None:
    if value is None:
        return None
    if name not in catalog.tiny_models():
        raise GridError(path, fld, f"only allowed for the random models {', '.join(catalog.tiny_models())}")
    if not isinstance(value, dict) or not value:
        raise GridError(path, fld, f"must be a mapping of {', '.join(TINY_CONFIG_KEYS)}")
    check_keys(value, TINY_CONFIG_KEYS, path, fld)
    problem = catalog.check_tiny_config(name, value)
    if problem:
        raise GridError(path, fld, problem)
    return dict(sorted(value.items()))


def entries(value: Any, fld: str, path: Path, names: list[str], validate, canonical) -> list[tuple[str, dict]]:
    """methods / prompt_sets: mapping or list of single-key mappings -> expanded (field, {name, params}) list."""
    kind = "method" if fld == "methods" else "prompt set"
    pairs = entry_pairs(value, fld, path, kind)
    out, seen = [], {}
    for where, name, params in pairs:
        if not known_name(name, names):
            raise GridError(path, where, f"unknown {kind} {name!r}{did_you_mean(name, names)}; "
                                         f"allowed: {', '.join(names)}")
        for combo in sweep(params, path, where):
            if fld == "prompt_sets":
                check_bounds(combo, path, where)
            try:  # validate None: `canonical` validates (a method's config is built once, there)
                if validate is not None:
                    validate(name, combo)
                entry = canonical(name, combo)
            except ValueError as exc:
                raise GridError(path, where, str(exc)) from None
            key = canonical_json([name, combo])
            if key in seen:
                raise GridError(path, where, f"duplicate {kind} {name}{fmt(combo)}: already given at {seen[key]}")
            seen[key] = where
            out.append((where, entry))
    return out


def known_name(name: str, names: list[str]) -> bool:
    """`name` is listed, or a family listed as `base:<task>` takes any task (lm-eval:<task>); the family's own
    validation then says whether the task exists."""
    if name in names:
        return True
    base, sep, task = name.partition(":")
    return bool(sep and task) and f"{base}:<task>" in names


def check_bounds(options: dict, path: Path, where: str) -> None:
    for key, (lo, hi) in OPTION_BOUNDS.items():
        if options.get(key) is not None:
            int_in(options[key], path, f"{where}.{key}", lo, hi)


def entry_pairs(value: Any, fld: str, path: Path, kind: str) -> list[tuple[str, str, Any]]:
    example = "fp16: {}" if kind == "method" else "passkey: {n_samples: 3}"
    if isinstance(value, dict) and value:
        return [(f"{fld}.{name}", name, params) for name, params in value.items()]
    if isinstance(value, list) and value:
        pairs = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                raise GridError(path, f"{fld}[{i}]", f"must be a {kind} name or a one-key mapping like {{{example}}}")
            (name, params), = item.items()
            pairs.append((f"{fld}[{i}].{name}", name, params))
        return pairs
    raise GridError(path, fld, f"must be a non-empty mapping of {kind} name -> parameters (e.g. {example}) "
                               f"or a list of them, got {value!r}")


def sweep(params: Any, path: Path, where: str) -> list[dict]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise GridError(path, where, f"parameters must be a mapping (a list value is a sweep), got {params!r}")
    for key, val in params.items():
        if not isinstance(key, str):
            raise GridError(path, f"{where}.{key}", "parameter names must be strings")
        if isinstance(val, list) and not val:
            raise GridError(path, f"{where}.{key}", "an empty sweep; give at least one value")
        check_scalar(val, path, f"{where}.{key}")
    keys = sorted(params)
    axes = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes)]


def check_scalar(value: Any, path: Path, fld: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise GridError(path, fld, f"must be a finite number, got {value!r}")
    if isinstance(value, list):
        for v in value:
            check_scalar(v, path, fld)
    elif isinstance(value, dict):
        raise GridError(path, fld, "nested mappings are not allowed in parameters")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise GridError(path, fld, f"must be a number, string, boolean or null, got {type(value).__name__}")


def generation(value: Any, path: Path) -> dict:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise GridError(path, "generation", f"must be a mapping with keys {', '.join(GENERATION_DEFAULTS)}")
    check_keys(value, tuple(GENERATION_DEFAULTS), path, "generation")
    gen = {**GENERATION_DEFAULTS, **value}
    if gen["max_new_tokens"] is not None:
        int_in(gen["max_new_tokens"], path, "generation.max_new_tokens", 1, 4096)
    for key in ("do_sample", "compare_fp16"):
        if not isinstance(gen[key], bool):
            raise GridError(path, f"generation.{key}", f"must be true or false, got {gen[key]!r}")
    opt_number(gen, "temperature", path, 0.0, 10.0, lo_open=True)
    opt_number(gen, "top_p", path, 0.0, 1.0, lo_open=True)
    if gen["top_k"] is not None:
        int_in(gen["top_k"], path, "generation.top_k", 1, 100_000)
    int_in(gen["warmup"], path, "generation.warmup", 0, 8)
    return gen


def opt_number(gen: dict, key: str, path: Path, lo: float, hi: float, lo_open: bool) -> None:
    val = gen[key]
    if val is None:
        return
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if not ok or not ((lo < val) if lo_open else (lo <= val)) or val > hi:
        raise GridError(path, f"generation.{key}", f"must be a number in ({lo}, {hi}], got {val!r}")


def truncation(value: Any, path: Path) -> dict:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise GridError(path, "truncation", f"must be a mapping with keys {', '.join(TRUNCATION_DEFAULTS)}")
    check_keys(value, tuple(TRUNCATION_DEFAULTS), path, "truncation")
    trunc = {**TRUNCATION_DEFAULTS, **value}
    if trunc["side"] not in TRUNCATION_SIDES:
        raise GridError(path, "truncation.side", f"must be one of {', '.join(TRUNCATION_SIDES)}, "
                                                 f"got {trunc['side']!r}")
    if trunc["max_context_tokens"] is not None:
        int_in(trunc["max_context_tokens"], path, "truncation.max_context_tokens", 16, 1_048_576)
    return trunc
