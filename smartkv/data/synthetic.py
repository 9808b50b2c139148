"""Synthetic long-context prompt sets, generated from a seed at any target length in tokens.

- passkey: Mohtashami & Jaggi 2023 ("Landmark Attention"), the prompt reused by PI, LongLoRA and YaRN.
- needle: RULER's niah (Hsieh et al. 2024, NVIDIA/RULER scripts/data/synthetic/niah.py): word keys, 7-digit values;
  one needle is niah_single_1, several (`num_needles`, one of them asked for) is niah_multikey_1.
- kv-retrieval: RULER's niah_multikey_3: the haystack is all needles, uuid keys to uuid values.
- variable-tracking: RULER's vt (variable_tracking.py): chains "VAR B = VAR A" in noise, with a one-shot example.
Each sample draws from its own RNG (`random.Random("<set>:<seed>:<index>")`), then `fit_units` sizes the haystack
with the model's tokenizer so prompt + answer prefix is the longest that fits `length` tokens. The answer prefix is
RULER's; `build_input_ids` puts it after the chat template's assistant header (passkey: no chat template).
"""
from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from smartkv.data.base import PROMPT_SETS, PromptSet, Sample, check_choice, check_int, check_percents, set_field
from smartkv.data.haystack import (HAYSTACKS, NOISE, RULER_DEPTHS, Haystack, distinct, fit_units, insert_at_depths,
                                   random_key, random_number, random_uuid)
from smartkv.data.inputs import count_tokens
from smartkv.data.prose import prose_digest

Render = Callable[[int], tuple[str, str]]  # haystack units -> (prompt, answer prefix)

NIAH_NEEDLE = "One of the special magic {type} for {key} is: {value}."
# RULER's niah template and answer prefix, made singular as RULER does when one value is asked for.
NIAH_TEMPLATE = ("A special magic {type} is hidden within the following text. Make sure to memorize it. I will quiz "
                 "you about the {type} afterwards.\n{context}\nWhat is the special magic {type} for {query} mentioned "
                 "in the provided text?")
NIAH_PREFIX = " The special magic {type} for {query} mentioned in the provided text is"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")


@dataclass(frozen=True)
class Draft:
    """One sample before sizing."""
    render: Render
    answers: tuple[str, ...]
    meta: dict


@dataclass(frozen=True)
class SyntheticSet(PromptSet):
    num_samples: int = 10
    seed: int = 42
    length: int = 2048  # target prompt tokens (prompt + answer prefix, before any chat template)

    metric: ClassVar[str] = "string_match_all"
    max_new_tokens: ClassVar[int] = 128

    def __post_init__(self):
        check_int("num_samples", self.num_samples, 1)
        check_int("seed", self.seed)
        check_int("length", self.length, 1)
        if getattr(self, "depths", None) is not None:
            set_field(self, "depths", check_percents("depths", self.depths))
        check_choice("haystack", getattr(self, "haystack", "noise"), HAYSTACKS)

    def data_digest(self) -> str:
        return prose_digest() if getattr(self, "haystack", "noise") == "prose" else ""

    def depth(self, index: int, rng: random.Random) -> float | None:
        """The given depths cycled over samples, else one of RULER's 40 depths at random."""
        if not hasattr(self, "depths"):
            return None
        return self.depths[index % len(self.depths)] if self.depths else rng.choice(RULER_DEPTHS)

    def draft(self, rng: random.Random, depth: float | None) -> Draft:
        raise NotImplementedError

    def samples(self, tokenizer) -> list[Sample]:
        return self.sample_range(tokenizer, 0, self.num_samples)

    def sample_range(self, tokenizer, lo: int, hi: int) -> list[Sample]:
        return [self.make_sample(i, tokenizer) for i in range(max(lo, 0), min(hi, self.num_samples))]

    def prompt_tokens(self) -> int:
        return self.length

    def new_tokens(self) -> int:
        return self.max_new_tokens

    def check_tokenizer(self, tokenizer, max_checked: int = 1000) -> None:
        """The task's prompt without any haystack must fit `length` for every sample (the first `max_checked`)."""
        need = 0
        for index in range(min(self.num_samples, max_checked)):
            rng = random.Random(f"{self.name}:{self.seed}:{index}")
            draft = self.draft(rng, self.depth(index, rng))
            need = max(need, count_tokens(tokenizer, "".join(draft.render(0))))
        if need > self.length:
            raise ValueError(f"length must be at least {need} tokens for {self.name} with this model's tokenizer "
                             f"(the task's prompt without any haystack), got {self.length}")

    def make_sample(self, index: int, tokenizer) -> Sample:
        rng = random.Random(f"{self.name}:{self.seed}:{index}")
        depth = self.depth(index, rng)
        draft = self.draft(rng, depth)
        units, _, tokens = fit_units(lambda n: "".join(draft.render(n)), tokenizer, self.length, self.name)
        prompt, prefix = draft.render(units)
        meta = {"task": self.name, "depth": depth, "target_length": self.length, "prompt_tokens": tokens,
                "haystack_units": units, **draft.meta}
        return Sample(id=str(index), prompt=prompt, answers=draft.answers, metric=self.metric,
                      max_new_tokens=self.max_new_tokens, kind="generate", answer_prefix=prefix, meta=meta)


