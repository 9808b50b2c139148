"""lm-eval:<task>: an EleutherAI lm-evaluation-harness task (or group) as a prompt set, one sample per document.

The harness builds each document's requests (its prompts, few-shot examples, choices, generation settings) and
scores them (its filters, its metrics), so a grid row carries lm-eval's own numbers; smartkv only runs the
requests, through a cache (`smartkv.lmeval`). Tasks come from lm-eval's registry, from the offline tasks shipped
here (`TASKS_DIR`: smartkv_qa, smartkv_choice, smartkv_prose, the group smartkv_tiny) and from `include_path`.
lm-eval is an optional extra (`pip install 'smartkv[lmeval]'`); it is imported only when a set is built.

Options: num_samples (the first N documents of each task, lm-eval's --limit; None: all), num_fewshot (None: the
task's own), fewshot_seed, include_path (a folder of task YAMLs), apply_chat_template, metadata (a JSON object
for tasks that read it, e.g. RULER's '{"max_seq_lengths": [4096], "tokenizer": "..."}').
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import numbers
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from smartkv.data.base import PROMPT_SETS, PromptSet, Sample, check_int

TASKS_DIR = Path(__file__).parent / "lmeval_tasks"
SHIPPED_TASKS = ("smartkv_qa", "smartkv_choice", "smartkv_prose", "smartkv_tiny")
INSTALL_HINT = "pip install 'smartkv[lmeval]' (lm-eval from PyPI)"
_BUILT: OrderedDict[str, list] = OrderedDict()  # the last few sets built in this process (workers reuse them)
_BUILT_MAX = 4


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"lm-eval prompt sets need the lm-eval package: {INSTALL_HINT}")


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None = None, defaults: bool = True, metadata: str | None = None):
    """lm-eval's TaskManager over the shipped tasks and `include_path` (and lm-eval's own with `defaults`:
    indexing those takes seconds to tens of seconds, so `load_tasks` tries without them first)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, include_defaults=defaults,
                       metadata=json.loads(metadata) if metadata else None)


def load_tasks(task: str, include_path: str | None = None, metadata: str | None = None) -> dict:
    """{task name: lm-eval Task} of a task or group name; ValueError naming the task when nothing matches."""
    require_lm_eval()
    manager = task_manager(include_path, False, metadata)
    if task not in manager.all_tasks:
        manager = task_manager(include_path, True, metadata)
    if task not in manager.all_tasks:
        from smartkv.core.registry import did_you_mean
        raise ValueError(f"unknown lm-eval task {task!r}{did_you_mean(task, manager.all_tasks)}; "
                         f"`lm-eval ls tasks` lists them (offline: {', '.join(SHIPPED_TASKS)})")
    return dict(sorted(manager.load([task])["tasks"].items()))


def _number(value) -> float | None:
    return float(value) if isinstance(value, numbers.Number) else None


@dataclass
class LMEvalDoc:
    """One document of a task with its requests (lm-eval Instances, in order), run and scored as lm-eval does."""
    task_name: str
    task: object = field(repr=False)
    doc_id: int
    instances: list = field(repr=False)

    @property
    def doc(self) -> dict:
        return self.instances[0].doc

    @property
    def request_type(self) -> str:
        return self.instances[0].request_type

    @property
    def filters(self) -> list[str]:
        return [f.name for f in getattr(self.task, "_filters", [])] or ["none"]

    @property
    def primary_metric(self) -> str:
        """lm-eval's name of the first metric under the first filter, e.g. 'acc,none' or 'exact_match,strict'."""
        names = list(getattr(self.task, "_metric_fn_list", {}) or {"score": None})
        return f"{names[0]},{self.filters[0]}"

    def run(self, lm) -> dict[str, dict]:
        """Send each request to `lm` (as many times as the task repeats it), apply the task's filters, and return
        {filter: {metric: this document's value}} from the task's process_results."""
        for inst in self.instances:
            inst.resps, inst.filtered_resps = [], {}
        for inst in self.instances:
            for _ in range(inst.repeats or 1):
                inst.resps.extend(getattr(lm, inst.request_type)([inst], disable_tqdm=True))
        for ensemble in getattr(self.task, "_filters", []):
            ensemble.apply(self.instances)
        if not self.instances[0].filtered_resps:
            for inst in self.instances:
                inst.filtered_resps["none"] = inst.resps[0] if len(inst.resps) == 1 else inst.resps
        return {key: self.task.process_results(self.doc, [inst.filtered_resps[key] for inst in self.instances])
                for key in self.instances[0].filtered_resps}

    def score(self, metrics: dict[str, dict]) -> float | None:
        metric, _, key = self.primary_metric.partition(",")
        return _number(metrics.get(key, {}).get(metric))

    def prediction(self) -> str | None:
        """The generated text, or the choice with the highest log-likelihood (multiple choice)."""
        if self.request_type == "generate_until":
            return str(self.instances[0].resps[0])
        if getattr(self.task, "OUTPUT_TYPE", None) == "multiple_choice":
            lls = [inst.resps[0][0] for inst in self.instances]
            choices = self.task.doc_to_choice(self.doc)
            best = max(range(len(lls)), key=lls.__getitem__)
            return str(choices[best]) if best < len(choices) else None
        return None


