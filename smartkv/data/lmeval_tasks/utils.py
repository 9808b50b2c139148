"""Loaders of the offline lm-eval tasks shipped with smartkv: each reads a JSONL file beside this one.

lm-eval calls a task's `custom_dataset` with the run's metadata (the model arguments among them), hence **kwargs.
"""
import json
from pathlib import Path

HERE = Path(__file__).parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_qa(**kwargs):
    return _load("qa.jsonl")


def load_choice(**kwargs):
    return _load("choice.jsonl")


def load_prose(**kwargs):
    return _load("prose.jsonl")
