"""Small pure ports of the text-similarity functions LongBench's metrics call, with identical results.

- `rouge_l_f`: ROUGE-L F of the PyPI package `rouge` 1.0.1 (pltrdy), as `Rouge().get_scores([pred], [gt], avg=True)
  ["rouge-l"]["f"]`: texts split into "sentences" on ".", summary-level union LCS over *sets* of words.
  One deliberate difference: the original reconstructs the LCS recursively and so raises RecursionError for a
  sentence pair whose traceback is longer than Python's stack (about 1000 words), which LongBench then scores 0;
  this port walks the table iteratively and gives the score.
- `fuzz_ratio`: `fuzzywuzzy.fuzz.ratio` 0.18.0 as LongBench's requirements install it (no python-Levenshtein, so
  difflib's SequenceMatcher), an integer in [0, 100].
- `jieba_cut`: Chinese word segmentation; needs the `jieba` package (pip install jieba), there is no pure stand-in.
"""
from __future__ import annotations

import difflib
import logging


class EmptyTextError(ValueError):
    """The `rouge` package raises on a text with no sentence; LongBench turns that into a score of 0."""


def _sentences(text: str) -> list[str]:
    # `rouge` keeps the pieces that are non-empty *before* whitespace is collapsed, so " " becomes a "" sentence.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _words(sentences: list[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """The words of the LCS of `ref` and `hyp`, reconstructed with `rouge`'s tie-breaking (up only if strictly
    longer)."""
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev = table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ref[i - 1] == hyp[j - 1] else max(prev[j], row[j - 1])
    words, i, j = set(), n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l_f(prediction: str, reference: str) -> float:
    """ROUGE-L F (summary level) exactly as `rouge.Rouge` computes it; raises EmptyTextError on an empty text."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        raise EmptyTextError("a text has no sentence")
    union: set[str] = set()
    for ref_sentence in ref:
        ref_words = ref_sentence.split(" ")
        for hyp_sentence in hyp:
            union |= _lcs_words(ref_words, hyp_sentence.split(" "))
    recall = len(union) / len(set(_words(ref)))
    precision = len(union) / len(set(_words(hyp)))
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` on difflib: 100 for equal strings, 0 if one is empty, else round(100 * ratio)."""
    if a is None or b is None:
        return 0
    if a == b:
        return 100
    if len(a) == 0 or len(b) == 0:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def jieba_cut(text: str) -> list[str]:
    """`jieba.cut(text, cut_all=False)` as LongBench calls it (accurate mode, HMM on)."""
    try:
        import jieba
    except ImportError as err:
        raise ImportError("the Chinese LongBench metrics need jieba: pip install jieba") from err
    jieba.setLogLevel(logging.WARNING)  # its default logger prints the dictionary build to stderr
    return list(jieba.cut(text, cut_all=False))
