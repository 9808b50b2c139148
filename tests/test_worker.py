"""worker.run_job: one job on a tiny random model, every method, both sample kinds; failures become rows."""
from __future__ import annotations

import json

import pytest
import torch

import smartkv
from smartkv.bench.results import schema
from smartkv.bench.run import worker
from smartkv.bench.run.generation import decode, reference_memo, sampler
from smartkv.models import load_model

PASSKEY = ("passkey", {"length": 300, "num_samples": 2})      # the shortest passkey the byte tokenizer allows
PROSE = ("prose-ppl", {"length": 48, "continuation": 6, "num_samples": 2})
IDENTITY = ("job_id", "grid", "model", "model_revision", "method", "method_params", "method_label", "prompt_set",
            "prompt_set_version", "prompt_set_hash", "seed", "repeat", "package_version")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def handle():
    return load_model("tiny-llama", device="cpu")


def make_job(method: str, prompt_set=PASSKEY, params=None, seed: int = 0, **generation) -> dict:
    name, options = prompt_set
    return {"job_id": f"job-{method}", "grid": "test", "spec_version": 1,
            "model": {"name": "tiny-llama", "revision": None, "dtype": "float32", "device": "cpu"},
            "method": {"name": method, "params": params or {}}, "prompt_set": {"name": name, "options": options},
            "generation": {"max_new_tokens": 4, "do_sample": False, "temperature": None, "top_p": None,
                           "compare_fp16": True, **generation},
            "truncation": {"side": "middle", "max_context_tokens": None},
            "seed": seed, "repeat": 0, "package_version": "0.1.0", "prompt_set_version": "1",
            "prompt_set_hash": None}


def check_well_formed(rows: list[dict], job: dict, n_samples: int) -> None:
    assert len(rows) == n_samples + 1
    assert [r["row_kind"] for r in rows] == ["sample"] * n_samples + ["summary"]
    for row in rows:
        assert list(row) == list(schema.COLUMNS)
        assert row["job_id"] == job["job_id"] and row["method"] == job["method"]["name"]
        assert all(row[c] is not None for c in IDENTITY if c not in ("model_revision", "prompt_set_hash"))
        assert row["status"] in schema.STATUSES and row["worker"] and row["wall_s"] > 0
        json.loads(row["extra"])
    assert len({tuple(r[c] for c in IDENTITY) for r in rows}) == 1  # the same identity on every row
    summary = rows[-1]
    assert summary["n_samples"] == n_samples and summary["sample_id"] is None


@pytest.mark.parametrize("method", smartkv.list_methods())
def test_every_method_both_kinds_well_formed(handle, method):
    for prompt_set in (PASSKEY, PROSE):
        job = make_job(method, prompt_set)
        rows = worker.run_job(job, handle)
        check_well_formed(rows, job, 2)
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        for row in rows:
            for column in ("kl_to_fp16", "top1_agreement", "key_rel_error", "value_rel_error", "prefill_ms",
                           "kv_total_bytes", "kv_fp16_bytes", "payload_ratio", "total_ratio", "avg_bits",
                           "context_tokens", "new_tokens"):
                assert row[column] is not None, column
            assert row["kl_to_fp16"] >= 0 and 0 <= row["top1_agreement"] <= 1
        sample = rows[0]
        if prompt_set is PASSKEY:
            assert sample["metric"] == "first_number_match" and sample["score"] in (0.0, 1.0)
            assert 1 <= sample["new_tokens"] <= 4 and isinstance(sample["prediction"], str)
        else:
            assert sample["nll"] > 0 and sample["ppl"] == pytest.approx(torch.tensor(sample["nll"]).exp().item())
            assert sample["new_tokens"] == 6
        extra = json.loads(sample["extra"])
        assert len(extra["key_rel_error_per_layer"]) == smartkv.models.model_kv_shape(handle.model)["num_layers"]


def test_fp16_matches_itself_exactly(handle):
    for prompt_set in (PASSKEY, PROSE):
        rows = worker.run_job(make_job("fp16", prompt_set), handle)
        for row in rows:
            assert row["kl_to_fp16"] == 0.0 and row["top1_agreement"] == 1.0
            assert row["key_rel_error"] == 0.0 and row["value_rel_error"] == 0.0


