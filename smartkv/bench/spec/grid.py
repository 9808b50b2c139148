"""Grid files (jobs/*.yaml) -> validated, expanded, canonical job specs with stable ids.

A grid file (YAML, read with a safe loader that also refuses duplicate keys and alias bombs: yaml_load.py):

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
      passkey: {length: 1024, num_samples: 3, seed: 0}
    generation: {max_new_tokens: null, do_sample: false}   # + temperature, top_p, top_k, compare_fp16 (KL vs fp16),
                                                           # warmup (untimed runs of a job's first sample, 0-8: 1)
    truncation: {side: middle, max_context_tokens: null}   # side: left | right | middle | none
    seeds: [0]                        # int or list; the job seed (torch/numpy), not the data seed
    repeats: 1                        # 1..100; repeats of every job (timing and sampling variance)

The canonical job spec (what `worker.run_job` receives, stored in each result file's metadata):

    {"spec_version", "job_id", "grid",
     "model": {"name", "revision", "dtype", "device", "trust_remote_code", "config"},
     "method": {"name", "params", "label"}, "prompt_set": {"name", "options"},
     "generation": {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "compare_fp16", "warmup"},
     "truncation": {"side", "max_context_tokens"},
     "seed", "repeat", "package_version", "prompt_set_version", "prompt_set_hash"}

`job_id` (16 hex digits of sha256 over the canonical spec) is the deliberate answer to "which results are the
same experiment": it covers everything the grid asks for that can change a result - the model (name, revision,
dtype, device, trust_remote_code, tiny-model config), the method and every parameter with its defaults filled in
(`budget: 4` and `budget: 4.0` are one job), the prompt set's name, version and content hash (every option,
defaults included, and the bytes of any data file), truncation, generation, seed, repeat and spec_version. It
leaves out (NOT_IN_ID) what does not change the experiment: `job_id` itself, `grid` (the same job in two grids
shares its id), the method's display `label`, the prompt set's options as written (the content hash covers them,
but not where a data file lies), the warm-up runs before the timed samples (`generation.warmup`: they keep
one-time costs out of the timings, the experiment is the same), and `package_version`: the code that ran is
provenance, recorded in every row with the source commit, a hash of the package files and the library versions
(bench/provenance.py). Results from other code keep their ids; `status` shows them as stale and
`submit --rerun-stale` reruns them in place, so an edit of the code never orphans results silently, nor mixes two
versions of one job in a report. A change of what the id covers bumps SPEC_VERSION: files of another spec version
are reported and skipped, and their jobs run again.

Every error is a `GridError` naming the file, the field and what is allowed; the whole file is checked before
anything runs.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from smartkv.bench.spec import catalog as catalog_mod
from smartkv.bench.spec import fields as F
from smartkv.bench.spec import yaml_load
from smartkv.bench.spec.catalog import Catalog, package_version
from smartkv.bench.spec.fields import GridError, canonical_json, short

__all__ = ["Grid", "GridError", "canonical_json", "expand", "job_cost", "job_id_of", "job_identity", "load_grid",
           "method_label", "package_version"]

# The job spec's format and what its id covers. 2: package_version left the id (provenance instead). Results of
# another version are not counted as any job's (results/check.py): their jobs run again under their new ids.
SPEC_VERSION = 2
MAX_JOBS = 10_000
MAX_SAMPLES = 1_000_000
MAX_FILE_BYTES = 1_000_000
GRID_KEYS = ("name", "description", "models", "methods", "prompt_sets", "generation", "truncation", "seeds",
             "repeats")
# Keys prompt-set options use for size: for ordering jobs longest first (bounded in grid_fields.OPTION_BOUNDS).
_LENGTH_KEYS = ("length", "max_length", "context_tokens")
_COUNT_KEYS = ("num_samples", "n_samples")


@dataclass(frozen=True)
class Grid:
    name: str
    path: str
    jobs: list[dict] = field(default_factory=list)
    description: str = ""


# Parts of a job spec its id leaves out (see the module docstring for why); everything else is in it.
NOT_IN_ID = (("job_id",), ("grid",), ("package_version",), ("method", "label"), ("prompt_set", "options"),
             ("generation", "warmup"))


def job_id_of(spec: dict) -> str:
    """16 hex digits of sha256 over the canonical spec less NOT_IN_ID (see the module docstring)."""
    identity = {k: v for k, v in spec.items() if (k,) not in NOT_IN_ID}
    for part, key in (p for p in NOT_IN_ID if len(p) == 2):
        identity[part] = {k: v for k, v in spec[part].items() if k != key}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]


def method_label(method: dict) -> str:
    if method.get("label"):
        return method["label"]
    params = ",".join(f"{k}={short(v)}" for k, v in sorted(method["params"].items()))
    return f"{method['name']}({params})" if params else method["name"]


def job_identity(job: dict) -> dict:
    """The identity columns every result row of `job` carries (see schema.py); missing parts give nulls, so a
    worker can label rows of a hand-made job too."""
    model, method, prompt_set = job.get("model") or {}, job.get("method") or {}, job.get("prompt_set") or {}
    params = method.get("params") or {}
    label = method_label({"name": method["name"], "params": params, "label": method.get("label")}) \
        if method.get("name") else None
    return {
        "job_id": job.get("job_id"), "grid": job.get("grid"), "model": model.get("name"),
        "model_revision": model.get("revision"), "method": method.get("name"),
        "method_params": canonical_json(params), "method_label": label, "prompt_set": prompt_set.get("name"),
        "prompt_set_version": job.get("prompt_set_version"), "prompt_set_hash": job.get("prompt_set_hash"),
        "seed": job.get("seed"), "repeat": job.get("repeat"),
        "package_version": job.get("package_version") or package_version(),
    }


# Relative decode cost of a method's cache beyond fp16's, for ordering only: SmartKV also tracks importance and
# re-allocates its pools (measured: 2.5x fp16's time per token on CPU, more on a GPU).
_METHOD_COST = {"smartkv": 2.0}


def _sample_count(options: dict) -> int:
    """Samples a prompt set's options ask for (10 when they leave it to the set's default)."""
    return next((int(options[k]) for k in _COUNT_KEYS if isinstance(options.get(k), int)), 10)


def job_cost(job: dict) -> float:
    """Relative cost used to start the longest jobs first: context length x samples and warm-up runs (x new
    tokens), x the passes a sample takes (a method compared with fp16 also decodes fp16's continuation through its
    own cache), x the method's relative cost. An ordering heuristic, not a time prediction."""
    options = job["prompt_set"]["options"]
    length = next((options[k] for k in _LENGTH_KEYS if isinstance(options.get(k), (int, float))), 1024)
    count = next((options[k] for k in _COUNT_KEYS if isinstance(options.get(k), (int, float))), 10)
    new_tokens = job["generation"].get("max_new_tokens") or 32
    method = job["method"]["name"]
    passes = 2.0 if method != "fp16" and job["generation"].get("compare_fp16", True) else 1.0
    runs = count + job["generation"].get("warmup", 1)   # the warm-up runs a sample more
    return float(length) * float(runs) * (1.0 + new_tokens / 256.0) * passes * _METHOD_COST.get(method, 1.0)


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
        raw = yaml_load.load(text)
    except yaml_load.GridYAMLError as exc:
        raise GridError(path, exc.where, exc.problem) from None
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
    F.check_keys(raw, GRID_KEYS, path, "")
    name = F.grid_name(raw.get("name", path.stem), path)
    models = F.model_list(raw.get("models"), path, catalog)
    methods = F.entries(raw.get("methods"), "methods", path, catalog.method_names(), None,
                       catalog.canonical_method)
    sets = F.entries(raw.get("prompt_sets"), "prompt_sets", path, catalog.prompt_set_names(),
                    catalog.validate_prompt_set, lambda name, options: {"name": name, "options": options})
    generation = F.generation(raw.get("generation"), path)
    truncation = F.truncation(raw.get("truncation"), path)
    seeds = F.seeds(raw.get("seeds", 0), path)
    repeats = F.int_in(raw.get("repeats", 1), path, "repeats", 1, F.MAX_REPEATS)
    total = len(models) * len(methods) * len(sets) * len(seeds) * repeats
    if total > MAX_JOBS:
        raise GridError(path, "(grid)", f"expands to {total} jobs; at most {MAX_JOBS} are allowed")
    samples = total // len(sets) * sum(_sample_count(ps["options"]) for _, ps in sets)
    if samples > MAX_SAMPLES:
        raise GridError(path, "(grid)", f"expands to {samples} samples over all jobs; at most {MAX_SAMPLES} are "
                                        "allowed (lower num_samples, seeds or repeats)")
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
        where = f"{m_field} x {x_field} {method_label(method)} x {s_field}{F.fmt(ps['options'])}"
        if spec["job_id"] in seen:
            raise GridError(path, where, f"duplicate job: the same as {seen[spec['job_id']]}; "
                                         "remove one of the repeated entries")
        seen[spec["job_id"]] = where
        jobs.append(spec)
    return Grid(name=name, path=str(path), jobs=jobs, description=str(raw.get("description") or ""))

def _describe_set(ps: dict, fld: str, path: Path, catalog: Catalog) -> tuple[str, str]:
    try:
        return catalog.describe_prompt_set(ps["name"], ps["options"])
    except (ValueError, OSError) as exc:
        raise GridError(path, fld, str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__) from None
