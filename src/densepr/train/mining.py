"""Training data from question/answer pairs without gold passages (DPR Section 4.2, Section 5.2).

For TriviaQA, WebQuestions and CuratedTREC the paper takes BM25's top 100 passages per
question: the highest-ranked passage that contains an answer (``has_answer``) is the
positive, and the question is dropped when none does; the BM25 passages without any
answer are the hard negatives; random passages are the plain negatives. The output is DPR's
retriever JSON (see :mod:`densepr.data.training`), so the official ``biencoder-*.json``
files and ours feed the same trainer.

Re-mining (the DPR follow-ups' "adversarial" negatives, ANCE's idea): ``negatives_from`` gives
a trained model's own ranking; its answerless passages become the hard negatives (after
``skip_top`` ranks, where unlabelled positives are likeliest), and the positive is the model's
best answer-bearing passage, else BM25's, so questions either list answers survive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from densepr.data.passages import Corpus
from densepr.data.qa import QASet
from densepr.data.training import TrainRecord
from densepr.evaluate.answers import AnswerMatcher
from densepr.ranking import SearchResult
from densepr.retrieve.bm25 import BM25Index


@dataclass
class MiningStats:
    """How many questions each set gave and why the others were dropped."""

    questions: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    no_positive: dict[str, int] = field(default_factory=dict)
    hard_negatives: int = 0
    positive_from: dict[str, int] = field(default_factory=dict)  # which list gave each positive

    def as_dict(self) -> dict:
        return {"questions": self.questions, "kept": self.kept, "dropped_no_positive_in_bm25_top": self.no_positive,
                "hard_negatives_total": self.hard_negatives, "positive_from": self.positive_from}  # fmt: skip


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
    negatives_from: Callable[[Sequence[str], int], SearchResult] | None = None,
    skip_top: int = 0,
) -> Iterator[TrainRecord]:
    """Yield one :class:`TrainRecord` per question whose answer BM25 (or ``negatives_from``) finds in its top ``depth``.

    Args:
        sets: question/answer sets (the match type of each decides string or regex matching).
        corpus: the passages.
        bm25: a BM25 index over ``corpus``.
        depth: how many BM25 passages to look at (the paper: 100).
        hard_negatives: keep up to this many answerless BM25 passages, best first.
        random_negatives: random answerless passages per question.
        seed: for the random negatives.
        stats: filled with counts as records are produced.
        negatives_from: ``(questions, depth) -> SearchResult``, a trained model's ranking: hard
            negatives come from it, positives from it or else from BM25 (None: BM25 alone, DPR's rule).
        skip_top: answerless passages ranked above this (0-based) are not used as hard negatives.
    """
    stats = stats if stats is not None else MiningStats()
    matcher = AnswerMatcher(corpus.texts)
    rng = np.random.default_rng(seed)
    for qas in sets:
        stats.questions[qas.name] = len(qas)
        stats.kept[qas.name] = stats.no_positive[qas.name] = 0
        sparse = bm25.search(qas.questions, depth)
        res = negatives_from(qas.questions, depth) if negatives_from is not None else sparse
        lists = [("model" if negatives_from is not None else "bm25", res)] + ([("bm25", sparse)] if negatives_from is not None else [])
        all_hits = matcher.hits_many([r.rows for _, r in lists], qas)
        for i, qa in enumerate(qas.items):
            rows, h = res.rows[i], all_hits[0][i]
            valid = rows >= 0
            source = next((j for j, hits in enumerate(all_hits) if hits[i].any()), None)
            if source is None:
                stats.no_positive[qas.name] += 1
                continue
            name, found = lists[source]
            pos = int(found.rows[i][np.argmax(all_hits[source][i])])
            stats.positive_from[name] = stats.positive_from.get(name, 0) + 1
            hard = [int(r) for rank, (r, v, a) in enumerate(zip(rows, valid, h)) if v and not a and rank >= skip_top][:hard_negatives]
            taken = set(rows[valid].tolist()) | {pos}
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
