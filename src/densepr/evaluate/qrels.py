"""trec_eval metrics over relevance judgements (BEIR-style qrels), via pytrec_eval.

Ties: every metric ranks a query's passages in :func:`densepr.ranking.trec_order` (score descending,
then docid descending), the order trec_eval itself uses, so nDCG@10, MRR@10 and recall agree on a tie
that straddles a cut-off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from densepr.errors import DenseprError
from densepr.ranking import trec_order

METRICS = ("ndcg_cut_10", "recall_20", "recall_100", "mrr_10")
TIE_BREAK = "score descending, then docid descending (trec_eval's order)"


def check_overlap(run: dict, qrels: dict, run_path: str | os.PathLike[str], qrels_path: str | os.PathLike[str]) -> None:
    """Refuse a run that answers none of the judged queries: every metric would be a silent 0."""
    if run and qrels and not set(run) & set(qrels):
        raise DenseprError(f"{run_path} and {qrels_path} share no query id (run: {', '.join(sorted(run)[:3])}, ...; "
                           f"qrels: {', '.join(sorted(qrels)[:3])}, ...): is it the qrels of this run's queries?")  # fmt: skip


def qrels_per_query(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], metrics: Sequence[str] = METRICS
) -> dict[str, dict[str, float]]:
    """Each judged query's trec_eval metrics (via pytrec_eval): ``{qid: {metric: value}}``, ``mrr_10`` being
    MRR@10. Queries judged but absent from the run score 0, as trec_eval's ``-c`` does."""
    import pytrec_eval

    # one ranking for every metric: trec_eval's order, cut at 10 for MRR@10
    ranked = {q: trec_order(run.get(q, {}).items()) for q in qrels}
    per_q: dict[str, dict[str, float]] = {q: {} for q in qrels}
    plain = [m for m in metrics if m != "mrr_10"]
    if plain:
        measures = {m.rsplit("_", 1)[0] if m.rsplit("_", 1)[-1].isdigit() else m for m in plain}
        got = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate({q: dict(r) for q, r in ranked.items()})
        for q in qrels:
            per_q[q].update({m: float(got.get(q, {}).get(m, 0.0)) for m in plain})
    if "mrr_10" in metrics:
        got = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({q: dict(r[:10]) for q, r in ranked.items()})
        for q in qrels:
            per_q[q]["mrr_10"] = float(got.get(q, {}).get("recip_rank", 0.0))
    return {q: {m: per_q[q][m] for m in metrics} for q in qrels}


def qrels_metrics(
    run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """Mean trec_eval metrics over the judged queries (see :func:`qrels_per_query`)."""
    per_q = qrels_per_query(run, qrels, metrics)
    return {m: float(np.mean([v[m] for v in per_q.values()])) for m in metrics}
