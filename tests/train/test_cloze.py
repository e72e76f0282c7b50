"""Cloze pre-training questions (densepr.train.cloze, `densepr cloze-data`): made from the corpus, answerable
from their context, written as reader training data."""

from __future__ import annotations

import json

import pytest

from densepr.data.passages import Corpus, Passage
from densepr.errors import DenseprError
from densepr.evaluate.answers import has_answer
from densepr.retrieve.bm25 import BM25Index
from densepr.train.cloze import cloze_candidates, cloze_records, make_cloze
from tests.support.cli import run

TEXT = ("Because of the war, the Treaty of Paris was signed in 1783 by Britain. Britain had lost 13 colonies. "
        "The treaty ended the war in 1783 and Britain agreed to it. Nothing else here.")  # fmt: skip


def _corpus() -> Corpus:
    return Corpus.from_passages([Passage("1", "Treaty", TEXT), Passage("2", "Solo", "One sentence only, about Britain in 1783."),
                                 Passage("3", "Colonies", "Britain ruled colonies in America until 1783. The colonies were 13.")])  # fmt: skip


def test_candidates_are_names_years_and_numbers_not_sentence_openers():
    cands = cloze_candidates("Because of the war, the Treaty of Paris was signed in 1783 by Britain.", TEXT)
    assert ("1783", "when") in cands and ("Treaty of Paris", "what") in cands and ("Britain", "what") in cands
    assert all(a != "Because" for a, _ in cands)  # capitalised only as the sentence's first word
    assert ("13", "how many") in cloze_candidates("Britain had lost 13 colonies.", TEXT)


def test_a_cloze_question_blanks_one_span_that_its_context_still_holds():
    made = make_cloze(_corpus(), 100, seed=1)
    assert made and {m["row"] for m in made} <= {0, 2}  # a one-sentence passage leaves no context
    for m in made:
        text = _corpus().texts[m["row"]]
        assert m["question"].endswith("?") and f"{m['wh']}" in m["question"]
        sentence = next(s for s in text.replace(". ", ".\n").splitlines() if s not in m["context"])
        assert sentence.replace(m["answer"], m["wh"], 1).rstrip(" .") + "?" == m["question"]  # the sentence, one span blanked
        assert has_answer([m["answer"]], m["context"]) and len(m["context"]) < len(text)
    assert len({m["question"] for m in made}) == len(made)  # at most one per sentence
    assert make_cloze(_corpus(), 100, seed=1) == made and len(make_cloze(_corpus(), 1, seed=1)) == 1  # seeded; n caps


def test_records_are_reader_training_data_with_bm25_negatives():
    corpus = _corpus()
    recs = cloze_records(corpus, BM25Index.build(corpus), 100, seed=1, depth=3)
    for r, m in zip(recs, make_cloze(corpus, 100, seed=1)):
        first, rest = r["ctxs"][0], r["ctxs"][1:]
        assert r["question"] == m["question"] and r["answers"] == [m["answer"]]
        assert first["has_answer"] and first["text"] == m["context"] and first["id"] == corpus.ids[m["row"]]
        assert len(r["ctxs"]) <= 3 and all(c["id"] != first["id"] for c in rest)  # the source passage is not a negative too
        assert all(c["has_answer"] == has_answer(r["answers"], c["text"]) for c in rest)
        assert all(first["score"] > c["score"] for c in rest)
    with pytest.raises(DenseprError, match="at least 1"):
        cloze_records(corpus, BM25Index.build(corpus), 0)
    one = Corpus.from_passages([Passage("1", "x", "Only one sentence here.")])
    with pytest.raises(DenseprError, match="no passage of two or more sentences"):
        cloze_records(one, BM25Index.build(one), 5)


def test_cli_cloze_data_writes_what_train_reader_reads(tmp_path, capsys, tiny_bert):
    from densepr.data import write_passages_tsv

    corpus, idx = _corpus(), tmp_path / "index"
    write_passages_tsv(corpus, idx / "passages.tsv")
    BM25Index.build(corpus).save(idx / "bm25")
    out = tmp_path / "cloze.json"
    code, stdout, stderr = run(capsys, "cloze-data", "--index", str(idx), "-n", "10", "--depth", "3", "-o", str(out))
    assert code == 0, stderr
    recs = json.loads(out.read_text())
    assert recs == cloze_records(corpus, BM25Index.load(idx / "bm25", corpus=corpus), 10, depth=3) and f"{len(recs)} cloze questions" in stdout
    code, stdout, stderr = run(capsys, "train-reader", "--train", str(out), "--init", str(tiny_bert), "--passages", "2", "--depth", "3",
                               "--batch-size", "2", "--max-length", "64", "--max-steps", "1", "-o", str(tmp_path / "run"))  # fmt: skip
    assert code == 0 and "trained 1 steps" in stdout, stderr  # the reader trainer takes it
    code, _, stderr = run(capsys, "cloze-data", "--index", str(tmp_path), "-o", str(tmp_path / "x.json"))
    assert code != 0 and "passages.tsv and bm25/" in stderr and not (tmp_path / "x.json").exists()
    code, _, stderr = run(capsys, "cloze-data", "--index", str(idx), "--depth", "1", "-o", str(tmp_path / "x.json"))
    assert code != 0 and "depth must be at least 2" in stderr and not (tmp_path / "x.json").exists()
