"""Samples, the PromptSet base class, option checks and the prompt-set registry.

A prompt set is a frozen dataclass whose fields are its options (kvpress-style); `name` and `version` are class
attributes, `version` is bumped whenever the generator changes what it produces. `content_hash()` covers the name,
version, every option (defaults included) and the bytes of any data the set reads, so it can go into job ids.
The tokenizer also shapes the samples (length fitting, truncation); job ids carry the model for that.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import ClassVar

from smartkv.core.registry import Registry, did_you_mean

PROMPT_SETS: Registry[type] = Registry("prompt set")
KINDS = ("generate", "ppl", "lm-eval")


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str  # text before any chat template
    answers: tuple[str, ...]  # references
    metric: str  # a name in smartkv.metrics.task (or "ppl")
    max_new_tokens: int
    kind: str  # "generate", "ppl" or "lm-eval" (the harness's own requests and metrics: see data/lmeval.py)
    continuation: str = ""  # kind == "ppl": text fed one token at a time after the prompt
    all_classes: tuple[str, ...] = ()
    answer_prefix: str = ""  # RULER: the start of the answer, put after the chat template's assistant header
    meta: dict = field(default_factory=dict, compare=False)  # depth, target length, task, language...
    harness: object = field(default=None, compare=False, repr=False)  # kind "lm-eval": its data.lmeval.LMEvalDoc


@dataclass(frozen=True)
class PromptSet:
    """Base of every prompt set; subclasses add their options as dataclass fields and implement `samples`."""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    unhashed: ClassVar[tuple[str, ...]] = ()  # options whose effect the data digest already covers (a file path)

    @property
    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def data_digest(self) -> str:
        """Digest of the external data the samples are made from ("" if none)."""
        return ""

    def content_hash(self) -> str:
        options = {k: v for k, v in self.options.items() if k not in self.unhashed}
        spec = {"name": self.name, "version": self.version, "options": options, "data": self.data_digest()}
        blob = json.dumps(spec, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def samples(self, tokenizer) -> list[Sample]:
        raise NotImplementedError

    def sample_range(self, tokenizer, lo: int, hi: int) -> list[Sample]:
        """`samples(tokenizer)[lo:hi]`; sets that build each sample on its own make only those."""
        return self.samples(tokenizer)[lo:hi]

    # ---- what the runner checks before any model loads -----------------------------------------------------
    def prompt_tokens(self) -> int | None:
        """Most tokens a sample feeds the model before generating (chat template aside); None: unknown until the
        data is read."""
        return None

    def new_tokens(self) -> int:
        """Tokens a sample generates unless the job says otherwise."""
        return 0

    def check_data(self) -> None:
        """ValueError if the set's data cannot be had: a local file that does not parse (file and line named), a
        hub dataset neither cached nor reachable. Reads local files only."""

    def check_tokenizer(self, tokenizer) -> None:
        """ValueError if this tokenizer cannot make the samples (a target length below the task's own prompt)."""


# ---- option checks: ValueError naming the option, what is allowed and what was given --------------------------

def check_int(option: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{option} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")


def check_choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {tuple(choices)}, got {value!r}")


def check_percents(option: str, values) -> tuple[float, ...]:
    """A list of percents in [0, 100] (depths), returned as a tuple so the frozen set stays hashable."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{option} must be a non-empty list of percents in [0, 100], got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 100:
            raise ValueError(f"{option} must be percents in [0, 100], got {v!r} in {list(values)!r}")
    return tuple(values)


def set_field(obj, name: str, value) -> None:
    """Normalise a field of a frozen dataclass in __post_init__."""
    object.__setattr__(obj, name, value)


# ---- lookup ---------------------------------------------------------------------------------------------------

def _split_name(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str):
        raise ValueError(f"prompt set name must be a string, got {name!r}")
    base, sep, arg = name.partition(":")
    return base, (arg if sep else None)


def _construct(cls: type, arg: str | None, full_name: str, options: dict) -> PromptSet:
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "task"]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for prompt set {full_name!r}{did_you_mean(key, allowed)}; "
                             f"allowed: {', '.join(sorted(allowed))}")
    if getattr(cls, "takes_task", False):
        return cls(task=arg, **options) if arg is not None else cls(**options)
    if arg is not None:
        raise ValueError(f"prompt set {cls.name!r} takes no ':' argument, got {full_name!r}")
    return cls(**options)


def get_prompt_set(name: str, **options) -> PromptSet:
    """The prompt set `name` ("passkey", "longbench:hotpotqa", ...) with `options`; ValueError on bad input."""
    base, arg = _split_name(name)
    if base not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}{did_you_mean(name, list_prompt_sets())}; "
                         f"allowed: {', '.join(list_prompt_sets())}")
    return _construct(PROMPT_SETS.get(base), arg, name, options)


def validate_prompt_set(name: str, options: dict) -> None:
    """Check a name and its options without loading any data (a local `path` must exist)."""
    get_prompt_set(name, **(options or {}))


def list_prompt_sets() -> list[str]:
    names = []
    for base in PROMPT_SETS.names():
        cls = PROMPT_SETS.get(base)
        names += [f"{base}:{t}" for t in cls.task_names()] if getattr(cls, "takes_task", False) else [base]
    return names
