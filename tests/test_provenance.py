"""Every result row records the code and environment that made it; results from other code show in `status` and
`submit` as stale and `submit --rerun-stale` reruns them; the job id covers what the grid asks for (documented)."""
from __future__ import annotations

import copy
import importlib.metadata
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from smartkv.bench import provenance
from smartkv.bench.cli import app
from smartkv.bench.results import schema
from smartkv.bench.results.store import ResultStore
from smartkv.bench.spec import grid as grid_mod
from smartkv.bench.spec.grid import job_id_of, load_grid

runner = CliRunner()
GRID = "name: prov\nmodels: [tiny-llama]\nmethods: [fp16, int4, kivi]\nprompt_sets: {passkey: {length: 256, " \
       "num_samples: 2}}\n"


def _submit(grid, out, *extra):
    return runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(out), "--local", "--no-progress", *extra])


def _status_cells(grid, out) -> tuple[list[str], str]:
    result = runner.invoke(app, ["status", str(grid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if " prov " in line)
    return [c.strip() for c in row.split("│")[1:-1]], result.stderr


def test_every_row_records_code_and_environment(write_grid, fake_worker, tmp_path):
    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    table = ResultStore(out).read()[0]
    assert table.num_rows == 9 and set(provenance.COLUMNS) <= set(schema.COLUMNS)

    def column(name):
        return set(table.column(name).to_pylist())

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    assert column("code_hash") == {provenance.files_hash()}
    assert column("package_version") == {importlib.metadata.version("smartkv")}
    assert column("torch_version") == {torch.__version__}
    assert column("transformers_version") == {importlib.metadata.version("transformers")}
    assert column("triton_version") == {triton} and column("cuda_version") == {torch.version.cuda}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None  # device auto: the GPU if any
    assert column("gpu_name") == {gpu}
    assert column("source_commit") == {provenance.git_commit()}  # None where the copy is not in git
    assert column("runtime_env") == {"{}"}


def test_the_source_is_a_commit_in_git_and_a_file_hash_outside(tmp_path):
    package = tmp_path / "repo" / "pkg"
    shutil.copytree(provenance.PACKAGE_DIR / "bench" / "spec", package)
    before = provenance.files_hash(package)
    assert provenance.git_commit(package) is None  # not in git
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t", "-C", str(package.parent)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    commit = provenance.git_commit(package)
    assert len(commit) == 40 and not commit.endswith("+dirty")
    (package / "grid.py").write_text((package / "grid.py").read_text() + "\n# an edit\n")
    assert provenance.git_commit(package) == commit + "+dirty"
    assert provenance.files_hash(package) != before


def test_results_from_other_code_are_stale_and_rerun_on_request(write_grid, fake_worker, tmp_path, monkeypatch):
    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    cells, _ = _status_cells(grid, out)
    assert cells[1:3] == ["3", "3"] and cells[8] == "0"               # jobs, done ... stale
    real = provenance.code_identity()
    monkeypatch.setattr(provenance, "code_identity", lambda: {**real, "code_hash": "feedfacefeedface"})
    cells, stderr = _status_cells(grid, out)
    assert cells[2] == "3" and cells[8] == "3"                        # still done, and stale
    assert f"code_hash {real['code_hash']} -> feedfacefeedface" in stderr and "--rerun-stale" in stderr
    again = _submit(grid, out)
    assert "Nothing to run" in again.stdout and "3 stored results of grid 'prov' came from other code" in \
        again.stderr
    rerun = _submit(grid, out, "--rerun-stale")
    assert rerun.exit_code == 0 and "ran 3 jobs" in rerun.stdout, rerun.output
    assert set(ResultStore(out).read()[0].to_pandas()["code_hash"]) == {"feedfacefeedface"}
    assert _status_cells(grid, out)[0][8] == "0"


def test_results_written_before_provenance_are_stale(write_grid, fake_worker, tmp_path):
    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    path = ResultStore(out).path_for(load_grid(grid).jobs[0])
    old = pq.read_table(path)
    pq.write_table(old.drop_columns(list(provenance.COLUMNS[1:])), path)  # as schema 1 wrote it
    cells, stderr = _status_cells(grid, out)
    assert cells[8] == "1" and "code_hash unknown ->" in stderr


def test_a_library_upgrade_makes_results_stale(write_grid, fake_worker, tmp_path, monkeypatch):
    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    monkeypatch.setattr(provenance, "_libraries", lambda: {"torch_version": "9.9", "transformers_version": "9.9",
                                                           "triton_version": None, "cuda_version": None})
    cells, stderr = _status_cells(grid, out)
    assert cells[8] == "3" and "torch_version" in stderr and "transformers_version" in stderr


def test_a_result_changing_variable_makes_results_stale(write_grid, fake_worker, tmp_path, monkeypatch):
    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    monkeypatch.setenv("SMARTKV_NO_KERNELS", "1")  # the torch fallbacks instead of the Triton kernels
    cells, stderr = _status_cells(grid, out)
    assert cells[8] == "3" and 'runtime_env {} -> {"SMARTKV_NO_KERNELS": "1"}' in stderr


# ---- what the job id covers ---------------------------------------------------------------------------------

def _leaves(spec: dict, prefix=()):
    for key, value in spec.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def test_the_job_id_covers_every_field_except_the_documented_ones(tiny_grid):
    job = next(j for j in load_grid(tiny_grid).jobs if j["method"]["name"] == "smartkv")
    for leaf in _leaves(job):
        changed = copy.deepcopy(job)
        holder = changed
        for key in leaf[:-1]:
            holder = holder[key]
        holder[leaf[-1]] = ["changed", holder[leaf[-1]]]
        covered = job_id_of(changed) != job_id_of(job)
        excluded = any(leaf[:i] in grid_mod.NOT_IN_ID for i in range(1, len(leaf) + 1))
        assert covered != excluded, f"{'.'.join(leaf)}: in the id {covered}, documented as excluded {excluded}"


@pytest.mark.parametrize("excluded", ["package_version", "grid"])
def test_documented_exclusions(tiny_grid, excluded):
    assert (excluded,) in grid_mod.NOT_IN_ID
    assert excluded in (grid_mod.__doc__ or "")


def test_results_of_another_job_spec_version_are_skipped_not_mixed(write_grid, fake_worker, tmp_path):
    import json

    grid, out = write_grid(GRID), tmp_path / "out"
    assert _submit(grid, out).exit_code == 0
    store = ResultStore(out)
    source = store.path_for(load_grid(grid).jobs[0])
    table = pq.read_table(source)
    meta = dict(table.schema.metadata)
    spec = json.loads(meta[b"smartkv.job_spec"])
    spec["spec_version"] = 1
    meta[b"smartkv.job_spec"] = json.dumps(spec).encode()
    pq.write_table(table.replace_schema_metadata(meta), source)  # as a submit before the id changed wrote it
    result = runner.invoke(app, ["report", str(out), "--format", "csv"])
    assert result.exit_code == 0 and "written under job spec version 1" in result.stderr
    assert result.stdout.count("\n") == 1 + 2  # fp16's line is gone: its only result is of the old version
    assert "ran 1 jobs" in _submit(grid, out).stdout


def test_the_job_id_of_a_fixed_spec_is_pinned():
    """Changing what the id covers changes every id: bump grid.SPEC_VERSION with it (and update this value)."""
    spec = {"spec_version": grid_mod.SPEC_VERSION, "grid": "g", "package_version": "0.1.0", "seed": 0, "repeat": 0,
            "model": {"name": "tiny-llama", "revision": None, "dtype": "auto", "device": "auto",
                      "trust_remote_code": False, "config": None},
            "method": {"name": "fp16", "params": {}, "label": "fp16"},
            "prompt_set": {"name": "passkey", "options": {}}, "prompt_set_version": "2", "prompt_set_hash": "0" * 16,
            "generation": {"max_new_tokens": None}, "truncation": {"side": "middle", "max_context_tokens": None}}
    assert grid_mod.SPEC_VERSION == 2 and job_id_of(spec) == PINNED_ID


PINNED_ID = "5b1bc688457a5cf8"
