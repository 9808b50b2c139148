"""The bad-input matrix: every malformed grid file or command line gets exit code 2, one line naming the file
(or option), the field and what is allowed, and nothing is written."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from smartkv.bench.cli import app

runner = CliRunner()

GOOD = """\
models: [tiny-llama]
methods: {fp16: {}}
prompt_sets: {passkey: {length: 256, num_samples: 2}}
"""

def _alias_bomb(levels: int, width: int = 9) -> str:
    """`a: &a [lol x width]`, then each level a list of `width` aliases of the one before: width**levels values."""
    names = "abcdefghijklmnop"
    text = f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]\n"
    for i in range(1, levels):
        text += f"{names[i]}: &{names[i]} [{', '.join(['*' + names[i - 1]] * width)}]\n"
    return text


def _in_description(yaml_text: str) -> str:
    return "description:\n" + "".join(f"  {line}\n" for line in yaml_text.splitlines()) + GOOD


# (case id, grid text, substrings the one-line message must contain: the field and what is allowed)
BAD_GRIDS = [
    ("yaml-syntax", "models: [tiny-llama\nmethods: {fp16: {}}\n", ["line ", "YAML syntax error"]),
    ("yaml-indent", "models:\n  - tiny-llama\n methods: {}\n", ["line ", "YAML syntax error"]),
    ("yaml-tab", "models:\n\t- tiny-llama\n", ["YAML syntax error"]),
    ("empty-file", "", ["(top level)", "empty grid"]),
    ("top-level-list", "- models\n- methods\n", ["(top level)", "mapping"]),
    ("unknown-top-key", GOOD + "modles: []\n", ["modles", "did you mean 'models'"]),
    ("missing-methods", "models: [tiny-llama]\nprompt_sets: {passkey: {}}\n", ["methods", "non-empty"]),
    ("empty-methods", GOOD.replace("{fp16: {}}", "{}"), ["methods", "non-empty"]),
    ("empty-models", GOOD.replace("[tiny-llama]", "[]"), ["models", "non-empty"]),
    ("missing-prompt-sets", "models: [tiny-llama]\nmethods: {fp16: {}}\n", ["prompt_sets", "non-empty"]),
    ("unknown-method", GOOD.replace("fp16", "kiwi"), ["methods.kiwi", "did you mean 'kivi'", "allowed"]),
    ("unknown-prompt-set", GOOD.replace("passkey", "passky"), ["prompt_sets.passky", "did you mean 'passkey'"]),
    ("bits-not-allowed", GOOD.replace("fp16: {}", "kivi: {key_bits: 3}"), ["methods.kivi", "key_bits", "(2, 4, 8)"]),
    ("budget-zero", GOOD.replace("fp16: {}", "smartkv: {budget: 0}"), ["methods.smartkv", "budget"]),
    ("budget-negative", GOOD.replace("fp16: {}", "smartkv: {budget: -1}"), ["methods.smartkv", "budget"]),
    ("budget-above-16", GOOD.replace("fp16: {}", "smartkv: {budget: 17}"), ["methods.smartkv", "budget"]),
    ("budget-in-sweep", GOOD.replace("fp16: {}", "smartkv: {budget: [3, 4, 99]}"), ["methods.smartkv", "99"]),
    ("unknown-method-param", GOOD.replace("fp16: {}", "smartkv: {budgt: 4}"), ["budgt", "did you mean 'budget'"]),
    ("unknown-set-option", GOOD.replace("length: 256", "lenght: 256"), ["lenght", "did you mean 'length'"]),
    ("negative-samples", GOOD.replace("num_samples: 2", "num_samples: -5"), ["num_samples", "[1, 100000]"]),
    ("absurd-samples", GOOD.replace("num_samples: 2", "num_samples: 1000000000"), ["num_samples", "[1, 100000]"]),
    ("absurd-length", GOOD.replace("length: 256", "length: 999999999"), ["length", "[16, 1048576]"]),
    ("negative-seed-option", GOOD.replace("length: 256", "length: 256, seed: -1"), ["seed"]),
    ("repeats-zero", GOOD + "repeats: 0\n", ["repeats", "[1, 100]"]),
    ("repeats-absurd", GOOD + "repeats: 100000\n", ["repeats", "[1, 100]"]),
    ("repeats-string", GOOD + "repeats: many\n", ["repeats", "integer"]),
    ("seeds-wrong-type", GOOD + "seeds: [0, abc]\n", ["seeds[1]", "integer"]),
    ("too-many-jobs", GOOD + "seeds: [" + ", ".join(map(str, range(200))) + "]\nrepeats: 100\n",
     ["(grid)", "20000 jobs", "10000"]),
    ("duplicate-method", "models: [tiny-llama]\nmethods: [fp16, int8, fp16]\nprompt_sets: [passkey]\n",
     ["methods[2].fp16", "duplicate"]),
    ("duplicate-after-defaults", "models: [tiny-llama]\nmethods: [kivi, {kivi: {residual_length: 128}}]\n"
                                 "prompt_sets: [passkey]\n", ["duplicate job"]),
    ("duplicate-model", GOOD.replace("[tiny-llama]", "[tiny-llama, tiny-llama]"), ["models[1]", "duplicate"]),
    ("missing-model-dir", GOOD.replace("[tiny-llama]", "[./no/such/model]"), ["models[0].name", "does not exist"]),
    ("odd-model-name", GOOD.replace("[tiny-llama]", "['bad name$']"), ["models[0].name", "hub id"]),
    ("missing-data-file", GOOD.replace("passkey: {length: 256, num_samples: 2}",
                                       "'longbench:qasper': {path: /no/such/qasper.jsonl}"),
     ["prompt_sets.longbench:qasper", "does not exist"]),
    ("unknown-device", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, device: tpu}]"),
     ["models[0].device", "auto, cpu, cuda, cuda:N"]),
    ("unknown-dtype", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, dtype: float8}]"),
     ["models[0].dtype", "float32"]),
    ("unknown-model-key", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, revison: main}]"),
     ["models[0].revison", "did you mean 'revision'"]),
    ("trust-remote-code-string", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, trust_remote_code: 'yes'}]"),
     ["trust_remote_code", "true or false"]),
    ("config-on-real-model", GOOD.replace("[tiny-llama]", "[{name: smollm2, config: {hidden_size: 64}}]"),
     ["models[0].config", "tiny-llama"]),
    ("max-new-tokens-negative", GOOD + "generation: {max_new_tokens: -1}\n", ["generation.max_new_tokens"]),
    ("warmup-too-many", GOOD + "generation: {warmup: 9}\n", ["generation.warmup", "[0, 8]"]),
    ("generation-typo", GOOD + "generation: {temperatur: 0.5}\n", ["generation.temperatur", "did you mean"]),
    ("truncation-side", GOOD + "truncation: {side: center}\n", ["truncation.side", "left, right, middle, none"]),
    ("name-traversal", GOOD + "name: ../../etc\n", ["name", "letters, digits"]),
    ("name-absolute", GOOD + "name: /tmp/evil\n", ["name", "letters, digits"]),
    ("nested-param", GOOD.replace("fp16: {}", "smartkv: {budget: {a: 1}}"), ["methods.smartkv.budget", "nested"]),
    ("nan-param", GOOD.replace("fp16: {}", "smartkv: {budget: .nan}"), ["methods.smartkv.budget", "finite"]),
    ("empty-sweep", GOOD.replace("fp16: {}", "smartkv: {budget: []}"), ["methods.smartkv.budget", "empty sweep"]),
    # the YAML itself: duplicate keys, alias bombs, self-reference, nesting
    ("duplicate-key", "models: [tiny-llama]\nmethods:\n  smartkv: {budget: 3}\n  smartkv: {budget: 5}\n"
                      "prompt_sets: [passkey]\n",
     ["line 4, column 3", "duplicate key 'smartkv'", "first given on line 3"]),
    ("duplicate-top-key", GOOD + "models: [tiny-gpt2]\n", ["line 4", "duplicate key 'models'"]),
    ("duplicate-option", GOOD.replace("length: 256", "length: 256, length: 512"), ["duplicate key 'length'"]),
    ("alias-bomb-description", _in_description(_alias_bomb(6)), ["(yaml): aliases expand to", "at most 10000 more"]),
    ("alias-bomb-param", _in_description(_alias_bomb(6)).replace("{fp16: {}}", "{smartkv: {budget: *f}}"),
     ["aliases expand to", "at most 10000"]),
    ("recursive-alias", "description: &d [1, *d]\n" + GOOD, ["line 1", "refers to the value that contains it"]),
    ("deep-nesting", "description: " + "[" * 100 + "]" * 100 + "\n" + GOOD, ["nested too deeply"]),
    # numbers bounded by what a machine holds, before anything is allocated
    ("tiny-config-field", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, config: {hidden_size: 65536}}]"),
     ["models[0].config", "hidden_size must be an integer in [8, 8192], got 65536"]),
    ("tiny-config-total", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, config: {hidden_size: 8192, "
                                                       "intermediate_size: 32768, num_hidden_layers: 64}}]"),
     ["models[0].config", "M parameters", "at most 268M"]),
    ("tiny-config-heads", GOOD.replace("[tiny-llama]", "[{name: tiny-llama, config: {num_attention_heads: 3}}]"),
     ["models[0].config", "multiple of the attention heads"]),
    ("tiny-config-zero", GOOD.replace("[tiny-llama]", "[{name: tiny-gpt2, config: {n_layer: 0}}]"),
     ["n_layer must be an integer in [1, 64]"]),
    ("continuation-absurd", GOOD.replace("passkey: {length: 256, num_samples: 2}",
                                         "prose-ppl: {continuation: 1000000000}"), ["continuation", "[1, 65536]"]),
    ("needles-absurd", GOOD.replace("passkey: {length: 256, num_samples: 2}", "needle: {num_needles: 10000000}"),
     ["num_needles", "[1, 1000]"]),
    ("hops-absurd", GOOD.replace("passkey: {length: 256, num_samples: 2}",
                                 "variable-tracking: {num_hops: 100000}"), ["num_hops", "[1, 100]"]),
    ("too-many-samples", GOOD.replace("num_samples: 2", "num_samples: 100000") + "seeds: [" +
     ", ".join(map(str, range(20))) + "]\n", ["(grid)", "2000000 samples", "1000000"]),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line_error(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("case,text,expected", BAD_GRIDS, ids=[c[0] for c in BAD_GRIDS])
def test_bad_grid_file(workdir, case, text, expected):
    path = workdir / f"{case}.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["submit", "--grid", str(path)])
    assert result.exit_code == 2, result.output
    line = _one_line_error(result)
    assert f"{case}.yaml: " in line
    for part in expected:
        assert part in line, line
    assert not (workdir / "results").exists()  # nothing written


def test_status_refuses_an_alias_bomb_among_the_grids_quickly(workdir):
    """`status` reads every jobs/*.yaml: a bomb there is one line and exit 2, in well under a second of work."""
    import time

    (workdir / "jobs").mkdir()
    (workdir / "jobs" / "ok.yaml").write_text(GOOD)
    (workdir / "jobs" / "zz-bomb.yaml").write_text(_in_description(_alias_bomb(10)))  # 9**10 values
    start = time.process_time()
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "aliases expand to" in _one_line_error(result)
    assert time.process_time() - start < 5


def test_missing_grid_file(workdir):
    result = runner.invoke(app, ["submit", "--grid", "nope.yaml"])
    assert result.exit_code == 2
    assert "nope.yaml: (file): no such grid file" in _one_line_error(result)


BAD_COMMANDS = [
    (["submit", "--grid", "{grid}", "--workers", "0"], ["--workers", "[1, 1024]"]),
    (["submit", "--grid", "{grid}", "--workers", "-3"], ["--workers"]),
    (["submit", "--grid", "{grid}", "--workers", "many"], ["--workers", "integer"]),
    (["submit", "--grid", "{grid}", "--cpus-per-worker", "0"], ["--cpus-per-worker", "[1, 256]"]),
    (["submit", "--grid", "{grid}", "--workers-per-gpu", "0"], ["--workers-per-gpu", "[1, 64]"]),
    (["submit", "--grid", "{grid}", "--max-inflight", "0"], ["--max-inflight"]),
    (["submit", "--grid", "{grid}", "--max-attempts", "0"], ["--max-attempts", "[1, 20]"]),
    (["submit", "--grid", "{grid}", "--address", " "], ["--address"]),
    (["submit", "--grid", "{grid}", "--no-such-flag"], ["--no-such-flag"]),
    (["submit"], ["--grid"]),
    (["sbumit", "--grid", "{grid}"], ["sbumit", "did you mean 'submit'"]),
    (["report", "{workdir}", "--format", "xml"], ["--format", "table, md, csv"]),
    (["report", "{workdir}/no-such-results"], ["RESULTS", "not a directory"]),
    (["status", "{grid}", "{grid}", "--out", "x"], ["--out", "exactly one grid"]),
]


@pytest.mark.parametrize("argv,expected", BAD_COMMANDS, ids=[" ".join(a[:2] + a[3:]) for a, _ in BAD_COMMANDS])
def test_bad_command_line(workdir, argv, expected):
    grid = workdir / "ok.yaml"
    grid.write_text(GOOD)
    args = [a.format(grid=grid, workdir=workdir) for a in argv]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    line = _one_line_error(result)
    for part in expected:
        assert part.lower() in line.lower(), line
    assert not (workdir / "results").exists()


def test_unusable_output_directory_is_refused_before_anything_runs(workdir, fake_worker):
    blocker = workdir / "a-file"
    blocker.write_text("not a directory")
    grid = workdir / "ok.yaml"
    grid.write_text(GOOD)
    result = runner.invoke(app, ["submit", "--grid", str(grid), "--out", str(blocker / "sub"), "--local"])
    assert result.exit_code == 2, result.output
    assert "cannot create output directory" in _one_line_error(result)
    assert not list(fake_worker.glob("started-*"))  # no job started
