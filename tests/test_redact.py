"""Credentials are masked as docs/reliability.md says: values of `*TOKEN*`, `*SECRET*`, `*KEY*`, `*PASSWORD*`...
variables, token shapes and URL passwords, in result files (every text column, folder names), output and logs."""
from __future__ import annotations

import logging

import pandas as pd
import pytest
from typer.testing import CliRunner

from smartkv.bench.cli import app
from smartkv.bench.redact import MASK, RedactingFilter, redact

runner = CliRunner()
SECRET = "s3cr3t-VALUE-0123456789"


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MY_KEY", "ACME_KEY", "KEY",
                                  "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "SMTP_PASSWD",
                                  "GPG_PASSPHRASE", "GOOGLE_APPLICATION_CREDENTIALS", "my_secret"])
def test_values_of_credential_like_variables_are_masked(name):
    text = f"failed to load org/model?auth={SECRET} (see {SECRET})"
    assert redact(text, {name: SECRET}) == f"failed to load org/model?auth={MASK} (see {MASK})"


def test_other_variables_and_short_values_are_left_alone():
    assert redact(f"x {SECRET}", {"HOME": SECRET, "PATH": SECRET}) == f"x {SECRET}"
    assert redact("key abc", {"MY_KEY": "abc"}) == "key abc"  # under 8 characters: too common to mask


def test_token_shapes_and_url_passwords_are_masked_without_the_environment():
    text = "hf_" + "a" * 30 + " ghp_" + "B" * 30 + " https://user:pa55word@hub.example.com/x"
    assert redact(text, {}) == f"{MASK} {MASK} https://user:{MASK}@hub.example.com/x"


def test_log_records_are_masked(monkeypatch):
    monkeypatch.setenv("ACME_KEY", SECRET)
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "loading %s failed", (f"m-{SECRET}",), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == f"loading m-{MASK} failed"


def test_a_secret_in_a_model_id_reaches_no_file_name_row_or_output(write_grid, fake_worker, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("ACME_KEY", SECRET)
    model = tmp_path / f"models-{SECRET}"
    model.mkdir()
    (model / "config.json").write_text("{broken")  # loading fails: the error text carries the path too
    grid = write_grid(f"name: leak\nmodels: ['{model}', tiny-llama]\nmethods: [fp16]\n"
                      "prompt_sets: {passkey: {length: 256, num_samples: 1}}\n")
    out = tmp_path / "out"
    outputs = [runner.invoke(app, args) for args in (
        ["submit", "--grid", str(grid), "--out", str(out), "--dry-run"],
        ["submit", "--grid", str(grid), "--out", str(out), "--local", "--no-progress", "-v"],
        ["status", str(grid), "--out", str(out)],
        ["report", str(out), "--format", "csv"])]
    assert outputs[1].exit_code == 1  # the broken model's job is an error row
    for result in outputs:
        assert SECRET not in result.output
    for path in out.rglob("*"):
        assert SECRET not in str(path.relative_to(tmp_path / "out"))
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    frame = pd.read_parquet(out)
    masked = frame[frame["model"].str.contains(MASK, regex=False)]
    assert len(masked) == 1 and masked["status"].item() == "error"  # the broken model's one failure row
