"""Haystacks and length fitting for the synthetic long-context sets (RULER, passkey, needle in a haystack).

- noise: RULER's fixed line (also the passkey "garbage"), repeated.
- prose: consecutive words of CPython's documentation (smartkv.data.prose) from a seeded sentence start, cycled if
  short; insertions go to sentence starts. RULER's essay haystack is Paul Graham's essays, which would need a
  download: scores on `prose` are not comparable to RULER's essay numbers, which is why the haystack is an option
  stored with every result.
`fit_units` is RULER's sizing: binary search on the number of haystack units for the longest prompt that still
fits the target token count (RULER fits prompt + generated tokens to max_seq_length; our target is the prompt).
"""
from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Callable

from smartkv.data.inputs import count_tokens
from smartkv.data.prose import prose_sentences

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_SENTENCES = tuple(s.strip() + "." for s in NOISE.split(".") if s.strip())
HAYSTACKS = ("noise", "prose")
# RULER samples depths from 40 evenly spaced points in [0, 100] (np.round of linspace).
RULER_DEPTHS = tuple(int(round(i * 100 / 39)) for i in range(40))

# RULER's keys are adjective-noun pairs from the `wonderwords` lists; this smaller built-in lexicon keeps the same
# shape without the package (1,600 keys).
ADJECTIVES = ("amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "crimson", "curious",
              "dark", "distant", "dusty", "eager", "early", "elegant", "empty", "faint", "fierce", "fluffy", "fragile",
              "gentle", "giant", "golden", "grumpy", "hidden", "hollow", "humble", "icy", "jolly", "lazy", "little",
              "lively", "loud", "lucky", "quiet", "rapid", "silent", "silver")
NOUNS = ("anchor", "badger", "banjo", "basket", "beacon", "breeze", "candle", "canyon", "castle", "cactus", "comet",
         "compass", "cottage", "crayon", "dolphin", "falcon", "feather", "forest", "glacier", "harbor", "helmet",
         "island", "jacket", "kettle", "lantern", "meadow", "mirror", "orchard", "otter", "pebble", "pillow",
         "puzzle", "rocket", "saddle", "teapot", "thimble", "tunnel", "violin", "walnut", "window")


def random_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def distinct(draw: Callable[[], str], count: int) -> list[str]:
    """`count` different values from `draw` (keys must not repeat, or the question has two answers)."""
    out: list[str] = []
    while len(out) < count:
        value = draw()
        if value not in out:
            out.append(value)
    return out


class Haystack:
    """Filler of one kind, sized in units: noise lines (RULER), noise sentences (`noise_sentences`: the passkey's
    space-joined garbage, finer sizing), or prose words. Prose is sized by the word, so any target length is met
    closely, and things are inserted at sentence starts (the needle test moves its needle back to the previous
    sentence boundary the same way); a prose haystack may therefore end inside a sentence."""

    def __init__(self, kind: str, rng: random.Random, noise_sentences: bool = False):
        self.kind = kind
        self.sep = " " if kind == "prose" or noise_sentences else "\n"
        self._noise = _NOISE_SENTENCES if noise_sentences else (NOISE,)
        self._start = rng.choice(prose_words()[2]) if kind == "prose" else 0

    def units(self, n: int) -> list[str]:
        pool = prose_words()[0] if self.kind == "prose" else self._noise
        return [pool[(self._start + i) % len(pool)] for i in range(n)]

    def boundary(self, index: int) -> int:
        """The unit index at or before `index` where a sentence starts (every noise unit does)."""
        if self.kind != "prose":
            return index
        starts = prose_words()[1]
        while index > 0 and not starts[(self._start + index) % len(starts)]:
            index -= 1
        return index

    def position(self, n: int, depth: float) -> int:
        return self.boundary(int(n * depth / 100))

    def context(self, n: int, items: list[tuple[float, str]]) -> str:
        """n units with each (depth percent, text) inserted at its position, joined."""
        return self.sep.join(insert_at(self.units(n), [(self.position(n, d), text) for d, text in items]))


def insert_at(units: list[str], items: list[tuple[int, str]]) -> list[str]:
    """Insert each (unit index, text); items at the same index keep their given order."""
    out = list(units)
    for pos, k in sorted(((pos, k) for k, (pos, _) in enumerate(items)), reverse=True):
        out.insert(pos, items[k][1])
    return out


def insert_at_depths(units: list[str], items: list[tuple[float, str]]) -> list[str]:
    """Insert each (depth percent, text) at unit index int(len(units) * depth / 100) (whole-unit boundaries)."""
    return insert_at(units, [(int(len(units) * depth / 100), text) for depth, text in items])


@functools.cache
def prose_words() -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
    """The prose sentences as words: (words, starts a sentence?, indices of sentence starts)."""
    words, starts = [], []
    for sentence in prose_sentences():
        parts = sentence.split()
        words += parts
        starts += [True] + [False] * (len(parts) - 1)
    return tuple(words), tuple(starts), tuple(i for i, s in enumerate(starts) if s)


def fit_units(render: Callable[[int], str], tokenizer, target_tokens: int, what: str) -> tuple[int, str, int]:
    """Largest n with count_tokens(render(n)) <= target_tokens, by binary search; returns (n, text, tokens).

    `render(n)` must grow with n. ValueError if even n = 0 is longer than the target."""
    def tokens(n: int) -> int:
        return count_tokens(tokenizer, render(n))

    base = tokens(0)
    if base > target_tokens:
        raise ValueError(f"length must be at least {base} tokens for {what} (the prompt without any haystack), "
                         f"got {target_tokens}")
    per_unit = max((tokens(8) - base) / 8, 1e-3)
    hi = int((target_tokens - base) / per_unit * 1.25) + 8
    while tokens(hi) <= target_tokens:
        hi *= 2
        if hi > 1 << 24:  # a tokenizer that truncates its input never reaches the target
            raise ValueError(f"length {target_tokens} is never reached for {what}: does the tokenizer truncate?")
    lo = 0  # invariant: tokens(lo) <= target < tokens(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= target_tokens else (lo, mid)
    text = render(lo)
    return lo, text, count_tokens(tokenizer, text)
