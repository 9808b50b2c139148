"""Real English prose without a download, from two disjoint sources that ship with CPython:

  pydoc       the documentation text CPython bundles in `pydoc_data.topics` (the language reference: about 465K
              characters, keyed by topic); a document is a topic.
  docstrings  the docstrings of the standard library's top-level modules (Lib/*.py: module, class and function
              docstrings, read with `ast`, never imported); a document is a module. Paragraphs that also occur in
              the pydoc prose are dropped, so the two sources share no paragraph.

From either we keep the unindented paragraphs (prose), drop code blocks, grammar rules, tables, lists and
headings, and join each paragraph onto one line.

Tuning and evaluation parts: every document belongs to one part, by a hash of its name (TUNING_SHARE of the
documents tune, the rest evaluate), so the parts share no document (nor paragraph: boilerplate repeated in a
tuning document is dropped from the evaluation part) and a text change moves no document between them. Settings are chosen on `part="tuning"`; reports use `part="evaluation"`. The text differs between CPython
releases, so `prose_digest()` goes into the content hash of any set using it.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import re
import sysconfig
from pathlib import Path

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


SOURCES = ("pydoc", "docstrings")
PARTS = ("tuning", "evaluation", "all")
TUNING_SHARE = 1 / 3


def check_source_part(source: str, part: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")


def document_part(source: str, name: str) -> str:
    """"tuning" or "evaluation": a fixed function of the document's name."""
    h = int.from_bytes(hashlib.sha256(f"{source}:{name}".encode()).digest()[:8], "big")
    return "tuning" if h / 2 ** 64 < TUNING_SHARE else "evaluation"


def _docstrings(path: Path) -> str:
    """A module's docstrings (module, classes, functions), in source order, blank-line separated."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in docs if d)


@functools.cache
def prose_documents(source: str = "pydoc") -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(document name, its prose paragraphs) for every document of `source` that has any, sorted by name."""
    check_source_part(source, "all")
    if source == "pydoc":
        from pydoc_data.topics import topics
        docs = [(key, tuple(_paragraphs(topics[key]))) for key in sorted(topics)]
    else:
        seen = set(prose_paragraphs("pydoc"))
        lib = Path(sysconfig.get_paths()["stdlib"])
        docs = [(f.stem, tuple(p for p in _paragraphs(_docstrings(f)) if p not in seen))
                for f in sorted(lib.glob("*.py"))]
    return tuple((name, paras) for name, paras in docs if paras)


@functools.cache
def prose_paragraphs(source: str = "pydoc", part: str = "all") -> tuple[str, ...]:
    """Prose paragraphs of `source`, of the documents of `part`. A paragraph that also occurs in a tuning
    document (boilerplate repeated across documents) is left out of the evaluation part."""
    check_source_part(source, part)
    paras = tuple(p for name, doc in prose_documents(source)
                  if part == "all" or document_part(source, name) == part for p in doc)
    if part == "evaluation":
        tuning = set(prose_paragraphs(source, "tuning"))
        paras = tuple(p for p in paras if p not in tuning)
    return paras


@functools.cache
def prose_text(source: str = "pydoc", part: str = "all") -> str:
    """Prose paragraphs of `source` (documents of `part`), blank-line separated (pydoc, all: about 300K
    characters)."""
    return "\n\n".join(prose_paragraphs(source, part))


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
def prose_digest(source: str = "pydoc", part: str = "all") -> str:
    return hashlib.sha256(prose_text(source, part).encode()).hexdigest()[:16]
