"""Reader latency and throughput: reading 20 and 100 passages per question, side by side with
Hugging Face's own DPR reader recipe in the same run.

* densepr: ``Reader.read`` (windows length-sorted and batched, spans decoded per window);
* reference: ``DPRReaderTokenizer(questions, titles, texts)`` padded per question, the same
  ``DPRReader`` weights, then ``decode_best_spans`` (what the transformers docs show).

Both read the same BM25 top-100 passages of the first NQ test questions over the embedded
corpus. Per-question latency is one question at a time (median over questions); throughput
is all questions in one call. Prints a table, writes ``benchmarks/results/reader-speed[-DEVICE].json``.

    python benchmarks/reader_speed.py [--reader runs/reader/best] [--questions 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine_info

from densepr.data import EmbeddedData, load_corpus
from densepr.fileio import write_json
from densepr.models.reader import Reader
from densepr.retrieve.bm25 import BM25Index

RESULTS = Path(__file__).parent / "results"


def hf_reference(reader: Reader, question: str, passages: list[tuple[str, str]]) -> str:
    """The transformers recipe: DPRReaderTokenizer -> DPRReader -> decode_best_spans."""
    from transformers import DPRReaderTokenizerFast

    tok = hf_reference.tok = getattr(hf_reference, "tok", None) or DPRReaderTokenizerFast.from_pretrained(reader.name)
    enc = tok(questions=question, titles=[t for t, _ in passages], texts=[x for _, x in passages], padding=True,
              truncation=True, max_length=reader.config.max_length, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        out = reader.model(input_ids=enc["input_ids"].to(reader.device), attention_mask=enc["attention_mask"].to(reader.device))
    spans = tok.decode_best_spans(enc, out, num_spans=1, max_answer_length=reader.config.max_answer_length)
    return spans[0].text if spans else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", type=Path, default=Path("runs/reader/best"))
    ap.add_argument("--index", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--passages", default="20,100")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    data = EmbeddedData()
    reader = Reader.load(args.reader if args.reader.is_dir() else data.model_dir, args.device)
    corpus = load_corpus(args.index / "passages.tsv")
    bm25 = BM25Index.load(args.index / "bm25", corpus=corpus)
    qs = data.load_qa("nq-test", limit=args.questions).questions
    sizes = [int(x) for x in args.passages.split(",")]
    top = bm25.search(qs, max(sizes))
    rows = []
    reader.read(qs[:1], [[(corpus.titles[r], corpus.texts[r]) for r in top.rows[0, :8]]])  # warm-up
    for n in sizes:
        pss = [[(corpus.titles[r], corpus.texts[r]) for r in top.rows[i, :n] if r >= 0] for i in range(len(qs))]
        ours, ref = [], []
        for q, ps in zip(qs, pss):  # alternate the two per question: same machine state for both
            t0 = time.perf_counter()
            reader.read([q], [ps], args.batch_size)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_reference(reader, q, ps)
            ref.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reader.read(qs, pss, args.batch_size)
        batched = time.perf_counter() - t0
        rows.append({"passages": n, "questions": len(qs),
                     "densepr_ms_per_question": round(1000 * statistics.median(ours), 1),
                     "reference_ms_per_question": round(1000 * statistics.median(ref), 1),
                     "speedup": round(statistics.median(ref) / statistics.median(ours), 2),
                     "densepr_batched_questions_per_s": round(len(qs) / batched, 2),
                     "densepr_passages_per_s": round(len(qs) * n / batched, 1)})  # fmt: skip
    print(f"reader {reader.name} on {args.device}")
    print(f"{'passages':>8} {'densepr ms/q':>13} {'HF recipe ms/q':>15} {'speed-up':>9} {'batched q/s':>12} {'passages/s':>11}")
    for r in rows:
        print(f"{r['passages']:>8} {r['densepr_ms_per_question']:>13} {r['reference_ms_per_question']:>15} "
              f"{r['speedup']:>8}x {r['densepr_batched_questions_per_s']:>12} {r['densepr_passages_per_s']:>11}")  # fmt: skip
    name = "reader-speed.json" if args.device == "cpu" else f"reader-speed-{args.device.split(':')[0]}.json"
    write_json(RESULTS / name, {"command": "python benchmarks/reader_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                                "machine": machine_info(), "device": args.device, "reader": reader.name,
                                "max_length": reader.config.max_length, "rows": rows})  # fmt: skip
    print(f"written to {RESULTS / name}")


if __name__ == "__main__":
    main()
