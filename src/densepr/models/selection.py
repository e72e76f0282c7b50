"""Readings and how the answer is chosen among them: DPR's rule, or a fusion tuned on held-out questions.

:class:`~densepr.models.reader.Reader` turns each retrieved passage into a :class:`Reading` (its selection
logit and best span); :func:`best_reading` picks the answer among the first k under a :class:`Selection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    """How the answer is chosen among the first k readings.

    Each passage scores ``relevance * selection logit + span * its best span score +
    retriever * (its retrieval score - the question's best retrieval score)``. The default is
    DPR's rule (the selection logit alone); a retriever weight is BERTserini's fusion of the
    retriever's score with the reader's (Yang et al., 2019). Retrieval scores are on each mode's
    own scale, so the weights are tuned per retrieval mode on held-out questions
    (:func:`densepr.pipeline.tune_selection`).

    ``aggregate`` = 0: the answer is the best span of the best-scoring passage that has one.
    ``aggregate`` = t > 0: answers, not passages, compete (evidence aggregation, Wang et al., 2018):
    each distinct answer (its normalised text) scores ``t * log sum exp(score / t)`` over the
    passages whose best span it is, so an answer several passages agree on can beat one
    passage's slightly higher score; large t counts votes, small t tends to the best passage.
    """

    relevance: float = 1.0
    span: float = 0.0
    retriever: float = 0.0
    aggregate: float = 0.0

    @property
    def is_paper(self) -> bool:
        return self.span == 0 and self.retriever == 0 and self.relevance > 0 and self.aggregate == 0


PAPER_SELECTION = Selection()


@dataclass
class Reading:
    """What the reader made of one passage: its selection logit and its best span."""

    relevance: float
    span_score: float = float("-inf")
    start: int = -1  # character offsets into the passage text; -1: the text has no tokens
    end: int = -1
    text: str = ""

    @property
    def has_span(self) -> bool:
        return self.start >= 0




def best_reading(readings: Sequence[Reading], k: int | None = None, selection: Selection = PAPER_SELECTION,
                 retrieval_scores: Sequence[float] | None = None, answer_keys: Sequence[str] | None = None) -> int | None:  # fmt: skip
    """The chosen reading among the first ``k`` (see :class:`Selection`); None when none has a span.

    ``answer_keys``: each reading's answer normalised (as exact match compares answers), which
    groups equal answers when ``selection.aggregate`` is on; without it, lower-cased text.
    With aggregation the result is the best-scoring reading of the winning answer.
    """
    use_retriever = selection.retriever != 0 and retrieval_scores is not None
    scored: list[tuple[int, float]] = []
    for i, r in enumerate(readings[:k] if k else readings):
        if not r.has_span:
            continue
        score = selection.relevance * r.relevance + (selection.span * r.span_score if selection.span else 0.0)
        if use_retriever:
            score += selection.retriever * float(retrieval_scores[i])
        scored.append((i, score))
    if not scored:
        return None
    if selection.aggregate <= 0:
        return max(scored, key=lambda x: x[1])[0]  # the first of equals: retrieval order breaks ties
    t = selection.aggregate
    groups: dict[str, list[tuple[int, float]]] = {}
    for i, score in scored:
        groups.setdefault(answer_keys[i] if answer_keys is not None else readings[i].text.lower().strip(), []).append((i, score))
    def total(g: list[tuple[int, float]]) -> float:
        top = max(s for _, s in g)
        return top + t * float(np.log(sum(np.exp((s - top) / t) for _, s in g)))
    return max(max(groups.values(), key=total), key=lambda x: x[1])[0]
