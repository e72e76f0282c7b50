"""BM25 at scale: the pruned (MaxScore) top-k against the exhaustive scorer, and loading an index
with and without the compact vocabulary.

* Queries/s of the ``numba`` backend (bm25s: every passage scored, then a top-k over all of them)
  and the ``pruned`` one (:mod:`densepr.retrieve.bm25_topk`), batched (one ``search`` call) and one
  question at a time, top-10 and top-100, on NQ-test questions (embedded benchmark); both must
  return identical rows and scores (checked). ``--numpy N`` also times bm25s's numpy scorer on N.
* In fresh processes: ``BM25Index.load`` seconds and RSS (before any query; anonymous memory and
  mapped file pages, which the kernel can drop, apart) with the compact
  vocabulary, and through bm25s's JSON dict (what every load did before it: a copy of the index
  without the compact files, loaded as from a read-only directory), and the one-off upgrade of
  such a copy (first load of a writable directory).

    python benchmarks/scale/synthetic_corpus.py --passages 200000 --output DATA/passages.tsv
    densepr index bm25 DATA/passages.tsv DATA/bm25 --workers 1
    python benchmarks/retrieval/bm25_topk.py DATA/bm25 [--questions 3610] [--numpy 300]

Writes ``benchmarks/retrieval/results/bm25-topk-<passages>.json``. The machine may be shared: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"

_LOAD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import densepr.retrieve.bm25 as bm25
mode, path = sys.argv[1], sys.argv[2]
if mode == "dict":  # as from a read-only directory: the compact vocabulary cannot be written
    bm25.add_compact_vocab = lambda directory, manifest, model: (manifest, False)
t1 = time.perf_counter()
index = bm25.BM25Index.load(path)
t2 = time.perf_counter()
st = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssAnon", "RssFile"))}
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "rss_bytes": st["VmRSS"], "rss_anon_bytes": st["RssAnon"], "rss_file_bytes": st["RssFile"],
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "vocab": type(index.model.vocab_dict).__name__}))
"""


def load_in_fresh_process(mode: str, path: Path, repeats: int = 3) -> dict:
    """The fastest of ``repeats`` loads, each in a new interpreter (warm page cache after the first)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _LOAD, mode, str(path)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["load_s"])


def legacy_copy(index: Path, to: Path) -> Path:
    """A copy of ``index`` as saved before the compact vocabulary: without its files, nor their manifest entries."""
    from densepr.retrieve.bm25_files import COMPACT_FILES

    shutil.copytree(index, to, copy_function=os.link)  # hard links: nothing is written into them (9 GB at 21M)
    manifest = json.loads((to / "manifest.json").read_text())
    for f in COMPACT_FILES:
        (to / f).unlink(missing_ok=True)
        manifest["files"].pop(f, None)
    (to / "manifest.json").unlink()  # a link to the original's: written anew
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def qps(index, questions: list[str], k: int, backend: str, one_at_a_time: bool):
    index.search(questions[:8], k=k, backend=backend)  # compiled code loaded, buffers allocated
    t0 = time.perf_counter()
    if one_at_a_time:
        parts = [index.search([q], k=k, backend=backend) for q in questions]
        rows, scores = np.concatenate([p.rows for p in parts]), np.concatenate([p.scores for p in parts])
    else:
        res = index.search(questions, k=k, backend=backend)
        rows, scores = res.rows, res.scores
    return len(questions) / (time.perf_counter() - t0), rows, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", type=Path, help="a BM25 index directory (densepr index bm25)")
    ap.add_argument("--questions", type=int, default=3610, help="NQ-test questions to run (3,610 in all)")
    ap.add_argument("--numpy", type=int, default=0, help="also time the numpy backend on this many questions")
    ap.add_argument("--out", type=Path, help="JSON output (default: benchmarks/retrieval/results/bm25-topk-<passages>.json)")
    args = ap.parse_args()

    from densepr.data import EmbeddedData
    from densepr.retrieve.bm25 import BM25Index, numba_installed

    if not numba_installed():
        sys.exit("needs numba (pip install 'densepr[fast]')")
    questions = EmbeddedData().load_qa("nq-test").questions[: args.questions]
    index = BM25Index.load(args.index)
    s = index.model.scores
    info = {"passages": index.num_docs, "terms": len(s["indptr"]) - 1, "postings": int(s["indptr"][-1]), "questions": len(questions)}
    print(f"{info['passages']:,} passages, {info['terms']:,} terms, {info['postings']:,} postings; {len(questions)} NQ-test questions")
    rows = []
    for k in (10, 100):
        for one in (False, True):
            r = {"k": k, "mode": "one at a time" if one else "batched"}
            want = None
            for backend in ("numba", "pruned"):
                q, got_rows, got_scores = qps(index, questions, k, backend, one)
                r[backend] = round(q, 1)
                if want is None:
                    want = (got_rows, got_scores)
                elif not (np.array_equal(want[0], got_rows) and np.array_equal(want[1], got_scores)):
                    sys.exit(f"the pruned backend differs from numba at k={k} ({r['mode']})")
            if args.numpy and not one:
                r["numpy"] = round(qps(index, questions[: args.numpy], k, "numpy", False)[0], 1)
            r["pruned/numba"] = round(r["pruned"] / r["numba"], 2)
            rows.append(r)
            print(f"top-{k:<3} {r['mode']:<14} numba {r['numba']:>8.1f} q/s   pruned {r['pruned']:>8.1f} q/s   "
                  f"x{r['pruned/numba']:.2f}" + (f"   numpy {r['numpy']:.1f} q/s" if "numpy" in r else ""))  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.index.parent, prefix=".bm25-topk-bench-") as tmp:
        legacy = legacy_copy(args.index, Path(tmp) / "legacy")
        loads = {"compact": load_in_fresh_process("compact", args.index), "dict": load_in_fresh_process("dict", legacy)}
        t0 = time.perf_counter()
        BM25Index.load(legacy)  # gains the compact vocabulary
        loads["upgrade_s"] = round(time.perf_counter() - t0, 3)
    for name in ("compact", "dict"):
        x = loads[name]
        print(f"load ({name:<7}): {x['load_s']:.3f} s, RSS {x['rss_bytes'] / 2**20:.0f} MiB after load: {x['rss_anon_bytes'] / 2**20:.0f} "
              f"MiB anonymous, {x['rss_file_bytes'] / 2**20:.0f} MiB mapped file pages (import {x['import_s']:.2f} s)")
    print(f"first load of an old-format index (builds the compact vocabulary): {loads['upgrade_s']:.2f} s")
    out = args.out or RESULTS / f"bm25-topk-{info['passages']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "qps": rows, "load": loads}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
