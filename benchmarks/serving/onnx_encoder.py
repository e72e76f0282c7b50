"""Question encoding for CPU serving: PyTorch eager against ONNX Runtime (float32 and int8), side by side.

The index's own question encoder is exported with ``densepr export-onnx --int8`` (into
``--workdir``), then, in one run and interleaved round by round (machines are noisy):

* latency at batch 1 (what a server sees per question): median over ``--questions`` NQ test
  questions, each encoded alone, tokenisation included;
* accuracy: NQ test top-20 / top-100 (all questions) over the index's dense index, every question
  encoded by each encoder (batches of 128), so the cost of each in retrieval quality is measured.

Prints a table and writes ``benchmarks/serving/results/onnx-encoder.json``.

    python benchmarks/serving/onnx_encoder.py [--index runs/dpr] [--questions 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData
from densepr.evaluate.answers import AnswerMatcher
from densepr.fileio.atomic import read_json, write_json
from densepr.models.encoder import Encoder
from densepr.models.onnx import OnnxQuestionEncoder, export_question_encoder
from densepr.retrieve.retriever import Retriever

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("runs/dpr") if Path("runs/dpr/dense").is_dir() else Path("runs/embedded"))
    ap.add_argument("--questions", type=int, default=300, help="questions timed one at a time")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("runs/onnx-encoder"))
    args = ap.parse_args()
    manifest = read_json(args.index / "dense" / "manifest.json")
    source = manifest["question_encoder"]
    export_question_encoder(source, args.workdir, int8=True)
    encoders = {"pytorch eager (float32)": Encoder.load(source, device="cpu"),
                "onnxruntime float32": OnnxQuestionEncoder(args.workdir),
                "onnxruntime int8": OnnxQuestionEncoder(args.workdir, int8=True)}  # fmt: skip
    qas = EmbeddedData().load_qa("nq-test")
    timed = qas.questions[: args.questions]
    for enc in encoders.values():  # warm-up
        for q in timed[:10]:
            enc.encode_questions([q], 1)
    lat: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(args.rounds):
        for name, enc in encoders.items():
            for q in timed:
                t0 = time.perf_counter()
                enc.encode_questions([q], 1)
                lat[name].append(time.perf_counter() - t0)
    retriever = Retriever.load(args.index, device="cpu")
    matcher = AnswerMatcher(retriever.corpus.texts)
    rows = []
    base = None
    for name, enc in encoders.items():
        vecs = enc.encode_questions(qas.questions, 128)
        res = retriever.retrieve_all(qas.questions, 100, ["dense"], vectors=vecs)["dense"]
        hits = matcher.hits(res.rows, qas)
        top = {k: round(100 * float(hits[:, :k].any(1).mean()), 2) for k in (20, 100)}
        med = statistics.median(lat[name]) * 1000
        base = base or med
        rows.append({"encoder": name, "batch1_median_ms": round(med, 2), "batch1_p95_ms": round(float(np.percentile(lat[name], 95)) * 1000, 2),
                     "speedup_vs_eager": round(base / med, 2), "nq_top20": top[20], "nq_top100": top[100]})  # fmt: skip
    print(f"\nquestion encoder {source}; index {args.index}; {len(timed)} questions x {args.rounds} rounds at batch 1; "
          f"NQ test ({len(qas)} questions), torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| encoder | batch-1 median ms | p95 ms | speed-up | NQ top-20 | top-100 |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['batch1_median_ms']} | {r['batch1_p95_ms']} | {r['speedup_vs_eager']}x | {r['nq_top20']} | {r['nq_top100']} |")
    out = RESULTS / "onnx-encoder.json"
    write_json(out, {"command": f"python benchmarks/serving/onnx_encoder.py --index {args.index} --questions {args.questions} --rounds {args.rounds}",
                     "machine": machine_info(), "question_encoder": source, "index": str(args.index), "rows": rows})  # fmt: skip
    print(f"written to {out}")


if __name__ == "__main__":
    main()
