"""Top-k retrieval accuracy (DPR's metric): the fraction of questions with an answer-bearing passage in the first k."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def first_hit_rank(hits: np.ndarray, none: int | None = None) -> np.ndarray:
    """0-based rank of the first hit per question; ``none`` (default: the list length) when no hit."""
    any_hit = hits.any(axis=1)
    return np.where(any_hit, hits.argmax(axis=1), hits.shape[1] if none is None else none)


def topk_curve(hits: np.ndarray, max_k: int | None = None) -> np.ndarray:
    """Top-k accuracy for k = 1..max_k (index k-1), as fractions in [0, 1].

    Lists shorter than ``max_k`` count as misses beyond their end.
    """
    max_k = max_k or hits.shape[1]
    if len(hits) == 0:
        return np.zeros(max_k)
    first = first_hit_rank(hits[:, :max_k], none=max_k)
    counts = np.bincount(first, minlength=max_k + 1)[:max_k]
    return np.cumsum(counts) / len(hits)


def accuracy_report(hits: np.ndarray, answerable: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 20, 100)) -> dict:
    """Top-k accuracy (percent) on all questions and on the answerable subset.

    Returns:
        ``{"all": {"n": N, "top1": .., "top5": ..}, "answerable": {...}}`` with accuracies in
        percent, rounded to 2 decimals; ``answerable`` is omitted when no mask is given.
    """
    def one(h: np.ndarray) -> dict:
        curve = topk_curve(h, max(ks))
        return {"n": int(len(h)), **{f"top{k}": round(100 * float(curve[k - 1]), 2) for k in ks}}

    out = {"all": one(hits)}
    if answerable is not None:
        out["answerable"] = one(hits[answerable])
    return out
