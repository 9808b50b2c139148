"""worker.run_job: one job on a tiny random model, every method, both sample kinds; failures become rows."""
from __future__ import annotations

import json

import pytest
import torch

import smartkv
from smartkv.bench.results import schema
from smartkv.bench.run import worker
from smartkv.bench.run.generation import decode, reference_memo, sampler
from smartkv.data import get_prompt_set
from smartkv.metrics import task
from smartkv.models import load_model

PASSKEY = ("passkey", {"length": 300, "num_samples": 2})      # the shortest passkey the byte tokenizer allows
PROSE = ("prose-ppl", {"length": 48, "continuation": 6, "num_samples": 2})
# KL to fp16 (nats per position) of each method's rows at its defaults, measured on tiny-llama (the largest of a
# job's rows); a random model's logits are flat, so KL is small. Bounds: 3x; below 1e-6 (fp16 rounding of
# full-precision windows, int8 near fp32's resolution) a lower bound would test noise, above it a tenth.
KL_MEASURED = {"passkey": {"int8": 1.3e-7, "int4": 2.9e-5, "kivi": 9.0e-6, "smartkv": 9.1e-6, "zipcache": 3.3e-4,
                           "fp8": 2.7e-6, "quanto": 1.4e-5, "hqq": 3.4e-6},
               "prose-ppl": {"int8": 1.1e-7, "int4": 3.5e-5, "kivi": 9.0e-8, "smartkv": 4.6e-7, "zipcache": 2.0e-4,
                             "fp8": 2.7e-6, "quanto": 2.3e-5, "hqq": 1.8e-5}}
# top-1 agreement with fp16 over the decode positions: measured 1.0 for every method but ZipCache (0.6: it also
# compresses decoded tokens every streaming_gap); one more flip than measured is allowed
TOP1_FLOOR = {"fp16": 1.0, "zipcache": 0.4}
IDENTITY = ("job_id", "grid", "model", "model_revision", "method", "method_params", "method_label", "prompt_set",
            "prompt_set_version", "prompt_set_hash", "seed", "repeat", "package_version")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def handle():
    return load_model("tiny-llama", device="cpu")


