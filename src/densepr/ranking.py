"""Ranked lists in memory: per question, the passage rows (-1 = none) and scores of its top k.

The one value every search returns (BM25, FAISS, fusions), and the one place a row becomes a
:class:`Hit` (id, title, text, score, rank); the lowest layer, so any stage may use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Passages(Protocol):
    """What :meth:`SearchResult.hits` needs of a corpus (:class:`densepr.data.passages.Corpus`)."""

    ids: Sequence[str]
    titles: Sequence[str]
    texts: Sequence[str]


@dataclass
class Hit:
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float
    rank: int


@dataclass
class SearchResult:
    """Top-k lists for a batch of queries: ``rows[i, j]`` is a corpus row (``-1`` = no more hits)."""

    rows: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def top(self, k: int) -> SearchResult:
        return SearchResult(self.rows[:, :k], self.scores[:, :k])

    def select(self, index: np.ndarray | slice) -> SearchResult:
        return SearchResult(self.rows[index], self.scores[index])

    def hits(self, i: int, corpus: Passages, k: int | None = None) -> list[Hit]:
        """Question ``i``'s passages (at most ``k``), best first, up to the first empty slot."""
        out = []
        for j, (r, s) in enumerate(zip(self.rows[i, :k], self.scores[i, :k])):
            if r < 0:
                break
            out.append(Hit(corpus.ids[r], corpus.titles[r], corpus.texts[r], float(s), j + 1))
        return out
