"""Does cloze pre-training on the corpus lift densepr's reader? EM given the answer passage, with and without.

The reader goal of issue 15 (EM >= 50% given the answer-bearing passage) is not reached with the ~4.2 k
labelled questions the embedded data offers (benchmarks/reader_data.py: +1.9 EM for the last doubling).
Cloze pre-training makes training questions from unlabelled text (Dhingra et al., NAACL 2018, "Simple and
Effective Semi-Supervised Question Answering"; Lewis et al., ACL 2019, "Unsupervised Question Answering by
Cloze Translation"): a sentence of a passage whose entity, year or number also occurs in the passage's other
sentences becomes a question, the span replaced by a wh-word ("... was founded in when by ...?"); its context
is the passage *without* that sentence (so the answer is found by matching the rest of the sentence to the
context, not by copying), and BM25's top passages for the question are its negatives, as DPR's reader data.
Only the retrieval corpus's own text is used, no test question or answer.

Three readers, each with the run's reader recipe, then read on the best-ranked answer-bearing passage of
the same held-out questions (as benchmarks/reader_data.py):

- ``labelled``: the run's reader data only (``--epochs`` epochs from the embedded MiniLM);
- ``cloze``: ``--cloze`` cloze questions only (one epoch), no labelled question;
- ``cloze+labelled``: ``cloze``, then the labelled data as ``labelled``.

    python benchmarks/reader_cloze.py --run runs/dpr [--cloze 8000] [--epochs 2] [--eval 500] [--workdir DIR]

Each reader is kept under ``--workdir``; a reader whose training finished with the same configuration is
not trained again, so a killed run continues. Prints a table, writes benchmarks/results/reader/cloze.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import RESULTS, gold_passages, machine_info, reader_recipe, span_scores
from reader_data import usable_rows, write_subset

from densepr.data import EmbeddedData
from densepr.data.passages import load_corpus
from densepr.evaluate.answers import has_answer
from densepr.fileio import atomic_write, read_json, remove_tree, write_json
from densepr.models.reader import Reader
from densepr.retrieve.bm25 import BM25Index
from densepr.train.config import ReaderTrainConfig
from densepr.train.reader import train_reader

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NUMBER = re.compile(r"\b[0-9][0-9,.]*[0-9]\b|\b[0-9]\b")
# a run of capitalised words, which may hold "of", "the", "de", ... between them
_NAME = re.compile(r"\b[A-Z][\w'’\-.]*(?:\s+(?:(?:of|the|de|du|von|van|der|la|le|and|y)\s+)*[A-Z][\w'’\-.]*)*")
# capitalised only because they start a sentence, or too common to be answers
_NOT_NAMES = frozenset("the a an it in he she they this these those his her its their there on at as by for from after before "
                       "during since when while however although following it's i we our one two".split())  # fmt: skip


def cloze_candidates(sentence: str, text: str) -> list[tuple[str, str]]:
    """(answer span, wh-word) candidates of one sentence of ``text``: years (when), other numbers (how many),
    names (what)."""
    out = [(m.group(0), "when") for m in _YEAR.finditer(sentence)]
    years = {a for a, _ in out}
    out += [(m.group(0), "how many") for m in _NUMBER.finditer(sentence) if m.group(0) not in years]
    for m in _NAME.finditer(sentence):
        words = m.group(0).rstrip(".").split()
        initial = m.start() == 0
        while words and words[0].lower() in _NOT_NAMES:
            words, initial = words[1:], False
        name = " ".join(words)
        # a single capitalised word opening the sentence is a name only if it is capitalised mid-sentence too
        if len(name) > 2 and not (initial and len(words) == 1 and not re.search(rf"[a-z,;]\s+{re.escape(name)}\b", text)):
            out.append((name, "what"))
    return out


def make_cloze(corpus, n: int, seed: int) -> list[dict]:
    """Up to ``n`` cloze questions (seeded sample, at most one per sentence): question, answer, source row,
    context (the passage without the question's sentence)."""
    rng = random.Random(seed)
    made = []
    for row, (title, text) in enumerate(zip(corpus.titles, corpus.texts)):
        sentences = _SENTENCE_END.split(text)
        if len(sentences) < 2:
            continue
        for i, s in enumerate(sentences):
            context = " ".join(sentences[:i] + sentences[i + 1 :])
            # the answer must be findable in the context and the question must keep some words to match
            cands = [(a, wh) for a, wh in cloze_candidates(s, text) if has_answer([a], context) and len(s.split()) - len(a.split()) >= 4]
            if not cands:
                continue
            answer, wh = rng.choice(cands)
            question = s.replace(answer, wh, 1).rstrip(" .!?") + "?"
            made.append({"question": question, "answer": answer, "wh": wh, "row": row, "title": title, "context": context})
    rng.shuffle(made)
    return made[:n]


def write_cloze_data(run: Path, n: int, seed: int, depth: int, path: Path) -> dict:
    """DPR retrieval-result JSON of ``n`` cloze questions: the positive context first, then BM25's top
    passages for the question (the source passage left out), ``has_answer`` by DPR's rule."""
    corpus = load_corpus(run / "passages.tsv")
    made = make_cloze(corpus, n, seed)
    bm25 = BM25Index.load(run / "bm25", corpus=corpus)
    hits = bm25.search([m["question"] for m in made], k=depth)
    rows = []
    for m, rs, ss in zip(made, hits.rows, hits.scores):
        # the positive first, scored above every BM25 hit (the file is a ranked list)
        top = float(ss[0]) + 1.0 if len(ss) else 1.0
        ctxs = [{"id": corpus.ids[m["row"]], "title": m["title"], "text": m["context"], "score": top, "has_answer": True}]
        for r, s in zip(rs, ss):
            if r >= 0 and r != m["row"] and len(ctxs) < depth:
                ctxs.append({"id": corpus.ids[r], "title": corpus.titles[r], "text": corpus.texts[r], "score": float(s),
                             "has_answer": has_answer([m["answer"]], corpus.texts[r])})  # fmt: skip
        rows.append({"question": m["question"], "answers": [m["answer"]], "ctxs": ctxs})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        json.dump(rows, fh)
    kinds: dict[str, int] = {}
    for m in made:
        kinds[m["wh"]] = kinds.get(m["wh"], 0) + 1
    return {"questions": len(rows), "examples": [r["question"] + " -> " + r["answers"][0] for r in rows[:5]], "by_wh_word": kinds}


def train(cfg: ReaderTrainConfig, run_dir: Path, device: str) -> dict:
    """Train ``cfg`` unless ``run_dir/done.json`` holds the same configuration; the record."""
    done = run_dir / "done.json"
    if done.is_file() and read_json(done).get("config") == json.loads(json.dumps(asdict(cfg))):
        print(f"{run_dir.name}: trained before ({read_json(done)['seconds']} s)")
        return read_json(done)
    remove_tree(Path(cfg.output_dir))
    t0 = time.perf_counter()
    out = train_reader(cfg, device=device, show_progress=False, log=print)
    record = {"config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1), "steps": out.get("step")}
    write_json(done, record)
    return record


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
    ap.add_argument("--readers", default="labelled,cloze,cloze+labelled", help="which readers to train and read")
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "reader" / "cloze.json")
    args = ap.parse_args()
    wanted = [r.strip() for r in args.readers.split(",") if r.strip()]
    if not wanted or set(wanted) - {"labelled", "cloze", "cloze+labelled"}:
        ap.error(f"--readers: from labelled, cloze, cloze+labelled, not {args.readers!r}")
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
    if any("labelled" in r for r in wanted):
        labelled, _ = write_subset(usable_rows(train_files, heldout, depth), depth, None, args.seed, args.workdir / "data" / "labelled")

    def config(files: list[str], out: Path, start: str, epochs: int) -> ReaderTrainConfig:
        return ReaderTrainConfig(train_files=files, output_dir=str(out / "reader"), init=start, epochs=epochs, save_every=10**9,
                                 seed=args.seed, max_steps=args.max_steps, **recipe)  # fmt: skip

    plans = {"labelled": lambda: config(labelled, args.workdir / "labelled", init, args.epochs),
             "cloze": lambda: config([str(cloze_path)], args.workdir / "cloze", init, 1),
             "cloze+labelled": lambda: config(labelled, args.workdir / "cloze+labelled", str(args.workdir / "cloze" / "reader" / "final"), args.epochs)}  # fmt: skip
    order = [r for r in ("labelled", "cloze", "cloze+labelled") if r in wanted or (r == "cloze" and "cloze+labelled" in wanted)]
    rows = []
    for name in order:
        cfg = plans[name]()
        if name == "labelled" and args.labelled_reader is not None:
            # reader_data.py's layout: <size>/done.json beside <size>/reader/final
            final, record = args.labelled_reader, read_json(args.labelled_reader.parents[1] / "done.json")
            if any(record["config"].get(k) != v for k, v in recipe.items()) or record["config"]["epochs"] != args.epochs:
                raise SystemExit(f"--labelled-reader {final}: trained with another recipe or epochs than this run's")
        else:
            record = train(cfg, args.workdir / name, args.device)
            final = Path(cfg.output_dir) / "final"
        reader = Reader.load(final, args.device)
        reader.eval()
        readings = reader.read([g[0] for g in gold], [[(g[2], g[3])] for g in gold])
        kept = read_json(final.parent / "data.json")["kept"]
        rows.append({"reader": name, "dir": str(final), "questions": kept, "epochs": cfg.epochs, "train_seconds": record["seconds"], "steps": record["steps"],
                     **span_scores([r[0].text for r in readings], gold)})  # fmt: skip
        print(f"{name}: {kept} training questions, {record['steps']} steps, EM {rows[-1]['em']}, F1 {rows[-1]['f1']}")
    print(f"\nEM / F1 given the answer-bearing passage, {len(gold)} held-out questions ({args.run})")
    print("| reader | training questions | epochs | steps | train s | EM | F1 |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['reader']} | {r['questions']:,} | {r['epochs']} | {r['steps']} | {r['train_seconds']} | {r['em']} | {r['f1']} |")
    write_json(args.json, {"command": f"python benchmarks/reader_cloze.py --run {args.run} --cloze {args.cloze} --epochs {args.epochs} --eval {args.eval} --readers {args.readers}"
                           + (f" --labelled-reader {args.labelled_reader}" if args.labelled_reader else ""),
                           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1),
                           "held_out_questions": len(gold), "recipe": recipe, "cloze_data": cloze_info, "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
