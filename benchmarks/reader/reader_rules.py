"""Compare trained readers on the same retrieved passages: end-to-end EM at k under three passage
selection rules, EM given the answer-bearing passage, and how often the selection logit picks a
passage that holds an answer.

Input: a DPR result JSON (``densepr retrieve -o``; e.g. only the questions whose top 20 hold an
answer, to compare readers rather than retrievers) and reader directories. Each question's first
``--depth`` passages are read once per reader.

* ``paper``: DPR's rule (the passage with the best selection logit among the first k);
* ``span``: the passage with the best span score (meaningful when span scores compare across
  passages: ``train-reader --span-loss shared``);
* ``sel+span``: their sum;
* ``agg1``, ``agg3``: ``sel+span`` with answer aggregation at temperature 1 and 3 (answers that
  several passages agree on add up; :class:`densepr.models.reader.Selection`);
* ``tuned`` (with ``--tune HELD.json``): the selection ``densepr tune-reader`` would choose
  (:func:`densepr.pipeline.choose_selection` over its grid, retrieval scores included), chosen on
  another result file's questions, then applied here at every k.

    python benchmarks/reader/reader_rules.py RESULTS.json READER [READER ...] [--depth 20] [--limit N] [--tune HELD.json] [-o OUT.json]

Prints a table and writes JSON (default ``benchmarks/reader/results/rules.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densepr.data.qa import QA, QASet
from densepr.data.runs import iter_dpr_results
from densepr.evaluate.answers import has_answer
from densepr.evaluate.qa import exact_match, normalize_answer
from densepr.fileio.atomic import write_json
from densepr.models.reader import Reader, Selection, best_reading
from densepr.pipeline import choose_selection

RULES = {"paper": Selection(1, 0, 0), "span": Selection(0, 1, 0), "sel+span": Selection(1, 1, 0),
         "agg1": Selection(1, 1, 0, 1.0), "agg3": Selection(1, 1, 0, 3.0)}  # fmt: skip
KS = (1, 5, 10, 20)


def _read(reader: Reader, recs: list, depth: int) -> tuple[list, list, list]:
    """Readings, retrieval scores and normalised answers of each question's first ``depth`` passages."""
    readings = reader.read([r.question for r in recs], [[(str(c.get("title") or ""), c["text"]) for c in r.ctxs[:depth]] for r in recs])
    scores = [[float(c.get("score") or 0.0) for c in r.ctxs[:depth]] for r in recs]
    return readings, scores, [[normalize_answer(x.text) for x in rd] for rd in readings]


def evaluate(reader_dir: str, recs: list, depth: int, tune: list | None = None) -> dict:
    reader = Reader.load(reader_dir, "cpu")
    readings, scores, keys = _read(reader, recs, depth)
    rules = dict(RULES)
    out: dict = {}
    if tune:
        t_read, t_scores, _ = _read(reader, tune, depth)
        chosen = choose_selection(t_read, t_scores, QASet("tune", [QA(r.question, tuple(r.answers)) for r in tune]), KS)
        rules["tuned"] = Selection(chosen["relevance"], chosen["span"], chosen["retriever"], chosen["aggregate"])
        out["tuned_selection"] = chosen
    for name, sel in rules.items():
        for k in KS:
            em = 0
            for r, rd, sc, ky in zip(recs, readings, scores, keys):
                b = best_reading(rd, k, sel, sc, ky)
                em += exact_match(rd[b].text if b is not None else "", r.answers)
            out[f"{name}@{k}"] = round(100 * em / max(1, len(recs)), 1)
    given = picked = n = 0
    for r, rd in zip(recs, readings):
        hits = [i for i, c in enumerate(r.ctxs[:depth]) if has_answer(r.answers, c["text"])]
        if not hits:
            continue
        n += 1
        given += exact_match(rd[hits[0]].text, r.answers)
        picked += max(range(len(rd)), key=lambda i: rd[i].relevance) in hits
    out["given_passage_em"] = round(100 * given / max(1, n), 1)
    out["selection_picks_answer_passage"] = round(100 * picked / max(1, n), 1)
    out["retriever_rank1_holds_answer"] = round(100 * sum(bool(r.ctxs) and has_answer(r.answers, r.ctxs[0]["text"]) for r in recs) / max(1, len(recs)), 1)
    out["questions"], out["with_answer_in_depth"] = len(recs), n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("readers", nargs="+")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tune", type=Path, default=None, help="result JSON of held-out questions to tune the selection on")
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "rules.json")
    args = ap.parse_args()
    recs = list(iter_dpr_results(args.results))[: args.limit]
    tune = list(iter_dpr_results(args.tune)) if args.tune else None
    rows = {r: evaluate(r, recs, args.depth, tune) for r in args.readers}
    cols = [f"{n}@{k}" for n in [*RULES, *(["tuned"] if tune else [])] for k in KS] + ["given_passage_em", "selection_picks_answer_passage"]
    print(f"{len(recs)} questions, first {args.depth} passages; EM (%)")
    print(f"{'reader':<24}" + "".join(f"{c[:12]:>13}" for c in cols))
    for r, v in rows.items():
        print(f"{Path(r).name if len(r) > 24 else r:<24}" + "".join(f"{v[c]:>13}" for c in cols))
    write_json(args.output, {"command": "python benchmarks/reader/reader_rules.py " + " ".join([str(args.results), *args.readers, "--depth", str(args.depth)]
                                                                                       + (["--limit", str(args.limit)] if args.limit else [])
                                                                                       + (["--tune", str(args.tune)] if args.tune else [])),
                             "readers": rows})  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
