"""Is BM25's fast stemmer Lucene's, word for word, and how much faster is it?

densepr stems with Snowball's C "porter" (PyStemmer) and sends the words where Martin Porter's C
version (which Lucene's PorterStemmer ports) departs from it to NLTK's port of that version
(:func:`densepr.retrieve.bm25_analyzer.martin_porter`). This compares the analyzer's stemmer with
NLTK's alone on every distinct lower-cased word (stopwords aside) of the passage stores given, and
times both, plus Snowball alone, on the same words.

    python benchmarks/retrieval/stemmer_parity.py STORE [STORE ...] [--limit N]

STORE: a passage store (``densepr index bm25`` writes one beside its index; the embedded run's is
``runs/<run>/store``). Writes ``benchmarks/retrieval/results/stemmer-parity.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def vocabulary(stores: list[Path], limit: int) -> list[str]:
    from densepr.data.store import open_store
    from densepr.retrieve.bm25_analyzer import LUCENE_STOPWORDS, words

    seen: set[str] = set()
    for path in stores:
        s = open_store(path, verify="none")
        n = min(limit, len(s))
        for lo in range(0, n, 50_000):
            hi = min(n, lo + 50_000)
            for t, x in zip(s.titles[lo:hi], s.texts[lo:hi]):
                seen.update(words(f"{t} {x}"))
    return sorted({w.replace("\u0130", "i").lower() for w in seen if w.strip("_")} - LUCENE_STOPWORDS)


def timed(fn, ws: list[str]) -> tuple[list[str], float]:
    t0 = time.perf_counter()
    out = [fn(w) for w in ws]
    return out, (time.perf_counter() - t0) / max(len(ws), 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stores", type=Path, nargs="+")
    ap.add_argument("--limit", type=int, default=1_000_000, help="passages read from each store (default 1,000,000)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stemmer-parity.json")
    args = ap.parse_args()
    import Stemmer
    from nltk.stem.porter import PorterStemmer

    from densepr.fileio.atomic import write_json
    from densepr.machine import machine_info
    from densepr.retrieve.bm25_analyzer import LuceneAnalyzer

    ws = vocabulary(args.stores, args.limit)
    nltk = PorterStemmer(mode=PorterStemmer.MARTIN_EXTENSIONS).stem
    snowball = Stemmer.Stemmer("porter")
    snowball.maxCacheSize = 0
    ours = LuceneAnalyzer("porter")._load_stemmer()
    ref, t_ref = timed(nltk, ws)
    got, t_ours = timed(ours, ws)
    raw, t_raw = timed(snowball.stemWord, ws)
    differ = [(w, a, b) for w, a, b in zip(ws, ref, got) if a != b]
    result = {
        "stores": [str(p) for p in args.stores], "passages_each": args.limit, "distinct_words": len(ws),
        "differ_from_nltk": len(differ), "examples": differ[:20],
        "snowball_alone_differs": sum(a != b for a, b in zip(ref, raw)),
        "us_per_word": {"nltk_martin": round(t_ref, 3), "densepr": round(t_ours, 3), "snowball_alone": round(t_raw, 3)},
        "speedup_vs_nltk": round(t_ref / t_ours, 1),
        "command": "python benchmarks/retrieval/stemmer_parity.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "machine": machine_info(),
    }  # fmt: skip
    print(f"{'stemmer':<16}{'us/word':>10}{'differ from NLTK':>20}")
    print(f"{'NLTK (Martin)':<16}{t_ref:>10.3f}{0:>20}")
    print(f"{'densepr':<16}{t_ours:>10.3f}{len(differ):>20}")
    print(f"{'Snowball alone':<16}{t_raw:>10.3f}{result['snowball_alone_differs']:>20}")
    print(f"{len(ws):,} distinct words; densepr {result['speedup_vs_nltk']}x NLTK")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
