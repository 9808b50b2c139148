"""Checks before Ray starts or any model loads (spec/checks.py): prompt length against the model's context, task
minimums with the model's tokenizer, local data parsed with the file and line named, hub data resolvable offline.
Each is exit code 2 and one line, with no worker started; the worker's own guard makes a prompt past the context
an error row rather than a score of 0."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from smartkv.bench.cli import app
from smartkv.bench.run import ray_executor
from smartkv.bench.run.worker import run_job
from smartkv.bench.spec.checks import check_jobs
from smartkv.bench.spec.grid import load_grid
from smartkv.data import longbench
from smartkv.models import load_tiny

runner = CliRunner()
CONNECTS: list = []  # calls that reached Ray
FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SMARTKV_BENCH_WORKER", raising=False)  # the real worker: the checks are for its inputs
    # Another test of the session may have left Ray running, so "never started" is checked at the door instead.
    CONNECTS.clear()
    monkeypatch.setattr(ray_executor, "connect", lambda *args, **kw: CONNECTS.append(args) or pytest.fail("Ray"))
    return tmp_path


def _refused(workdir, text: str) -> str:
    """Submit a grid that must be refused up front: exit 2, one line, nothing written, Ray never started."""
    path = workdir / "g.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["submit", "--grid", str(path), "--no-progress"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert not (workdir / "results").exists() and not CONNECTS
    return lines[0]


def test_a_prompt_longer_than_the_model_context_is_refused(workdir):
    line = _refused(workdir, "models: [tiny-llama]\nmethods: [fp16]\n"
                             "prompt_sets: {passkey: {length: 8192, num_samples: 1}}\n")
    assert "8192 prompt tokens + 16 new tokens exceed the context of model 'tiny-llama' (4096 tokens)" in line
    line = _refused(workdir, "models: [{name: tiny-gpt2, config: {n_positions: 512}}]\nmethods: [fp16]\n"
                             "prompt_sets: {prose-ppl: {length: 480, continuation: 64, num_samples: 1}}\n")
    assert "544 prompt tokens + 0 new tokens exceed the context" in line and "(512 tokens)" in line


def test_the_grids_own_cap_counts(write_grid):
    capped = write_grid("models: [tiny-llama]\nmethods: [fp16]\nprompt_sets: {passkey: {length: 8192}}\n"
                        "truncation: {side: middle, max_context_tokens: 3000}\n")
    check_jobs(load_grid(capped).jobs, capped)  # 3000 + 16 fit 4096
    tight = write_grid("models: [tiny-llama]\nmethods: [fp16]\nprompt_sets: {passkey: {length: 4000}}\n"
                       "generation: {max_new_tokens: 200}\n", "tight.yaml")
    with pytest.raises(ValueError, match="4000 prompt tokens \\+ 200 new tokens"):
        check_jobs(load_grid(tight).jobs, tight)


def test_passkeys_minimum_length_is_checked_with_the_models_tokenizer(workdir):
    line = _refused(workdir, "models: [tiny-llama]\nmethods: [fp16]\n"
                             "prompt_sets: {passkey: {length: 64, num_samples: 2}}\n")
    assert "prompt_sets.passkey" in line and "length must be at least" in line and "got 64" in line


def test_prose_that_cannot_hold_the_windows_is_refused(workdir):
    line = _refused(workdir, "models: [tiny-llama]\nmethods: [fp16]\n"
                             "prompt_sets: {prose-ppl: {length: 1000, continuation: 100, num_samples: 50}}\n")
    assert "num_samples=50 windows" in line


def _jsonl(tmp_path, lines: list[str]) -> Path:
    good = (FIXTURES / "hotpotqa.jsonl").read_text().splitlines()
    path = tmp_path / "hotpotqa.jsonl"
    path.write_text("\n".join([good[0], ""] + lines + good[1:]) + "\n")
    return path


@pytest.mark.parametrize("bad,says", [('{"input": "q", "context": "c", "answers": ["a"]', "not valid JSON"),
                                      ('["a list"]', "a LongBench record must be a JSON object"),
                                      ('{"input": "q", "answers": ["a"]}', "LongBench record lacks ['context']")])
def test_local_jsonl_errors_name_the_file_and_line(workdir, bad, says):
    path = _jsonl(workdir, [bad])
    line = _refused(workdir, f"models: [tiny-llama]\nmethods: [fp16]\n"
                             f"prompt_sets:\n  'longbench:hotpotqa': {{path: {path}, max_length: 1024}}\n")
    assert f"{path}: line 3: {says}" in line  # line 2 is blank; the first record is line 1


def test_offline_hub_data_names_the_offline_alternative(workdir, monkeypatch):
    monkeypatch.setattr(longbench, "hub_cached", lambda task: False)
    monkeypatch.setattr(longbench, "hub_reachable", lambda *a, **k: False)
    line = _refused(workdir, "models: [tiny-llama]\nmethods: [fp16, int8]\n"
                             "prompt_sets: {'longbench:qasper': {max_length: 1024}}\n")
    assert "not in the local Hugging Face cache and the hub is not reachable" in line
    assert "option path" in line and "data.zip" in line


def test_hub_offline_variables_are_honoured(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert longbench.hub_reachable() is False


def test_the_worker_makes_an_over_long_prompt_an_error_row():
    handle = load_tiny("tiny-llama", max_position_embeddings=256)
    job = {"job_id": "0" * 16, "model": {"name": "tiny-llama"}, "method": {"name": "fp16", "params": {}},
           "prompt_set": {"name": "passkey", "options": {"length": 250, "num_samples": 1}},
           "generation": {"max_new_tokens": 16, "compare_fp16": False}, "truncation": {"side": "none"}}
    rows = run_job(job, handle)
    assert rows[0]["status"] == "error" and "exceed the model's context of 256 tokens" in rows[0]["error"]
    assert rows[-1]["row_kind"] == "summary" and rows[-1]["status"] == "error"
