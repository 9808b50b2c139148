"""The quality benchmarks' bookkeeping (benchmarks/bench_quality.py, benchmarks/retrieval.py): shards split the work
without loss or overlap, merged shard files give one row per config, retrieval answers stop at the end-of-sequence
token, and paired differences are taken on the same samples."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_quality  # noqa: E402
import retrieval  # noqa: E402


class _Parser:
    def error(self, message):
        raise SystemExit(message)


@pytest.mark.parametrize("text", ["3/3", "a/2", "1", "-1/2", "1/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(SystemExit, match="--shard must be I/N"):
        bench_quality.parse_shard(_Parser(), text)


def test_shards_cover_the_frontier_once():
    configs = list(bench_quality.FRONTIER)
    parts = [configs[i::4] for i in (bench_quality.parse_shard(_Parser(), f"{i}/4")[0] for i in range(4))]
    assert sorted(c for p in parts for c in p) == sorted(configs) and len(set(configs)) == len(configs)


def test_merged_shards_keep_one_row_per_config(tmp_path):
    fp16 = {"config": "fp16 (reference)", "kl_windows": [0.0, 0.0]}
    (tmp_path / "q.0.json").write_text(json.dumps([fp16, {"config": "int4", "kl_windows": [0.1, 0.3]}]))
    (tmp_path / "q.1.json").write_text(json.dumps([fp16, {"config": "kivi", "kl_windows": [0.2, 0.2]}]))
    rows = bench_quality.merged_rows(str(tmp_path / "q.*.json"))
    assert [r["config"] for r in rows] == ["fp16 (reference)", "int4", "kivi"]
    paired = bench_quality.with_intervals(rows, "kivi")
    assert paired[1]["dkl"] == pytest.approx(0.0) and paired[1]["dkl_lo"] < 0 < paired[1]["dkl_hi"]


class _Tok:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_an_answer_stops_at_the_end_of_sequence_token():
    assert retrieval.answer_text(_Tok(), [5, 7, 2, 9, 9]) == "5 7"
    assert retrieval.answer_text(_Tok(), [5, 7]) == "5 7"


def test_retrieval_differences_are_paired_on_the_same_samples():
    row = lambda config, sample, score: {"config": config, "task": "passkey", "length": 2048,  # noqa: E731
                                         "sample": sample, "score": score, "total_ratio": 0.3}
    rows = [row("ref", i, s) for i, s in enumerate([1, 1, 0, 0])] + [row("m", i, s) for i, s in enumerate([1, 0, 0, 0])]
    cells = {c["config"]: c for c in retrieval.cell_tables(rows, "ref")}
    assert cells["ref"]["accuracy"] == 0.5 and "diff" not in cells["ref"]
    assert cells["m"]["n"] == 4 and cells["m"]["accuracy"] == 0.25 and cells["m"]["diff"] == pytest.approx(-0.25)
    assert cells["m"]["diff_lo"] <= -0.25 <= cells["m"]["diff_hi"] <= 0


def test_retrieval_work_units_cover_every_sample_once_costliest_first():
    units = retrieval.work_units(["int4", "smartkv:budget=3"], ["passkey", "needle"], [1024, 4096], 25, 10)
    samples = [(c, t, n, i) for c, t, n, (lo, hi) in units for i in range(lo, hi)]
    assert len(samples) == len(set(samples)) == 2 * 2 * 2 * 25
    assert [u[2] for u in units[:6]] == [4096] * 6 and units[0][0].startswith("smartkv")
    assert {hi - lo for *_, (lo, hi) in units} == {10, 5}


def test_a_retrieval_unit_is_claimed_by_one_process_only(tmp_path):
    unit = ("int4", "passkey", 2048, (0, 10))
    assert retrieval.claim(tmp_path, unit) and not retrieval.claim(tmp_path, unit)
    assert retrieval.claim(tmp_path, ("int4", "passkey", 2048, (10, 20)))


def test_a_chunk_of_samples_is_the_same_samples_numbered_as_in_the_whole_set():
    from smartkv.models import load_tiny

    h = load_tiny("tiny-llama")
    whole = retrieval.run_unit(h.model, h.tokenizer, "int4", "passkey", 256, 4, 7)
    part = retrieval.run_unit(h.model, h.tokenizer, "int4", "passkey", 256, 4, 7, chunk=(2, 4))
    key = lambda r: (r["sample"], r["prompt_tokens"], r["answer"])  # noqa: E731
    assert [key(r) for r in part] == [key(r) for r in whole[2:]]


def test_a_run_stopped_inside_a_unit_goes_on_with_the_samples_it_lacks(tmp_path):
    earlier = retrieval.run_unit(*_tiny(), "int4", "passkey", 256, 4, 7, chunk=(0, 4))
    earlier = [{"model": "tiny-llama", **r} for r in earlier]
    (tmp_path / "earlier.json").write_text(json.dumps([earlier[0], earlier[2]]))  # stopped after samples 0 and 2
    out = tmp_path / "out.json"
    retrieval.main(["--model", "tiny-llama", "--configs", "int4", "--tasks", "passkey", "--lengths", "256",
                    "--samples", "4", "--chunk", "4", "--seed", "7", "--skip-done", str(tmp_path / "earlier.json"),
                    "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["sample"] for r in rows] == [1, 3]
    assert [r["answer"] for r in rows] == [earlier[1]["answer"], earlier[3]["answer"]]


def _tiny():
    from smartkv.models import load_tiny

    h = load_tiny("tiny-llama")
    return h.model, h.tokenizer


def test_a_run_goes_on_from_the_units_an_earlier_one_finished():
    units = retrieval.work_units(["int4"], ["passkey"], [2048], 20, 10)
    rows = [{"config": "int4", "task": "passkey", "length": 2048, "sample": i} for i in range(15)]
    assert retrieval.done_units(units, rows) == {("int4", "passkey", 2048, (0, 10))}


def test_cells_where_fp16_is_at_the_floor_run_fp16_only(tmp_path):
    row = lambda config, task, sample, score: {"model": "smollm2", "config": config, "task": task,  # noqa: E731
                                               "length": 2048, "sample": sample, "score": score}
    earlier = ([row("fp16", "kv-retrieval", i, 0.0) for i in range(20)]          # at the floor on every sample
               + [row("fp16", "passkey", i, 0.0) for i in range(10)]             # too few samples to tell
               + [row("fp16", "needle", i, float(i % 2)) for i in range(20)])    # 0.5: informative
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    units = retrieval.work_units(["fp16", "int4"], ["kv-retrieval", "passkey", "needle"], [2048], 20, 10)
    args = retrieval.parser().parse_args(["--model", "smollm2", "--skip-done", str(tmp_path / "*.json"),
                                          "--floor", "0.1", "--samples", "20"])
    left = retrieval.pending_units(units, args)
    assert {(u[0], u[1]) for u in left} == {("int4", "passkey"), ("fp16", "passkey"), ("int4", "needle")}
    assert retrieval.floor_cells(earlier, "fp16", 20, 0.1) == {("kv-retrieval", 2048)}
    assert len(retrieval.pending_units(units, retrieval.parser().parse_args([]))) == len(units)


def test_a_skip_done_glob_that_matches_nothing_is_named(tmp_path, capsys):
    units = retrieval.work_units(["int4"], ["passkey"], [2048], 10, 10)
    typo = f"{tmp_path}/*.json,{tmp_path}/*.gz"   # two globs joined by a comma: one glob matching nothing
    args = retrieval.parser().parse_args(["--skip-done", typo, "--samples", "10"])
    assert len(retrieval.pending_units(units, args)) == 1
    assert f"--skip-done: no file matches {typo!r}" in capsys.readouterr().err


def test_earlier_rows_count_only_for_the_model_that_answered_them(tmp_path, capsys):
    row = lambda model, sample: {"model": model, "config": "int4", "task": "passkey", "length": 2048,  # noqa: E731
                                 "sample": sample, "score": 1.0}
    (tmp_path / "smollm2.json").write_text(json.dumps([row("smollm2", i) for i in range(10)]))
    (tmp_path / "gemma3.json").write_text(json.dumps([row("gemma3", i) for i in range(3)]))
    units = retrieval.work_units(["int4"], ["passkey"], [2048], 10, 10)
    for model, left in (("smollm2", 0), ("gemma3", 1)):
        args = retrieval.parser().parse_args(["--model", model, "--skip-done", str(tmp_path / "*.json"), "--samples", "10"])
        assert len(retrieval.pending_units(units, args)) == left
    assert len(retrieval.read_rows(str(tmp_path / "*.json"), "gemma3")) == 3
    with pytest.raises(SystemExit):
        retrieval.main(["--from-json", str(tmp_path / "*.json")])
    assert "rows of 2 models" in capsys.readouterr().err
    (tmp_path / "old.json").write_text(json.dumps([{k: v for k, v in row("gemma3", 0).items() if k != "model"}]))
    with pytest.raises(ValueError, match="old.json: rows lack 'model'"):
        retrieval.read_rows(str(tmp_path / "*.json"))


def test_the_wide_table_has_a_row_per_config_and_marks_short_cells():
    row = lambda config, task, sample, score: {"config": config, "task": task, "length": 8000,  # noqa: E731
                                               "sample": sample, "score": score, "total_ratio": 0.3}
    rows = ([row("int4", "passkey", i, 1) for i in range(4)] + [row("fp16", "passkey", i, 1) for i in range(4)]
            + [row("fp16", "needle", i, 0) for i in range(2)])
    cells = retrieval.cell_tables(rows, "fp16")
    assert {c["config"]: c.get("diff_n") for c in cells if c["task"] == "passkey"} == {"fp16": None, "int4": 4}
    columns, table = retrieval.wide_rows(cells)
    assert columns == ["config", "total ratio", "passkey 8000", "needle 8000"]
    assert table[0][0] == "fp16" and table[0][3].endswith("(n=2)") and table[1][3] is None
    assert table[1][2] == "1.00 [1.00, 1.00]"


def test_a_length_too_short_for_a_task_is_skipped_before_any_generation(tmp_path, capsys):
    out = tmp_path / "out.json"
    retrieval.main(["--model", "tiny-llama", "--configs", "int4", "--tasks", "passkey,variable-tracking",
                    "--lengths", "256", "--samples", "2", "--chunk", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "skipping variable-tracking at 256 tokens: length must be at least" in printed
    assert "FAILED" not in printed
    assert {r["task"] for r in json.loads(out.read_text())} == {"passkey"}
    _, tokenizer = _tiny()
    assert retrieval.unfit_cells(tokenizer, ["passkey"], [256], 2, 0) == {}


def test_merged_rows_are_added_once_and_the_file_is_rewritten_identically(tmp_path, capsys):
    row = lambda sample, score, model="gemma3": {"model": model, "config": "int4", "task": "passkey",  # noqa: E731
                                                 "length": 2048, "sample": sample, "score": score, "total_ratio": 0.3}
    kept = tmp_path / "rows.json.gz"
    (tmp_path / "a.json").write_text(json.dumps([row(0, 1.0), row(1, 0.0)]))
    (tmp_path / "b.json").write_text(json.dumps([row(1, 1.0), row(2, 1.0)]))     # sample 1 again, another score
    retrieval.main(["--from-json", str(tmp_path / "a.json"), "--merge-into", str(kept)])
    first = kept.read_bytes()
    retrieval.main(["--from-json", str(tmp_path / "a.json"), "--merge-into", str(kept)])
    assert kept.read_bytes() == first                                            # nothing new: the same bytes
    capsys.readouterr()
    retrieval.main(["--from-json", str(tmp_path / "*.json"), "--merge-into", str(kept)])
    assert "1 rows added, 3 already held (1 of those with another score" in capsys.readouterr().out
    rows = retrieval.read_rows(str(kept))
    assert sorted((r["sample"], r["score"]) for r in rows) == [(0, 1.0), (1, 0.0), (2, 1.0)]
    (tmp_path / "c.json").write_text(json.dumps([row(3, 1.0, model="smollm2")]))
    with pytest.raises(SystemExit):
        retrieval.main(["--from-json", str(tmp_path / "c.json"), "--merge-into", str(kept)])
    assert "--merge-into" in capsys.readouterr().err and len(retrieval.read_rows(str(kept))) == 3


def test_a_config_spec_writes_a_tuple_with_slashes():
    """SmartKV's widths are a tuple: `widths=2/4/8` (commas separate parameters); everything else as before."""
    from smartkv.methods import make_cache

    method, params = bench_quality.parse_config("smartkv:budget=4.25,widths=2/4/8,joint=true,rotate=keys")
    assert (method, params) == ("smartkv", dict(budget=4.25, widths=(2, 4, 8), joint=True, rotate="keys"))
    assert make_cache(method, num_layers=1, **params).layers[0].config.widths == (2, 4, 8)