def test_quantized_cache_is_really_read(handle):
    """int4 must differ from fp16 somewhere (KL > 0): the decode path reads the quantized cache."""
    rows = worker.run_job(make_job("int4", PROSE), handle)
    assert rows[-1]["kl_to_fp16"] > 0 and rows[-1]["key_rel_error"] > 0.01


def test_a_failing_sample_does_not_lose_the_others(handle, monkeypatch):
    real = worker.run_sample

    def flaky(h, sample, settings):
        if sample.id == "1":
            raise RuntimeError("boom in sample 1")
        return real(h, sample, settings)

    monkeypatch.setattr(worker, "run_sample", flaky)
    job = make_job("int8")
    rows = worker.run_job(job, handle)
    check_well_formed(rows, job, 2)
    ok, bad, summary = rows
    assert ok["status"] == "ok" and ok["score"] is not None
    assert bad["status"] == "error" and "boom in sample 1" in bad["error"] and bad["score"] is None
    assert summary["status"] == "error" and summary["n_failed"] == 1 and "1 of 2" in summary["error"]
    assert summary["kl_to_fp16"] == pytest.approx(ok["kl_to_fp16"])  # means over the ok samples only


def test_cuda_out_of_memory_becomes_an_oom_row(handle, monkeypatch):
    freed = []

    def oom(h, sample, settings):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(worker, "run_sample", oom)
    monkeypatch.setattr(worker, "free_memory", lambda: freed.append(True))
    rows = worker.run_job(make_job("kivi"), handle)
    assert [r["status"] for r in rows] == ["oom", "oom", "oom"]
    assert "CUDA out of memory" in rows[0]["error"] and len(freed) == 2
    assert rows[-1]["n_failed"] == 2 and rows[-1]["kl_to_fp16"] is None


def test_sampling_is_deterministic_for_a_seed(handle):
    def predictions(seed):
        rows = worker.run_job(make_job("int8", seed=seed, do_sample=True, temperature=1.0, max_new_tokens=8), handle)
        return [r["prediction"] for r in rows[:-1]]

    first = predictions(1)
    assert predictions(1) == first
    assert predictions(2) != first  # a random model samples near-uniformly over 512 tokens


def test_the_fp16_reference_is_computed_once_per_prompt(handle):
    memo = reference_memo(handle)
    worker.run_job(make_job("int8", PROSE), handle)
    misses = memo.misses
    worker.run_job(make_job("int4", PROSE), handle)
    worker.run_job(make_job("smartkv", PROSE), handle)
    assert memo.misses == misses


def test_manual_decode_matches_generate(handle):
    ids = list(range(10, 60))
    decoded = decode(handle.model, ids, smartkv.make_cache("fp16", handle.model), 6)
    out = handle.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert decoded.tokens == out[0, len(ids):].tolist()
    assert decoded.decode_steps == 5 and decoded.logits.shape == (6, handle.model.config.vocab_size)


def test_minimal_job_is_accepted(handle):
    job = {"method": {"name": "int8"}, "prompt_set": {"name": PROSE[0], "options": PROSE[1]}}
    rows = worker.run_job(job, handle)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert rows[0]["job_id"] is None and rows[0]["method_label"] == "int8" and rows[0]["method_params"] == "{}"


def test_a_job_that_cannot_start_raises_a_clear_error(handle):
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        worker.run_job(make_job("int3"), handle)
    with pytest.raises(ValueError, match="unknown parameter 'bitz'"):
        worker.run_job(make_job("int8", params={"bitz": 3}), handle)


@pytest.mark.parametrize("side, expected", [("left", [6, 7, 8, 9]), ("right", [0, 1, 2, 3]),
                                            ("middle", [0, 1, 8, 9]), ("none", list(range(10)))])
def test_truncation(side, expected):
    settings = worker.Settings(method="fp16", truncation_side=side, max_context_tokens=4)
    ids, truncated = worker.truncate(list(range(10)), settings)
    assert ids == expected and truncated == (side != "none")


def test_sampler_filters_top_k_and_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])  # probabilities 0.665, 0.245, 0.090, 0.000
    generator = torch.Generator().manual_seed(0)
    assert {sampler(generator, top_p=0.5)(logits) for _ in range(50)} == {0}
    assert {sampler(generator, top_p=0.9)(logits) for _ in range(300)} == {0, 1}
    assert {sampler(generator, top_k=3)(logits) for _ in range(300)} == {0, 1, 2}
