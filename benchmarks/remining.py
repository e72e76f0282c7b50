"""Re-mined hard negatives: how many questions survive mining, and how often a "hard negative" is
probably an unlabelled positive, for BM25 mining vs a model's own ranking at several ``skip_top``.

No training here: the "model" is whatever index directory you give (a trained DPR's, or the
zero-shot embedded encoder's as a stand-in). Run from the repository root:

    python benchmarks/remining.py --index runs/embedded --limit 500

False-negative proxy (looser than DPR's has_answer, which already excluded these passages): a
hard negative is *suspect* when an answer string occurs in its title, or every token of an answer
occurs somewhere in its text (any order). Reported per rank bucket of the list it came from.
Writes benchmarks/results/remining.json.
"""

from __future__ import annotations

import argparse
import json
import time

from common import RESULTS, machine_info

from densepr.data import EmbeddedData
from densepr.evaluate.answers import answer_tokens, normalize
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.retriever import Retriever
from densepr.train.mining import MiningStats, mine

BUCKETS = ((0, 1), (1, 3), (3, 5), (5, 10), (10, 30), (30, 100))


def suspect(answers, title: str, text: str) -> bool:
    t_title, t_text = normalize(title).lower(), set(answer_tokens(text))
    return any(normalize(a).lower() in t_title or (answer_tokens(a) and set(answer_tokens(a)) <= t_text) for a in answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default="runs/embedded", help="index directory with passages.tsv, bm25/ and dense/")
    ap.add_argument("--sets", default="nq-dev,trivia-dev")
    ap.add_argument("--limit", type=int, default=500, help="questions per set")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--hard", type=int, default=30, help="hard negatives kept per question")
    ap.add_argument("--skips", default="0,1,3,5")
    args = ap.parse_args()
    retriever = Retriever.load(args.index, device="cpu")
    corpus, bm25 = retriever.corpus, retriever.bm25
    assert isinstance(bm25, BM25Index)
    data = EmbeddedData()
    sets = [data.resolve_qa(s, args.limit) for s in args.sets.split(",")]
    answers = {q.question: q.answers for s in sets for q in s.items}
    cache: dict = {}

    def ranked(mode):
        def search(questions, k):
            key = (mode, tuple(questions), k)
            if key not in cache:  # one search per mode and set, shared by every skip_top
                cache[key] = retriever.retrieve(list(questions), k, mode)
            return cache[key]

        return search

    rows = []
    for mode in ("bm25", "dense", "hybrid"):
        for skip in [int(x) for x in args.skips.split(",")] if mode != "bm25" else [0]:
            t0, stats = time.perf_counter(), MiningStats()
            recs = list(mine(sets, corpus, bm25, depth=args.depth, hard_negatives=args.hard, random_negatives=0, stats=stats,
                             negatives_from=None if mode == "bm25" else ranked(mode), skip_top=skip))  # fmt: skip
            # rank of each hard negative in its list, for the per-bucket proxy
            lists = {}
            for s in sets:
                res = bm25.search(s.questions, args.depth) if mode == "bm25" else ranked(mode)(s.questions, args.depth)
                lists.update({q: {corpus.ids[r]: j for j, r in enumerate(res.rows[i]) if r >= 0} for i, q in enumerate(s.questions)})
            per_bucket = {f"{a + 1}-{b}": [0, 0] for a, b in BUCKETS}
            for r in recs:
                for p in r.hard_negative_ctxs:
                    rank = lists[r.question][p.id]
                    name = next(f"{a + 1}-{b}" for a, b in BUCKETS if a <= rank < b)
                    per_bucket[name][0] += 1
                    per_bucket[name][1] += suspect(answers[r.question], p.title, p.text)
            n_q = sum(stats.questions.values())
            total_hard = sum(v[0] for v in per_bucket.values())
            rows.append({"negatives": mode, "skip_top": skip, "questions": n_q, "kept": len(recs),
                         "kept_pct": round(100 * len(recs) / n_q, 1), "positive_from": stats.positive_from,
                         "hard_negatives": total_hard,
                         "suspect_pct": round(100 * sum(v[1] for v in per_bucket.values()) / max(1, total_hard), 2),
                         "suspect_pct_by_rank": {k: round(100 * v[1] / v[0], 2) if v[0] else None for k, v in per_bucket.items()},
                         "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
            r = rows[-1]
            print(f"{mode:7s} skip {skip}: kept {r['kept']}/{n_q} ({r['kept_pct']}%), positives {r['positive_from']}, "
                  f"suspect hard negatives {r['suspect_pct']}% of {total_hard}; by rank {r['suspect_pct_by_rank']}")
    out = {"command": "python benchmarks/remining.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "model": retriever.question_encoder.name.split("/")[-1] if retriever.question_encoder else None,
           "proxy": "answer string in the title, or all answer tokens anywhere in the text (has_answer already false)",
           "machine": machine_info(), "rows": rows}  # fmt: skip
    path = RESULTS / "remining.json"
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