@PROMPT_SETS.register("passkey")
@dataclass(frozen=True)
class Passkey(SyntheticSet):
    """Find the pass key (1..50000) hidden at `depth` in repeated filler; scored on the first number generated.

    The classic prompt is a completion prompt ("... The pass key is"), fed as plain text as in Landmark Attention
    and LongLoRA, so like LongBench's few-shot tasks it skips the chat template (`use_chat_template=True` forces
    it). The embedded SmolLM2-135M-Instruct finds 5/5 keys at 2K tokens this way, 3/5 through its chat template.
    """
    depths: tuple[float, ...] | None = None  # percents, cycled over samples; None: RULER's 40 depths at random
    haystack: str = "noise"

    name: ClassVar[str] = "passkey"
    version: ClassVar[str] = "2"
    metric: ClassVar[str] = "first_number_match"
    max_new_tokens: ClassVar[int] = 16  # the first number is all that is scored

    def draft(self, rng, depth):
        key = str(rng.randint(1, 50000))
        info = f"The pass key is {key}. Remember it. {key} is the pass key."
        hay = Haystack(self.haystack, rng, noise_sentences=True)

        def render(n):
            units, cut = hay.units(n), hay.position(n, depth)
            lines = [PASSKEY_TASK, " ".join(units[:cut]), info, " ".join(units[cut:]), "What is the pass key?"]
            return "\n".join(lines), " The pass key is"
        return Draft(render, (key,), {"haystack": self.haystack, "chat_template": False})


def niah_render(context: Callable[[int], str], type_v: str, query: str) -> Render:
    def render(n):
        return (NIAH_TEMPLATE.format(type=type_v, context=context(n), query=query),
                NIAH_PREFIX.format(type=type_v, query=query))
    return render


@PROMPT_SETS.register("needle")
@dataclass(frozen=True)
class Needle(SyntheticSet):
    """RULER niah: `num_needles` word->number needles; the first, asked for, at `depth`, the others at random."""
    depths: tuple[float, ...] | None = None  # percents, cycled over samples; None: RULER's 40 depths at random
    num_needles: int = 1
    haystack: str = "noise"

    name: ClassVar[str] = "needle"
    version: ClassVar[str] = "1"

    def __post_init__(self):
        super().__post_init__()
        check_int("num_needles", self.num_needles, 1)

    def draft(self, rng, depth):
        keys = distinct(lambda: random_key(rng), self.num_needles)
        values = [random_number(rng) for _ in keys]
        needles = [NIAH_NEEDLE.format(type="numbers", key=k, value=v) for k, v in zip(keys, values)]
        others = [(rng.choice(RULER_DEPTHS), text) for text in needles[1:]]
        hay = Haystack(self.haystack, rng)
        items = [(depth, needles[0]), *others]
        render = niah_render(lambda n: hay.context(n, items), "number", keys[0])
        return Draft(render, (values[0],), {"haystack": self.haystack, "num_needles": self.num_needles,
                                            "key": keys[0]})


