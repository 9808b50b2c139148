"""Checks of the jobs about to run, before Ray starts or any model loads; each failure is a GridError naming the
model and prompt set. `grid.load_grid` has already checked every field on its own; these need the models and data:

  data         a local data file parses (file and line named); a hub dataset is cached or the hub reachable, else
               the line names the offline alternative (the prompt set's `path` option)
  length       prompt tokens (the set's length, capped by truncation.max_context_tokens) + new tokens fit the
               model's context, read from its config offline (no check when the config is not on this machine)
  task minimum the model's tokenizer, when it is on this machine, can make the samples at the target length
               (passkey's own prompt needs some tokens before any haystack; prose-ppl needs enough prose)

What cannot be known here (a hub model's config not cached, LongBench records without max_length) is checked per
sample in the worker, which turns a prompt longer than the model's context into an error row, not a score of 0.
"""
from __future__ import annotations

import logging
from pathlib import Path

from smartkv.bench.spec.catalog import Catalog, default_catalog
from smartkv.bench.spec.fields import GridError, canonical_json, fmt

log = logging.getLogger(__name__)


def check_jobs(jobs: list[dict], path: str | Path, catalog: Catalog | None = None) -> None:
    """Raise GridError for the first job that cannot run (see the module docstring); runs no model."""
    catalog = catalog or default_catalog()
    checked_data: set[str] = set()
    for model_jobs in _group(jobs, lambda j: canonical_json(j["model"])).values():
        model = model_jobs[0]["model"]
        context = catalog.model_context(model)
        tokenizer = None
        for set_jobs in _group(model_jobs, lambda j: canonical_json(j["prompt_set"])).values():
            ps = set_jobs[0]["prompt_set"]
            where = f"prompt_sets.{ps['name']}{fmt(ps['options'])}"
            prompt_set = _build(catalog, ps, path, where)
            if canonical_json(ps) not in checked_data:
                _run(prompt_set.check_data, path, where)
                checked_data.add(canonical_json(ps))
            for job in set_jobs:
                _check_fits(job, prompt_set, context, path, where)
            tokenizer = tokenizer or _tokenizer(catalog, model)
            if tokenizer is not None:
                _run(lambda: prompt_set.check_tokenizer(tokenizer), path, f"{where} with model {model['name']}")


def _group(jobs: list[dict], key) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return groups


def _build(catalog: Catalog, ps: dict, path, where: str):
    try:
        return catalog.prompt_set(ps["name"], ps["options"])
    except (ValueError, OSError) as exc:
        raise GridError(path, where, _line(exc)) from None


def _run(check, path, where: str) -> None:
    try:
        check()
    except (ValueError, OSError) as exc:
        raise GridError(path, where, _line(exc)) from None


def _tokenizer(catalog: Catalog, model: dict):
    try:
        return catalog.tokenizer(model)
    except Exception as exc:  # whatever a tokenizer load raises, the worker will meet it with the model
        log.info("no tokenizer for %s before the run (%s); its samples are checked in the worker", model["name"],
                 exc)
        return None


def _check_fits(job: dict, prompt_set, context: int | None, path, where: str) -> None:
    prompt = prompt_set.prompt_tokens()
    trunc = job["truncation"]
    if trunc["side"] != "none" and trunc["max_context_tokens"] is not None:
        prompt = trunc["max_context_tokens"] if prompt is None else min(prompt, trunc["max_context_tokens"])
    if context is None or prompt is None:
        return
    new = job["generation"]["max_new_tokens"] or prompt_set.new_tokens()
    if prompt + new > context:
        raise GridError(path, where, f"{prompt} prompt tokens + {new} new tokens exceed the context of model "
                                     f"{job['model']['name']!r} ({context} tokens); lower the length, set "
                                     "truncation.max_context_tokens, or use a model with a longer context")


def _line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
