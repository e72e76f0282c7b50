"""Is the reader's exact match given the answer passage a capacity limit of the 6-layer MiniLM? Readers from
different starting encoders (e.g. MiniLM-L6 and the 12-layer all-mpnet-base-v2) trained on the same data with the
same recipe and the same number of steps, then read on the same held-out questions.

Training data: the top ``--depth`` passages ``--index`` retrieves (``--mode``) for NQ-dev and TriviaQA-dev, minus
each set's last ``--heldout`` questions, which are held out (``train-reader --holdout``). The recipe is
``reproduce --profile dpr``'s reader (ReaderPlan: 32 questions x M = 2 passages, 192-token windows, shared
normalisation, heads at lr 1e-3), ``--epochs`` epochs, in ``--precision``. Read: the best-ranked answer-bearing
passage of the first ``--eval`` held-out questions that have one (as benchmarks/reader/reader_data.py).

    python benchmarks/reader/reader_models.py --index runs/mpnet-zs --model minilm=DIR --model mpnet=DIR \\
        [--epochs 1] [--precision bf16] [--heldout 1000] [--eval 500] [--workdir runs/reader-models] \\
        [--recipe NAME:lr=3e-5,head_lr=1e-3 ...] [--trained NAME=READER_DIR ...]

``--recipe NAME:KEY=VALUE,...`` changes the recipe of the model named NAME only (any ReaderTrainConfig field:
lr, head_lr, span_loss, passages, batch_size, max_length, warmup_steps, ...), so the same starting model can be
trained several ways on the same data and batches: ``--model mpnet=DIR --model mpnet-3e-5=DIR --recipe mpnet-3e-5:lr=3e-5``.

``--trained NAME=DIR`` reads a reader trained elsewhere (another run, another data depth) on the same held-out
passages, without training it. A reader already trained with the same configuration is read again, not retrained (the benchmark resumes).
Prints a table and writes benchmarks/reader/results/reader-models.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import given_passage_scores, gold_passages, machine_info, train_reader_once

from densepr.data import EmbeddedData
from densepr.data.runs import write_dpr_results
from densepr.fileio.atomic import atomic_write, read_json, write_json
from densepr.reproduce.profiles import ReaderPlan
from densepr.train.config import ReaderTrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
SETS = ("nq-dev", "trivia-dev")


def reader_data(index: Path, mode: str, depth: int, heldout: int, out: Path, device: str) -> tuple[list[Path], Path, Path]:
    """Retrieval results for the training sets, the held-out questions' results, and their QA TSV (written once)."""
    files = [out / f"{s}.json" for s in SETS]
    held_json, held_tsv = out / "heldout.json", out / "heldout.qa.tsv"
    if all(p.is_file() for p in (*files, held_json, held_tsv)):
        return files, held_json, held_tsv
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.retrieve.retriever import Retriever

    retriever = Retriever.load(index, device=device)
    data = EmbeddedData()
    out.mkdir(parents=True, exist_ok=True)
    held_q, held_a = [], []
    for name, path in zip(SETS, files):
        qas = data.load_qa(name)
        res = retriever.retrieve(qas.questions, depth, mode, True)
        hits = AnswerMatcher(retriever.corpus.texts).hits(res.rows, qas)
        write_dpr_results(path, qas.questions, [q.answers for q in qas.items], res, retriever.corpus, hits)
        held_q += qas.questions[-heldout:]
        held_a += [q.answers for q in qas.items[-heldout:]]
    # the held-out questions' own results file (validation reads their answer passages)
    import json

    rows = [r for p in files for r in json.loads(p.read_text(encoding="utf-8"))]
    keep = set(held_q)
    held_rows = [r for r in rows if r["question"] in keep]
    with atomic_write(held_json) as fh:
        json.dump(held_rows, fh)
    with atomic_write(held_tsv) as fh:
        for q, a in zip(held_q, held_a):
            fh.write(f"{q}\t{json.dumps(list(a))}\n")
    return files, held_json, held_tsv