@PROMPT_SETS.register("kv-retrieval")
@dataclass(frozen=True)
class KVRetrieval(SyntheticSet):
    """RULER niah_multikey_3: many "key is: value" uuid needles; the one asked for sits at `depth`."""
    depths: tuple[float, ...] | None = None  # percents, cycled over samples; None: RULER's 40 depths at random

    name: ClassVar[str] = "kv-retrieval"
    version: ClassVar[str] = "1"

    def draft(self, rng, depth):
        key, value = random_uuid(rng), random_uuid(rng)
        needle = NIAH_NEEDLE.format(type="uuids", key=key, value=value)
        pool_rng, pool = random.Random(rng.getrandbits(64)), []

        def distractors(n):  # a fixed sequence, so n + 1 pairs extend n pairs
            while len(pool) < n:
                pool.append(NIAH_NEEDLE.format(type="uuids", key=random_uuid(pool_rng), value=random_uuid(pool_rng)))
            return pool[:n]
        render = niah_render(lambda n: "\n".join(insert_at_depths(distractors(n), [(depth, needle)])), "uuid", key)
        return Draft(render, (value,), {"key": key})


def vt_chain(rng: random.Random, num_hops: int, name_len: int, value: str) -> tuple[list[str], list[str]]:
    """Variable names and the assignment lines of one chain (RULER: 'VAR B = VAR A ' keeps its trailing space)."""
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)), num_hops + 1)
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
    return names, lines


def vt_items(chains: list[list[str]], fractions: list[list[float]]) -> list[tuple[float, str]]:
    """Each chain's lines at its sorted random fractions of the haystack (as depth percents), in order."""
    items = [(100 * f, line) for chain, fr in zip(chains, fractions) for f, line in zip(fr, chain)]
    return sorted(items, key=lambda item: item[0])


@PROMPT_SETS.register("variable-tracking")
@dataclass(frozen=True)
class VariableTracking(SyntheticSet):
    """RULER vt: find every variable that ends up holding the value, `num_chains` chains of `num_hops` hops."""
    num_chains: int = 1
    num_hops: int = 4
    haystack: str = "noise"
    fewshot: bool = True  # RULER prepends one solved example (3-letter names, 16 noise lines here)

    name: ClassVar[str] = "variable-tracking"
    version: ClassVar[str] = "1"
    max_new_tokens: ClassVar[int] = 30

    def __post_init__(self):
        super().__post_init__()
        check_int("num_chains", self.num_chains, 1)
        check_int("num_hops", self.num_hops, 1)
        check_choice("fewshot", self.fewshot, (True, False))

    def example(self, rng: random.Random) -> str:
        value = str(rng.randint(10000, 99999))
        names, chain = vt_chain(rng, self.num_hops, 3, value)
        fractions = [sorted(rng.random() for _ in chain)]
        context = "\n".join(insert_at_depths([NOISE] * 16, vt_items([chain], fractions)))
        prefix = VT_PREFIX.format(num_v=self.num_hops + 1, query=value)
        return VT_TEMPLATE.format(context=context, query=value) + prefix + " ".join(names) + "\n"

    def draft(self, rng, depth):
        values = distinct(lambda: str(rng.randint(10000, 99999)), self.num_chains)
        chains = [vt_chain(rng, self.num_hops, 5, v) for v in values]
        fractions = [sorted(rng.random() for _ in lines) for _, lines in chains]
        shot = self.example(rng) if self.fewshot else ""
        hay = Haystack(self.haystack, rng)
        lines = [[ln.strip() + "." if self.haystack == "prose" else ln for ln in c] for _, c in chains]
        items = vt_items(lines, fractions)

        def render(n):
            context = hay.context(n, items).replace(". \n", ".\n")
            return (shot + VT_TEMPLATE.format(context=context, query=values[0]),
                    VT_PREFIX.format(num_v=self.num_hops + 1, query=values[0]))
        return Draft(render, tuple(chains[0][0]), {"haystack": self.haystack, "value": values[0]})
