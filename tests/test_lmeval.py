"""lm-evaluation-harness through smartkv caches: the model class (Python API), the console entry point, and the
`lm-eval:<task>` prompt set a grid runs, on the offline tasks shipped in smartkv/data/lmeval_tasks."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

import smartkv  # noqa: E402
import smartkv.lmeval as L  # noqa: E402
from smartkv.bench.run import worker  # noqa: E402
from smartkv.bench.spec.grid import GridError, load_grid  # noqa: E402
from smartkv.data import get_prompt_set  # noqa: E402
from smartkv.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
METHOD_ARGS = {"fp16": "", "int8": "", "int4": "", "kivi": ",key_bits=2,residual_length=32", "smartkv": ",budget=4",
               "zipcache": ",streaming_gap=8", "fp8": "", "quanto": ",residual_length=16", "hqq": ",residual_length=16"}


@pytest.fixture(scope="module")
def handle():
    return load_model("tiny-llama", device="cpu")


def offline_manager():
    return L.task_manager(defaults=False)  # lm-eval's own index takes tens of seconds and is not needed here


def test_every_method_runs_an_lm_eval_task_from_the_python_api():
    assert set(smartkv.list_methods()) <= set(METHOD_ARGS)  # quanto/hqq register only where installed
    for method, params in METHOD_ARGS.items():
        if method not in smartkv.list_methods():
            continue
        results = lm_eval.simple_evaluate(model="smartkv", model_args=f"pretrained=tiny-llama,method={method}{params}",
                                          tasks=["smartkv_qa", "smartkv_choice"], limit=2, bootstrap_iters=0,
                                          task_manager=offline_manager())
        assert 0.0 <= results["results"]["smartkv_choice"]["acc,none"] <= 1.0, method
        assert 0.0 <= results["results"]["smartkv_qa"]["exact_match,none"] <= 1.0, method
        assert results["config"]["smartkv_method"] == method
        assert len(results["samples"]["smartkv_choice"]) == 2


def test_fp16_log_likelihood_equals_one_full_forward_pass(handle):
    """The cache's decode path (prefill, then one token at a time) gives the model's own log-likelihood."""
    lm = L.SmartKVLM.from_handle(handle, "fp16")
    context, continuation = lm.tok_encode("The river runs through"), lm.tok_encode(" the old town")
    ll, _ = lm._score(context, continuation, "loglikelihood")
    with torch.no_grad():
        logits = handle.model(torch.tensor([context + continuation])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1:-1], -1)
    expected = float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
    assert ll == pytest.approx(expected, abs=1e-3)
    int4, _ = L.SmartKVLM.from_handle(handle, "int4")._score(context, continuation, "loglikelihood")
    assert int4 != ll and int4 == pytest.approx(ll, rel=0.05)  # the quantized cache is read, and close
    assert lm.requests_log[-1].output_tokens == len(continuation)


def test_generate_until_matches_generate_and_cuts_at_stop_strings(handle):
    lm = L.SmartKVLM.from_handle(handle, "fp16")
    prompt = "abc"  # the random model's greedy text from here holds printable letters after its start
    ids = lm.tok_encode(prompt)
    with torch.no_grad():
        out = handle.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    free = lm.tok_decode([t for t in out if t != lm.eot_token_id])
    request = type("Req", (), {"args": (prompt, {"until": [], "max_gen_toks": 24}), "resps": []})()
    assert lm.generate_until([request]) == [free]
    stop = next(ch for ch in free if ch.isalnum() and free.index(ch) > 0)
    request.args = (prompt, {"until": [stop], "max_gen_toks": 24})
    assert lm.generate_until([request]) == [free.split(stop)[0]]
    assert lm.requests_log[-1].output_tokens < lm.requests_log[-2].output_tokens  # it stopped early


def test_bad_method_arguments_fail_before_a_model_loads():
    with pytest.raises(ValueError, match="budget"):
        L.SmartKVLM(pretrained="no-such-model", method="smartkv", budget=99)


def grid_job(method: str, task: str = "smartkv_choice", params=None, **options) -> dict:
    return {"job_id": f"job-{method}", "grid": "t", "model": {"name": "tiny-llama"},
            "method": {"name": method, "params": params or {}},
            "prompt_set": {"name": f"lm-eval:{task}", "options": {"num_samples": 2, **options}},
            "generation": {"max_new_tokens": 4}, "seed": 0}


def test_grid_rows_carry_lm_evals_own_scores_and_serving_metrics(handle):
    rows = worker.run_job(grid_job("int4"), handle)
    samples, summary = rows[:-1], rows[-1]
    assert [r["sample_id"] for r in samples] == ["smartkv_choice/0", "smartkv_choice/1"]
    assert all(r["status"] == "ok" and r["metric"] == "acc,none" for r in samples)
    # the same documents through lm-eval's evaluator and the same cache give the same per-document accuracy
    lm = L.SmartKVLM.from_handle(handle, "int4")
    results = lm_eval.simple_evaluate(model=lm, tasks=["smartkv_choice"], limit=2, bootstrap_iters=0,
                                      task_manager=offline_manager())
    assert [r["score"] for r in samples] == [s["acc"] for s in results["samples"]["smartkv_choice"]]
    assert summary["score"] == pytest.approx(results["results"]["smartkv_choice"]["acc,none"])
    for row in samples:
        extra = json.loads(row["extra"])
        assert extra["lm_eval"]["requests"] == 4 and extra["lm_eval"]["metrics"]["none"]["acc"] == row["score"]
        assert row["prediction"] in ("blue", "green", "red", "black", "two", "four", "six", "eight")
        assert 0 < row["ttft_ms"] <= row["e2e_ms"] and row["output_tokens"] > 0 and row["tpot_ms"] > 0
        assert row["total_ratio"] == pytest.approx(5 / 16)  # int4's true bytes: 4-bit codes + fp16 scale, zero per 32
    assert summary["output_tokens"] == round(sum(r["output_tokens"] for r in samples) / 2)


def test_grid_perplexity_task_fills_nll_and_ppl(handle):
    rows = worker.run_job(grid_job("fp16", "smartkv_prose", num_samples=1), handle)
    row = rows[0]
    assert row["status"] == "ok", row["error"]
    extra = json.loads(row["extra"])
    assert row["ppl"] == pytest.approx(math.exp(row["nll"])) and row["nll"] > 0
    assert row["score"] is None and row["metric"] == "word_perplexity,none"
    assert extra["lm_eval"]["request_type"] == "loglikelihood_rolling"


def test_generation_task_rows_hold_the_generated_text(handle):
    rows = worker.run_job(grid_job("kivi", "smartkv_qa", params={"key_bits": 2}), handle)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert all(isinstance(r["prediction"], str) and r["metric"] == "exact_match,none" for r in rows[:-1])
    assert all(r["output_tokens"] <= 8 for r in rows[:-1])  # the task's max_gen_toks, not the grid's


def test_prompt_set_options_are_checked_and_hashed():
    with pytest.raises(ValueError, match="task name"):
        get_prompt_set("lm-eval:")
    with pytest.raises(ValueError, match="num_samples"):
        get_prompt_set("lm-eval:smartkv_qa", num_samples=0)
    with pytest.raises(ValueError, match="metadata"):
        get_prompt_set("lm-eval:smartkv_qa", metadata="[1]")
    two = get_prompt_set("lm-eval:smartkv_qa", num_samples=2)
    assert two.content_hash() == get_prompt_set("lm-eval:smartkv_qa", num_samples=2).content_hash()
    assert two.content_hash() != get_prompt_set("lm-eval:smartkv_qa", num_samples=3).content_hash()
    assert len(get_prompt_set("lm-eval:smartkv_tiny", num_samples=1).samples(None)) == 3  # a group: its tasks


def test_grid_file_names_lm_eval_tasks(write_grid):
    grid = load_grid(write_grid("""\
        models: [tiny-llama]
        methods: {fp16: {}, smartkv: {budget: 4}}
        prompt_sets: {"lm-eval:smartkv_qa": {num_samples: 2}}
        """))
    assert len(grid.jobs) == 2 and grid.jobs[0]["prompt_set"]["name"] == "lm-eval:smartkv_qa"
    with pytest.raises(GridError, match="num_fewshot"):
        load_grid(write_grid("""\
            models: [tiny-llama]
            methods: {fp16: {}}
            prompt_sets: {"lm-eval:smartkv_qa": {num_fewshot: -1}}
            """, "bad.yaml"))


def test_console_entry_point_runs_lm_evals_cli(tmp_path, monkeypatch):
    from lm_eval import tasks as lm_tasks

    from smartkv.lmeval import cli

    monkeypatch.setattr(lm_tasks, "TaskManager", functools.partial(lm_tasks.TaskManager, include_defaults=False))
    cli.main(["--model_args", "pretrained=tiny-llama,method=smartkv,budget=4", "--tasks", "smartkv_choice",
              "--limit", "2", "--output_path", str(tmp_path / "out"), "--seed", "0"])
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["config"]["smartkv_method"] == "smartkv" and "acc,none" in results["results"]["smartkv_choice"]