def make_job(method: str, prompt_set=PASSKEY, params=None, seed: int = 0, **generation) -> dict:
    name, options = prompt_set
    return {"job_id": f"job-{method}", "grid": "test", "spec_version": 2,
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
            check_kl(row["kl_to_fp16"], prompt_set[0], method)
            assert row["top1_agreement"] >= TOP1_FLOOR.get(method, 0.75)  # measured 1.0: one flip allowed
        sample = rows[0]
        if prompt_set is PASSKEY:
            answers = get_prompt_set(*PASSKEY[:1], **PASSKEY[1]).samples(handle.tokenizer)[0].answers
            assert sample["metric"] == "first_number_match"
            assert sample["score"] == task.score("first_number_match", sample["prediction"], answers)
            assert 1 <= sample["new_tokens"] <= 4 and isinstance(sample["prediction"], str)
        else:
            assert sample["nll"] > 0 and sample["ppl"] == pytest.approx(torch.tensor(sample["nll"]).exp().item())
            assert sample["new_tokens"] == 6
        extra = json.loads(sample["extra"])
        assert len(extra["key_rel_error_per_layer"]) == smartkv.models.model_kv_shape(handle.model)["num_layers"]


def check_kl(kl: float, prompt_set: str, method: str) -> None:
    if method == "fp16":
        assert kl == 0.0
        return
    if method not in KL_MEASURED[prompt_set]:
        pytest.fail(f"no measured KL for {method!r} on {prompt_set}: measure it and add it to KL_MEASURED")
    measured = KL_MEASURED[prompt_set][method]
    assert (measured / 10 if measured >= 1e-6 else 0) <= kl <= 3 * measured, (method, prompt_set, kl)


def test_fp16_matches_itself_exactly(handle):
    for prompt_set in (PASSKEY, PROSE):
        rows = worker.run_job(make_job("fp16", prompt_set), handle)
        for row in rows:
            assert row["kl_to_fp16"] == 0.0 and row["top1_agreement"] == 1.0
            assert row["key_rel_error"] == 0.0 and row["value_rel_error"] == 0.0


def test_quantized_cache_is_really_read(handle):
    """The decode path reads the quantized cache: int4's KL to fp16 is over 30x int8's (KL grows as the square of
    the step, (255/15)^2 = 289; measured 300-400x) and its key error is int4's (measured 0.077: 3x bounds)."""
    int8, int4 = (worker.run_job(make_job(m, PROSE), handle)[-1] for m in ("int8", "int4"))
    assert int4["kl_to_fp16"] > 30 * int8["kl_to_fp16"] > 0
    assert 0.026 <= int4["key_rel_error"] <= 0.23 and 0.026 <= int4["value_rel_error"] <= 0.23


def _uniform_ratio(bits: int, group: int) -> float:
    return (bits + 2 * 16 / group) / 16               # codes, then an fp16 scale and zero per group


def _kivi_ratio(tokens: int, key_bits: int, value_bits: int, group: int, residual: int) -> float:
    n_k, n_v = tokens // residual * residual, max(tokens - residual, 0)   # quantized keys (whole blocks), values
    meta = 2 * 16 / group
    bits = n_k * (key_bits + meta) + n_v * (value_bits + meta) + (2 * tokens - n_k - n_v) * 16
    return bits / (2 * tokens * 16)


@pytest.mark.parametrize("method,params,payload,total", [
    ("fp16", {}, 2.0, lambda T: 2.0),                        # the reference holds the fp32 model's tensors
    ("int8", {}, 0.5, lambda T: _uniform_ratio(8, 32)),
    ("int4", {"group_size": 16}, 0.25, lambda T: _uniform_ratio(4, 16)),
    ("int8", {"group_size": 64}, 0.5, lambda T: _uniform_ratio(8, 32)),   # clamped to head_dim 32
    ("kivi", {"residual_length": 32}, 6 / 32, lambda T: _kivi_ratio(T, 2, 4, 32, 32)),
    ("kivi", dict(key_bits=4, value_bits=8, group_size=16, residual_length=16), 12 / 32,
     lambda T: _kivi_ratio(T, 4, 8, 16, 16)),
    ("kivi", {}, 1.0, lambda T: 1.0),                        # 53 tokens < residual_length 128: nothing quantized
])
def test_memory_columns_follow_each_layout(handle, method, params, payload, total):
    """payload_ratio and total_ratio of every row equal the method's layout formula at the row's token count."""
    rows = worker.run_job(make_job(method, PROSE, params=params, compare_fp16=False), handle)
    for row in rows:
        tokens = row["context_tokens"] + row["new_tokens"] - 1    # the last continuation token is never fed back
        assert row["payload_ratio"] == pytest.approx(payload) and row["avg_bits"] == pytest.approx(16 * payload)
        assert row["total_ratio"] == pytest.approx(total(tokens), rel=1e-9), (row["total_ratio"], total(tokens))
        assert row["kv_total_bytes"] == round(total(tokens) * row["kv_fp16_bytes"])


@pytest.mark.parametrize("budget,gap", [(7.0, 2.0), (3.0, 2.0), (4.5, 0.0)])
def test_smartkv_rows_meet_their_budget(handle, budget, gap):
    """SmartKV's avg_bits is at most its budget, and its budget up to whole-bit widths over a finite middle (the
    re-allocating design's measured deficit <= 0.014 at 300 tokens) less the bits append charges its per-layer
    bookkeeping to (the filling flushes' count table, the window's and ring's counts): measured 0.079-0.093 at 300
    tokens of the tiny model, 1.0 over the 16-token middle of a 48-token prompt; payload_ratio is avg_bits / 16."""
    for prompt_set, deficit in ((PASSKEY, 0.12), (PROSE, 1.05)):
        params = dict(budget=budget, key_value_gap=gap)
        row = worker.run_job(make_job("smartkv", prompt_set, params=params, compare_fp16=False), handle)[-1]
        assert budget - deficit <= row["avg_bits"] <= budget + 1e-9
        assert row["payload_ratio"] == pytest.approx(row["avg_bits"] / 16)


@pytest.mark.slow
def test_a_known_answer_scores_one_with_fp16():
    """The embedded model finds the pass key (measured: 3 of 3 at 200 and 300 tokens): the row scores 1 and the
    prediction starts with the key."""
    smol = load_model("smollm2", device="cpu")
    prompt_set = ("passkey", {"length": 200, "num_samples": 2})
    rows = worker.run_job(make_job("fp16", prompt_set, max_new_tokens=8, compare_fp16=False), smol)
    answers = [s.answers[0] for s in get_prompt_set(prompt_set[0], **prompt_set[1]).samples(smol.tokenizer)]
    assert [r["score"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["prediction"].split()[0].rstrip(".") for r in rows[:-1]] == answers


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
    assert "CUDA out of memory" in rows[0]["error"] and len(freed) == 3   # the warm-up's, then each sample's
    assert rows[-1]["n_failed"] == 2 and rows[-1]["kl_to_fp16"] is None


def test_the_first_sample_warms_up_untimed(handle, monkeypatch):
    """`generation.warmup` runs the job's first sample that many times before the timed samples, its results
    dropped (the rows are the timed samples'); 0 runs none; a warm-up that fails leaves the timed samples to run;
    the warm-up does not move a sampled job's draws."""
    real, calls = worker.run_sample, []

    def counted(h, sample, settings):
        calls.append(sample.id)
        if settings.warmup == 3 and len(calls) == 1:
            raise RuntimeError("boom in the warm-up")
        return real(h, sample, settings)

    monkeypatch.setattr(worker, "run_sample", counted)
    for warmup, expected in ((0, ["0", "1"]), (1, ["0", "0", "1"]), (2, ["0", "0", "0", "1"]), (3, ["0", "0", "1"])):
        calls.clear()
        job = make_job("int8", warmup=warmup, compare_fp16=False)
        rows = worker.run_job(job, handle)
        check_well_formed(rows, job, 2)
        assert calls == expected and all(r["status"] == "ok" for r in rows)
    monkeypatch.setattr(worker, "run_sample", real)
    drawn = [[r["prediction"] for r in worker.run_job(make_job("int8", seed=1, do_sample=True, temperature=1.0,
                                                               max_new_tokens=8, warmup=w), handle)[:-1]]
             for w in (0, 1)]
    assert drawn[0] == drawn[1]


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
