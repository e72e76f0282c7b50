"""Re-ranking's reads at scale: rows through the memory map (page faults) vs ``densepr.index.rows.RowReader``.

A compressed index with ``--rerank R`` re-scores each query's k x R candidates with their exact
vectors from the embeddings on disk. At DPR's 21M passages those are 30 GiB (768-d float16), more
than RAM, so most candidate rows are read from disk. This times, on an index ``scale.py`` built
(``<d>/dense``, ``ivf-pq`` with re-ranking), side by side and alternating:

* ``mmap``: the rows gathered from the memory-mapped parts (``RowReader(..., pread=False)``, what re-ranking did before);
* ``pread``: :class:`~densepr.index.rows.RowReader` (one ``pread`` a row, several threads; now).

Each arm gets fresh queries (rows of the corpus plus noise, a new seed per repetition, so no arm
reads rows another already brought into a cache) and the page cache dropped first (needs root:
``/proc/sys/vm/drop_caches``). Measured: top-100 one query at a time (p50, p95), and top-1000
batched (what a hybrid or RRF fusion asks each engine for) per query.

    python benchmarks/scale/rerank_reads.py DIR/n21015324 [--queries 20] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "rerank-reads.json"


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("index_dir", type=Path, help="a scale.py size directory holding dense/ (ivf-pq, rerank > 1)")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from common import machine_info

    from densepr.index.dense import DenseIndex
    from densepr.index.rows import RowReader

    index = DenseIndex.load(args.index_dir / "dense")
    reader = index._exact
    if reader is None:
        raise SystemExit(f"{args.index_dir / 'dense'}: not built with --rerank; nothing is read from disk")
    readers = {"mmap": RowReader(reader.parts, pread=False), "pread": RowReader(reader.parts, pread=True)}
    arms: dict[str, list[dict]] = {"mmap": [], "pread": []}
    for rep in range(args.reps):
        for arm in arms:
            rng = np.random.default_rng(10_000 + 2 * rep + (arm == "pread"))
            rows = np.sort(rng.choice(len(reader), args.queries, replace=False))
            q = reader.take(rows) + 0.05 * rng.standard_normal((args.queries, index.dim)).astype(np.float32)
            index._exact = readers[arm]
            drop_caches()
            lat = []
            for v in q:
                t0 = time.perf_counter()
                index.search(v[None], 100)
                lat.append(time.perf_counter() - t0)
            drop_caches()
            t0 = time.perf_counter()
            index.search(q, 1000)
            deep = (time.perf_counter() - t0) / len(q)
            arms[arm].append({"top100_p50_ms": round(1000 * float(np.median(lat)), 1), "top100_p95_ms": round(1000 * float(np.percentile(lat, 95)), 1),
                              "top1000_batched_ms_per_query": round(1000 * deep, 1)})  # fmt: skip
            print(f"{arm:>5} rep {rep}: {arms[arm][-1]}", flush=True)
    med = {a: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for a, rs in arms.items()}
    out = {"index": str(args.index_dir), "passages": len(reader), "params": index.manifest.get("params"), "queries": args.queries,
           "reps": arms, "median": med, "speedup": {k: round(med["mmap"][k] / med["pread"][k], 1) for k in med["mmap"]},
           "machine": machine_info(), "command": f"python benchmarks/scale/rerank_reads.py DIR --queries {args.queries} --reps {args.reps}",
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(out, indent=1))
    print(f"\n{'':>22} {'mmap (before)':>14} {'pread (now)':>12} {'speed-up':>9}")
    for k in med["mmap"]:
        print(f"{k:>22} {med['mmap'][k]:>14} {med['pread'][k]:>12} {out['speedup'][k]:>8}x")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
