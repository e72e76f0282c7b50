"""Re-mined hard negatives: how many questions survive mining, and how often a "hard negative" is
probably an unlabelled positive, for BM25 mining vs a model's own ranking at several ``skip_top``.

No training here: the "model" is whatever index directory you give (a trained DPR's, or the
zero-shot embedded encoder's as a stand-in). Run from the repository root:

    densepr reproduce --profile smoke --output runs/smoke     # passages.tsv, bm25/, dense/, hybrid.json
    python benchmarks/training/remining.py --index runs/smoke --limit 1000

Survival: questions kept by BM25 mining (DPR's rule), by the model's list alone, and by the union
(the model's list, else BM25's: what ``data build-train --negatives-from`` does).

False-negative proxies, for passages DPR's ``has_answer`` (answer tokens as a contiguous sequence
in the *text*) already calls answerless, so every hit is a candidate unlabelled positive:

- ``title``: an answer's token sequence occurs in the passage *title* (has_answer on the title);
- ``substring``: an answer, NFD and lower-cased, is a substring of the lower-cased title + text,
  token boundaries ignored ("1990" in "1990s", "Röntgen" in "Röntgenstrahlen");
- ``tokens``: every token of an answer occurs somewhere in the title or text, in any order.

``suspect`` is any of the three. Per rank bucket, the rates are over *every* answerless passage of
the top ``depth`` of the kept questions (what ``skip_top`` would remove); per ``skip_top``, over
the ``--hard`` hard negatives actually mined. Writes benchmarks/training/results/remining.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData
from densepr.evaluate.answers import answer_tokens, has_answer, normalize
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.retriever import Retriever
from densepr.train.mining import MiningStats, mine

RESULTS = Path(__file__).resolve().parent / "results"

BUCKETS = ((0, 1), (1, 3), (3, 5), (5, 10), (10, 30), (30, 100))
PROXIES = ("title", "substring", "tokens")


def proxies(answers, title: str, text: str) -> dict[str, bool]:
    """Which looser answer checks a passage meets (see the module docstring)."""
    low = normalize(f"{title} {text}").lower()
    words = set(answer_tokens(title)) | set(answer_tokens(text))
    return {
        "title": has_answer(answers, title),
        "substring": any(normalize(a).lower().strip() and normalize(a).lower().strip() in low for a in answers),
        "tokens": any(answer_tokens(a) and set(answer_tokens(a)) <= words for a in answers),
    }


def bucket_of(rank: int) -> str:
    return next(f"{a + 1}-{b}" for a, b in BUCKETS if a <= rank < b)


def rates(counts: dict[str, int], n: int) -> dict[str, float | None]:
    return {p: round(100 * counts[p] / n, 2) if n else None for p in (*PROXIES, "suspect")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", default="runs/smoke", help="index directory with passages.tsv, bm25/ and dense/ (and hybrid.json)")
    ap.add_argument("--sets", default="nq-dev,trivia-dev")
    ap.add_argument("--limit", type=int, default=1000, help="questions per set (the first ones)")
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--hard", type=int, default=30, help="hard negatives kept per question")
    ap.add_argument("--skips", default="0,1,3,5")
    ap.add_argument("--out", default="remining.json", help="file name under benchmarks/training/results/")
    args = ap.parse_args()
    skips = [int(x) for x in args.skips.split(",")]
    t_all = time.perf_counter()
    retriever = Retriever.load(args.index, device="cpu")
    corpus, bm25 = retriever.corpus, retriever.bm25
    assert isinstance(bm25, BM25Index), "the index directory needs bm25/"
    data = EmbeddedData()
    sets = [data.resolve_qa(s, args.limit) for s in args.sets.split(",")]
    n_q = sum(len(s) for s in sets)
    t0 = time.perf_counter()
    # one search per set and mode, shared by every skip_top; BM25's as mine() searches it
    ranked = {"bm25": [bm25.search(s.questions, args.depth) for s in sets], "dense": [], "hybrid": []}
    for s in sets:
        for m, res in retriever.retrieve_all(s.questions, args.depth, ["dense", "hybrid"]).items():
            ranked[m].append(res)
    search_s = round(time.perf_counter() - t0, 1)
    proxy_cache: dict[tuple[str, int], dict[str, bool]] = {}

    def proxy(q, answers, row):
        if (q, row) not in proxy_cache:
            proxy_cache[(q, row)] = proxies(answers, corpus.titles[row], corpus.texts[row])
        return proxy_cache[(q, row)]

    def run(mode, skip, hard, alone=False):
        stats = MiningStats()
        negatives = None if mode == "bm25" else ranked[mode]
        recs = list(mine(sets, corpus, bm25, depth=args.depth, hard_negatives=hard, random_negatives=0, stats=stats,
                         negatives_from=negatives, positives_also={} if alone else None, skip_top=skip))  # fmt: skip
        return recs, stats

    answers = {(s.name, q.question): q.answers for s in sets for q in s.items}
    rows, by_rank = [], {}
    bm25_kept = None
    for mode in ("bm25", "dense", "hybrid"):
        # per rank bucket: every answerless passage of the top depth, for the kept questions
        t0 = time.perf_counter()
        recs, stats = run(mode, 0, args.depth)
        rank_of = {}
        for s, res in zip(sets, ranked[mode]):
            for i, q in enumerate(s.questions):
                rank_of[(s.name, q)] = {corpus.ids[r]: j for j, r in enumerate(res.rows[i].tolist()) if r >= 0}
        per = {bucket_of(a): {p: 0 for p in (*PROXIES, "suspect", "n")} for a, _ in BUCKETS}
        for r in recs:
            key = (r.dataset, r.question)
            for p in r.hard_negative_ctxs:
                b = per[bucket_of(rank_of[key][p.id])]
                flags = proxy(r.question, answers[key], corpus.row(p.id))
                b["n"] += 1
                for name, hit in flags.items():
                    b[name] += hit
                b["suspect"] += any(flags.values())
        by_rank[mode] = {k: {"answerless": v["n"], **rates(v, v["n"])} for k, v in per.items()}
        model_alone = None if mode == "bm25" else len(run(mode, 0, 0, alone=True)[0])
        for skip in skips:
            recs, stats = run(mode, skip, args.hard)
            counts = {p: 0 for p in (*PROXIES, "suspect")}
            n_hard = 0
            for r in recs:
                for p in r.hard_negative_ctxs:
                    flags = proxy(r.question, answers[(r.dataset, r.question)], corpus.row(p.id))
                    n_hard += 1
                    for name, hit in flags.items():
                        counts[name] += hit
                    counts["suspect"] += any(flags.values())
            if mode == "bm25" and skip == 0:
                bm25_kept = len(recs)
            rows.append({"negatives": mode, "skip_top": skip, "questions": n_q, "kept": len(recs),
                         "kept_pct": round(100 * len(recs) / n_q, 1), "kept_bm25_mining": bm25_kept, "kept_model_list_alone": model_alone,
                         "positive_from": stats.positive_from, "answer_in": stats.answer_in, "rescued_by": stats.rescued_by,
                         "hard_negatives": n_hard, "proxy_pct": rates(counts, n_hard)})  # fmt: skip
            r = rows[-1]
            print(
                f"{mode:7s} skip {skip}: kept {r['kept']}/{n_q} (BM25 mining {bm25_kept}, model list alone {model_alone}), "
                f"positives {r['positive_from']}, {n_hard} hard negatives, suspect {r['proxy_pct']['suspect']}% "
                f"(title {r['proxy_pct']['title']}, substring {r['proxy_pct']['substring']}, tokens {r['proxy_pct']['tokens']})"
            )
        print(
            f"{mode:7s} suspect % of answerless passages by rank: "
            + ", ".join(f"{k}: {v['suspect']} (of {v['answerless']})" for k, v in by_rank[mode].items())
            + f"  [{time.perf_counter() - t0:.1f}s]"
        )
    out = {"command": "python benchmarks/training/remining.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
           "model": retriever.question_encoder.name.split("/")[-1] if retriever.question_encoder else None,
           "hybrid_lambda": retriever.hybrid_lambda,
           "proxies": {"title": "has_answer on the title", "substring": "NFD lower-cased answer is a substring of the lower-cased title + text",
                       "tokens": "every answer token occurs in the title or text, any order", "suspect": "any of the three"},
           "rows": rows, "suspect_by_rank_of_answerless_top_depth": by_rank,
           "seconds": {"search": search_s, "total": round(time.perf_counter() - t_all, 1)}, "machine": machine_info()}  # fmt: skip
    path = RESULTS / args.out
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"written to {path} in {out['seconds']['total']}s")


if __name__ == "__main__":
    main()
