"""BM25 as Lucene/Anserini score it (the paper's sparse baseline), on bm25s.

* Scoring: Lucene 8's BM25 (``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, no ``(k1 + 1)``
  factor), k1 = 0.9, b = 0.4: Anserini's and Pyserini's defaults, which DPR's baseline used.
* Analysis: an approximation of Anserini's ``DefaultEnglishAnalyzer``: Unicode word tokens
  (UAX#29-like: ``U.S``, ``don't`` and ``3,000`` stay whole), English possessive ``'s``
  removed, lower-cased, Lucene's 33 English stopwords dropped, Porter-stemmed.
* Indexed field: ``title + " " + text`` (Pyserini's DPR index stores ``title\\ntext``).

On disk an index is bm25s's files (``*.index.npy`` sparse matrix, loadable memory-mapped,
``vocab.index.json``, ``params.index.json``) plus densepr's ``manifest.json`` (parameters,
analyzer, corpus fingerprint, file sizes and checksums).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import bm25s
import numpy as np
import regex
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from .data.passages import Corpus, check_corpus
from .fileio import read_manifest, write_manifest
from .results import SearchResult

KIND = "bm25-index"
LUCENE_STOPWORDS = frozenset(STOPWORDS_EN)  # Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (33 words)
assert len(LUCENE_STOPWORDS) == 33

# Runs of letters/digits/marks/underscore, joined by a mid-word character between two letters
# (apostrophe, period, colon) or between two digits (period, comma, semicolon, apostrophe).
_WORD = regex.compile(
    r"[\p{L}\p{M}\p{N}_]+(?:(?:(?<=[\p{L}\p{M}])['\u2019.:](?=[\p{L}\p{M}])|(?<=\p{N})[.,;'\u2019](?=\p{N}))[\p{L}\p{M}\p{N}_]+)*"
)


class LuceneAnalyzer:
    """Text to BM25 terms, approximating Anserini's DefaultEnglishAnalyzer (see module docstring)."""

    name = "lucene-english-porter-v1"

    def __init__(self, stemmer: str | None = "porter", stopwords: frozenset[str] = LUCENE_STOPWORDS) -> None:
        self.stopwords = stopwords
        self._stemmer = Stemmer.Stemmer(stemmer) if stemmer else None

    def __call__(self, text: str) -> list[str]:
        terms = []
        for w in _WORD.findall(text):
            w = w.lower()
            if w.endswith(("'s", "\u2019s")):  # Lucene's EnglishPossessiveFilter
                w = w[:-2]
            if w and w not in self.stopwords:
                terms.append(w)
        return self._stemmer.stemWords(terms) if self._stemmer else terms

    def many(self, texts: Sequence[str]) -> list[list[str]]:
        return [self(t) for t in texts]


class BM25Index:
    """A Lucene-style BM25 index over a :class:`Corpus` (rows are corpus row numbers)."""

    def __init__(self, model: bm25s.BM25, analyzer: LuceneAnalyzer, manifest: dict) -> None:
        self.model, self.analyzer, self.manifest = model, analyzer, manifest

    @property
    def k1(self) -> float:
        return float(self.manifest["k1"])

    @property
    def b(self) -> float:
        return float(self.manifest["b"])

    @classmethod
    def build(cls, corpus: Corpus, k1: float = 0.9, b: float = 0.4, stemmer: str | None = "porter") -> BM25Index:
        """Analyse ``title + " " + text`` of every passage and build the sparse score matrix."""
        analyzer = LuceneAnalyzer(stemmer)
        docs = [analyzer(f"{t} {x}") for t, x in zip(corpus.titles, corpus.texts)]
        model = bm25s.BM25(k1=k1, b=b, method="lucene")
        model.index(docs, show_progress=False)
        manifest = {"k1": k1, "b": b, "method": "lucene", "analyzer": analyzer.name, "stemmer": stemmer,
                    "fields": "title text", "corpus": corpus.fingerprint()}  # fmt: skip
        return cls(model, analyzer, manifest)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write bm25s's files and the manifest (last, so a complete index is one with a manifest)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "manifest.json").unlink(missing_ok=True)
        self.model.save(directory, show_progress=False)
        files = sorted(p.name for p in directory.iterdir() if p.name.endswith(".index.npy") or p.name.endswith(".index.json"))
        meta = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "files")}
        self.manifest = write_manifest(directory, KIND, files, **meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True, corpus: Corpus | None = None) -> BM25Index:
        """Load an index (memory-mapped by default); checks sizes and, if given, the corpus."""
        manifest = read_manifest(directory, KIND)
        if corpus is not None:
            check_corpus(manifest, corpus, f"BM25 index {directory}")
        model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False, verbosity=0)
        return cls(model, LuceneAnalyzer(manifest.get("stemmer")), manifest)

    def search(self, queries: Sequence[str], k: int = 100, batch_size: int = 4096) -> SearchResult:
        """Top-k passages per query. Passages matching no query term are not returned (as in Lucene)."""
        n_docs = int(self.manifest["corpus"]["count"])
        k_eff = min(k, n_docs)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), batch_size):
            toks = self.analyzer.many(queries[start : start + batch_size])
            docs, sc = self.model.retrieve(toks, k=k_eff, show_progress=False, n_threads=0)
            matched = sc > 0
            rows[start : start + len(toks), :k_eff] = np.where(matched, docs, -1)
            scores[start : start + len(toks), :k_eff] = np.where(matched, sc, 0.0)
        return SearchResult(rows, scores)
