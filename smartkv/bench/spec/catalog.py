"""What a grid may name: methods, prompt sets and models. The one place the runner asks smartkv.methods,
smartkv.data and smartkv.models about names, so grid validation can run against a fake in tests.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from smartkv.models import EMBEDDED_ALIASES, EMBEDDED_NAMES, TINY_MODELS

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name


def check_model_name(name: str) -> str | None:
    """None if `name` can be loaded by smartkv.models.load_model, else what is wrong (checked without loading)."""
    if name.lower() in EMBEDDED_ALIASES or name in TINY_MODELS:
        return None
    if looks_like_path(name):
        local = Path(os.path.expanduser(name))   # os.path's leaves a ~user of no user here as it is; pathlib's raises
        if not local.is_dir():
            return f"local model directory {name!r} does not exist"
        if not (local / "config.json").is_file():
            return f"local model directory {name!r} has no config.json"
        return None
    if ".." in name or not HUB_ID_RE.match(name):
        return (f"{name!r} is not a known model ({', '.join(EMBEDDED_NAMES + TINY_MODELS)}), "
                "a local directory (start it with ./ or /) or a hub id like org/name")
    return None


class Catalog:
    """The real catalog: smartkv.methods, smartkv.data, smartkv.models (imported on first use)."""

    def __init__(self) -> None:
        self._described: dict[str, tuple[str, str]] = {}

    def method_names(self) -> list[str]:
        from smartkv import methods
        return list(methods.list_methods())

    def canonical_method(self, name: str, params: dict) -> dict:
        """{"name", "params" (every parameter, defaults filled in), "label"}; ValueError for a bad method (the
        config is built once, here, and travels as this dict across the Ray and Parquet boundary)."""
        import json

        from smartkv import methods
        config = methods.make_config(name, **params)
        full = _integral_floats_to_int(json.loads(json.dumps(config.params(), default=list)))
        return {"name": name, "params": full, "label": config.label()}

    def prompt_set_names(self) -> list[str]:
        from smartkv import data
        return list(data.list_prompt_sets())

    def validate_prompt_set(self, name: str, options: dict) -> None:
        from smartkv import data
        data.validate_prompt_set(name, dict(options))

    def describe_prompt_set(self, name: str, options: dict) -> tuple[str, str]:
        """(version, content hash) of a prompt set; cached, since building a set can read files."""
        import json

        key = json.dumps([name, options], sort_keys=True)
        if key not in self._described:
            from smartkv import data
            prompt_set = data.get_prompt_set(name, **options)
            self._described[key] = (str(prompt_set.version), str(prompt_set.content_hash()))
        return self._described[key]

    def check_model(self, name: str) -> str | None:
        return check_model_name(name)

    def tiny_models(self) -> tuple[str, ...]:
        return TINY_MODELS

    def check_tiny_config(self, name: str, config: dict) -> str | None:
        from smartkv.models import tiny_config_problem
        return tiny_config_problem(name, config)

    def model_context(self, model: dict) -> int | None:
        from smartkv.models import model_context
        return model_context(model["name"], model.get("revision"), model.get("config"))

    def tokenizer(self, model: dict):
        """The model's tokenizer if it is on this machine (no weights, no network), else None."""
        from smartkv.models import load_tokenizer_offline
        return load_tokenizer_offline(model["name"], model.get("revision"), model.get("config"),
                                      model.get("trust_remote_code", False))

    def prompt_set(self, name: str, options: dict):
        from smartkv import data
        return data.get_prompt_set(name, **options)

    def model_names(self) -> list[str]:
        return [*EMBEDDED_NAMES, *TINY_MODELS]

    def package_version(self) -> str:
        return package_version()


def _integral_floats_to_int(value):
    """budget: 4 and budget: 4.0 are the same job, so they must give the same id."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_to_int(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_to_int(v) for k, v in value.items()}
    return value


def package_version() -> str:
    try:
        return importlib.metadata.version("smartkv")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def default_catalog() -> Catalog:
    return Catalog()
