"""The passage store against the in-memory corpus (issue 34, deliverable 1): RSS per passage right
after opening, open time and row access time, at two corpus sizes.

Corpora: N synthetic 100-word passages (DPR's TSV layout), words drawn at the embedded corpus's word
frequencies (~/.cache/densepr/embedded, `densepr data fetch`), seeded. Every measurement runs in a
fresh process, so its RSS is its own: RSS (VmRSS) just before and just after ``load_corpus(tsv)`` or
``open_store(store, tsv)``, their difference divided by N; then 20,000 random rows read (``corpus[r]``,
id, title and text). The store is built once per size beforehand (its build time and peak RSS are
reported too). Page cache is not RSS: mapped pages count only once touched.

    python benchmarks/scale/passage_store.py [--sizes 20000 200000] [--work /tmp/densepr-store-bench]

Prints a table; writes benchmarks/scale/results/passage-store.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's RSS now (``VmHWM``: its peak; unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    """``n`` 100-word passages with words at the embedded corpus's frequencies, written as DPR's TSV."""
    from densepr.data import EmbeddedData, load_wiki_summaries

    data = EmbeddedData()
    if not data.available:
        sys.exit(f"embedded corpus not fetched in {data.root}: run `densepr data fetch`")
    counts = Counter(w for t in load_wiki_summaries(data.root / "corpus/summaries_en-us.json").texts for w in t.split())
    words = np.array(list(counts))
    p = np.fromiter(counts.values(), dtype=np.float64)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("id\ttext\ttitle\n")
        for lo in range(0, n, 10_000):
            m = min(10_000, n - lo)
            draws = words[rng.choice(len(words), size=(m, 102), p=p / p.sum())]
            for i, row in enumerate(draws):
                text = " ".join(row[2:]).replace('"', "'")
                fh.write(f"{lo + i + 1}\t{text}\t{' '.join(row[:2]).replace(chr(34), chr(39))}\n")
    tmp.replace(path)


def measure(kind: str, tsv: Path, store: Path) -> dict:
    """In this (fresh) process: open the corpus one way, RSS and time; then random row reads."""
    from densepr.data.passages import load_corpus
    from densepr.data.store import open_store

    before = rss_bytes()
    t0 = time.perf_counter()
    corpus = load_corpus(tsv) if kind == "load_corpus" else open_store(store, tsv)
    open_s = time.perf_counter() - t0
    after = rss_bytes()
    rows = np.random.default_rng(1).integers(0, len(corpus), 20_000).tolist()
    t0 = time.perf_counter()
    for r in rows:
        corpus[r]
    access_us = (time.perf_counter() - t0) / len(rows) * 1e6
    ids = [corpus.ids[r] for r in rows[:2000]]
    t0 = time.perf_counter()
    for pid in ids:
        corpus.row(pid)
    row_us = (time.perf_counter() - t0) / len(ids) * 1e6
    return {"n": len(corpus), "open_s": round(open_s, 3), "rss_growth_bytes": after - before,
            "bytes_per_passage": round((after - before) / len(corpus), 1), "row_access_us": round(access_us, 2),
            "row_of_id_us": round(row_us, 2), "rss_after_access_mib": round(rss_bytes() / 2**20, 1)}  # fmt: skip


def build(tsv: Path, store: Path) -> dict:
    from densepr.data.store import build_store

    before = rss_bytes()  # the interpreter and libraries
    t0 = time.perf_counter()
    build_store(tsv, store)
    return {"build_s": round(time.perf_counter() - t0, 2), "rss_before_build_mib": round(before / 2**20, 1), "build_peak_rss_mib": round(rss_bytes("VmHWM") / 2**20, 1),
            "store_bytes": sum(p.stat().st_size for p in store.iterdir())}  # fmt: skip


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--work", default="/tmp/densepr-store-bench")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, tsv, store = args.child
        res = build(Path(tsv), Path(store)) if what == "build" else measure(what, Path(tsv), Path(store))
        print(json.dumps(res))
        return
    from densepr.machine import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        tsv, store = work / f"passages-{n}.tsv", work / f"store-{n}"
        if not tsv.is_file():
            make_corpus(tsv, n)
        b = child("build", str(tsv), str(store))
        rows.append({"n": n, "tsv_bytes": tsv.stat().st_size, **b,
                     "load_corpus": child("load_corpus", str(tsv), str(store)), "store": child("store", str(tsv), str(store))})  # fmt: skip
    slopes = {}
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        for k in ("load_corpus", "store"):
            slopes[k] = round((hi[k]["rss_growth_bytes"] - lo[k]["rss_growth_bytes"]) / (hi["n"] - lo["n"]), 1)
    print(f"{'N':>8} {'how':>12} {'open s':>8} {'RSS B/psg':>10} {'row us':>7} {'row(id) us':>10}   store: build s, RSS MiB before -> peak, MiB on disk")
    for r in rows:
        for k in ("load_corpus", "store"):
            m = r[k]
            extra = f"   {r['build_s']}, {r['rss_before_build_mib']} -> {r['build_peak_rss_mib']}, {r['store_bytes'] / 2**20:.1f}" if k == "store" else ""
            print(f"{r['n']:>8} {k:>12} {m['open_s']:>8.3f} {m['bytes_per_passage']:>10.1f} {m['row_access_us']:>7.2f} {m['row_of_id_us']:>10.2f}{extra}")
    if slopes:
        print(f"RSS growth per added passage ({rows[0]['n']} -> {rows[-1]['n']}): " + ", ".join(f"{k} {v} B" for k, v in slopes.items()))
    RESULTS.mkdir(exist_ok=True)
    out = {"command": "python benchmarks/scale/passage_store.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
           "rows": rows, "rss_bytes_per_added_passage": slopes}  # fmt: skip
    (RESULTS / "passage-store.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS / 'passage-store.json'}")


if __name__ == "__main__":
    main()
