"""Executor: scheduling (model grouping, longest first), the job runner's error handling, runs on a real local Ray."""
from __future__ import annotations

import time

import pytest

from smartkv.bench.run import executor
from smartkv.bench.run.executor import (ExecConfig, ExecError, Scheduler, execute, model_key, plan_workers,
                                     unit_key)
from smartkv.bench.spec.grid import job_cost, load_grid
from smartkv.bench.progress import Progress
from smartkv.bench.run.runner import JobRunner
from smartkv.bench.results.store import ResultStore, job_status
from smartkv.bench.submit import make_plan, submit

TWO_MODELS = """\
name: two
models: [tiny-llama, tiny-gpt2]
methods: {fp16: {}, int4: {}}
prompt_sets:
  passkey: {length: [128, 512], num_samples: 2}
"""


@pytest.fixture
def two_model_jobs(write_grid):
    return load_grid(write_grid(TWO_MODELS, "two.yaml")).jobs


def test_scheduler_runs_one_model_at_a_time_longest_first(two_model_jobs):
    sched = Scheduler(two_model_jobs)
    order, current = [], None
    while (job := sched.next_for(current, set())) is not None:
        current = model_key(job)
        order.append(job)
    models = [j["model"]["name"] for j in order]
    assert models == sorted(models, key=models.index)  # contiguous per model: each model loaded once
    for name in set(models):
        costs = [job_cost(j) for j in order if j["model"]["name"] == name]
        assert costs == sorted(costs, reverse=True)


def test_scheduler_spreads_slots_over_models(two_model_jobs):
    sched = Scheduler(two_model_jobs)
    first = sched.next_for(None, set())
    second = sched.next_for(None, {model_key(first)})
    assert model_key(first) != model_key(second)
    sched.requeue(first)
    assert sched.next_for(model_key(first), set()) is first


def test_scheduler_keeps_a_slot_on_its_prompt_set(write_grid):
    """Each worker memoises fp16 references per prompt: a slot drains its prompt set, others start other sets."""
    jobs = load_grid(write_grid("models: [tiny-llama]\nmethods: [fp16, int4, smartkv]\n"
                                "prompt_sets:\n  passkey: {length: [128, 512], num_samples: 2}\n", "sets.yaml")).jobs
    sched = Scheduler(jobs)
    a = sched.next_for(None, set())
    assert a["prompt_set"]["options"]["length"] == 512 and a["method"]["name"] == "smartkv"  # longest first
    b = sched.next_for(model_key(a), set(), None, {unit_key(a)})
    assert unit_key(b) != unit_key(a)                    # a second slot starts the other set
    rest_a = [sched.next_for(model_key(a), set(), unit_key(a), {unit_key(b)}) for _ in range(2)]
    assert all(unit_key(j) == unit_key(a) for j in rest_a)
    assert [j["method"]["name"] for j in rest_a] == ["int4", "fp16"]  # compared methods decode twice: cost more
    # its set drained, a slot takes the longest job left (here the other set's)
    assert unit_key(sched.next_for(model_key(a), set(), unit_key(a), {unit_key(b)})) == unit_key(b)


def test_job_cost_counts_passes_and_method():
    def job(method, compare=True):
        return {"prompt_set": {"options": {"length": 1000, "num_samples": 2}}, "method": {"name": method},
                "generation": {"max_new_tokens": 0, "compare_fp16": compare}}
    assert job_cost(job("int4")) == 2 * job_cost(job("fp16")) == 2 * job_cost(job("int4", compare=False))
    assert job_cost(job("smartkv")) > job_cost(job("int4"))


def test_worker_plan_from_resources():
    assert plan_workers({"CPU": 8}, ExecConfig(cpus_per_worker=2)) == (4, False)
    assert plan_workers({"CPU": 8, "GPU": 2}, ExecConfig()) == (2, True)
    with pytest.raises(ExecError, match="cluster has 2 CPUs"):
        plan_workers({"CPU": 2}, ExecConfig(workers=3))
    assert plan_workers({"CPU": 2}, ExecConfig(workers=3, address="auto")) == (3, False)  # autoscaler may add
    # several actors per GPU (fractional GPUs): default = GPUs x workers_per_gpu, each still needs its CPUs
    assert plan_workers({"CPU": 16, "GPU": 2}, ExecConfig(workers_per_gpu=4)) == (8, True)
    with pytest.raises(ExecError, match="1/4 GPU"):
        plan_workers({"CPU": 16, "GPU": 1}, ExecConfig(workers=5, workers_per_gpu=4))
    with pytest.raises(ExecError, match="cluster has 1 GPUs and 4 CPUs"):
        plan_workers({"CPU": 4, "GPU": 1}, ExecConfig(workers_per_gpu=8))


