"""What trained readers get wrong given the answer passage: each reader's best span in the best-ranked
answer-bearing passage of a ``densepr reproduce --profile dpr`` run's held-out questions (as
benchmarks/reader/reader_data.py), sorted into kinds of error, side by side on the same questions.

Kinds, on SQuAD-normalised tokens (DPR's EM normalisation), against each question's gold answers:
``exact`` (EM); ``too long`` (the span holds a gold answer and more); ``too short`` (the span is part of a gold
answer); ``overlap`` (shares words with a gold answer, neither holds the other); ``wrong span`` (no word in
common: another entity or phrase of the passage). Then which questions one reader answers and the other not.

    python benchmarks/reader/reader_errors.py --run runs/dpr --reader minilm=runs/dpr/reader \\
        --reader mpnet=runs/dpr-mpnet/reader [--eval 500] [--precision fp32]

Prints a table and writes benchmarks/reader/results/reader-errors.json (counts and examples of each kind).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import gold_passages, machine_info, span_scores

from densepr.evaluate.qa import exact_match, normalize_answer
from densepr.fileio.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("exact", "too long", "too short", "overlap", "wrong span")
EXAMPLES = 8  # per kind and reader, in the JSON


def _contains(outer: list[str], inner: list[str]) -> bool:
    """``inner`` is a contiguous run of ``outer`` (both non-empty)."""
    n = len(inner)
    return bool(inner) and any(outer[i : i + n] == inner for i in range(len(outer) - n + 1))


def error_kind(prediction: str, answers: list[str]) -> str:
    """One of :data:`KINDS` for a predicted span against the gold answers (the closest answer decides)."""
    if exact_match(prediction, answers):
        return "exact"
    pred = normalize_answer(prediction).split()
    golds = [g for g in (normalize_answer(a).split() for a in answers) if g]
    if any(_contains(pred, g) for g in golds):
        return "too long"
    if any(_contains(g, pred) for g in golds):
        return "too short"
    if any(set(pred) & set(g) for g in golds):
        return "overlap"
    return "wrong span"


def read_spans(reader_dir: Path, gold, device: str, precision: str) -> list[str]:
    """Each reader's best span in each gold row's answer passage."""
    from densepr.models.reader import Reader

    reader = Reader.load(reader_dir, device, precision=precision)
    reader.eval()
    return [r[0].text for r in reader.read([g[0] for g in gold], [[(g[2], g[3])] for g in gold])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a `reproduce --profile dpr` output (its reader-data/heldout.json)")
    ap.add_argument("--reader", action="append", required=True, help="NAME=DIR of a trained reader (repeat; two for the side-by-side)")
    ap.add_argument("--eval", type=int, default=500, help="held-out questions read (those with an answer-bearing passage among them)")
    ap.add_argument("--precision", default="fp32", help="the readers' weights when reading: fp32 or bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "reader-errors.json")
    args = ap.parse_args()

    heldout = args.run / "reader-data" / "heldout.json"
    if not heldout.is_file():
        raise SystemExit(f"{heldout}: no reader data; run `densepr reproduce --profile dpr -o {args.run}` first")
    readers = [tuple(r.split("=", 1)) for r in args.reader]
    if any(len(r) != 2 for r in readers):
        ap.error("--reader: NAME=DIR")
    gold = gold_passages(heldout, args.eval)
    t0 = time.perf_counter()
    rows, kinds_of = [], {}
    for name, path in readers:
        t = time.perf_counter()
        spans = read_spans(Path(path), gold, args.device, args.precision)
        kinds = [error_kind(s, g[1]) for s, g in zip(spans, gold)]
        kinds_of[name] = kinds
        counts = {k: kinds.count(k) for k in KINDS}
        examples = {k: [{"question": g[0], "answers": g[1], "span": s} for s, g, kk in zip(spans, gold, kinds) if kk == k][:EXAMPLES]
                    for k in KINDS if k != "exact"}  # fmt: skip
        wrong = [len(normalize_answer(s).split()) for s, k in zip(spans, kinds) if k != "exact"]
        rows.append({"reader": name, "path": path, **span_scores(spans, gold), "counts": counts, "read_seconds": round(time.perf_counter() - t, 1),
                     "mean_words_when_wrong": round(sum(wrong) / max(1, len(wrong)), 2), "examples": examples})  # fmt: skip
    n = len(gold)
    print(f"Given the best-ranked answer passage, {n} held-out questions of {args.run} (% of questions)")
    print("| reader | EM | F1 | " + " | ".join(KINDS[1:]) + " | words in a wrong span |\n|---|---:|---:|" + "---:|" * (len(KINDS) - 1) + "---:|")
    for r in rows:
        cells = " | ".join(f"{100 * r['counts'][k] / max(1, n):.1f}" for k in KINDS[1:])
        print(f"| {r['reader']} | {r['em']} | {r['f1']} | {cells} | {r['mean_words_when_wrong']} |")
    pairs = {}
    if len(readers) == 2:
        (a, _), (b, _) = readers
        right_a = [k == "exact" for k in kinds_of[a]]
        right_b = [k == "exact" for k in kinds_of[b]]
        pairs = {"both": sum(x and y for x, y in zip(right_a, right_b)), f"only {a}": sum(x and not y for x, y in zip(right_a, right_b)),
                 f"only {b}": sum(y and not x for x, y in zip(right_a, right_b)), "neither": sum(not x and not y for x, y in zip(right_a, right_b)),
                 f"{b}'s kind where only {a} is right": {k: sum(1 for x, y, kb in zip(right_a, right_b, kinds_of[b]) if x and not y and kb == k) for k in KINDS[1:]},
                 f"{a}'s kind where only {b} is right": {k: sum(1 for x, y, ka in zip(right_a, right_b, kinds_of[a]) if y and not x and ka == k) for k in KINDS[1:]}}  # fmt: skip
        print("\nexact match on the same questions: " + ", ".join(f"{k} {v}" for k, v in pairs.items() if isinstance(v, int)))
        for k, v in pairs.items():
            if isinstance(v, dict):
                print(f"{k}: " + ", ".join(f"{kk} {vv}" for kk, vv in v.items()))
    write_json(args.json, {"command": "python benchmarks/reader/reader_errors.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                           "machine": machine_info(), "seconds": round(time.perf_counter() - t0, 1), "held_out_questions": n,
                           "precision": args.precision, "results": rows, "agreement": pairs})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