@PROMPT_SETS.register("lm-eval")
@dataclass(frozen=True)
class LMEvalSet(PromptSet):
    task: str = "smartkv_tiny"
    num_samples: int | None = None
    num_fewshot: int | None = None
    fewshot_seed: int = 1234
    include_path: str | None = None
    apply_chat_template: bool = False
    metadata: str | None = None

    name: ClassVar[str] = "lm-eval"
    version: ClassVar[str] = "1"
    takes_task: ClassVar[bool] = True
    unhashed: ClassVar[tuple[str, ...]] = ("include_path",)  # the digest covers what the tasks there produce

    @classmethod
    def task_names(cls) -> list[str]:
        return [*SHIPPED_TASKS, "<task>"]

    def __post_init__(self):
        if not isinstance(self.task, str) or not self.task.strip() or self.task == "<task>":
            raise ValueError(f"lm-eval needs a task name after the colon (lm-eval:hellaswag), got {self.task!r}")
        if self.num_samples is not None:
            check_int("num_samples", self.num_samples, 1)
        if self.num_fewshot is not None:
            check_int("num_fewshot", self.num_fewshot, 0)
        check_int("fewshot_seed", self.fewshot_seed, 0)
        if not isinstance(self.apply_chat_template, bool):
            raise ValueError(f"apply_chat_template must be true or false, got {self.apply_chat_template!r}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ValueError(f"include_path must be a folder of lm-eval task YAMLs, got {self.include_path!r}")
        if self.metadata is not None:
            try:
                ok = isinstance(json.loads(self.metadata), dict)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"metadata must be a JSON object as a string, got {self.metadata!r}")
        require_lm_eval()

    def build(self, tokenizer=None) -> list[LMEvalDoc]:
        """Every selected document of every task of the set, with its requests built by lm-eval."""
        templated = self.apply_chat_template and tokenizer is not None
        key = json.dumps([self.options, id(tokenizer) if templated else None], sort_keys=True, default=str)
        if key in _BUILT:
            _BUILT.move_to_end(key)
            return _BUILT[key]
        docs = []
        for name, task in load_tasks(self.task, self.include_path, self.metadata).items():
            docs += self._build_task(name, task, tokenizer if templated else None)
        _BUILT[key] = docs
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
        return docs

    def _build_task(self, name: str, task, tokenizer) -> list[LMEvalDoc]:
        # the same defaults simple_evaluate applies: the set's num_fewshot, else the task's, else 0
        if self.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=self.fewshot_seed)
        template = None
        if tokenizer is not None:
            def template(history, add_generation_prompt=True):
                return tokenizer.apply_chat_template(history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt,
                                                     continue_final_message=not add_generation_prompt)
        task.build_all_requests(limit=self.num_samples, rank=0, world_size=1, apply_chat_template=bool(template),
                                fewshot_as_multiturn=bool(template), chat_template=template,
                                tokenizer_name=getattr(tokenizer, "name_or_path", "") if template else "")
        by_doc = defaultdict(list)
        for inst in task.instances:
            by_doc[inst.doc_id].append(inst)
        return [LMEvalDoc(name, task, doc_id, sorted(insts, key=lambda i: i.idx))
                for doc_id, insts in sorted(by_doc.items())]

    def data_digest(self) -> str:
        """What lm-eval would send and score: each document's request arguments and target, and the task
        versions (the tasks' code is lm-eval's, whose version is in the hash too)."""
        import lm_eval

        digest = hashlib.sha256(f"lm_eval {lm_eval.__version__}".encode())
        for doc in self.build():
            version = (doc.task.get_config("metadata") or {}).get("version")
            spec = [doc.task_name, version, doc.doc_id, [list(inst.args) for inst in doc.instances],
                    str(doc.task.doc_to_target(doc.doc))]
            digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
        return digest.hexdigest()[:16]

    def samples(self, tokenizer) -> list[Sample]:
        out = []
        for doc in self.build(tokenizer):
            first = doc.instances[0]
            max_new = (first.args[1] or {}).get("max_gen_toks", 0) if doc.request_type == "generate_until" else 0
            out.append(Sample(id=f"{doc.task_name}/{doc.doc_id}", prompt=str(first.args[0]), answers=(),
                              metric=doc.primary_metric, max_new_tokens=int(max_new or 0), kind="lm-eval",
                              meta={"task": doc.task_name, "doc_id": doc.doc_id, "request_type": doc.request_type,
                                    "requests": len(doc.instances),
                                    "target": str(doc.task.doc_to_target(doc.doc))[:200]},
                              harness=doc))
        return out
