"""LongBench prompt sets on the fixture in tests/fixtures/longbench (LongBench's schema, records made for the tests).

The byte-level TinyTokenizer makes middle truncation checkable by hand: a token is a byte.
"""
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from smartkv.data import build_input_ids, get_prompt_set, validate_prompt_set
from smartkv.data import longbench_config as cfg
from smartkv.data.inputs import encode
from smartkv.models import TinyTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


class LongTinyTokenizer(TinyTokenizer):
    model_max_length = 1 << 20  # TinyTokenizer cuts its input at 4096 bytes; the long record has 11K


TOK = LongTinyTokenizer()


class ChatTinyTokenizer(LongTinyTokenizer):
    chat_template = "<user>{content}</user><assistant>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


def records(task):
    with open(FIXTURE / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_fixture_loads_with_longbench_template_metric_and_lengths():
    samples = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE)).samples(TOK)
    rec = records("hotpotqa")
    assert len(samples) == 3
    s = samples[0]
    assert s.prompt == cfg.PROMPTS["hotpotqa"].format(**rec[0])
    assert s.prompt.startswith("Answer the question based on the given passages.")
    assert s.prompt.endswith(f"Question: {rec[0]['input']}\nAnswer:")
    assert s.answers == ("Westmere",) and s.id == "fixture-hotpotqa-0"
    assert s.metric == "qa_f1_score" and s.max_new_tokens == 32 and s.kind == "generate"
    assert s.meta["chat_template"] and not s.meta["truncated"] and s.meta["language"] == "en"


def test_few_shot_tasks_score_first_line_and_skip_the_chat_template():
    (s, _) = get_prompt_set("longbench:trec", path=str(FIXTURE)).samples(TOK)
    assert s.metric == "classification_score@first_line" and s.max_new_tokens == 64
    assert "Number of something" in s.all_classes and not s.meta["chat_template"]
    chat = ChatTinyTokenizer()
    assert build_input_ids(s, chat) == encode(chat, s.prompt)  # trec: no template even though the model has one
    assert build_input_ids(s, chat, use_chat_template=True) == encode(chat, f"<user>{s.prompt}</user><assistant>")
    (hotpot, *_) = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE)).samples(TOK)
    assert build_input_ids(hotpot, chat) == encode(chat, f"<user>{hotpot.prompt}</user><assistant>")


def test_samsum_and_code_tasks_follow_pred_py():
    (samsum,) = get_prompt_set("longbench:samsum", path=str(FIXTURE)).samples(TOK)
    assert samsum.metric == "rouge_score@first_line" and samsum.meta["stop_on_newline"]
    (lcc,) = get_prompt_set("longbench:lcc", path=str(FIXTURE)).samples(TOK)
    assert lcc.metric == "code_sim_score" and not lcc.meta["chat_template"]
    assert lcc.prompt.startswith("Please complete the code given below. \ndef add(a, b):")
    assert lcc.prompt.endswith("total = a + b\nNext line of code:\n")


def test_chinese_task_uses_the_chinese_template_and_metric():
    s = get_prompt_set("longbench:multifieldqa_zh", path=str(FIXTURE)).samples(TOK)[0]
    assert s.prompt.startswith("阅读以下文字并用中文简短回答：") and s.prompt.endswith("问题：中国的首都是哪里？\n回答：")
    assert s.metric == "qa_f1_zh_score" and s.meta["language"] == "zh" and s.max_new_tokens == 64


def test_middle_truncation_keeps_head_and_tail_halves():
    full = cfg.PROMPTS["hotpotqa"].format(**records("hotpotqa")[2])
    s = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), max_length=301).samples(TOK)[2]
    assert len(full.encode()) > 301 and s.meta["truncated"]
    assert s.prompt == full[:150] + full[-150:]  # int(301 / 2) bytes from each end
    assert s.prompt.startswith("Answer the question based on the given passages.")
    assert s.prompt.endswith("In which year was Marrow Hill founded?\nAnswer:")
    short = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), max_length=301).samples(TOK)[0]
    assert len(short.prompt.encode()) <= 301 or short.meta["truncated"]


def test_num_samples_takes_the_first_records():
    samples = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), num_samples=2).samples(TOK)
    assert [s.id for s in samples] == ["fixture-hotpotqa-0", "fixture-hotpotqa-1"]


def test_parquet_and_single_files_load_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records("trec")), tmp_path / "trec.parquet")
    from_parquet = get_prompt_set("longbench:trec", path=str(tmp_path)).samples(TOK)
    from_file = get_prompt_set("longbench:trec", path=str(FIXTURE / "trec.jsonl")).samples(TOK)
    assert from_parquet == from_file == get_prompt_set("longbench:trec", path=str(FIXTURE)).samples(TOK)