def parse_recipes(specs: list[str], names: list[str]) -> dict[str, dict]:
    """``NAME:KEY=VALUE,...`` -> {NAME: {KEY: value}}, each value cast to its ReaderTrainConfig field's type."""
    fields = ReaderTrainConfig.__dataclass_fields__
    out: dict[str, dict] = {}
    for spec in specs:
        name, _, body = spec.partition(":")
        if name not in names or not body:
            raise SystemExit(f"--recipe {spec!r}: expected NAME:KEY=VALUE,... with NAME one of --model's ({', '.join(names)})")
        for item in body.split(","):
            key, _, value = item.partition("=")
            if key not in fields or key in ("train_files", "output_dir", "init", "holdout", "epochs", "precision"):
                raise SystemExit(f"--recipe {spec!r}: {key!r} is not a recipe field")
            default = fields[key].default
            try:
                if value.lower() == "none":
                    cast = None
                elif isinstance(default, bool):
                    cast = value.lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    cast = int(value)
                elif isinstance(default, float) or key in ("lr", "head_lr", "weight_decay"):
                    cast = float(value)
                else:
                    cast = value
            except ValueError:
                raise SystemExit(f"--recipe {spec!r}: {key}={value!r} is not a {type(default).__name__}") from None
            out.setdefault(name, {})[key] = cast
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, required=True, help="an index directory (passages.tsv, bm25/, dense/)")
    ap.add_argument("--mode", default="dense")
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR of a starting encoder (repeat)")
    ap.add_argument("--trained", action="append", default=[],
                    help="NAME=DIR of a reader trained elsewhere (repeat): read on the same held-out passages, not trained")
    ap.add_argument("--recipe", action="append", default=[], help="NAME:KEY=VALUE,... recipe changes for model NAME (repeat)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--retrieve-depth", type=int, default=None,
                    help="passages retrieved per question (default: the recipe's depth, 20); deeper lists let --recipe NAME:depth=100 "
                         "find positives further down, while the held-out questions read stay those with an answer in the top 20")
    ap.add_argument("--heldout", type=int, default=1000, help="last questions of each dev set held out")
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("runs/reader-models"))
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "reader-models.json")
    args = ap.parse_args()
    if not args.model and not args.trained:
        ap.error("give at least one --model NAME=DIR (trained here) or --trained NAME=DIR (read only)")
    if bad := [m for m in args.model + args.trained if "=" not in m]:
        ap.error(f"expected NAME=DIR, got {bad[0]!r}")

    plan = ReaderPlan()
    depth = args.retrieve_depth or plan.depth
    data_dir = args.workdir / ("data" if depth == plan.depth else f"data-top{depth}")
    files, held_json, held_tsv = reader_data(args.index, args.mode, depth, args.heldout, data_dir, args.device)
    gold = gold_passages(held_json, args.eval, plan.depth)
    recipe = {k: v for k, v in asdict(plan).items() if k in ReaderTrainConfig.__dataclass_fields__
              and k not in ("epochs", "max_steps", "save_every", "dev_limit", "model")}  # fmt: skip
    models = [m.split("=", 1) for m in args.model]
    changes = parse_recipes(args.recipe, [n for n, _ in models])
    rows, t_start = [], time.perf_counter()
    for name, path in models:
        run_dir = args.workdir / f"{name}-{args.precision}-e{args.epochs}"
        cfg = ReaderTrainConfig(train_files=[str(f) for f in files], output_dir=str(run_dir / "reader"), init=path, epochs=args.epochs,
                                save_every=10**9, holdout=[str(held_tsv)], precision=args.precision,
                                **{**recipe, **changes.get(name, {})})  # fmt: skip
        record = train_reader_once(cfg, run_dir, args.device, name)
        scores = given_passage_scores(run_dir / "reader" / "final", gold, args.device)
        kept = read_json(run_dir / "reader" / "data.json")["kept"]
        rows.append({"model": name, "path": path, "recipe_changes": changes.get(name, {}), "questions": kept, "epochs": args.epochs, "precision": args.precision,
                     "steps": record["steps"], "train_seconds": record["seconds"], **scores})  # fmt: skip
        print(f"{name}: {kept} questions, {record['steps']} steps in {record['seconds']} s; EM {scores['em']}, F1 {scores['f1']}", flush=True)
    for name, path in (m.split("=", 1) for m in args.trained):
        scores = given_passage_scores(path, gold, args.device)
        rows.append({"model": name, "path": path, "recipe_changes": {}, "questions": None, "epochs": None, "precision": None,
                     "steps": None, "train_seconds": None, "trained_elsewhere": True, **scores})  # fmt: skip
        print(f"{name} (trained elsewhere): EM {scores['em']}, F1 {scores['f1']}", flush=True)
    print(f"\nEM / F1 given the answer-bearing passage, {len(gold)} held-out questions (retrieval: {args.index}, {args.mode})")
    print("| reader from | recipe changes | training questions | steps | train s | EM | F1 |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        diff = ", ".join(f"{k}={v}" for k, v in r["recipe_changes"].items()) or "-"
        if r.get("trained_elsewhere"):
            print(f"| {r['model']} | trained elsewhere ({r['path']}) | - | - | - | {r['em']} | {r['f1']} |")
        else:
            print(f"| {r['model']} | {diff} | {r['questions']:,} | {r['steps']} | {r['train_seconds']} | {r['em']} | {r['f1']} |")
    write_json(args.json, {"command": "python benchmarks/reader/reader_models.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
                           "retrieve_depth": depth, "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1), "held_out_questions": len(gold),
                           "recipe": recipe, "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
