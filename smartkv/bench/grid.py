"""Grid files (jobs/*.yaml) -> validated, expanded, canonical job specs with stable ids.

A grid file (YAML, read with `yaml.safe_load` only):

    name: quick                       # optional, default: the file's stem; [A-Za-z0-9._-], names results/<name>/
    description: free text            # optional
    models:                           # list of names or mappings
      - smollm2                       # the embedded model; "tiny-llama"/"tiny-gpt2" (random); HF id; local dir
      - {name: tiny-llama, dtype: float32, device: cpu, config: {hidden_size: 512}}   # config: tiny models only
    methods:                          # mapping name -> params, or a list of {name: params} (same name twice)
      fp16: {}
      smartkv: {budget: [3, 4, 6]}    # a list is a sweep (cartesian product over all swept keys);
                                      # a literal list value is written as a one-item sweep: [[2, 4, 8]]
    prompt_sets:                      # same shapes as methods; options go to smartkv.data
      passkey: {context_tokens: 1024, n_samples: 3, seed: 0}
    generation: {max_new_tokens: null, do_sample: false}   # + temperature, top_p, top_k, compare_fp16 (KL vs fp16)
    truncation: {side: middle, max_context_tokens: null}   # side: left | right | middle | none
    seeds: [0]                        # int or list; the job seed (torch/numpy), not the data seed
    repeats: 1                        # 1..100; repeats of every job (timing and sampling variance)

The canonical job spec (what `worker.run_job` receives, stored in each result file's metadata):

    {"spec_version", "job_id", "grid",
     "model": {"name", "revision", "dtype", "device", "trust_remote_code", "config"},
     "method": {"name", "params", "label"}, "prompt_set": {"name", "options"},
     "generation": {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "compare_fp16"},
     "truncation": {"side", "max_context_tokens"},
     "seed", "repeat", "package_version", "prompt_set_version", "prompt_set_hash"}

`job_id` is sha256 of the canonical JSON of everything except `job_id` and `grid`, so the same job in two grids
shares its id (method params are completed with their defaults; see job_id_of), and any change to model, revision, method params, data version/content, truncation, generation,
seed, repeat or package version gives a new id.

Every error is a `GridError` naming the file, the field and what is allowed; the whole file is checked before
anything runs.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smartkv.bench import catalog as catalog_mod
from smartkv.bench.catalog import Catalog
from smartkv.registry import did_you_mean

SPEC_VERSION = 1
MAX_JOBS = 10_000
MAX_FILE_BYTES = 1_000_000
MAX_REPEATS = 100
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

GRID_KEYS = ("name", "description", "models", "methods", "prompt_sets", "generation", "truncation", "seeds",
             "repeats")
MODEL_KEYS = ("name", "revision", "dtype", "device", "trust_remote_code", "config")
GENERATION_DEFAULTS: dict[str, Any] = {"max_new_tokens": None, "do_sample": False, "temperature": None,
                                       "top_p": None, "top_k": None, "compare_fp16": True}
TRUNCATION_DEFAULTS: dict[str, Any] = {"side": "middle", "max_context_tokens": None}
TRUNCATION_SIDES = ("left", "right", "middle", "none")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2})$")
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
TINY_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head",
                    "n_positions")
# Keys prompt-set options use for size: for ordering jobs longest first, and bounded (below) so that a typo
# like `length: 40000000` fails here rather than after hours; smartkv.data checks everything else.
_LENGTH_KEYS = ("length", "max_length", "context_tokens")
_COUNT_KEYS = ("num_samples", "n_samples")
OPTION_BOUNDS = {"length": (16, 1_048_576), "max_length": (16, 1_048_576), "context_tokens": (16, 1_048_576),
                 "num_samples": (1, 100_000), "n_samples": (1, 100_000), "seed": (0, 2**31 - 1)}


class GridError(ValueError):
    """A bad grid file: `file: field: what is allowed, got what`."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field, self.message = str(file), field, message
        super().__init__(f"{self.file}: {field}: {message}")


@dataclass(frozen=True)
class Grid:
    name: str
    path: str
    jobs: list[dict] = field(default_factory=list)
    description: str = ""


