"""Retrieval: BM25, dense, and their fusions, behind one :class:`Retriever`.

Hybrid (DPR Section 5.1, Pyserini's ``HybridSearcher``): take each retriever's top ``depth``
passages, score every passage of the union as ``dense + lambda * bm25``, where a passage
missing from one list gets that list's lowest score for this question, and re-rank.
Reciprocal-rank fusion scores ``sum 1 / (60 + rank)`` over the lists that hold a passage.

An *index directory* (what ``densepr reproduce`` and the stage commands write) holds::

    passages.tsv      # the corpus, DPR TSV layout
    bm25/             # BM25 index (densepr.bm25)
    dense/            # FAISS index (densepr.index); its manifest names the question encoder
    hybrid.json       # optional: the lambda tuned on a dev set
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bm25 import BM25Index
from .data.passages import Corpus, load_corpus
from .data.qa import QASet
from .encoder import Encoder
from .errors import DenseprError
from .evaluate import AnswerMatcher, topk_curve
from .fileio import read_json
from .index import DenseIndex
from .results import SearchResult

MODES = ("bm25", "dense", "hybrid", "rrf")
PAPER_LAMBDA = 1.1
RRF_K = 60
# Spans normalised (cosine ~ 0..1) and unnormalised (dot ~ 10..100) dense scores against BM25 (~ 0..40).
LAMBDA_GRID = (0.0, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.7, 1.0, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0)  # fmt: skip


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
        return _top_k(self.rows, fused, k)


def _top_k(rows: np.ndarray, scores: np.ndarray, k: int) -> SearchResult:
    k_eff = min(k, rows.shape[1])
    # Sort by (-score, row) per question: lexsort's last key is the primary one.
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k_eff]
    top_rows = np.take_along_axis(rows, order, 1)
    top_scores = np.take_along_axis(scores, order, 1)
    out_rows = np.full((len(rows), k), -1, dtype=np.int64)
    out_scores = np.zeros((len(rows), k), dtype=np.float32)
    valid = np.isfinite(top_scores) & (top_rows >= 0)
    out_rows[:, :k_eff] = np.where(valid, top_rows, -1)
    out_scores[:, :k_eff] = np.where(valid, top_scores, 0.0)
    return SearchResult(out_rows, out_scores)


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
    return _top_k(rows, scores, k)


@dataclass
class Hit:
    """One retrieved passage."""

    id: str
    title: str
    text: str
    score: float
    rank: int


class Retriever:
    """Question in, scored passages out: BM25, dense, hybrid or RRF over one corpus.

    Args:
        corpus: the passages.
        bm25: a BM25 index over ``corpus`` (needed for ``bm25``, ``hybrid``, ``rrf``).
        dense: a dense index bound to ``corpus`` (needed for ``dense``, ``hybrid``, ``rrf``).
        question_encoder: E_Q matching ``dense``.
        hybrid_lambda: weight of BM25 in ``dense + lambda * bm25``.
        depth: how many passages each retriever contributes to a fusion.
    """

    def __init__(
        self,
        corpus: Corpus,
        bm25: BM25Index | None = None,
        dense: DenseIndex | None = None,
        question_encoder: Encoder | None = None,
        hybrid_lambda: float = PAPER_LAMBDA,
        depth: int = 1000,
    ) -> None:
        if dense is not None and question_encoder is None:
            raise DenseprError("a dense index needs its question encoder")
        if dense is not None and question_encoder is not None and question_encoder.dim != dense.dim:
            raise DenseprError(
                f"question encoder {question_encoder.name} gives {question_encoder.dim}-d vectors, "
                f"the dense index holds {dense.dim}-d vectors: they were not built as a pair"
            )
        self.corpus, self.bm25, self.dense, self.question_encoder = corpus, bm25, dense, question_encoder
        self.hybrid_lambda, self.depth = hybrid_lambda, depth

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], question_encoder: str | os.PathLike[str] | None = None,
        device: str | None = None, hybrid_lambda: float | None = None, mmap: bool = False,
    ) -> Retriever:  # fmt: skip
        """Load an index directory (see module docstring); the parts present decide the modes."""
        d = Path(directory)
        if not (d / "passages.tsv").is_file():
            raise DenseprError(f"{d}: not an index directory (no passages.tsv); build one with `densepr reproduce` or the stage commands")
        corpus = load_corpus(d / "passages.tsv")
        bm25 = BM25Index.load(d / "bm25", corpus=corpus) if (d / "bm25").is_dir() else None
        dense = encoder = None
        if (d / "dense").is_dir():
            dense = DenseIndex.load(d / "dense", corpus=corpus, mmap=mmap)
            encoder = Encoder.load(question_encoder or dense.manifest["question_encoder"], device=device)
            dense.to_device(str(encoder.device))  # exact search on the GPU when there is one
        if hybrid_lambda is None:
            hybrid_lambda = read_json(d / "hybrid.json")["lambda"] if (d / "hybrid.json").is_file() else PAPER_LAMBDA
        if bm25 is None and dense is None:
            raise DenseprError(f"{d}: holds neither bm25/ nor dense/; nothing to search")
        return cls(corpus, bm25, dense, encoder, hybrid_lambda)

    @property
    def modes(self) -> list[str]:
        if self.bm25 is not None and self.dense is not None:
            return list(MODES)
        return ["bm25"] if self.bm25 is not None else ["dense"]

    def _need(self, mode: str) -> None:
        if mode not in MODES:
            raise DenseprError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if mode not in self.modes:
            raise DenseprError(f"mode {mode!r} needs {'a BM25' if mode == 'bm25' else 'both a BM25 and a dense' if mode in ('hybrid', 'rrf') else 'a dense'} index; this retriever has: {', '.join(self.modes)}")

    def encode(self, questions: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        from .progress import progress_bar

        assert self.question_encoder is not None
        with progress_bar(len(questions), "encode questions", show_progress, unit="q") as advance:
            return self.question_encoder.encode_questions(questions, batch_size, progress=advance)

    def retrieve_all(
        self, questions: Sequence[str], k: int = 100, modes: Sequence[str] = MODES, show_progress: bool = False
    ) -> dict[str, SearchResult]:
        """Top-k for several modes at once; BM25 and dense run once and feed the fusions."""
        for m in modes:
            self._need(m)
        fused = any(m in ("hybrid", "rrf") for m in modes)
        depth = max(k, self.depth) if fused else k
        out: dict[str, SearchResult] = {}
        sparse = self.bm25.search(questions, depth) if self.bm25 is not None and ("bm25" in modes or fused) else None
        dense = None
        if self.dense is not None and ("dense" in modes or fused):
            dense = self.dense.search(self.encode(questions, show_progress=show_progress), depth)
        if "bm25" in modes:
            out["bm25"] = sparse.top(k)
        if "dense" in modes:
            out["dense"] = dense.top(k)
        if "hybrid" in modes:
            out["hybrid"] = fuse_hybrid(dense, sparse, self.hybrid_lambda, k)
        if "rrf" in modes:
            out["rrf"] = fuse_rrf([dense, sparse], k)
        return out

    def retrieve(self, questions: Sequence[str], k: int = 100, mode: str = "hybrid", show_progress: bool = False) -> SearchResult:
        """Top-k corpus rows and scores for a batch of questions."""
        return self.retrieve_all(questions, k, [mode], show_progress)[mode]

    def search(self, question: str, k: int = 10, mode: str | None = None) -> list[Hit]:
        """The top-k passages for one question (mode: hybrid when both indexes exist)."""
        if not question or not question.strip():
            raise DenseprError("empty question")
        mode = mode or ("hybrid" if "hybrid" in self.modes else self.modes[0])
        res = self.retrieve([question], k, mode)
        return [
            Hit(self.corpus.ids[r], self.corpus.titles[r], self.corpus.texts[r], float(s), j + 1)
            for j, (r, s) in enumerate(zip(res.rows[0], res.scores[0]))
            if r >= 0
        ]


def tune_lambda(
    retriever: Retriever, matcher: AnswerMatcher, dev_sets: Sequence[QASet], grid: Sequence[float] = LAMBDA_GRID, k: int = 20
) -> tuple[float, dict[str, float]]:
    """Pick the hybrid lambda with the best mean top-k accuracy over ``dev_sets`` (DPR tuned on dev)."""
    cands = []
    for qas in dev_sets:
        both = retriever.retrieve_all(qas.questions, retriever.depth, ["bm25", "dense"])
        cands.append((qas, HybridCandidates(both["dense"], both["bm25"])))
    scores = {}
    for lam in grid:
        accs = [topk_curve(matcher.hits(c.rank(lam, k).rows, qas), k)[-1] for qas, c in cands]
        scores[str(lam)] = round(100 * float(np.mean(accs)), 2)
    best = max(grid, key=lambda lam: (scores[str(lam)], -lam))
    return best, scores
