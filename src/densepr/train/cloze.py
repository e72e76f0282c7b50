"""Reader training questions made from the corpus itself: cloze pre-training.

Dhingra et al., NAACL 2018 ("Simple and Effective Semi-Supervised Question Answering") and Lewis et al.,
ACL 2019 ("Unsupervised Question Answering by Cloze Translation"): a sentence whose name, year or number
also occurs elsewhere in its passage becomes a question, the span replaced by a wh-word ("Churchill was
Prime Minister from when to 1945?" -> "1940"); its positive context is the passage *without* that sentence,
so the answer is found by matching the rest of the sentence to the context, not by copying it. BM25's top
passages for the question (the source passage left out) follow as negatives, ``has_answer`` by DPR's rule,
so the output is DPR's retrieval JSON and :func:`densepr.train.reader.train_reader` trains on it as on
real questions. A reader pre-trained on such questions, then trained on labelled ones, extracts more
answers than one trained on the labelled ones alone (benchmarks/reader/reader_cloze.py; docs/reader.md).

Only the corpus's text is used: no question or answer of any QA set.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence

from densepr.data.passages import Corpus
from densepr.errors import DenseprError
from densepr.evaluate.answers import has_answer
from densepr.fileio.atomic import atomic_write
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.index_dir import IndexDir

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NUMBER = re.compile(r"\b[0-9][0-9,.]*[0-9]\b|\b[0-9]\b")
# a run of capitalised words, which may hold "of", "the", "de", ... between them
_NAME = re.compile(r"\b[A-Z][\w'’\-.]*(?:\s+(?:(?:of|the|de|du|von|van|der|la|le|and|y)\s+)*[A-Z][\w'’\-.]*)*")
# capitalised only because they start a sentence, or too common to be answers
_NOT_NAMES = frozenset("the a an it in he she they this these those his her its their there on at as by for from after before "
                       "during since when while however although following it's i we our one two".split())  # fmt: skip
CLOZE_SEED = 12345  # the default sample of questions (reproduce's reader-cloze stage records it)
MIN_WORDS_LEFT = 4  # words a question keeps besides its wh-word: fewer leave nothing to match the context with


def cloze_candidates(sentence: str, text: str) -> list[tuple[str, str]]:
    """(answer span, wh-word) candidates of one ``sentence`` of passage ``text``: years (``when``), other
    numbers (``how many``), runs of capitalised words (``what``)."""
    out = [(m.group(0), "when") for m in _YEAR.finditer(sentence)]
    years = {a for a, _ in out}
    out += [(m.group(0), "how many") for m in _NUMBER.finditer(sentence) if m.group(0) not in years]
    for m in _NAME.finditer(sentence):
        words = m.group(0).rstrip(".").split()
        initial = m.start() == 0
        while words and words[0].lower() in _NOT_NAMES:
            words, initial = words[1:], False
        name = " ".join(words)
        # a single capitalised word opening the sentence is a name only if it is capitalised mid-sentence too
        if len(name) > 2 and not (initial and len(words) == 1 and not re.search(rf"[a-z,;]\s+{re.escape(name)}\b", text)):
            out.append((name, "what"))
    return out


def make_cloze(corpus: Corpus, n: int, seed: int = CLOZE_SEED) -> list[dict]:
    """Up to ``n`` cloze questions, a seeded sample with at most one per sentence.

    Returns:
        ``[{"question", "answer", "wh", "row", "title", "context"}]``: ``row`` is the source passage's
        corpus row, ``context`` its text without the question's sentence (the answer occurs in it).
    """
    rng = random.Random(seed)
    made = []
    for row, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        sentences = _SENTENCE_END.split(text)
        if len(sentences) < 2:
            continue
        for i, s in enumerate(sentences):
            context = " ".join(sentences[:i] + sentences[i + 1 :])
            cands = [(a, wh) for a, wh in cloze_candidates(s, text)
                     if len(s.split()) - len(a.split()) >= MIN_WORDS_LEFT and has_answer([a], context)]  # fmt: skip
            if not cands:
                continue
            answer, wh = rng.choice(cands)
            question = s.replace(answer, wh, 1).rstrip(" .!?") + "?"
            made.append({"question": question, "answer": answer, "wh": wh, "row": row, "title": title, "context": context})
    rng.shuffle(made)
    return made[:n]


def cloze_records(corpus: Corpus, bm25: BM25Index, n: int, seed: int = CLOZE_SEED, depth: int = 20) -> list[dict]:
    """DPR retrieval-result records of :func:`make_cloze`'s questions: ``[{"question", "answers", "ctxs"}]``,
    each ``ctxs`` the positive context first (scored above every hit), then BM25's top passages for the
    question without the source passage, ``depth`` in all, each with ``has_answer``."""
    if n < 1:
        raise DenseprError(f"cloze questions: ask for at least 1, not {n}")
    made = make_cloze(corpus, n, seed)
    if not made:
        raise DenseprError("cloze questions: the corpus has no passage of two or more sentences with a repeated name, year or number")
    hits = bm25.search([m["question"] for m in made], k=depth)
    records = []
    for m, rows, scores in zip(made, hits.rows, hits.scores):
        top = float(scores[0]) + 1.0 if len(scores) else 1.0
        ctxs = [{"id": corpus.ids[m["row"]], "title": m["title"], "text": m["context"], "score": top, "has_answer": True}]
        for r, s in zip(rows, scores):
            r = int(r) - bm25.offset
            if r >= 0 and r != m["row"] and len(ctxs) < depth:
                ctxs.append({"id": corpus.ids[r], "title": corpus.titles[r], "text": corpus.texts[r], "score": float(s),
                             "has_answer": has_answer([m["answer"]], corpus.texts[r])})  # fmt: skip
        records.append({"question": m["question"], "answers": [m["answer"]], "ctxs": ctxs})
    return records


def index_cloze_records(index: str | os.PathLike[str], n: int, seed: int = CLOZE_SEED, depth: int = 20) -> tuple[list[dict], int]:
    """:func:`cloze_records` over an index directory's ``passages.tsv`` and ``bm25/``; also returns the
    number of passages they were made from."""
    index = IndexDir(index)
    if not index.holds_passages() or not index.bm25.is_dir():
        raise DenseprError(f"{index.path}: cloze questions need passages.tsv and bm25/ (an index directory from `densepr reproduce` or the stage commands)")
    if depth < 2:
        raise DenseprError(f"cloze questions: depth must be at least 2 (the positive and a negative), not {depth}")
    from densepr.retrieve.retriever import open_corpus  # here: it imports the dense side

    corpus = open_corpus(index)  # its passage store: nothing held per passage
    return cloze_records(corpus, BM25Index.load(index.bm25, corpus=corpus), n, seed, depth), len(corpus)


def write_cloze(records: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """Write :func:`cloze_records` as DPR's retrieval JSON (what ``densepr train-reader --train`` reads), atomically."""
    with atomic_write(path) as fh:
        json.dump(list(records), fh, ensure_ascii=False)
