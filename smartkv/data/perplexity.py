"""prose-ppl: windows of real prose for the two-pass perplexity measurement.

Each sample is a context of `length` tokens (`prompt`, prefilled) and the next `continuation` tokens
(`continuation`, fed one token at a time and scored). The text is prose that ships with CPython
(smartkv.data.prose: `source` "pydoc" or "docstrings"), the documents of one `part` ("evaluation", the default
for reports; "tuning" to choose settings; "all"), tokenized once; windows sit in cells of length + continuation + SLACK tokens on a grid
shifted by a seeded offset, and a seeded choice of cells picks them, so windows never overlap. Within its cell a
window moves by up to SLACK tokens to where both texts re-tokenize to exactly the same ids, so a consumer that
encodes `prompt` and `continuation` separately gets `length` and `continuation` tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from smartkv.data.base import PROMPT_SETS, PromptSet, Sample, check_int
from smartkv.data.inputs import encode
from smartkv.data.prose import check_source_part, prose_digest, prose_text

SLACK = 8


def round_trips(tokenizer, ids: list[int]) -> bool:
    return encode(tokenizer, tokenizer.decode(ids)) == list(ids)


@PROMPT_SETS.register("prose-ppl")
@dataclass(frozen=True)
class ProsePPL(PromptSet):
    num_samples: int = 8
    seed: int = 42
    length: int = 1024  # context tokens
    continuation: int = 128  # scored tokens
    source: str = "pydoc"
    part: str = "evaluation"

    name: ClassVar[str] = "prose-ppl"
    version: ClassVar[str] = "2"

    def __post_init__(self):
        check_int("num_samples", self.num_samples, 1)
        check_int("seed", self.seed)
        check_int("length", self.length, 1)
        check_int("continuation", self.continuation, 1)
        check_source_part(self.source, self.part)

    def data_digest(self) -> str:
        return prose_digest(self.source, self.part)

    def cell_starts(self, total_tokens: int) -> list[int]:
        cell = self.length + self.continuation + SLACK
        rng = random.Random(f"{self.name}:{self.seed}")
        offset = rng.randrange(cell) if total_tokens >= cell * (self.num_samples + 1) else 0
        cells = (total_tokens - offset) // cell
        if cells < self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} windows of {cell - SLACK} tokens (length + "
                             f"continuation) do not fit in the {self.source} prose's {self.part} part "
                             f"({total_tokens} tokens); at most {cells}")
        return sorted(offset + cell * c for c in rng.sample(range(cells), self.num_samples))

    def window_start(self, ids: list[int], cell_start: int, tokenizer) -> int:
        """First start in the cell where context and continuation both re-tokenize exactly (else the cell's)."""
        for start in range(cell_start, cell_start + SLACK + 1):
            cut, end = start + self.length, start + self.length + self.continuation
            if round_trips(tokenizer, ids[start:cut]) and round_trips(tokenizer, ids[cut:end]):
                return start
        return cell_start

    def prompt_tokens(self) -> int:
        return self.length + self.continuation  # the continuation is fed too, one token at a time

    def check_tokenizer(self, tokenizer) -> None:
        self.cell_starts(len(encode(tokenizer, prose_text())))  # enough prose for num_samples windows

    def samples(self, tokenizer) -> list[Sample]:
        ids = encode(tokenizer, prose_text(self.source, self.part))
        out = []
        for i, cell_start in enumerate(self.cell_starts(len(ids))):
            start = self.window_start(ids, cell_start, tokenizer)
            cut, end = start + self.length, start + self.length + self.continuation
            out.append(Sample(id=str(i), prompt=tokenizer.decode(ids[start:cut]), answers=(), metric="ppl",
                              max_new_tokens=0, kind="ppl", continuation=tokenizer.decode(ids[cut:end]),
                              meta={"task": self.name, "start_token": start, "context_tokens": self.length,
                                    "continuation_tokens": self.continuation, "source": self.source,
                                    "part": self.part}))
        return out
