"""Does cloze pre-training on the corpus lift densepr's reader? EM given the answer passage, with and without.

The reader goal of issue 15 (EM >= 50% given the answer-bearing passage) is not reached with the ~4.2 k
labelled questions the embedded data offers (benchmarks/reader/reader_data.py: +1.9 EM for the last doubling).
Cloze pre-training makes training questions from the corpus's own sentences (:mod:`densepr.train.cloze`,
``densepr cloze-data``; Dhingra et al. 2018, Lewis et al. 2019): a name, year or number blanked with a
wh-word, the passage without that sentence as the context, BM25's top passages as negatives. Only the
retrieval corpus's own text is used, no test question or answer.

Readers, each with the run's reader recipe, then read on the best-ranked answer-bearing passage of
the same held-out questions (as benchmarks/reader/reader_data.py):

- ``labelled``: the run's reader data only (``--epochs`` epochs from the embedded MiniLM);
- ``cloze``: ``--cloze`` cloze questions only (one epoch), no labelled question;
- ``cloze+labelled``: ``cloze``, then the labelled data as ``labelled``.

The run's own recipe with cloze pre-training (3 epochs, best held-out checkpoint) is ``densepr reproduce
--profile dpr --reader-cloze N`` (stage ``reader-cloze``); ``--readers none --compare NAME=DIR`` reads such
readers on the same held-out answer passages.

    python benchmarks/reader/reader_cloze.py --run runs/dpr [--cloze 8000] [--epochs 2] [--eval 500] [--workdir DIR]
    python benchmarks/reader/reader_cloze.py --run runs/dpr --readers none --compare cloze=runs/dpr-cloze/reader --compare shipped=runs/dpr/reader

Each reader is kept under ``--workdir``; a reader whose training finished with the same configuration is
not trained again, so a killed run continues. Prints a table, writes benchmarks/reader/results/cloze.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import given_passage_scores, gold_passages, machine_info, reader_recipe, train_reader_once
from reader_data import usable_rows, write_subset

from densepr.data import EmbeddedData
from densepr.fileio.atomic import read_json, write_json
from densepr.train.cloze import index_cloze_records, write_cloze
from densepr.train.config import ReaderTrainConfig

RESULTS = Path(__file__).resolve().parent / "results"

READERS = ("labelled", "cloze", "cloze+labelled")


def kept_step(reader: Path) -> int | None:
    """The training step of a reader kept as ``best/`` (its ``validation.json``); None for a ``final/``."""
    path = reader / "validation.json"
    return read_json(path).get("step") if path.is_file() else None


def write_cloze_data(run: Path, n: int, seed: int, depth: int, path: Path) -> dict:
    """The cloze questions of the run's passages (:mod:`densepr.train.cloze`, as ``densepr cloze-data``)."""
    records, _ = index_cloze_records(run, n, seed, depth)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cloze(records, path)
    return {"questions": len(records), "examples": [r["question"] + " -> " + r["answers"][0] for r in records[:5]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/dpr"), help="a `densepr reproduce --profile dpr` output directory")
    ap.add_argument("--cloze", type=int, default=8000, help="cloze questions made from the run's passages")
    ap.add_argument("--epochs", type=int, default=2, help="epochs on the labelled data (as reader_data.py)")
    ap.add_argument("--eval", type=int, default=500, help="held-out questions read (their best-ranked answer-bearing passage)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", type=Path, default=Path("runs/reader-cloze"))
    ap.add_argument("--max-steps", type=int, default=None, help="stop each training after this many steps (smoke tests)")
    ap.add_argument("--labelled-reader", type=Path, default=None,
                    help="a reader already trained as `labelled` (e.g. reader_data.py's `all`, same recipe and epochs): read, not trained again")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=DIR",
                    help="another trained reader to read beside them, e.g. shipped=runs/dpr/reader (the one `reproduce` trains: 3 epochs, best checkpoint)")
    ap.add_argument("--readers", default="labelled,cloze,cloze+labelled",
                    help="which readers to train and read, from labelled, cloze, cloze+labelled; none: only the --compare ones")
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "cloze.json")
    args = ap.parse_args()
    wanted = [r.strip() for r in args.readers.split(",") if r.strip() and r.strip() != "none"]
    if set(wanted) - set(READERS) or not (wanted or args.compare):
        ap.error(f"--readers: from {', '.join(READERS)} (or none, with --compare), not {args.readers!r}")
    data_dir = args.run / "reader-data"
    heldout = data_dir / "heldout.json"
    train_files = sorted(p for p in data_dir.glob("*.json") if p.name != "heldout.json")
    if not heldout.is_file() or not train_files:
        raise SystemExit(f"{data_dir}: no reader data; run `densepr reproduce --profile dpr -o {args.run}` first")
    t_start = time.perf_counter()
    recipe = {k: v for k, v in reader_recipe(args.run).items() if k not in ("seed", "precision")}
    depth = recipe.get("depth", 20)
    gold = gold_passages(heldout, args.eval)
    init = str(EmbeddedData().model_dir)

    cloze_path = args.workdir / "data" / f"cloze-{args.cloze}-{args.seed}.json"
    cloze_info = read_json(cloze_path.with_suffix(".info.json")) if cloze_path.with_suffix(".info.json").is_file() else None
    if cloze_info is None and any("cloze" in r for r in wanted):
        t0 = time.perf_counter()
        cloze_info = {**write_cloze_data(args.run, args.cloze, args.seed, depth, cloze_path), "seconds": round(time.perf_counter() - t0, 1)}
        write_json(cloze_path.with_suffix(".info.json"), cloze_info)
        print(f"cloze data: {cloze_info['questions']} questions in {cloze_info['seconds']} s, e.g.\n  " + "\n  ".join(cloze_info["examples"]))
    labelled = None
    if any(r in wanted for r in ("labelled", "cloze+labelled")):
        labelled, _ = write_subset(usable_rows(train_files, heldout, depth), depth, None, args.seed, args.workdir / "data" / "labelled")

    def config(files: list[str], out: Path, start: str, epochs: int) -> ReaderTrainConfig:
        return ReaderTrainConfig(train_files=files, output_dir=str(out / "reader"), init=start, epochs=epochs, save_every=10**9,
                                 seed=args.seed, max_steps=args.max_steps, **recipe)  # fmt: skip

    cloze_final = str(args.workdir / "cloze" / "reader" / "final")
    plans = {"labelled": lambda: config(labelled, args.workdir / "labelled", init, args.epochs),
             "cloze": lambda: config([str(cloze_path)], args.workdir / "cloze", init, 1),
             "cloze+labelled": lambda: config(labelled, args.workdir / "cloze+labelled", cloze_final, args.epochs)}  # fmt: skip
    order = [r for r in READERS if r in wanted or (r == "cloze" and "cloze+labelled" in wanted)]
    rows = []
    for name in order:
        cfg = plans[name]()
        if name == "labelled" and args.labelled_reader is not None:
            # reader_data.py's layout: <size>/done.json beside <size>/reader/final
            final, record = args.labelled_reader, read_json(args.labelled_reader.parents[1] / "done.json")
            if any(record["config"].get(k) != v for k, v in recipe.items()) or record["config"]["epochs"] != args.epochs:
                raise SystemExit(f"--labelled-reader {final}: trained with another recipe or epochs than this run's")
        else:
            record = train_reader_once(cfg, args.workdir / name, args.device, name)
            final = Path(cfg.output_dir) / "final"
        kept = read_json(final.parent / "data.json")["kept"]
        rows.append({"reader": name, "dir": str(final), "questions": kept, "epochs": cfg.epochs, "train_seconds": record["seconds"], "steps": record["steps"],
                     "best_step": kept_step(final), **given_passage_scores(final, gold, args.device)})  # fmt: skip
        print(f"{name}: {kept} training questions, {record['steps']} steps, EM {rows[-1]['em']}, F1 {rows[-1]['f1']}")
    for spec in args.compare:
        name, _, path = spec.partition("=")
        if not path or not Path(path).is_dir():
            raise SystemExit(f"--compare: expected NAME=DIR of a reader directory, got {spec!r}")
        rows.append({"reader": name, "dir": path, "questions": None, "epochs": None, "train_seconds": None, "steps": None,
                     "best_step": kept_step(Path(path)), **given_passage_scores(path, gold, args.device)})  # fmt: skip
        print(f"{name} ({path}): EM {rows[-1]['em']}, F1 {rows[-1]['f1']}")
    print(f"\nEM / F1 given the answer-bearing passage, {len(gold)} held-out questions ({args.run})")
    print("| reader | training questions | epochs | steps | kept checkpoint's step | train s | EM | F1 |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r['questions']:,}" if r["questions"] else "", r["epochs"] or "", r["steps"] or "", r["best_step"] or "", r["train_seconds"] or ""]
        print(f"| {r['reader']} | " + " | ".join(map(str, cells)) + f" | {r['em']} | {r['f1']} |")
    write_json(args.json, {"command": f"python benchmarks/reader/reader_cloze.py --run {args.run} --cloze {args.cloze} --epochs {args.epochs} --eval {args.eval} --readers {args.readers}"
                           + (f" --labelled-reader {args.labelled_reader}" if args.labelled_reader else "") + "".join(f" --compare {c}" for c in args.compare),
                           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1),
                           "held_out_questions": len(gold), "recipe": recipe, "cloze_data": cloze_info, "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