def test_longbench_e_names_use_the_base_task_rules():
    (s, *_) = get_prompt_set("longbench:hotpotqa_e", path=str(FIXTURE / "hotpotqa.jsonl")).samples(TOK)
    assert s.metric == "qa_f1_score" and s.prompt.startswith("Answer the question based on the given passages.")


@pytest.mark.parametrize("name,options,message", [
    ("longbench:hotpotq", {}, "did you mean 'hotpotqa'"),
    ("longbench", {}, "write it as 'longbench:<task>'"),
    ("longbench:narrativeqa_e", {}, "LongBench task must be one of"),
    ("longbench:hotpotqa", {"path": "/no/such/dir"}, "path '/no/such/dir' does not exist"),
    ("longbench:gov_report", {"path": str(FIXTURE)}, "holds no gov_report.jsonl or gov_report.parquet"),
    ("longbench:hotpotqa", {"max_length": 0}, "max_length must be an integer >= 2"),
    ("longbench:hotpotqa", {"num_samples": -1}, "num_samples must be an integer >= 1"),
    ("longbench:hotpotqa", {"lenght": 5}, "unknown option 'lenght'"),
    ("longbench:hotpotqa", {"task": "trec"}, "unknown option 'task'"),
    ("longbenc:hotpotqa", {}, "did you mean 'longbench:hotpotqa'"),
])
def test_bad_longbench_names_and_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        validate_prompt_set(name, options)


def test_validation_does_not_read_the_data(tmp_path):
    bad = tmp_path / "hotpotqa.jsonl"
    bad.write_text("not json\n")
    validate_prompt_set("longbench:hotpotqa", {"path": str(bad)})  # cheap: the file exists
    with pytest.raises(ValueError, match="hotpotqa.jsonl: line 1: not valid JSON"):  # parsed when read: file, line
        get_prompt_set("longbench:hotpotqa", path=str(bad)).samples(TOK)


def test_content_hash_follows_options_and_file_bytes_not_the_path(tmp_path):
    base = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE))
    copy = tmp_path / "hotpotqa.jsonl"
    shutil.copy(FIXTURE / "hotpotqa.jsonl", copy)
    assert get_prompt_set("longbench:hotpotqa", path=str(copy)).content_hash() == base.content_hash()
    assert get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), max_length=512).content_hash() != base.content_hash()
    assert get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), num_samples=1).content_hash() != base.content_hash()
    assert get_prompt_set("longbench:hotpotqa").content_hash() != base.content_hash()  # hub vs local data
    copy.write_text(copy.read_text().replace("Westmere", "Eastmere"))
    assert get_prompt_set("longbench:hotpotqa", path=str(copy)).content_hash() != base.content_hash()
    assert base.name == "longbench:hotpotqa" and base.options["max_length"] is None


def test_hub_loading_goes_through_datasets(monkeypatch):
    import datasets
    calls = []

    def fake_load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return records("trec")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = get_prompt_set("longbench:trec").samples(TOK)
    assert calls == [("THUDM/LongBench", "trec", "test")] and len(samples) == 2


def test_hub_loading_falls_back_to_data_zip(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported")
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURE / "trec.jsonl", "data/trec.jsonl")
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, repo_type: str(archive))
    local = get_prompt_set("longbench:trec", path=str(FIXTURE)).samples(TOK)
    assert get_prompt_set("longbench:trec").samples(TOK) == local


def test_config_covers_all_21_tasks_with_the_fixed_templates():
    assert len(cfg.TASKS) == 21 and set(cfg.TASKS) == set(cfg.MAX_NEW_TOKENS) == set(cfg.METRIC)
    assert all("asconcisely" not in t for t in cfg.PROMPTS.values())
    for task, template in cfg.PROMPTS.items():
        assert "{context}" in template, task
    assert cfg.NO_CHAT_TEMPLATE == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert cfg.FIRST_LINE == {"trec", "triviaqa", "samsum", "lsht"}


@pytest.mark.slow
def test_real_tokenizer_middle_truncation_and_chat_template():
    from transformers import AutoTokenizer

    from smartkv.models import embedded_model_dir
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    s = get_prompt_set("longbench:hotpotqa", path=str(FIXTURE), max_length=200).samples(tok)[2]
    assert s.meta["truncated"] and abs(len(encode(tok, s.prompt)) - 200) <= 2
    assert s.prompt.startswith("Answer the question") and s.prompt.endswith("Marrow Hill founded?\nAnswer:")
    ids = build_input_ids(s, tok)
    assert tok.decode(ids).startswith("<|im_start|>system") and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_hub_without_access_says_to_give_a_path(monkeypatch):
    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="give the option path"):
        get_prompt_set("longbench:trec").samples(TOK)
