"""Is the index benchmark's synthetic data as easy or as hard as real embeddings for HNSW?

Builds the same HNSW (M=32, efConstruction=100, DPR's transform, one thread) over ~10k vectors
of each kind and reports recall@100 against exact search at two efSearch values: the real
passage vectors of a ``densepr reproduce`` run (held-out passages as queries) and the synthetic
generator of ``index_bench.py`` with and without its cluster structure.

    python benchmarks/retrieval/synthetic_check.py [--embeddings runs/ft-hn/embeddings]

Writes ``benchmarks/retrieval/results/index-synthetic-check.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import index_bench as ib
import numpy as np


def hnsw_recall(x: np.ndarray, q: np.ndarray) -> dict:
    from densepr.index.dense_build import hnsw_augment

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, exact = flat.search(q, 100)
    phi = float((x.astype(np.float64) ** 2).sum(1).max())
    h = faiss.IndexHNSWFlat(x.shape[1] + 1, 32)
    h.hnsw.efConstruction = 100
    t0 = time.perf_counter()
    h.add(hnsw_augment(x, phi))
    out = {"vectors": len(x), "dim": x.shape[1], "build_s": round(time.perf_counter() - t0, 1)}
    qq = np.hstack([q, np.zeros((len(q), 1), np.float32)])
    for ef in (128, 512):
        h.hnsw.efSearch = ef
        _, ix = h.search(qq, 100)
        out[f"recall_at_100_ef{ef}"] = round(ib.recall(ix, exact), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", type=Path, default=Path("runs/ft-hn/embeddings"))
    args = ap.parse_args()
    from densepr.fileio.atomic import write_json
    from densepr.index.embeddings import Embeddings

    faiss.omp_set_num_threads(1)
    emb = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in Embeddings.open(args.embeddings).parts()])
    perm = np.random.default_rng(0).permutation(len(emb))
    rows = {f"real passage vectors ({args.embeddings})": hnsw_recall(emb[perm[200:]], emb[perm[:200]])}
    for clusters in (0, 1000):
        with tempfile.TemporaryDirectory() as d:
            q = ib.write_synthetic(Path(d) / "e", 10_000, emb.shape[1], 200, clusters=clusters)
            x = np.concatenate([np.load(f, allow_pickle=False) for f in sorted((Path(d) / "e").glob("part-*.npy"))])
        rows[f"synthetic, {clusters} clusters" if clusters else "synthetic, one Gaussian"] = hnsw_recall(x, q)
    for name, r in rows.items():
        print(f"{name:60s} recall@100 efSearch 128: {r['recall_at_100_ef128']:.3f}  512: {r['recall_at_100_ef512']:.3f}")
    write_json(ib.RESULTS / "index-synthetic-check.json", {"command": "python benchmarks/retrieval/synthetic_check.py", "date": time.strftime("%Y-%m-%d"), "rows": rows})


if __name__ == "__main__":
    main()
