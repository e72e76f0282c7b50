"""Reading in bfloat16 on the CPU: speed and answers against float32, side by side in one run.

Reading the full test sets end to end is the longest part of the paper's experiment on 2 CPU cores (~6 h
in float32 for 28 k questions x ~30 passages). CPUs with native bf16 arithmetic (AVX512-BF16, AMX) run
a bfloat16 copy of the reader's weights faster. This reads the first ``--questions`` of each test set end to
end (``densepr.pipeline.evaluate_qa``: the retriever's and BM25's top k, each passage read once) with the
reader of a ``densepr reproduce --profile dpr`` run loaded at each ``--precisions``, the same passages
for each, one after the other on an otherwise idle machine, and reports:

- the reading's seconds (not the retrieval's) and passages read per second, and the speed-up over float32;
- how often a passage's best span (its text) is the same as float32's;
- exact match at every k under DPR's rule and the fused selection, and EM given the answer passage.

    python benchmarks/reader/reader_precision.py --run runs/dpr [--sets nq-test,trivia-test] [--questions 200]

Prints a table and writes benchmarks/reader/results/precision.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData
from densepr.evaluate.answers import AnswerMatcher
from densepr.fileio.atomic import read_json, write_json
from densepr.models.hf import cpu_has_bf16
from densepr.models.reader import Reader
from densepr.pipeline import evaluate_qa
from densepr.retrieve.retriever import Retriever

RESULTS = Path(__file__).resolve().parent / "results"


def same_spans(a: Path, b: Path) -> tuple[int, int]:
    """(passages whose best span text is equal, passages) between two evaluate_qa piece directories."""
    same = total = 0
    for pa in sorted(a.glob("readings-*.json")):
        for ra, rb in zip(read_json(pa)["readings"], read_json(b / pa.name)["readings"]):  # a piece: {key, seconds, readings}
            for x, y in zip(ra, rb):
                same += x[4] == y[4]
                total += 1
    return same, total


def dtype_of(reader: Reader) -> str:
    """The reader's weight type: torch's dtype, or the ONNX export's file."""
    if hasattr(reader.model, "parameters"):
        return str(next(reader.model.parameters()).dtype)
    return "onnx int8" if getattr(reader.model, "int8", False) else "onnx float32"


def timed(reader: Reader, seconds: dict, key: str) -> Reader:
    """``reader`` whose :meth:`Reader.read` adds its wall seconds to ``seconds[key]`` (reading only, not retrieval)."""
    real = reader.read

    def read(*a, **kw):
        t0 = time.perf_counter()
        out = real(*a, **kw)
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t0, 2)
        return out

    reader.read = read
    return reader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/dpr"), help="a `densepr reproduce --profile dpr` output directory")
    ap.add_argument("--sets", default="nq-test", help="embedded test sets, comma-separated")
    ap.add_argument("--questions", type=int, default=200, help="first N questions of each set")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="fp32, bf16, auto (PyTorch weights) and onnx, int8 (the --onnx export; int8: its quantised model)")
    ap.add_argument("--onnx", type=Path, help="a `densepr export-onnx READER DIR --int8` directory, for --precisions onnx/int8")
    ap.add_argument("--modes", default="dense,bm25")
    ap.add_argument("--ks", default="1,5,10,20")
    ap.add_argument("-o", "--json", type=Path, default=RESULTS / "precision.json")
    args = ap.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    modes, ks = args.modes.split(","), [int(k) for k in args.ks.split(",")]
    if not (args.run / "reader" / "config.json").is_file():
        raise SystemExit(f"{args.run}: no tuned reader; run `densepr reproduce --profile dpr -o {args.run}` first")
    data = EmbeddedData()
    retriever = Retriever.load(args.run, device="cpu")
    matcher = AnswerMatcher(retriever.corpus.texts)  # built once, outside the timings
    if {"onnx", "int8"} & set(precisions) and args.onnx is None:
        raise SystemExit("--precisions onnx/int8 need --onnx DIR (made by `densepr export-onnx RUN/reader DIR --int8`)")
    readers = {p: Reader.load(f"{args.onnx}#int8" if p == "int8" else args.onnx, "cpu") if p in ("onnx", "int8")
               else Reader.load(args.run / "reader", "cpu", precision=p) for p in precisions}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            qas = data.resolve_qa(name, limit=args.questions)
            retriever.retrieve_all(qas.questions[:2], 100, modes)  # warm the indexes before timing
            res, read_s = {}, {}
            for p in precisions:
                (Path(tmp) / name / p).mkdir(parents=True)
                res[p] = evaluate_qa(retriever, timed(readers[p], read_s, p), qas, modes, ks, matcher, pieces=Path(tmp) / name / p)
            base = precisions[0]
            for p in precisions:
                same, total = same_spans(Path(tmp) / name / base, Path(tmp) / name / p)
                r = res[p]
                rows.append({"set": name, "questions": len(qas), "precision": p,
                             "dtype": dtype_of(readers[p]), "seconds": r["seconds"], "read_seconds": read_s[p],
                             "passages": r["passages_read"], "passages_per_s": round(r["passages_read"] / read_s[p], 1),
                             "speedup": round(read_s[base] / read_s[p], 2), "same_span": round(same / max(1, total), 4),
                             "em": {m: {rule: {k: v["em"] for k, v in per["k"].items()}
                                        for rule, per in (("paper", r["modes"][m]), ("fused", r["modes"][m].get("fused", {"k": {}})))}
                                    for m in modes},
                             "em_given_passage": r["gold"]["em"], "gold_questions": r["gold"]["questions"]})  # fmt: skip
    print(f"\nreading {args.questions} questions per set end to end ({', '.join(modes)}, top {max(ks)}), {args.run}/reader; "
          f"CPU native bf16: {cpu_has_bf16()}, {torch.get_num_threads()} threads")
    print(f"| set | precision | read s | passages/s | speed-up | same span | {modes[0]} EM@{max(ks)} fused | EM given passage |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fused = r["em"][modes[0]]["fused"] or r["em"][modes[0]]["paper"]
        print(f"| {r['set']} | {r['precision']} | {r['read_seconds']} | {r['passages_per_s']} | {r['speedup']}x | "
              f"{100 * r['same_span']:.1f}% | {fused[str(max(ks))]} | {r['em_given_passage']} |")
    write_json(args.json, {"command": f"python benchmarks/reader/reader_precision.py --run {args.run} --sets {args.sets} --questions {args.questions} "
                                      f"--precisions {args.precisions}{f' --onnx {args.onnx}' if args.onnx else ''} --modes {args.modes} --ks {args.ks}",
                           "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "cpu_native_bf16": cpu_has_bf16(),
                           "threads": torch.get_num_threads(), "results": rows})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
