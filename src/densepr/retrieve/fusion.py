"""Fusing ranked lists: DPR's hybrid (dense + lambda * BM25 over the union of both lists) and reciprocal-rank fusion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from densepr.ranking import SearchResult, top_k_by_score

PAPER_LAMBDA = 1.1


RRF_K = 60


class HybridCandidates:
    """The union of a dense and a BM25 list per question, with missing scores filled.

    Built once, then :meth:`rank` re-ranks it for any lambda cheaply (used to tune lambda).
    """

    def __init__(self, dense: SearchResult, sparse: SearchResult) -> None:
        if len(dense) != len(sparse):
            raise ValueError("dense and BM25 results cover different numbers of questions")
        n, width = len(dense), dense.rows.shape[1] + sparse.rows.shape[1]
        self.rows = np.full((n, width), -1, dtype=np.int64)
        self.dense = np.zeros((n, width), dtype=np.float64)  # padding cells are masked in rank()
        self.sparse = np.zeros((n, width), dtype=np.float64)
        for i in range(n):
            dv, sv = dense.rows[i] >= 0, sparse.rows[i] >= 0
            d_rows, d_sc = dense.rows[i][dv], dense.scores[i][dv]
            s_rows, s_sc = sparse.rows[i][sv], sparse.scores[i][sv]
            union = np.union1d(d_rows, s_rows)
            m = len(union)
            self.rows[i, :m] = union
            # Pyserini: a passage absent from a list takes that list's minimum score (0 if empty).
            self.dense[i, :m] = d_sc.min() if len(d_sc) else 0.0
            self.sparse[i, :m] = s_sc.min() if len(s_sc) else 0.0
            self.dense[i, np.searchsorted(union, d_rows)] = d_sc
            self.sparse[i, np.searchsorted(union, s_rows)] = s_sc

    def rank(self, lam: float = PAPER_LAMBDA, k: int = 100, weight_on_dense: bool = False) -> SearchResult:
        """Top-k of ``dense + lam * bm25`` (or ``lam * dense + bm25``); ties go to the lower row."""
        fused = lam * self.dense + self.sparse if weight_on_dense else self.dense + lam * self.sparse
        fused = np.where(self.rows >= 0, fused, -np.inf)
        return top_k_by_score(self.rows, fused, k)


def fuse_hybrid(dense: SearchResult, sparse: SearchResult, lam: float = PAPER_LAMBDA, k: int = 100, weight_on_dense: bool = False) -> SearchResult:
    """Hybrid re-ranking of the union of both lists (see module docstring)."""
    return HybridCandidates(dense, sparse).rank(lam, k, weight_on_dense)


def fuse_rrf(results: Sequence[SearchResult], k: int = 100, c: int = RRF_K) -> SearchResult:
    """Reciprocal-rank fusion (Cormack et al., 2009): ``sum 1 / (c + rank)``, rank from 1."""
    n = len(results[0])
    width = sum(r.rows.shape[1] for r in results)
    rows = np.full((n, width), -1, dtype=np.int64)
    scores = np.full((n, width), -np.inf)
    for i in range(n):
        acc: dict[int, float] = {}
        for r in results:
            for rank, row in enumerate(r.rows[i], 1):
                if row >= 0:
                    acc[int(row)] = acc.get(int(row), 0.0) + 1.0 / (c + rank)
        rows[i, : len(acc)] = list(acc)
        scores[i, : len(acc)] = list(acc.values())
    return top_k_by_score(rows, scores, k)