def package_version() -> str:
    try:
        return importlib.metadata.version("smartkv")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def job_id_of(spec: dict) -> str:
    """16 hex digits of sha256 over the canonical spec, less what does not change the job: `job_id`, `grid`,
    the method's display label, and the prompt set's options as written (its content hash covers every option,
    defaults included, and the bytes of any data file, but not where the file lies)."""
    identity = {k: v for k, v in spec.items() if k not in ("job_id", "grid")}
    identity["method"] = {k: v for k, v in spec["method"].items() if k != "label"}
    identity["prompt_set"] = {"name": spec["prompt_set"]["name"]}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def method_label(method: dict) -> str:
    if method.get("label"):
        return method["label"]
    params = ",".join(f"{k}={_short(v)}" for k, v in sorted(method["params"].items()))
    return f"{method['name']}({params})" if params else method["name"]


def _short(value: Any) -> str:
    return canonical_json(value) if isinstance(value, (list, dict)) else str(value)


def job_identity(job: dict) -> dict:
    """The identity columns every result row of `job` carries (see schema.py)."""
    return {
        "job_id": job["job_id"], "grid": job["grid"], "model": job["model"]["name"],
        "model_revision": job["model"]["revision"], "method": job["method"]["name"],
        "method_params": canonical_json(job["method"]["params"]), "method_label": method_label(job["method"]),
        "prompt_set": job["prompt_set"]["name"], "prompt_set_version": job["prompt_set_version"],
        "prompt_set_hash": job["prompt_set_hash"], "seed": job["seed"], "repeat": job["repeat"],
        "package_version": job["package_version"],
    }


def job_cost(job: dict) -> float:
    """Relative cost used to start the longest jobs first: context length x samples (x new tokens)."""
    options = job["prompt_set"]["options"]
    length = next((options[k] for k in _LENGTH_KEYS if isinstance(options.get(k), (int, float))), 1024)
    count = next((options[k] for k in _COUNT_KEYS if isinstance(options.get(k), (int, float))), 10)
    new_tokens = job["generation"].get("max_new_tokens") or 32
    return float(length) * float(count) * (1.0 + new_tokens / 256.0)


# ---------------------------------------------------------------------------------------------------------------
# loading and validation


