"""Reader latency and throughput: reading 20 and 100 passages per question, side by side with
Hugging Face's own DPR reader recipe in the same run.

* densepr: ``Reader.read`` (windows length-sorted and batched, spans decoded per window);
* densepr-onnx: the same reader exported to ONNX Runtime (``densepr export-onnx READER OUT``), CPU only;
* reference: ``DPRReaderTokenizer(questions, titles, texts)`` padded per question, the same
  ``DPRReader`` weights, then ``decode_best_spans`` (what the transformers docs show).

"same answer": how often a system's answer (DPR's rule over all the passages) equals the recipe's
after SQuAD normalisation (the recipe truncates passages longer than the window; densepr reads them
in overlapping windows, so a few may differ).

Both read the same BM25 top-100 passages of the first NQ test questions over the embedded
corpus. Per-question latency is one question at a time (median over questions); throughput
is all questions in one call. Prints a table, writes ``benchmarks/reader/results/reader-speed[-DEVICE].json``.

    python benchmarks/reader/reader_speed.py [--reader runs/reader/best] [--questions 16] [--device cpu] [--no-onnx]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, shared by every group
from common import machine_info

from densepr.data import EmbeddedData, load_corpus
from densepr.evaluate.qa import exact_match
from densepr.fileio.atomic import write_json
from densepr.models.reader import Reader, best_reading
from densepr.retrieve.bm25 import BM25Index

RESULTS = Path(__file__).parent / "results"


def hf_reference(reader: Reader, question: str, passages: list[tuple[str, str]]) -> dict:
    """The transformers recipe: DPRReaderTokenizer -> DPRReader -> decode_best_spans. Returns the answer,
    the passage it came from and its logits."""
    from transformers import DPRReaderTokenizerFast

    tok = hf_reference.tok = getattr(hf_reference, "tok", None) or DPRReaderTokenizerFast.from_pretrained(reader.name, trust_remote_code=False)
    enc = tok(questions=question, titles=[t for t, _ in passages], texts=[x for _, x in passages], padding=True,
              truncation=True, max_length=reader.config.max_length, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        out = reader.model(input_ids=enc["input_ids"].to(reader.device), attention_mask=enc["attention_mask"].to(reader.device))
    spans = tok.decode_best_spans(enc, out, num_spans=1, max_answer_length=reader.config.max_answer_length)
    if not spans:
        return {"text": "", "passage": None}
    s = spans[0]
    return {"text": s.text, "passage": s.doc_id, "relevance": round(float(s.relevance_score), 4), "span_score": round(float(s.span_score), 4)}


def truncated_by_recipe(reader: Reader, question: str, passages: list[tuple[str, str]]) -> list[int]:
    """The passages the recipe cut at the window (their tail unread); computed outside the timed call."""
    full = hf_reference.tok(questions=question, titles=[t for t, _ in passages], texts=[x for _, x in passages])["input_ids"]
    return [i for i, ids in enumerate(full) if len(ids) > reader.config.max_length]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reader", type=Path, default=Path("runs/reader/best"))
    ap.add_argument("--index", type=Path, default=Path("runs/embedded"))
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--passages", default="20,100")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=None, help="window size (default: the reader's own)")
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON to write (default: benchmarks/reader/results/reader-speed[-DEVICE].json)")
    ap.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the reader exported to ONNX Runtime (CPU; needs densepr[onnx])")
    args = ap.parse_args()

    data = EmbeddedData()
    reader = Reader.load(args.reader if args.reader.is_dir() else data.model_dir, args.device)
    if args.max_length:  # e.g. longer than every passage: neither system truncates or splits one
        reader.config.max_length = args.max_length
    corpus = load_corpus(args.index / "passages.tsv")
    bm25 = BM25Index.load(args.index / "bm25", corpus=corpus)
    qs = data.load_qa("nq-test", limit=args.questions).questions
    sizes = [int(x) for x in args.passages.split(",")]
    top = bm25.search(qs, max(sizes))
    systems = {"densepr": reader}
    with tempfile.TemporaryDirectory(prefix="densepr-reader-onnx-") as tmp:
        if args.onnx and args.device == "cpu":  # the same weights on ONNX Runtime (`densepr export-onnx READER OUT`)
            from densepr.models.reader import export_reader

            export_reader(reader.name, Path(tmp) / "onnx")
            systems["densepr-onnx"] = Reader.load(Path(tmp) / "onnx", config=reader.config)
        rows = [bench_size(systems, reader, qs, top, corpus, n, args.batch_size) for n in sizes]
    print(f"reader {reader.name} on {args.device}, {len(qs)} NQ test questions, BM25 passages, windows of {reader.config.max_length} tokens")
    print(f"{'passages':>8} {'system':>13} {'ms/question':>12} {'HF recipe ms/q':>15} {'speed-up':>9} {'same answer':>12} {'batched q/s':>12}")
    for r in rows:
        for name, x in r["systems"].items():
            print(f"{r['passages']:>8} {name:>13} {x['ms_per_question']:>12} {r['reference_ms_per_question']:>15} "
                  f"{x['speedup']:>8}x {x['same_answer']:>12.2f} {x['batched_questions_per_s']:>12}")  # fmt: skip
    name = "reader-speed.json" if args.device == "cpu" else f"reader-speed-{args.device.split(':')[0]}.json"
    path = args.output or RESULTS / name
    write_json(path, {"command": "python benchmarks/reader/reader_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "onnx" and v not in (False, None))
                                + ("" if args.onnx else " --no-onnx"),
                                "machine": machine_info(), "device": args.device, "reader": reader.name,
                                "max_length": reader.config.max_length, "rows": rows})  # fmt: skip
    print(f"written to {path}")


def bench_size(systems: dict, reader: Reader, qs: list[str], top, corpus, n: int, batch_size: int) -> dict:
    """Each question read by every system and by the HF recipe in turn (same machine state for all):
    median ms per question, speed-up over the recipe, and how often the answer (DPR's rule over all
    ``n`` passages, SQuAD-normalised) equals the recipe's."""
    pss = [[(corpus.titles[r], corpus.texts[r]) for r in top.rows[i, :n] if r >= 0] for i in range(len(qs))]
    for sys_ in systems.values():  # warm-up
        sys_.read(qs[:1], [pss[0][:8]])
    hf_reference(reader, qs[0], pss[0][:8])
    times: dict[str, list[float]] = {k: [] for k in [*systems, "reference"]}
    answers: dict[str, list[str]] = {k: [] for k in times}
    picks: dict[str, list[dict]] = {k: [] for k in times}  # what each system chose, to explain a differing answer
    for q, ps in zip(qs, pss):
        for name, sys_ in systems.items():
            t0 = time.perf_counter()
            rd = sys_.read([q], [ps], batch_size)[0]
            times[name].append(time.perf_counter() - t0)
            b = best_reading(rd)
            answers[name].append(rd[b].text if b is not None else "")
            picks[name].append({"text": answers[name][-1], "passage": b, "relevance": round(rd[b].relevance, 4) if b is not None else None,
                                "span_score": round(rd[b].span_score, 4) if b is not None else None,
                                "relevances": [round(r.relevance, 4) for r in rd]})  # fmt: skip
        t0 = time.perf_counter()
        ref = hf_reference(reader, q, ps)
        times["reference"].append(time.perf_counter() - t0)
        answers["reference"].append(ref["text"])
        picks["reference"].append({**ref, "truncated": truncated_by_recipe(reader, q, ps)})
    ref_ms = statistics.median(times["reference"])
    out = {"passages": n, "questions": len(qs), "reference_ms_per_question": round(1000 * ref_ms, 1), "systems": {}}
    for name, sys_ in systems.items():
        t0 = time.perf_counter()
        sys_.read(qs, pss, batch_size)
        batched = time.perf_counter() - t0
        same = [exact_match(a, [b]) for a, b in zip(answers[name], answers["reference"])]
        out["systems"][name] = {"ms_per_question": round(1000 * statistics.median(times[name]), 1),
                                "speedup": round(ref_ms / statistics.median(times[name]), 2),
                                "same_answer": round(sum(same) / len(same), 3),
                                "batched_questions_per_s": round(len(qs) / batched, 2),
                                "batched_passages_per_s": round(len(qs) * n / batched, 1),
                                "differences": [_difference(q, picks[name][i], picks["reference"][i]) for i, q in enumerate(qs) if not same[i]]}  # fmt: skip
    return out


def _difference(question: str, ours: dict, ref: dict) -> dict:
    """A differing answer and why: the systems chose different passages (relevance logits, which
    densepr takes per passage as the max over its windows) or, in the same passage, different spans;
    ``in_truncated_passage``: the passage densepr answered from is one the recipe cut at the window."""
    ref_rel = ours["relevances"][ref["passage"]] if ref["passage"] is not None else None
    return {"question": question, "densepr": {k: ours[k] for k in ("text", "passage", "relevance", "span_score")},
            "recipe": {k: ref.get(k) for k in ("text", "passage", "relevance", "span_score")},
            "densepr_relevance_of_recipe_passage": ref_rel, "same_passage": ours["passage"] == ref["passage"],
            "in_truncated_passage": ours["passage"] in ref["truncated"], "recipe_truncated_passages": len(ref["truncated"])}


if __name__ == "__main__":
    main()
