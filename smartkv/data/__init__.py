"""Prompt sets: LongBench v1 tasks, lm-evaluation-harness tasks (lm-eval:<task>), synthetic long-context tasks
(passkey, RULER needle / kv-retrieval / variable-tracking), and prose windows for perplexity.
`get_prompt_set(name, **options).samples(tokenizer)`."""
from smartkv.data import lmeval, longbench, perplexity, synthetic  # noqa: F401  (registers the sets)
from smartkv.data.base import PromptSet, Sample, get_prompt_set, list_prompt_sets, validate_prompt_set
from smartkv.data.inputs import build_input_ids, continuation_ids

__all__ = ["PromptSet", "Sample", "build_input_ids", "continuation_ids", "get_prompt_set", "list_prompt_sets",
           "validate_prompt_set"]
