"""Ranked lists in memory: per question, the passage rows (-1 = none) and scores of its top k.

The one value every search returns (BM25, FAISS, fusions), and the one place a row becomes a
:class:`Hit` (id, title, text, score, rank); the lowest layer, so any stage may use it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


def top_k_by_score(rows: np.ndarray, scores: np.ndarray, k: int) -> SearchResult:
    """Each question's ``k`` best of ``[n, m]`` candidate rows (``-1`` or a non-finite score: none):
    best score first, equal scores in row order; padded with ``-1`` rows."""
    k_eff = min(k, rows.shape[1])
    # lexsort's last key is the primary one: score descending, then row
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k_eff]
    top_rows, top_scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    out_scores = np.zeros((len(rows), k), dtype=np.float32)
    valid = np.isfinite(top_scores) & (top_rows >= 0)
    out_rows[:, :k_eff] = np.where(valid, top_rows, -1)
    out_scores[:, :k_eff] = np.where(valid, top_scores, 0.0)
    return SearchResult(out_rows, out_scores)


def merge_shards(results: Sequence[SearchResult], k: int) -> SearchResult:
    """One top-k from the top-k lists of several index shards over disjoint passages (rows are
    corpus rows): best score first, equal scores in row order (how a single BM25 index and a flat
    FAISS index order them), so merging exact shards gives exactly one index's list."""
    rows = np.concatenate([r.rows for r in results], axis=1)
    scores = np.concatenate([r.scores for r in results], axis=1).astype(np.float64)
    return top_k_by_score(rows, np.where(rows >= 0, scores, -np.inf), k)


def trec_order(scored: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """``(docid, score)`` pairs in the one order every metric of a scored run uses: score descending,
    then docid descending (string order), as trec_eval (``comp_sim_docno``: ``strcmp(docno2, docno1)``)
    and so pytrec_eval rank them. A run file's rank column and line order are ignored, so nDCG, MRR@10,
    recall and top-k accuracy all see the same list, also when a tie straddles a cut-off."""
    by_docid = sorted(scored, key=lambda h: h[0], reverse=True)
    return sorted(by_docid, key=lambda h: -h[1])  # stable: equal scores keep docid descending
