"""Real English prose without a download: the documentation text CPython bundles in `pydoc_data.topics`.

The topics (about 465K characters, keyed by name) are reST rendered as text; we keep the unindented paragraphs
(prose), drop code blocks, grammar rules, tables, lists and headings, and join each paragraph onto one line.
The text differs between CPython releases, so `prose_digest()` goes into the content hash of any set using it.
"""
from __future__ import annotations

import functools
import hashlib
import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_HEADING_RULE = re.compile(r"^[*=\-~^#]{3,}$")
_BULLET = re.compile(r"^[*\-] ")


def _is_prose(paragraph: list[str]) -> bool:
    """Sentences, not code: no prompts or grammar rules, mostly letters, ends like a sentence."""
    text = " ".join(line.strip() for line in paragraph)
    if ">>>" in text or "::=" in text or text[:1] in "+|=" or any(_HEADING_RULE.match(ln.strip()) for ln in paragraph):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return len(text) >= 40 and letters >= 0.9 * len(text) and text.endswith((".", "?", "!"))


def _paragraphs(topic: str) -> list[str]:
    out, block = [], []
    for line in topic.splitlines() + [""]:
        if line.strip():
            block.append(line)
            continue
        if block and _is_prose(block):
            out.append(_BULLET.sub("", " ".join(" ".join(block).split())))
        block = []
    return out


@functools.cache
def prose_paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics
    return tuple(p for key in sorted(topics) for p in _paragraphs(topics[key]))


@functools.cache
def prose_text() -> str:
    """All prose paragraphs, blank-line separated (about 300K characters)."""
    return "\n\n".join(prose_paragraphs())


def split_sentences(paragraph: str) -> list[str]:
    """Regex sentence split (nltk's punkt needs a download); a piece under 20 characters ("1.", "e.g.") joins the
    next one."""
    out, carry = [], ""
    for piece in _SENTENCE_END.split(paragraph):
        carry = f"{carry} {piece}" if carry else piece
        if len(carry) >= 20:
            out.append(carry)
            carry = ""
    if carry:
        out.append(carry)
    return out


@functools.cache
def prose_sentences() -> tuple[str, ...]:
    return tuple(s for p in prose_paragraphs() for s in split_sentences(p))


@functools.cache
def prose_digest() -> str:
    return hashlib.sha256(prose_text().encode()).hexdigest()[:16]
