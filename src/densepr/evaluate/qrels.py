"""trec_eval metrics over relevance judgements (BEIR-style qrels), via pytrec_eval."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def qrels_metrics(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    metrics: Sequence[str] = ("ndcg_cut_10", "recall_20", "recall_100", "mrr_10"),
) -> dict[str, float]:
    """Mean trec_eval metrics (via pytrec_eval) over the judged queries; ``mrr_10`` is MRR@10.

    Queries judged but absent from the run score 0, as trec_eval's ``-c`` does.
    """
    import pytrec_eval

    def cut(r: dict[str, float], k: int) -> dict[str, float]:
        return dict(sorted(r.items(), key=lambda kv: -kv[1])[:k])

    out: dict[str, float] = {}
    plain = [m for m in metrics if m != "mrr_10"]
    full_run = {q: run.get(q, {}) for q in qrels}
    if plain:
        measures = {m.rsplit("_", 1)[0] if m.rsplit("_", 1)[-1].isdigit() else m for m in plain}
        per_q = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(full_run)
        for m in plain:
            out[m] = float(np.mean([per_q.get(q, {}).get(m, 0.0) for q in qrels]))
    if "mrr_10" in metrics:
        per_q = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({q: cut(r, 10) for q, r in full_run.items()})
        out["mrr_10"] = float(np.mean([per_q.get(q, {}).get("recip_rank", 0.0) for q in qrels]))
    return out
