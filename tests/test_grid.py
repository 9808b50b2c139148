"""Grid files: the shipped ones load, expansion is a cartesian product, job ids are stable and complete."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smartkv.bench.spec import grid as grid_mod
from smartkv.bench.spec.grid import GridError, job_id_of, load_grid

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", ["quick", "longbench", "needle", "pareto", "scale", "memory_points", "kivi2_point",
                                  "gemma3_quick"])
def test_shipped_grids_load(name):
    grid = load_grid(JOBS / f"{name}.yaml")
    assert grid.name == name and grid.jobs
    assert len({j["job_id"] for j in grid.jobs}) == len(grid.jobs)


def test_shipped_grid_contents():
    quick = load_grid(JOBS / "quick.yaml")
    assert {j["method"]["name"] for j in quick.jobs} == {"fp16", "int8", "int4", "kivi", "smartkv"}
    assert {j["model"]["name"] for j in quick.jobs} == {"smollm2"}
    assert all(j["prompt_set"]["options"].get("length", 0) <= 1024 for j in quick.jobs)
    scale = load_grid(JOBS / "scale.yaml")
    assert len(scale.jobs) >= 32 and len({j["model"]["name"] for j in scale.jobs}) == 2
    pareto = load_grid(JOBS / "pareto.yaml")
    budgets = {j["method"]["params"]["budget"] for j in pareto.jobs if j["method"]["name"] == "smartkv"}
    assert 2.3 <= min(budgets) <= 2.5 and max(budgets) == 8      # issue 6: budgets from about 2.5 to 8 bits
    lengths = {j["prompt_set"]["options"]["length"] for j in pareto.jobs if j["prompt_set"]["name"] == "passkey"}
    assert min(lengths) == 2048 and max(lengths) >= 8000          # retrieval at 2K, 4K and 8K tokens
    # memory_points is pareto's memory-point subset: same specs, same job ids, so one results directory serves both
    points = load_grid(JOBS / "memory_points.yaml")
    assert {j["job_id"] for j in points.jobs} < {j["job_id"] for j in pareto.jobs}
    kivi = {(j["method"]["params"]["value_bits"], j["method"]["params"]["residual_length"])
            for j in pareto.jobs if j["method"]["name"] == "kivi"}
    assert kivi == {(4, 32), (4, 128), (2, 32), (2, 128)}
    gemma = load_grid(JOBS / "gemma3_quick.yaml")
    assert {j["model"]["name"] for j in gemma.jobs} == {"gemma3"}
    assert {j["method"]["name"] for j in gemma.jobs} == {"fp16", "int8", "int4", "kivi", "smartkv"}
    assert {j["method"]["params"].get("sliding_layers", "quantized") for j in gemma.jobs} == {"quantized", "fp16"}


def test_expansion_is_the_cartesian_product(write_grid):
    path = write_grid("""
        models: [tiny-llama, tiny-gpt2]
        methods:
          fp16: {}
          smartkv: {budget: [3, 4, 6]}
          kivi: {value_bits: [2, 4], residual_length: [32, 128]}
        prompt_sets:
          passkey: {length: [256, 512], num_samples: 2}
        seeds: [0, 1]
        repeats: 2
    """)
    grid = load_grid(path)
    assert grid.name == "g"  # the file's stem
    assert len(grid.jobs) == 2 * (1 + 3 + 4) * 2 * 2 * 2
    assert len({j["job_id"] for j in grid.jobs}) == len(grid.jobs)


def test_job_spec_is_canonical_and_complete(tiny_grid):
    job = load_grid(tiny_grid).jobs[0]
    assert set(job) == {"spec_version", "job_id", "grid", "model", "method", "prompt_set", "generation",
                        "truncation", "seed", "repeat", "package_version", "prompt_set_version", "prompt_set_hash"}
    assert set(job["model"]) == {"name", "revision", "dtype", "device", "trust_remote_code", "config"}
    assert job["model"]["trust_remote_code"] is False  # off unless the grid asks
    assert job["generation"]["do_sample"] is False
    assert job["truncation"]["side"] == "middle"


def test_job_ids_are_stable_across_loads_and_key_order(write_grid, tiny_grid):
    first = [j["job_id"] for j in load_grid(tiny_grid).jobs]
    assert first == [j["job_id"] for j in load_grid(tiny_grid).jobs]
    raw = yaml.safe_load(tiny_grid.read_text())
    reordered = {k: raw[k] for k in reversed(list(raw))}
    again = load_grid(write_grid(yaml.safe_dump(reordered, sort_keys=False), "other.yaml"))
    assert sorted(first) == sorted(j["job_id"] for j in again.jobs)


def test_job_id_ignores_grid_name_and_default_spelling(write_grid):
    a = load_grid(write_grid("name: a\nmodels: [tiny-llama]\nmethods: {smartkv: {budget: 4}, kivi: {}}\n"
                             "prompt_sets: {passkey: {length: 256}}\n", "a.yaml"))
    b = load_grid(write_grid("name: b\nmodels: [tiny-llama]\nmethods: {smartkv: {budget: 4.0}, "
                             "kivi: {residual_length: 128}}\nprompt_sets: {passkey: {length: 256, seed: 42}}\n",
                             "b.yaml"))
    assert sorted(j["job_id"] for j in a.jobs) == sorted(j["job_id"] for j in b.jobs)


# Ids of these jobs before methods had `sliding_layers` (computed on main at 1e4c7ed): ids hash every parameter,
# defaults included, so a new field at its default must stay out of them or every stored result would be redone.
IDS_BEFORE_SLIDING_LAYERS = {"fp16": "026f9261d298b674", "int8": "5f4097ea73f4170b", "int4": "29bea636512d5555",
                             "fp8": "818a48c599e326e5", "kivi": "7c76731bc71a8aa3", "smartkv": "86d345501dfcb814",
                             "zipcache": "02bc6878bae8d231"}
# SmartKV's ids before it re-allocated incrementally by default (fe777a26e52749da) and before append became its
# default (68c965e7b7a170c9) are not kept: a new default changes what the config computes, so its stored results
# must be redone; block_tokens at 1 stays out of the id.
ID_GRID = """name: ids
models: [tiny-llama]
methods: {{fp16: {p}, int8: {p}, int4: {p}, fp8: {p}, kivi: {p}, smartkv: {{budget: 4{q}}}, zipcache: {p}}}
prompt_sets: {{passkey: {{length: 256, num_samples: 1, seed: 42}}}}
"""


def test_a_new_field_at_its_default_keeps_job_ids(write_grid):
    ids = lambda text: {j["method"]["name"]: j["job_id"] for j in load_grid(write_grid(text)).jobs}  # noqa: E731
    assert ids(ID_GRID.format(p="{}", q="")) == IDS_BEFORE_SLIDING_LAYERS
    explicit = ID_GRID.format(p="{sliding_layers: quantized}", q=", sliding_layers: quantized")
    assert ids(explicit) == IDS_BEFORE_SLIDING_LAYERS
    other = load_grid(write_grid(ID_GRID.format(p="{sliding_layers: fp16}", q=", sliding_layers: fp16"))).jobs
    assert not {j["job_id"] for j in other} & set(IDS_BEFORE_SLIDING_LAYERS.values())
    assert all(j["method"]["params"]["sliding_layers"] == "fp16" and "sliding_layers=fp16" in j["method"]["label"]
               for j in other)


CHANGES = {
    "model": lambda s: s["model"].update(name="tiny-gpt2"),
    "revision": lambda s: s["model"].update(revision="abc123"),
    "dtype": lambda s: s["model"].update(dtype="bfloat16"),
    "method": lambda s: s["method"].update(name="int8"),
    "method params": lambda s: s["method"]["params"].update(budget=5),
    "prompt set hash": lambda s: s.update(prompt_set_hash="0" * 16),
    "prompt set version": lambda s: s.update(prompt_set_version=s["prompt_set_version"] + "-next"),
    "truncation": lambda s: s["truncation"].update(side="left"),
    "generation": lambda s: s["generation"].update(max_new_tokens=7),
    "seed": lambda s: s.update(seed=s["seed"] + 1),
    "repeat": lambda s: s.update(repeat=s["repeat"] + 1),
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_job_id_changes_with_every_part_of_the_spec(tiny_grid, what):
    job = next(j for j in load_grid(tiny_grid).jobs if j["method"]["name"] == "smartkv")
    changed = copy.deepcopy(job)
    CHANGES[what](changed)
    assert job_id_of(changed) != job_id_of(job)
    same = copy.deepcopy(job)
    same["grid"], same["method"]["label"] = "another-grid", "any label"
    same["package_version"] = "9.9.9"  # provenance, not identity: results from other code are stale, not lost
    assert job_id_of(same) == job_id_of(job)


def test_list_form_allows_a_method_twice(write_grid):
    grid = load_grid(write_grid("""
        models: [tiny-llama]
        methods:
          - kivi: {key_bits: 2, value_bits: 4, residual_length: 32}
          - kivi: {key_bits: 4, value_bits: 4}
          - fp16
        prompt_sets: [passkey]
    """))
    assert [j["method"]["label"] for j in grid.jobs] == ["kivi(residual_length=32)", "kivi(key_bits=4)", "fp16"]


def test_tiny_model_config_and_local_model_dir(write_grid, tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text("{}")
    grid = load_grid(write_grid(f"""
        models:
          - {{name: tiny-llama, config: {{hidden_size: 256, num_hidden_layers: 4}}}}
          - {{name: {local}, dtype: float32, device: cpu}}
        methods: {{fp16: {{}}}}
        prompt_sets: {{passkey: {{length: 256}}}}
    """))
    assert grid.jobs[0]["model"]["config"] == {"hidden_size": 256, "num_hidden_layers": 4}
    assert grid.jobs[1]["model"]["name"] == str(local)


# ---- properties of expansion ----------------------------------------------------------------------------------

budgets = st.lists(st.sampled_from([2, 2.5, 3, 4, 5, 6, 7, 8]), min_size=1, max_size=4, unique=True)
lengths = st.lists(st.sampled_from([64, 128, 256, 512]), min_size=1, max_size=3, unique=True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budgets=budgets, lengths=lengths, seeds=st.lists(st.integers(0, 1000), min_size=1, max_size=3, unique=True),
       repeats=st.integers(1, 3), with_fp16=st.booleans())
def test_expansion_properties(tmp_path_factory, budgets, lengths, seeds, repeats, with_fp16):
    methods = {"smartkv": {"budget": budgets}} | ({"fp16": {}} if with_fp16 else {})
    raw = {"name": "p", "models": ["tiny-llama"], "methods": methods,
           "prompt_sets": {"passkey": {"length": lengths, "num_samples": 1}}, "seeds": seeds, "repeats": repeats}
    path = tmp_path_factory.mktemp("h") / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    jobs = load_grid(path).jobs
    expected = (len(budgets) + with_fp16) * len(lengths) * len(seeds) * repeats
    assert len(jobs) == expected
    assert len({j["job_id"] for j in jobs}) == expected          # ids unique
    assert all(job_id_of(j) == j["job_id"] for j in jobs)       # and recomputable from the stored spec
    shuffled = dict(raw, methods=dict(reversed(list(methods.items()))), seeds=list(reversed(seeds)))
    path.write_text(yaml.safe_dump(shuffled))
    assert {j["job_id"] for j in load_grid(path).jobs} == {j["job_id"] for j in jobs}  # order does not matter


@settings(max_examples=40, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                  max_size=3), max_leaves=8))
@example("~0")   # a ~user this machine does not have: pathlib raises RuntimeError there
def test_any_yaml_value_is_accepted_or_rejected_with_a_grid_error(value):
    """Whatever the file holds, loading ends in a Grid or a GridError, never another exception."""
    raw = {"models": ["tiny-llama"], "methods": {"fp16": {}}, "prompt_sets": {"passkey": {"length": 256}}}
    for key in ("models", "methods", "prompt_sets", "generation", "seeds"):
        bad = dict(raw, **{key: value})
        try:
            grid_mod.expand(bad, Path("x.yaml"), grid_mod.catalog_mod.default_catalog())
        except GridError as exc:
            assert str(exc).startswith("x.yaml: ")
