"""Training data from question/answer pairs without gold passages (DPR Section 4.2, Section 5.2).

For TriviaQA, WebQuestions and CuratedTREC the paper takes BM25's top 100 passages per
question: the highest-ranked passage that contains an answer (``has_answer``) is the
positive, and the question is dropped when none does; the BM25 passages without any
answer are the hard negatives; random passages are the plain negatives. The output is DPR's
retriever JSON (see :mod:`densepr.data.training`), so the official ``biencoder-*.json``
files and ours feed the same trainer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from densepr.data.passages import Corpus
from densepr.data.qa import QASet
from densepr.data.training import TrainRecord
from densepr.evaluate.answers import AnswerMatcher
from densepr.retrieve.bm25 import BM25Index


@dataclass
class MiningStats:
    """How many questions each set gave and why the others were dropped."""

    questions: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    no_positive: dict[str, int] = field(default_factory=dict)
    hard_negatives: int = 0

    def as_dict(self) -> dict:
        return {"questions": self.questions, "kept": self.kept, "dropped_no_positive_in_bm25_top": self.no_positive,
                "hard_negatives_total": self.hard_negatives}  # fmt: skip


def mine(
    sets: Sequence[QASet],
    corpus: Corpus,
    bm25: BM25Index,
    *,
    depth: int = 100,
    hard_negatives: int = 30,
    random_negatives: int = 10,
    seed: int = 0,
    stats: MiningStats | None = None,
) -> Iterator[TrainRecord]:
    """Yield one :class:`TrainRecord` per question whose answer BM25 finds in its top ``depth``.

    Args:
        sets: question/answer sets (the match type of each decides string or regex matching).
        corpus: the passages.
        bm25: a BM25 index over ``corpus``.
        depth: how many BM25 passages to look at (the paper: 100).
        hard_negatives: keep up to this many answerless BM25 passages, best first.
        random_negatives: random answerless passages per question.
        seed: for the random negatives.
        stats: filled with counts as records are produced.
    """
    stats = stats if stats is not None else MiningStats()
    matcher = AnswerMatcher(corpus.texts)
    rng = np.random.default_rng(seed)
    for qas in sets:
        stats.questions[qas.name] = len(qas)
        stats.kept[qas.name] = stats.no_positive[qas.name] = 0
        res = bm25.search(qas.questions, depth)
        hits = matcher.hits(res.rows, qas)
        for i, qa in enumerate(qas.items):
            rows, h = res.rows[i], hits[i]
            valid = rows >= 0
            if not h.any():
                stats.no_positive[qas.name] += 1
                continue
            pos = int(rows[np.argmax(h)])
            hard = [int(r) for r, v, a in zip(rows, valid, h) if v and not a][:hard_negatives]
            taken = set(rows[valid].tolist())
            rand: list[int] = []
            for r in rng.choice(len(corpus), size=min(len(corpus), 4 * random_negatives + 8), replace=False).tolist():
                if len(rand) == random_negatives:
                    break
                if r not in taken and not matcher.has_answer(r, qa.answers, qas.match):
                    rand.append(r)
                    taken.add(r)
            stats.kept[qas.name] += 1
            stats.hard_negatives += len(hard)
            yield TrainRecord(
                question=qa.question,
                answers=list(qa.answers),
                positive_ctxs=[corpus[pos]],
                negative_ctxs=[corpus[r] for r in rand],
                hard_negative_ctxs=[corpus[r] for r in hard],
                dataset=qas.name,
            )


def split_holdout(qas: QASet, fraction: float, seed: int = 0) -> tuple[QASet, QASet]:
    """Split questions into (train, validation) at random; ``fraction`` goes to validation."""
    if not 0 <= fraction < 1:
        raise ValueError("the validation fraction must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(qas))
    n_val = int(round(fraction * len(qas)))
    val, train = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
    return (QASet(qas.name, [qas.items[i] for i in train], qas.match), QASet(f"{qas.name}-heldout", [qas.items[i] for i in val], qas.match))
