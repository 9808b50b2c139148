"""From a Sample to model input ids: token counting, LongBench's middle truncation, the chat template.

Chat rule: the template is applied where the tokenizer has one and the sample allows it (LongBench leaves it off for
trec, triviaqa, samsum, lsht, lcc and repobench-p: `meta["chat_template"] = False`; perplexity samples never use
it). RULER puts the answer prefix after the template's assistant header, so `answer_prefix` goes after it here.
"""
from __future__ import annotations

import torch

from smartkv.data.base import Sample


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` alone (no BOS/EOS): what the synthetic sets fit to their target length."""
    return len(encode(tokenizer, text))


def truncate_middle(tokenizer, prompt: str, max_length: int | None) -> tuple[str, bool]:
    """LongBench pred.py: if the tokenized prompt is longer than `max_length`, keep the first and last
    int(max_length / 2) tokens, each decoded with skip_special_tokens=True, and join the two strings."""
    if max_length is None:
        return prompt, False
    ids = encode(tokenizer, prompt, add_special_tokens=True)
    if len(ids) <= max_length:
        return prompt, False
    half = int(max_length / 2)
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    return head + tail, True


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def wants_chat_template(sample: Sample, tokenizer, use_chat_template: bool | None = None) -> bool:
    """None: the model's template if it has one and the task allows it; True forces it; False never."""
    if sample.kind == "ppl" or use_chat_template is False:
        return False
    if use_chat_template is True:
        if not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        return True
    return has_chat_template(tokenizer) and sample.meta.get("chat_template", True)


def build_text(sample: Sample, tokenizer, use_chat_template: bool | None = None) -> tuple[str, bool]:
    """The text fed to the model, and whether it already holds the template's special tokens."""
    if not wants_chat_template(sample, tokenizer, use_chat_template):
        return sample.prompt + sample.answer_prefix, False
    text = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text + sample.answer_prefix.lstrip(), True


def build_input_ids(sample: Sample, tokenizer, use_chat_template: bool | None = None) -> list[int]:
    """Input ids for `sample`: chat template where the model has one and the task allows it, else the plain
    prompt with the tokenizer's special tokens (BOS) as LongBench tokenizes it."""
    text, templated = build_text(sample, tokenizer, use_chat_template)
    return encode(tokenizer, text, add_special_tokens=not templated)


def continuation_ids(sample: Sample, tokenizer) -> list[int]:
    """Token ids of a perplexity sample's continuation (no special tokens)."""
    return encode(tokenizer, sample.continuation)
