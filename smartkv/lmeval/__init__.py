"""lm-evaluation-harness through any smartkv cache (lm-eval is an optional extra: pip install 'smartkv[lmeval]').

    import lm_eval, smartkv.lmeval          # the import registers --model smartkv with lm-eval
    lm_eval.simple_evaluate(model="smartkv", model_args="pretrained=smollm2,method=kivi,key_bits=2",
                            tasks=["smartkv_qa"], task_manager=smartkv.lmeval.task_manager())

`smartkv-lm-eval` is lm-eval's command line with that model as the default; grids name tasks as prompt sets
`lm-eval:<task>` (smartkv.data.lmeval). `task_manager()` indexes the offline tasks shipped with smartkv
(smartkv_qa, smartkv_choice, smartkv_prose, the group smartkv_tiny) with lm-eval's own.
"""
from smartkv.data.lmeval import SHIPPED_TASKS, TASKS_DIR
from smartkv.lmeval.model import SmartKVLM


def task_manager(include_path: str | None = None, defaults: bool = True):
    """lm-eval's TaskManager with smartkv's offline tasks (and `include_path`); `defaults=False` skips indexing
    lm-eval's own thousands of tasks (seconds to tens of seconds)."""
    from smartkv.data.lmeval import task_manager as cached

    return cached(include_path, defaults)


__all__ = ["SHIPPED_TASKS", "SmartKVLM", "TASKS_DIR", "task_manager"]
