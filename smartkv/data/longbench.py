"""LongBench v1 tasks (THUDM/LongBench; Bai et al. 2023) as prompt sets "longbench:<task>" ("<task>_e" for LongBench-E).

Records follow LongBench's schema (input, context, answers, length, dataset, language, all_classes, _id). They come
from a local JSONL or Parquet file (option `path`: the file, or a directory holding `<task>.jsonl|.parquet` as in
LongBench's data.zip), else from the hub: `datasets.load_dataset("THUDM/LongBench", task, split="test")`, falling
back to the repository's data.zip where `datasets` no longer runs the dataset's loading script.
Prompts follow pred.py: `template.format(**record)`, then middle truncation to `max_length` tokens.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from smartkv.data import longbench_config as cfg
from smartkv.data.base import PROMPT_SETS, PromptSet, Sample, check_int, set_field
from smartkv.data.inputs import truncate_middle
from smartkv.core.registry import did_you_mean

log = logging.getLogger(__name__)
HUB_ID = "THUDM/LongBench"
FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")
SUFFIXES = (".jsonl", ".parquet")


def base_task(task: str) -> str:
    return task.removesuffix("_e")


def resolve_file(path: str | Path, task: str) -> Path:
    """The data file for `task`: `path` itself, or `<path>/<task>.jsonl|.parquet`; ValueError if missing."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for suffix in SUFFIXES:
            if (path / f"{task}{suffix}").is_file():
                return path / f"{task}{suffix}"
        raise ValueError(f"path {str(path)!r} holds no {task}.jsonl or {task}.parquet")
    raise ValueError(f"path {str(path)!r} does not exist (a LongBench JSONL/Parquet file or a directory of them)")


def read_records(file: Path) -> list[dict]:
    """Every record of a local JSONL or Parquet file, each checked; ValueError naming the file and line (JSONL) or
    row (Parquet) of the first bad one."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            records = pq.read_table(file).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"{file}: not a readable Parquet file ({exc.__class__.__name__})") from None
        for row, record in enumerate(records, 1):
            check_record(record, f"{file}: row {row}")
        return records
    records = []
    try:
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    records.append(parse_line(line, f"{file}: line {line_no}"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text (byte {exc.start} of the line after record {len(records)})") \
            from None
    return records


def parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line.rstrip("\r\n"))  # so the column is on this line, not at the start of the next
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a LongBench record must be a JSON object, got {type(record).__name__}")
    check_record(record, where)
    return record


def hub_cached(task: str) -> bool:
    """LongBench's data.zip is in the local Hugging Face cache (what load_hub falls back to)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(HUB_ID, "data.zip", repo_type="dataset"), str)
    except Exception:  # an old or missing huggingface_hub: nothing is known to be cached
        return False


def hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """The hub answers (a TCP connection), unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say not to try."""
    import os
    import socket
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_hub(task: str) -> list[dict]:
    """LongBench from the hub (needs access): through `datasets`, else data.zip's `data/<task>.jsonl`."""
    try:
        import datasets
        return list(datasets.load_dataset(HUB_ID, task, split="test"))
    except Exception as err:  # datasets >= 4 refuses script datasets; data.zip is the same data
        log.info("datasets could not load %s/%s (%s); reading data.zip", HUB_ID, task, err)
    from huggingface_hub import hf_hub_download
    try:
        archive = hf_hub_download(HUB_ID, "data.zip", repo_type="dataset")
    except Exception as err:
        raise RuntimeError(f"LongBench {task!r} could not be loaded from the hub ({err}); without hub access, "
                           f"give the option path: a LongBench JSONL/Parquet file or a directory of them") from err
    with zipfile.ZipFile(archive) as zf:
        text = zf.read(f"data/{task}.jsonl").decode("utf-8")
    return [json.loads(line) for line in io.StringIO(text) if line.strip()]


def check_record(record: dict, where: str) -> None:
    missing = [k for k in ("input", "context", "answers") if k not in record]
    if missing:
        raise ValueError(f"{where}: LongBench record lacks {missing}; the schema is {', '.join(FIELDS)}")
    if not isinstance(record["answers"], list):
        raise ValueError(f"{where}: answers must be a list of strings, got {type(record['answers']).__name__}")


@PROMPT_SETS.register("longbench")
@dataclass(frozen=True)
class LongBench(PromptSet):
    """One LongBench task. Options: path (local data), num_samples (the first N; None: all), max_length (middle
    truncation in tokens, as LongBench's model2maxlen; None: none)."""
    task: str = ""
    path: str | None = None
    num_samples: int | None = None
    max_length: int | None = None

    version: ClassVar[str] = "1"
    takes_task: ClassVar[bool] = True
    unhashed: ClassVar[tuple[str, ...]] = ("path",)  # the file's bytes are hashed instead

    def __post_init__(self):
        names = self.task_names()
        if self.task not in names:
            raise ValueError(f"LongBench task must be one of {names}, got {self.task!r}"
                             f"{did_you_mean(self.task, names)}; write it as 'longbench:<task>'")
        if self.num_samples is not None:
            check_int("num_samples", self.num_samples, 1)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 2)
        if self.path is not None:
            set_field(self, "path", str(resolve_file(self.path, self.task)))

    @classmethod
    def task_names(cls) -> list[str]:
        return list(cfg.TASKS) + [f"{t}_e" for t in cfg.LONGBENCH_E]

    @property
    def name(self) -> str:
        return f"longbench:{self.task}"

    def data_digest(self) -> str:
        source = hashlib.sha256(Path(self.path).read_bytes()).hexdigest() if self.path else f"hub:{HUB_ID}"
        return f"{source}:{cfg.TEMPLATE_HASH}"

    def prompt_tokens(self) -> int | None:
        return self.max_length  # None: as long as the records are

    def new_tokens(self) -> int:
        return cfg.MAX_NEW_TOKENS[base_task(self.task)]

    def check_data(self) -> None:
        if self.path:
            read_records(Path(self.path))
        elif not hub_cached(self.task) and not hub_reachable():
            raise ValueError(f"LongBench {self.task!r} ({HUB_ID}) is not in the local Hugging Face cache and the hub "
                             "is not reachable (offline); fetch LongBench's data.zip where there is network, unzip "
                             f"it and give the folder as the option path ('{self.name}': {{path: data/longbench}})")

    def records(self) -> list[dict]:
        records = read_records(Path(self.path)) if self.path else load_hub(self.task)
        return records[: self.num_samples] if self.num_samples else records

    def samples(self, tokenizer) -> list[Sample]:
        return [self.make_sample(i, r, tokenizer) for i, r in enumerate(self.records())]

    def make_sample(self, index: int, record: dict, tokenizer) -> Sample:
        task = base_task(self.task)
        check_record(record, f"{self.name} record {index}")
        prompt, truncated = truncate_middle(tokenizer, cfg.PROMPTS[task].format(**record), self.max_length)
        metric = cfg.METRIC[task] + ("@first_line" if task in cfg.FIRST_LINE else "")
        meta = {"task": task, "language": record.get("language"), "length": record.get("length"),
                "truncated": truncated, "chat_template": task not in cfg.NO_CHAT_TEMPLATE}
        if task == "samsum":  # pred.py stops samsum at a newline too (and forces at least one new token)
            meta["stop_on_newline"] = True
        return Sample(id=str(record.get("_id") or index), prompt=prompt, answers=tuple(record["answers"]),
                      metric=metric, max_new_tokens=cfg.MAX_NEW_TOKENS[task], kind="generate",
                      all_classes=tuple(record.get("all_classes") or ()), meta=meta)
