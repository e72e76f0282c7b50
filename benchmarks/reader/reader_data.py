"""How densepr's reader grows with its training questions: EM given the answer passage against the number
of questions trained on, with the same recipe and epochs.

The reader goal of issue 15 (EM >= 50% given the answer-bearing passage) was not reached with the ~4.2 k
questions the embedded data offers for training (nq-dev + trivia-dev minus the held-out ones, those whose
trained retriever's top 20 hold an answer); the paper's reader trains on NQ-train's 58.9 k (79.2 k with
TriviaQA's, ...). This measures whether the reader is data-bound: readers trained on seeded random subsets
of a ``densepr reproduce --profile dpr`` run's reader data (NQ and TriviaQA questions in their proportion),
each for ``--epochs`` epochs with the run's reader recipe, then the exact match and F1 of their best span in
the best-ranked answer-bearing passage of the same held-out questions (as benchmarks/reader/reader_peer.py). The EM
gained per doubling of the questions between consecutive sizes is printed beside the measured points, with the
number of questions at which the last rate would reach 50%: an extrapolation, labelled as such.

    python benchmarks/reader/reader_data.py --run runs/dpr [--questions 1000,2000,all] [--epochs 2] [--eval 500]

Each size's reader is kept under ``--workdir``; a size whose reader finished is not trained again, so a
killed run continues. Prints a table and writes benchmarks/reader/results/data-curve.json.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import given_passage_scores, gold_passages, machine_info, reader_recipe, train_reader_once

from densepr.data import EmbeddedData
from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.train.config import ReaderTrainConfig

RESULTS = Path(__file__).resolve().parent / "results"


def usable_rows(files: list[Path], heldout: Path, depth: int) -> dict[Path, list[dict]]:
    """Per training file, the usable questions (an answer in the first ``depth`` passages, not held out)."""
    held = {r["question"] for r in json.loads(heldout.read_text(encoding="utf-8"))}
    return {f: [r for r in json.loads(f.read_text(encoding="utf-8"))
                if r["question"] not in held and any(c.get("has_answer") for c in r["ctxs"][:depth])] for f in files}  # fmt: skip


def write_subset(rows: dict[Path, list[dict]], depth: int, n: int | None, seed: int, out_dir: Path) -> tuple[list[str], dict]:
    """Write, per training file, the questions of a seeded random sample of ``n`` of ``rows`` (None: all of
    them), their passages cut to ``depth``; returns the files and the counts."""
    pool = [(f, i) for f, rs in rows.items() for i in range(len(rs))]
    keep = set(pool if n is None or n >= len(pool) else random.Random(seed).sample(pool, n))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, per_file = [], {}
    for f, rs in rows.items():
        subset = [{**r, "ctxs": r["ctxs"][:depth]} for i, r in enumerate(rs) if (f, i) in keep]
        path = out_dir / f.name
        with atomic_write(path) as fh:
            json.dump(subset, fh)
        paths.append(str(path))
        per_file[f.stem] = len(subset)
    return paths, {"usable": len(pool), "sampled": len(keep), "per_set": per_file}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/dpr"), help="a `densepr reproduce --profile dpr` output directory")
    ap.add_argument("--questions", default="1000,2000,all", help="training set sizes (usable questions; 'all': every one)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs at every size (the reproduce reader's best checkpoint: epoch 2 of 3)")
    ap.add_argument("--eval", type=int, default=500, help="held-out questions read (their best-ranked answer-bearing passage)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--precision", default="fp32", help="training precision (fp32, bf16: bf16 autocast on the CPU); the readers of each are kept apart")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("runs/reader-data-curve"))
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "data-curve.json")
    args = ap.parse_args()
    try:
        sizes = [None if s.strip() == "all" else int(s) for s in args.questions.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--questions: comma-separated numbers or 'all', not {args.questions!r}")
    if any(s is not None and s < 1 for s in sizes) or not sizes:
        ap.error("--questions: sizes of at least 1")

    data_dir = args.run / "reader-data"
    heldout = data_dir / "heldout.json"
    train_files = sorted(p for p in data_dir.glob("*.json") if p.name != "heldout.json")
    if not heldout.is_file() or not train_files:
        raise SystemExit(f"{data_dir}: no reader data; run `densepr reproduce --profile dpr -o {args.run}` first")
    recipe = reader_recipe(args.run)
    gold = gold_passages(heldout, args.eval)
    init = str(EmbeddedData().model_dir)
    t_start = time.perf_counter()
    depth = recipe.get("depth", 20)
    usable = usable_rows(train_files, heldout, depth)  # read once: the files are ~115 MB each
    rows = []
    for n in sizes:
        name = f"q{n or 'all'}" + ("" if args.precision == "fp32" else f"-{args.precision}")
        run_dir = args.workdir / name
        files, counts = write_subset(usable, depth, n, args.seed, args.workdir / "data" / name)
        cfg = ReaderTrainConfig(train_files=files, output_dir=str(run_dir / "reader"), init=init, epochs=args.epochs,
                                save_every=10**9, seed=args.seed, **{k: v for k, v in recipe.items() if k not in ("seed", "precision")},
                                precision=args.precision)  # fmt: skip
        record = train_reader_once(cfg, run_dir, args.device, name)
        scores = given_passage_scores(run_dir / "reader" / "final", gold, args.device)
        kept = read_json(run_dir / "reader" / "data.json")["kept"]  # the trainer's count (it locates the answers itself)
        rows.append({"questions": kept, **counts, "epochs": args.epochs, "precision": args.precision, "train_seconds": record["seconds"],
                     "steps": record["steps"], **scores})  # fmt: skip
        print(f"{name}: {kept} questions, EM {rows[-1]['em']}, F1 {rows[-1]['f1']}")

    # EM gained per doubling of the training questions between consecutive sizes, and where the last rate would
    # reach 50% (an extrapolation: the curve may bend further)
    pts = sorted({r["questions"]: r["em"] for r in rows}.items())
    fit = {"em_per_doubling": [{"from": a, "to": b, "em_per_doubling": round((eb - ea) / math.log2(b / a), 2)}
                               for (a, ea), (b, eb) in zip(pts, pts[1:])]}  # fmt: skip
    if fit["em_per_doubling"]:
        rate, (n_last, em_last) = fit["em_per_doubling"][-1]["em_per_doubling"], pts[-1]
        fit["questions_for_em_50_at_last_rate"] = round(n_last * 2 ** ((50 - em_last) / rate)) if rate > 0 else None
    print(f"\nEM / F1 given the answer-bearing passage, {len(gold)} held-out questions ({args.run}), {args.epochs} epochs each")
    print("| training questions | train s | steps | EM | F1 |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['questions']:,} | {r['train_seconds']} | {r['steps']} | {r['em']} | {r['f1']} |")
    for g in fit["em_per_doubling"]:
        print(f"{g['from']:,} -> {g['to']:,} questions: {g['em_per_doubling']:+.2f} EM per doubling")
    if "questions_for_em_50_at_last_rate" in fit:
        q50 = fit["questions_for_em_50_at_last_rate"]
        print(f"50% EM at the last rate: {f'{q50:,} questions' if q50 else 'never (no rise)'} (an extrapolation, not measured)")
    write_json(args.json, {"command": f"python benchmarks/reader/reader_data.py --run {args.run} --questions {args.questions} --epochs {args.epochs} --eval {args.eval} --precision {args.precision}",
                           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1),
                           "held_out_questions": len(gold), "recipe": recipe, "results": rows, "growth": fit})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