def load_grid(path: str | Path, catalog: Catalog | None = None) -> Grid:
    """Read, validate and expand a grid file. Raises GridError on the first problem found."""
    path = Path(path)
    raw = _read_yaml(path)
    return expand(raw, path, catalog or catalog_mod.default_catalog())


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise GridError(path, "(file)", "no such grid file" if not path.exists() else "not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise GridError(path, "(file)", f"grid files must be under {MAX_FILE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GridError(path, "(file)", f"cannot read as UTF-8 text ({exc.__class__.__name__})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise GridError(path, where, f"YAML syntax error: {problem}") from None
    if raw is None:
        raise GridError(path, "(top level)", f"empty grid; expected a mapping with keys {', '.join(GRID_KEYS)}")
    if not isinstance(raw, dict):
        raise GridError(path, "(top level)", f"must be a mapping with keys {', '.join(GRID_KEYS)}, "
                                             f"got {type(raw).__name__}")
    return raw


def expand(raw: dict, path: Path, catalog: Catalog) -> Grid:
    _check_keys(raw, GRID_KEYS, path, "")
    name = _grid_name(raw.get("name", path.stem), path)
    models = _models(raw.get("models"), path, catalog)
    methods = _entries(raw.get("methods"), "methods", path, catalog.method_names(), catalog.validate_method,
                       catalog.canonical_method)
    sets = _entries(raw.get("prompt_sets"), "prompt_sets", path, catalog.prompt_set_names(),
                    catalog.validate_prompt_set, lambda name, options: {"name": name, "options": options})
    generation = _generation(raw.get("generation"), path)
    truncation = _truncation(raw.get("truncation"), path)
    seeds = _seeds(raw.get("seeds", 0), path)
    repeats = _int(raw.get("repeats", 1), path, "repeats", 1, MAX_REPEATS)
    total = len(models) * len(methods) * len(sets) * len(seeds) * repeats
    if total > MAX_JOBS:
        raise GridError(path, "(grid)", f"expands to {total} jobs; at most {MAX_JOBS} are allowed")
    described = {canonical_json(ps): _describe_set(ps, fld, path, catalog) for fld, ps in sets}
    jobs, seen = [], {}
    for (m_field, model), (x_field, method), (s_field, ps), seed, repeat in itertools.product(
            models, methods, sets, seeds, range(repeats)):
        version, content_hash = described[canonical_json(ps)]
        spec = {"spec_version": SPEC_VERSION, "grid": name, "model": model, "method": method, "prompt_set": ps,
                "generation": generation, "truncation": truncation, "seed": seed, "repeat": repeat,
                "package_version": catalog.package_version(), "prompt_set_version": version,
                "prompt_set_hash": content_hash}
        spec["job_id"] = job_id_of(spec)
        where = f"{m_field} x {x_field} {method_label(method)} x {s_field}{_fmt(ps['options'])}"
        if spec["job_id"] in seen:
            raise GridError(path, where, f"duplicate job: the same as {seen[spec['job_id']]}; "
                                         "remove one of the repeated entries")
        seen[spec["job_id"]] = where
        jobs.append(spec)
    return Grid(name=name, path=str(path), jobs=jobs, description=str(raw.get("description") or ""))


def _check_keys(mapping: dict, allowed: tuple[str, ...], path: Path, where: str) -> None:
    for key in mapping:
        if not isinstance(key, str) or key not in allowed:
            fld = f"{where}.{key}" if where else str(key)
            raise GridError(path, fld, f"unknown key{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}")


def _grid_name(value: Any, path: Path) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
        raise GridError(path, "name", "must be 1-64 characters of letters, digits, '.', '_' or '-', starting "
                                      f"with a letter or digit (it names the results folder), got {value!r}")
    return value


def _int(value: Any, path: Path, fld: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise GridError(path, fld, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _seeds(value: Any, path: Path) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise GridError(path, "seeds", "must be an integer or a non-empty list of integers in [0, 2147483647]")
    seeds = [_int(v, path, f"seeds[{i}]", 0, 2**31 - 1) for i, v in enumerate(values)]
    if len(set(seeds)) != len(seeds):
        raise GridError(path, "seeds", f"duplicate seeds in {seeds}")
    return seeds


def _models(value: Any, path: Path, catalog: Catalog) -> list[tuple[str, dict]]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise GridError(path, "models", "must be a non-empty list of model names or mappings with keys "
                                        f"{', '.join(MODEL_KEYS)}, got {value!r}")
    models, seen = [], {}
    for i, entry in enumerate(value):
        fld = f"models[{i}]"
        model = _model(entry, path, fld, catalog)
        key = canonical_json(model)
        if key in seen:
            raise GridError(path, fld, f"duplicate model: the same as {seen[key]}")
        seen[key] = fld
        models.append((fld, model))
    return models


def _model(entry: Any, path: Path, fld: str, catalog: Catalog) -> dict:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise GridError(path, fld, f"must be a model name or a mapping with keys {', '.join(MODEL_KEYS)}")
    _check_keys(entry, MODEL_KEYS, path, fld)
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
    config = _tiny_config(entry.get("config"), name, path, f"{fld}.config", catalog)
    return {"name": name, "revision": None if revision is None else str(revision), "dtype": dtype,
            "device": device, "trust_remote_code": trust, "config": config}


def _tiny_config(value: Any, name: str, path: Path, fld: str, catalog: Catalog) -> dict | None:
    if value is None:
        return None
    if name not in catalog.tiny_models():
        raise GridError(path, fld, f"only allowed for the random models {', '.join(catalog.tiny_models())}")
    if not isinstance(value, dict) or not value:
        raise GridError(path, fld, f"must be a mapping of {', '.join(TINY_CONFIG_KEYS)}")
    _check_keys(value, TINY_CONFIG_KEYS, path, fld)
    return {k: _int(v, path, f"{fld}.{k}", 1, 65536) for k, v in sorted(value.items())}


def _entries(value: Any, fld: str, path: Path, names: list[str], validate, canonical) -> list[tuple[str, dict]]:
    """methods / prompt_sets: mapping or list of single-key mappings -> expanded (field, {name, params}) list."""
    kind = "method" if fld == "methods" else "prompt set"
    pairs = _entry_pairs(value, fld, path, kind)
    out, seen = [], {}
    for where, name, params in pairs:
        if name not in names:
            raise GridError(path, where, f"unknown {kind} {name!r}{did_you_mean(name, names)}; "
                                         f"allowed: {', '.join(names)}")
        for combo in _sweep(params, path, where):
            if fld == "prompt_sets":
                _check_bounds(combo, path, where)
            try:
                validate(name, combo)
            except ValueError as exc:
                raise GridError(path, where, str(exc)) from None
            key = canonical_json([name, combo])
            if key in seen:
                raise GridError(path, where, f"duplicate {kind} {name}{_fmt(combo)}: already given at {seen[key]}")
            seen[key] = where
            out.append((where, canonical(name, combo)))
    return out


def _check_bounds(options: dict, path: Path, where: str) -> None:
    for key, (lo, hi) in OPTION_BOUNDS.items():
        if options.get(key) is not None:
            _int(options[key], path, f"{where}.{key}", lo, hi)


def _entry_pairs(value: Any, fld: str, path: Path, kind: str) -> list[tuple[str, str, Any]]:
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


def _sweep(params: Any, path: Path, where: str) -> list[dict]:
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise GridError(path, where, f"parameters must be a mapping (a list value is a sweep), got {params!r}")
    for key, val in params.items():
        if not isinstance(key, str):
            raise GridError(path, f"{where}.{key}", "parameter names must be strings")
        if isinstance(val, list) and not val:
            raise GridError(path, f"{where}.{key}", "an empty sweep; give at least one value")
        _check_scalar(val, path, f"{where}.{key}")
    keys = sorted(params)
    axes = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [dict(zip(keys, values)) for values in itertools.product(*axes)]


def _check_scalar(value: Any, path: Path, fld: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise GridError(path, fld, f"must be a finite number, got {value!r}")
    if isinstance(value, list):
        for v in value:
            _check_scalar(v, path, fld)
    elif isinstance(value, dict):
        raise GridError(path, fld, "nested mappings are not allowed in parameters")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise GridError(path, fld, f"must be a number, string, boolean or null, got {type(value).__name__}")


def _fmt(params: dict) -> str:
    return "(" + ", ".join(f"{k}={_short(v)}" for k, v in params.items()) + ")" if params else ""


def _describe_set(ps: dict, fld: str, path: Path, catalog: Catalog) -> tuple[str, str]:
    try:
        return catalog.describe_prompt_set(ps["name"], ps["options"])
    except (ValueError, OSError) as exc:
        raise GridError(path, fld, str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__) from None


def _generation(value: Any, path: Path) -> dict:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise GridError(path, "generation", f"must be a mapping with keys {', '.join(GENERATION_DEFAULTS)}")
    _check_keys(value, tuple(GENERATION_DEFAULTS), path, "generation")
    gen = {**GENERATION_DEFAULTS, **value}
    if gen["max_new_tokens"] is not None:
        _int(gen["max_new_tokens"], path, "generation.max_new_tokens", 1, 4096)
    for key in ("do_sample", "compare_fp16"):
        if not isinstance(gen[key], bool):
            raise GridError(path, f"generation.{key}", f"must be true or false, got {gen[key]!r}")
    _opt_number(gen, "temperature", path, 0.0, 10.0, lo_open=True)
    _opt_number(gen, "top_p", path, 0.0, 1.0, lo_open=True)
    if gen["top_k"] is not None:
        _int(gen["top_k"], path, "generation.top_k", 1, 100_000)
    return gen


def _opt_number(gen: dict, key: str, path: Path, lo: float, hi: float, lo_open: bool) -> None:
    val = gen[key]
    if val is None:
        return
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
    if not ok or not ((lo < val) if lo_open else (lo <= val)) or val > hi:
        raise GridError(path, f"generation.{key}", f"must be a number in ({lo}, {hi}], got {val!r}")


def _truncation(value: Any, path: Path) -> dict:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise GridError(path, "truncation", f"must be a mapping with keys {', '.join(TRUNCATION_DEFAULTS)}")
    _check_keys(value, tuple(TRUNCATION_DEFAULTS), path, "truncation")
    trunc = {**TRUNCATION_DEFAULTS, **value}
    if trunc["side"] not in TRUNCATION_SIDES:
        raise GridError(path, "truncation.side", f"must be one of {', '.join(TRUNCATION_SIDES)}, "
                                                 f"got {trunc['side']!r}")
    if trunc["max_context_tokens"] is not None:
        _int(trunc["max_context_tokens"], path, "truncation.max_context_tokens", 16, 1_048_576)
    return trunc
