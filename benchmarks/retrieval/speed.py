"""Speed of the retrieval stages against the tools densepr replaces, side by side in one run.

* passage encoding: densepr's Encoder vs sentence-transformers' ``encode`` (same model,
  same ``title [SEP] text`` inputs, same batch size), alternating rounds;
* BM25 queries/s: densepr (bm25s, Lucene scoring) vs rank_bm25's BM25Okapi with the same
  tokens, same corpus;
* exact FAISS search queries/s at batch 1 and 256, and as a fraction of this machine's
  measured matrix-multiply rate.

Prints a table and writes ``benchmarks/retrieval/results/speed.json``. Needs the embedded data
(``densepr data fetch``) and the ``compare`` extra (``pip install -e .[compare]``).

    python benchmarks/retrieval/speed.py [--passages 1024] [--rounds 3] [--bm25-queries 200]
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

from densepr.data import EmbeddedData, load_wiki_summaries
from densepr.fileio.atomic import write_json
from densepr.index.dense import DenseIndex
from densepr.models.encoder import Encoder
from densepr.retrieve.bm25 import BM25Index

RESULTS = Path(__file__).parent / "results" / "speed.json"


def timed(fn, *a, **k) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return time.perf_counter() - t0, out


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """This machine's float32 GEMM rate through torch (the ceiling for exact search and encoding)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t, _ = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n**3 * reps / t / 1e9


def bench_encoding(data: EmbeddedData, n: int, batch: int, rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    corpus = load_wiki_summaries(data.summaries)
    rows = np.random.default_rng(0).choice(len(corpus), n, replace=False)
    titles, texts = [corpus.titles[i] for i in rows], [corpus.texts[i] for i in rows]
    joined = [f"{t} [SEP] {x}" for t, x in zip(titles, texts)]
    ours = Encoder.load(data.model_dir, device="cpu")
    st = SentenceTransformer(str(data.model_dir), device="cpu")
    ours.encode_passages(titles[:batch], texts[:batch], batch)  # warm-up both
    st.encode(joined[:batch], batch_size=batch)
    t_ours, t_st = [], []
    for _ in range(rounds):  # alternate, so drift in machine speed hits both
        t, a = timed(ours.encode_passages, titles, texts, batch)
        t_ours.append(t)
        t, b = timed(st.encode, joined, batch_size=batch)
        t_st.append(t)
    cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    ours_ps, st_ps = n / statistics.median(t_ours), n / statistics.median(t_st)
    return {"passages": n, "batch_size": batch, "rounds": rounds, "densepr_passages_per_s": round(ours_ps, 1),
            "sentence_transformers_passages_per_s": round(st_ps, 1), "ratio": round(ours_ps / st_ps, 3),
            "min_cosine": round(cos, 6)}  # fmt: skip


def bench_bm25(data: EmbeddedData, n_rank_bm25: int) -> dict:
    from rank_bm25 import BM25Okapi

    corpus = load_wiki_summaries(data.summaries)
    questions = data.load_qa("nq-test").questions
    t_build, index = timed(BM25Index.build, corpus)
    index.search(questions[:10], 100)
    t_ours, _ = timed(index.search, questions, 100)
    docs = index.analyzer.many([f"{t} {x}" for t, x in zip(corpus.titles, corpus.texts)])
    t_build_rb, rb = timed(BM25Okapi, docs, k1=0.9, b=0.4)
    sample = questions[:n_rank_bm25]

    def rank_bm25_search():
        for q in sample:
            scores = rb.get_scores(index.analyzer(q))
            np.argpartition(-scores, 100)[:100]

    t_rb, _ = timed(rank_bm25_search)
    ours_qps, rb_qps = len(questions) / t_ours, len(sample) / t_rb
    return {"passages": len(corpus), "densepr_queries": len(questions), "rank_bm25_queries": len(sample), "k": 100,
            "densepr_build_s": round(t_build, 2), "rank_bm25_build_s": round(t_build_rb, 2),
            "densepr_queries_per_s": round(ours_qps, 1), "rank_bm25_queries_per_s": round(rb_qps, 1),
            "ratio": round(ours_qps / rb_qps, 1)}  # fmt: skip


def bench_faiss(data: EmbeddedData, index_dir: Path | None, gflops: float) -> dict:
    """Exact inner-product search over the embedded passages (real vectors when an index exists)."""
    if index_dir is not None and (index_dir / "manifest.json").is_file():
        index = DenseIndex.load(index_dir)
        source = str(index_dir)
    else:
        rng = np.random.default_rng(0)
        vecs = rng.standard_normal((10033, 384)).astype(np.float32)
        import faiss

        flat = faiss.IndexFlatIP(384)
        flat.add(vecs)
        index = DenseIndex.from_faiss(flat, [str(i) for i in range(len(vecs))])
        source = "random 10033 x 384"
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((4096, index.dim)).astype(np.float32)
    out = {"index": source, "vectors": len(index), "dim": index.dim, "k": 100, "machine_matmul_gflops": round(gflops, 1)}
    for batch in (1, 256):
        n = 512 if batch == 1 else 4096
        index.search(queries[:batch], 100, batch_size=batch)
        t, _ = timed(index.search, queries[:n], 100, batch_size=batch)
        qps = n / t
        out[f"queries_per_s_batch{batch}"] = round(qps, 1)
        # Exact search is a [batch, dim] x [dim, N] product: 2 * N * dim flops per query.
        out[f"gflops_batch{batch}"] = round(qps * 2 * len(index) * index.dim / 1e9, 1)
        out[f"fraction_of_matmul_batch{batch}"] = round(qps * 2 * len(index) * index.dim / 1e9 / gflops, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bm25-queries", type=int, default=200, help="queries timed for rank_bm25 (it is slow)")
    ap.add_argument("--index", type=Path, default=Path("runs/embedded/dense"))
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    data = EmbeddedData()
    torch.set_num_threads(torch.get_num_threads())
    gflops = matmul_gflops()
    results = {
        "command": "python benchmarks/retrieval/speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "encoding": bench_encoding(data, args.passages, args.batch_size, args.rounds),
        "bm25": bench_bm25(data, args.bm25_queries),
        "faiss_exact": bench_faiss(data, args.index, gflops),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"densepr speed ({results['machine']['cpu']}, {results['machine']['cores']} cores)")
    for col in ("stage", "densepr", "reference", "ratio"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    e, b, f = results["encoding"], results["bm25"], results["faiss_exact"]
    table.add_row(f"encode passages/s (batch {e['batch_size']})", f"{e['densepr_passages_per_s']:.1f}",
                  f"{e['sentence_transformers_passages_per_s']:.1f} (sentence-transformers)", f"{e['ratio']:.2f}x")
    table.add_row("BM25 queries/s (top-100)", f"{b['densepr_queries_per_s']:.0f}", f"{b['rank_bm25_queries_per_s']:.1f} (rank_bm25)", f"{b['ratio']:.0f}x")
    for batch in (1, 256):
        table.add_row(f"exact search queries/s, batch {batch}", f"{f[f'queries_per_s_batch{batch}']:.0f}",
                      f"{f['machine_matmul_gflops']:.0f} GFLOP/s GEMM", f"{f[f'fraction_of_matmul_batch{batch}']:.2f} of GEMM")  # fmt: skip
    Console(width=140).print(table)
    write_json(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
