"""Tuning the hybrid's lambda on dev questions (DPR tuned it on dev; the paper's value is 1.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from densepr.data.qa import QASet
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.topk import topk_curve
from densepr.retrieve.fusion import HybridCandidates
from densepr.retrieve.retriever import Retriever

# Spans normalised (cosine ~ 0..1) and unnormalised (dot ~ 10..100) dense scores against BM25 (~ 0..40).
LAMBDA_GRID = (0.0, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3,
               0.5, 0.7, 1.0, 1.1, 1.5, 2.0, 3.0, 5.0, 10.0)  # fmt: skip


def tune_lambda(
    retriever: Retriever, matcher: AnswerMatcher, dev_sets: Sequence[QASet], grid: Sequence[float] = LAMBDA_GRID, k: int = 20,
    show_progress: bool = False,
) -> tuple[float, dict[str, float]]:
    """Pick the hybrid lambda with the best mean top-k accuracy over ``dev_sets`` (DPR tuned on dev);
    ``show_progress``: bars for encoding the questions and the BM25 search."""
    cands = []
    for qas in dev_sets:
        both = retriever.retrieve_all(qas.questions, retriever.depth, ["bm25", "dense"], show_progress)
        cands.append((qas, HybridCandidates(both["dense"], both["bm25"])))
    scores = {}
    for lam in grid:
        accs = [topk_curve(matcher.hits(c.rank(lam, k).rows, qas), k)[-1] for qas, c in cands]
        scores[str(lam)] = round(100 * float(np.mean(accs)), 2)
    best = max(grid, key=lambda lam: (scores[str(lam)], -lam))
    return best, scores
