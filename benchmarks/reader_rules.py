"""Compare trained readers on the same retrieved passages: end-to-end EM at k under three passage
selection rules, EM given the answer-bearing passage, and how often the selection logit picks a
passage that holds an answer.

Input: a DPR result JSON (``densepr retrieve -o``; e.g. only the questions whose top 20 hold an
answer, to compare readers rather than retrievers) and reader directories. Each question's first
``--depth`` passages are read once per reader.

* ``paper``: DPR's rule (the passage with the best selection logit among the first k);
* ``span``: the passage with the best span score (meaningful when span scores compare across
  passages: ``train-reader --span-loss shared``);
* ``sel+span``: their sum.

    python benchmarks/reader_rules.py RESULTS.json READER [READER ...] [--depth 20] [--limit N] [-o OUT.json]

Prints a table and writes JSON (default ``benchmarks/results/reader/rules.json``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densepr.data.runs import iter_dpr_results
from densepr.evaluate.answers import has_answer
from densepr.evaluate.qa import exact_match
from densepr.fileio import write_json
from densepr.models.reader import Reader, Selection, best_reading

RULES = {"paper": Selection(1, 0, 0), "span": Selection(0, 1, 0), "sel+span": Selection(1, 1, 0)}
KS = (1, 5, 10, 20)


def evaluate(reader_dir: str, recs: list, depth: int) -> dict:
    reader = Reader.load(reader_dir, "cpu")
    readings = reader.read([r.question for r in recs], [[(str(c.get("title") or ""), c["text"]) for c in r.ctxs[:depth]] for r in recs])
    out: dict = {}
    for name, sel in RULES.items():
        for k in KS:
            em = 0
            for r, rd in zip(recs, readings):
                b = best_reading(rd, k, sel)
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
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "reader" / "rules.json")
    args = ap.parse_args()
    recs = list(iter_dpr_results(args.results))[: args.limit]
    rows = {r: evaluate(r, recs, args.depth) for r in args.readers}
    cols = [f"{n}@{k}" for n in RULES for k in KS] + ["given_passage_em", "selection_picks_answer_passage"]
    print(f"{len(recs)} questions, first {args.depth} passages; EM (%)")
    print(f"{'reader':<24}" + "".join(f"{c[:12]:>13}" for c in cols))
    for r, v in rows.items():
        print(f"{Path(r).name if len(r) > 24 else r:<24}" + "".join(f"{v[c]:>13}" for c in cols))
    write_json(args.output, {"command": "python benchmarks/reader_rules.py " + " ".join([str(args.results), *args.readers, "--depth", str(args.depth)]
                                                                                       + (["--limit", str(args.limit)] if args.limit else [])),
                             "readers": rows})  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
