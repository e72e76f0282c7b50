"""``densepr evaluate``'s results as one JSON-ready dict (``--json``), optionally with per-question values.

Two shapes, told apart by ``"metric"``:

* ``"topk"`` (DPR's top-k accuracy)::

    {"metric": "topk", "results": "run.json", "set": "nq-test", "match": "string", "ks": [1, 5],
     "all": {"n": 2, "top1": 50.0, "top5": 100.0}, "answerable": {...},          # percent; answerable when known
     "per_query": [{"qid": "0", "first_hit": 1, "top1": 1, "top5": 1, "answerable": true}, ...]}

  ``first_hit`` is the 1-based rank of the first answer-bearing passage (null: none); ``topK`` is 1 when it
  is at most K, so each ``all.topK`` is the mean of the per-query values, in percent.

* ``"qrels"`` (trec_eval metrics)::

    {"metric": "qrels", "results": "run.trec", "qrels": "qrels.tsv", "tie_break": "...",
     "judged": 3, "in_run": 2, "metrics": {"ndcg_cut_10": 0.61, ...},
     "per_query": {"q1": {"ndcg_cut_10": 0.92, ...}, ...}}
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from densepr.evaluate.qrels import METRICS, TIE_BREAK, qrels_per_query
from densepr.evaluate.topk import accuracy_report, first_hit_rank


def topk_summary(
    hits: np.ndarray,
    ks: Sequence[int],
    results: str | os.PathLike[str],
    set_name: str,
    match: str,
    answerable: np.ndarray | None = None,
    qids: Sequence[str] | None = None,
    per_query: bool = False,
) -> dict:
    """Top-k accuracy of ``hits`` (``[questions, rank]`` booleans) as :func:`accuracy_report`, with its context."""
    rep = accuracy_report(hits, answerable, ks=ks)
    out: dict = {"metric": "topk", "results": str(results), "set": set_name, "match": match, "ks": list(ks), **rep}
    if per_query:
        first = first_hit_rank(hits, none=-1)
        qids = [str(i) for i in range(len(hits))] if qids is None else qids
        rows = []
        for i, qid in enumerate(qids):
            f = int(first[i])
            row: dict = {"qid": qid, "first_hit": f + 1 if f >= 0 else None, **{f"top{k}": int(0 <= f < k) for k in ks}}
            if answerable is not None:
                row["answerable"] = bool(answerable[i])
            rows.append(row)
        out["per_query"] = rows
    return out


def qrels_summary(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    results: str | os.PathLike[str],
    qrels_path: str | os.PathLike[str],
    metrics: Sequence[str] = METRICS,
    per_query: bool = False,
) -> dict:
    """Mean trec_eval metrics over the judged queries (and each query's, with ``per_query``)."""
    per_q = qrels_per_query(run, qrels, metrics)
    means = {m: float(np.mean([v[m] for v in per_q.values()])) for m in metrics}
    out: dict = {"metric": "qrels", "results": str(results), "qrels": str(qrels_path), "tie_break": TIE_BREAK,
                 "judged": len(qrels), "in_run": sum(q in run for q in qrels), "metrics": means}  # fmt: skip
    if per_query:
        out["per_query"] = per_q
    return out