def test_runner_turns_failures_into_rows(two_model_jobs, fake_worker):
    job = two_model_jobs[0]
    runner = JobRunner()
    (fake_worker / f"oom-{job['job_id']}").touch()
    (fake_worker / f"raise-{job['job_id']}").touch()
    oom = runner.run(job)
    error = runner.run(job)
    ok = runner.run(job)
    assert [job_status(r["rows"]) for r in (oom, error, ok)] == ["oom", "error", "ok"]
    assert "CUDA out of memory" in oom["rows"][0]["error"]
    assert oom["model_loaded"] and not error["model_loaded"]  # the model stays loaded across jobs
    assert runner.loads == {model_key(job): 1}
    assert all(r["job_id"] == job["job_id"] and r["worker"] for r in ok["rows"])


def test_runner_remembers_a_model_that_fails_to_load(write_grid, fake_worker, tmp_path):
    local = tmp_path / "broken-model"
    local.mkdir()
    (local / "config.json").write_text("{not json")
    jobs = load_grid(write_grid(f"models: ['{local}']\nmethods: [fp16, int8]\nprompt_sets: [passkey]\n")).jobs
    runner = JobRunner()
    first, second = runner.run(jobs[0]), runner.run(jobs[1])
    assert job_status(first["rows"]) == job_status(second["rows"]) == "error"
    assert "failed to load earlier" in second["rows"][0]["error"]


def test_local_execution_groups_models(two_model_jobs, fake_worker):
    seen = []
    stats = execute(two_model_jobs, ExecConfig(local=True), lambda job, res: seen.append(job["job_id"]))
    assert sorted(seen) == sorted(j["job_id"] for j in two_model_jobs)
    assert stats.model_loads == 2 and stats.statuses == {"ok": len(two_model_jobs)}


def test_run_time_accounting(two_model_jobs, fake_worker, monkeypatch):
    """Job time, driver write time and idle shares add up to the run's time (the scaling benchmark's inputs)."""
    monkeypatch.setenv("SMARTKV_FAKE_SLEEP_S", "0.02")
    stats = execute(two_model_jobs, ExecConfig(local=True), lambda job, res: time.sleep(0.03))
    n = len(two_model_jobs)
    assert stats.workers == 1 and list(stats.busy_s) == ["local"]
    assert stats.write_s >= 0.03 * n and stats.job_s >= 0.02 * n
    assert stats.job_s + stats.write_s <= stats.run_s
    assert 0.2 < stats.busy_fraction < 1 and stats.tail_fraction < 0.05  # one worker: no one to wait for


@pytest.mark.slow
def test_ray_run_every_job_exactly_once(ray_session, write_grid, fake_worker, tmp_path):
    plan = make_plan(write_grid(TWO_MODELS, "two.yaml"), tmp_path / "out")
    progress = Progress()
    result = submit(plan, ExecConfig(workers=2, max_inflight=3, poll_s=0.1), progress=progress)
    ids = [f.job_id for f in ResultStore(tmp_path / "out").scan()]
    assert sorted(ids) == sorted(j["job_id"] for j in plan.grid.jobs)
    assert result.stats.statuses == {"ok": 8} and progress.done == 8
    assert result.stats.model_loads <= 4  # each of 2 actors loads each of 2 models at most once
    assert set(progress.slots) == {"worker-0", "worker-1"}
    stats = result.stats
    assert stats.workers == 2 and set(stats.busy_s) <= {"worker-0", "worker-1"}
    assert 0 < stats.busy_fraction <= 1 and 0 <= stats.tail_fraction < 1
    assert max(stats.last_done_s.values()) <= stats.run_s
    frame = ResultStore(tmp_path / "out").read()[0].to_pandas()
    assert frame.groupby("job_id").size().eq(3).all()  # 2 samples + 1 summary, no duplicates
    assert frame["worker"].str.startswith("worker-").all()


@pytest.mark.slow
def test_real_worker_on_tiny_model_with_ray(ray_session, write_grid, tmp_path, monkeypatch):
    """The real worker (smartkv.bench.run.worker) on the tiny random model, through Ray with 2 CPUs."""
    monkeypatch.delenv("SMARTKV_BENCH_WORKER", raising=False)
    path = write_grid("""
        name: real
        models: [{name: tiny-llama, device: cpu}]
        methods: {fp16: {}, kivi: {residual_length: 32}}
        prompt_sets:
          passkey: {length: 320, num_samples: 1}
          prose-ppl: {length: 96, num_samples: 1, continuation: 8}
        generation: {max_new_tokens: 4}
    """, "real.yaml")
    plan = make_plan(path, tmp_path / "out")
    result = submit(plan, ExecConfig(workers=2, poll_s=0.2))
    assert result.stats.statuses == {"ok": 4}, ResultStore(tmp_path / "out").read()[0].to_pandas()["error"]
    frame = ResultStore(tmp_path / "out").read()[0].to_pandas()
    samples = frame[frame["row_kind"] == "sample"]
    assert len(samples) == 4 and samples["status"].eq("ok").all()
    kivi = samples[samples["method"] == "kivi"]
    assert (kivi["total_ratio"] < 1).all() and kivi["method_label"].eq("kivi(residual_length=32)").all()
    assert executor.LOOPBACK_ENV in __import__("os").environ
