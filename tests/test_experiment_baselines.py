"""The validation experiment: `python -m smartkv.experiments.validate_baselines` and scripts/test_validation.py."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

import smartkv
from smartkv.experiments import validate_baselines
from smartkv.experiments.baselines import BASELINES, baseline_name, model_shape

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = validate_baselines.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def only_json(out_dir: Path) -> dict:
    files = list(out_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_memory_only_prints_and_writes_the_ratios(tmp_path, capsys):
    out_dir = tmp_path / "val"
    code, out, _ = run_main(capsys, "--memory-only", "--model", "gpt2", "--context-tokens", "192",
                            "--baselines", "fp16", "INT8", "int4", "Kivi", "smartKV", "--out-dir", str(out_dir))
    assert code == 0
    record = only_json(out_dir)
    ratios = {r["baseline"]: r["payload_ratio"] for r in record["results"]}
    assert ratios["FP16"] == 1.0 and ratios["INT8"] == 0.5 and ratios["INT4"] == 0.25 and ratios["KIVI"] == 0.1875
    smart = next(r for r in record["results"] if r["baseline"] == "SmartKV")
    budget = smartkv.method_fields("smartkv")["budget"]     # measured 6.9935 bits at the default 7
    assert budget - 0.05 <= smart["avg_bits"] <= budget and ratios["SmartKV"] == pytest.approx(smart["avg_bits"] / 16)
    totals = {r["baseline"]: r["total_ratio"] for r in record["results"]}
    assert totals["INT8"] == pytest.approx(0.5625) and totals["INT4"] == pytest.approx(0.3125)
    # KIVI at 192 tokens, R = 128: 128 keys and 64 values quantized (+1 bit of scale and zero each), the rest 16 bits
    assert totals["KIVI"] == pytest.approx((128 * 3 + 64 * 5 + 192 * 16) / (2 * 192 * 16))
    assert record["model"]["shape"] == {"num_layers": 12, "num_kv_heads": 12, "head_dim": 64}
    assert record["model"]["weights_loaded"] is False
    for name in BASELINES:
        assert name in out
    log = (out_dir / "validation.log").read_text()
    assert record["experiment_id"] in log and "0.5625" in log


@pytest.mark.parametrize("argv, says", [
    (["--baselines", "FP16", "FP32"], "unknown baseline 'FP32'; allowed: FP16, INT8, INT4, KIVI, SmartKV"),
    (["--model", "gpt3"], "unknown model 'gpt3'; allowed: gpt2, gpt2-medium, smollm2"),
    (["--num-prompts", "0"], "argument --num-prompts: must be a positive integer in [1, 1000], got '0'"),
    (["--num-prompts", "-2"], "must be a positive integer in [1, 1000], got '-2'"),
    (["--num-prompts", "three"], "must be a positive integer in [1, 1000], got 'three'"),
    (["--num-prompts", "100000"], "must be a positive integer in [1, 1000], got '100000'"),
    (["--context-tokens", "0", "--memory-only"], "must be a positive integer"),
    (["--context-tokens", "2000000", "--memory-only"], "in [1, 1048576], got '2000000'"),
    (["--context-tokens", "300000", "--memory-only", "--model", "gpt2-medium"],
     "300000 tokens of gpt2-medium's keys and values are 27.5 GiB; at most 43690 tokens (4 GiB)"),
    (["--context-tokens", "5000", "--model", "gpt2"], "5000 prompt tokens + 32 new tokens exceed gpt2's context of "
                                                       "1024 tokens"),
    (["--max-new-tokens", "100000"], "argument --max-new-tokens: must be a positive integer in [1, 4096]"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2147483647], got '-1'"),
    (["--device", "tpu"], "device must be one of"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv, says):
    out_dir = tmp_path / "val"
    code, out, err = run_main(capsys, *argv, "--out-dir", str(out_dir))
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


@pytest.mark.parametrize("where", ["under-a-file", "a-file"])
def test_an_unusable_out_dir_is_one_line_exit_2(tmp_path, capsys, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out_dir = blocker / "val" if where == "under-a-file" else blocker
    code, out, err = run_main(capsys, "--memory-only", "--model", "tiny-llama", "--out-dir", str(out_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "argument --out-dir: cannot write to" in err and "Traceback" not in err


def test_model_shapes_need_no_weights():
    assert model_shape("gpt2-medium") == {"num_layers": 24, "num_kv_heads": 16, "head_dim": 64}
    assert model_shape("smollm2") == {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}
    assert model_shape("tiny-llama") == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 32}


def test_baseline_names_are_case_insensitive():
    assert [baseline_name(n) for n in ("fp16", "Int8", "INT4", "kivi", "SMARTKV")] == list(BASELINES)


def test_generates_through_each_baseline_on_a_tiny_model(tmp_path, capsys):
    out_dir = tmp_path / "val"
    code, out, _ = run_main(capsys, "--model", "tiny-llama", "--num-prompts", "1", "--context-tokens", "64",
                            "--max-new-tokens", "3", "--baselines", "FP16", "INT4", "--out-dir", str(out_dir))
    assert code == 0
    record = only_json(out_dir)
    fp16, int4 = record["results"]["FP16"], record["results"]["INT4"]
    assert fp16["summary"]["kl_to_fp16"] == 0.0 and fp16["summary"]["token_agreement"] == 1.0
    assert int4["summary"]["key_rel_error"] > 0.01 and int4["summary"]["total_ratio"] == pytest.approx(0.3125)
    sample = int4["samples"][0]
    assert sample["status"] == "ok" and sample["new_tokens"] == 3 and "prediction" in sample
    assert "INT4" in out


@pytest.mark.slow
def test_gpt2_falls_back_to_the_embedded_model_offline(tmp_path, capsys):
    out_dir = tmp_path / "val"
    code, out, _ = run_main(capsys, "--model", "gpt2", "--num-prompts", "1", "--context-tokens", "64",
                            "--max-new-tokens", "2", "--baselines", "int8", "--out-dir", str(out_dir))
    assert code == 0
    model = only_json(out_dir)["model"]
    assert model["loaded"] in ("gpt2", "smollm2")
    if model["loaded"] == "smollm2":
        assert "gpt2" in model["note"] and "smollm2" in model["note"]


def test_quick_validation_script_passes(capsys):
    script = runpy.run_path(str(ROOT / "scripts" / "test_validation.py"), run_name="test_validation_script")
    code = script["main"]()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASSED" in out and "FAIL" not in out.replace("FAILED", "")
