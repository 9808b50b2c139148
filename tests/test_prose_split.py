"""Tuning and evaluation text: two prose sources that share no paragraph, each split by document into parts that
share no document; prose-ppl reads the evaluation part unless told otherwise."""
from __future__ import annotations

import pytest

from smartkv.data import get_prompt_set
from smartkv.data.prose import (SOURCES, document_part, prose_digest, prose_documents, prose_paragraphs,
                                prose_text)
from smartkv.models import TinyTokenizer

TOK = TinyTokenizer(4096)


@pytest.mark.parametrize("source", SOURCES)
def test_parts_are_disjoint_documents_that_cover_the_source(source):
    docs = prose_documents(source)
    parts = {name: document_part(source, name) for name, _ in docs}
    assert set(parts.values()) == {"tuning", "evaluation"}
    assert 0.2 < sum(p == "tuning" for p in parts.values()) / len(parts) < 0.5     # about a third tunes
    tuning, evaluation = prose_paragraphs(source, "tuning"), prose_paragraphs(source, "evaluation")
    assert not set(tuning) & set(evaluation)
    assert set(tuning) | set(evaluation) == set(prose_paragraphs(source, "all"))
    docs_of = {}
    for name, paras in docs:
        for p in paras:
            docs_of.setdefault(p, set()).add(parts[name])
    assert all("tuning" in docs_of[p] for p in tuning)
    assert all(docs_of[p] == {"evaluation"} for p in evaluation)
    assert len(prose_text(source, "evaluation")) > 100_000 and len(prose_text(source, "tuning")) > 50_000


def test_the_two_sources_share_no_paragraph():
    assert not set(prose_paragraphs("pydoc")) & set(prose_paragraphs("docstrings"))
    assert prose_digest("pydoc") != prose_digest("docstrings")


def test_a_document_keeps_its_part_whatever_the_text():
    assert document_part("pydoc", "if") == document_part("pydoc", "if")
    assert document_part("pydoc", "if") in ("tuning", "evaluation")


def test_prose_ppl_reads_the_evaluation_part_by_default():
    ps = get_prompt_set("prose-ppl", num_samples=3, length=200, continuation=32)
    assert ps.part == "evaluation" and ps.source == "pydoc"
    evaluation, tuning = prose_text("pydoc", "evaluation"), prose_text("pydoc", "tuning")
    for s in ps.samples(TOK):
        assert s.prompt in evaluation and s.prompt not in tuning and s.meta["part"] == "evaluation"
    tune = get_prompt_set("prose-ppl", num_samples=3, length=200, continuation=32, part="tuning", source="docstrings")
    assert tune.content_hash() != ps.content_hash()
    assert all(s.prompt in prose_text("docstrings", "tuning") for s in tune.samples(TOK))


@pytest.mark.parametrize("option,value", [("part", "test"), ("source", "wiki")])
def test_bad_part_or_source_names_the_option(option, value):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        get_prompt_set("prose-ppl", **{option: value})
