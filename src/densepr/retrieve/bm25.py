"""BM25 as Lucene/Anserini score it (the paper's sparse baseline), on bm25s.

* Scoring: Lucene 8's BM25 (``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, no ``(k1 + 1)``
  factor), k1 = 0.9, b = 0.4: Anserini's and Pyserini's defaults, which DPR's baseline used.
  Document lengths are, by default, rounded as Lucene stores them (one byte per document,
  ``SmallFloat.intToByte4``: exact below 24 terms, then 4 significant bits); ``lengths="exact"``
  matches Anserini's ``-bm25.accurate`` instead.
* Analysis (:mod:`densepr.retrieve.bm25_analyzer`): Anserini's ``DefaultEnglishAnalyzer``: UAX#29 word segmentation (``U.S``, ``don't``,
  ``3,000`` stay whole; each CJK ideograph is a token), English possessive ``'s`` removed,
  lower-cased, Lucene's 33 English stopwords dropped, Lucene's Porter stemmer (Martin
  Porter's C version: words of 1-2 letters untouched, ``logi -> log``, ``bli -> ble``).
* Indexed field: ``title + " " + text`` (Pyserini's DPR index stores ``title\\ntext``).

``benchmarks/retrieval/bm25_lucene.py`` runs Anserini itself on the embedded benchmark and compares.

On disk an index is bm25s's files (``*.index.npy`` sparse matrix, loadable memory-mapped,
``vocab.index.json``, ``params.index.json``), the vocabulary as memory-mapped arrays
(:mod:`densepr.retrieve.bm25_vocab`: ``vocab_*``, what queries are looked up in, so loading never
builds a Python dict of the vocabulary), each term's largest score (``term_max.npy``, float32: the
bounds :mod:`densepr.retrieve.bm25_topk` prunes with) plus densepr's ``manifest.json`` (parameters,
analyzer, corpus fingerprint, file sizes and checksums). It is rebuilt beside the old one and
swapped in whole (``fileio.atomic_dir``), so a server that memory-maps the old files keeps
working; on load the files' checksums (sampled above 32 MiB) and the arrays' ranges are checked.

Modules: this one holds :class:`BM25Index` (save, load, search, shards); the analysis is in
:mod:`~densepr.retrieve.bm25_analyzer`, the chunked build and merge in :mod:`~densepr.retrieve.bm25_build`,
the files' names and checks in :mod:`~densepr.retrieve.bm25_files`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp

from densepr.data.passages import Corpus, check_corpus
from densepr.data.store import StreamedCorpus
from densepr.errors import DenseprError
from densepr.fileio.atomic import save_npy
from densepr.fileio.dirs import atomic_dir, check_target
from densepr.fileio.manifest import read_manifest, write_manifest
from densepr.fileio.pages import save_npy_released
from densepr.progress import progress_bar
from densepr.ranking import SearchResult
from densepr.retrieve import bm25_topk
from densepr.retrieve.bm25_analyzer import LuceneAnalyzer
from densepr.retrieve.bm25_build import build_model
from densepr.retrieve.bm25_files import (
    BM25S_FILES,
    COMPACT_FILES,
    KIND,
    OWN_FILES,
    TERM_MAX,
    add_compact_vocab,
    check_arrays,
    term_max_of,
)
from densepr.retrieve.bm25_kernels import use_densepr_cache
from densepr.retrieve.bm25_vocab import CompactVocab, write_vocab

BACKENDS = ("numpy", "numba", "pruned")
# The numba scorers' first call in a process loads them from the disk cache (~0.3 s here; ~9 s to
# compile the first time on a machine). numpy scores every passage in Python-driven array code, so its
# cost grows with queries x passages (~2,000 q/s at 10k passages, ~2.5 q/s at 1M): below this much
# work it answers sooner than loading them (a long-lived server loads them up front: BM25Index.warm).
NUMBA_WORTH_WORK = 10_000_000  # queries x passages; 1,000 queries at the embedded corpus's size
TIE_MARGIN = 16
# search()'s default compiled backend: pruned up to PRUNED_MAX_K, and up to PRUNED_LARGE_K from PRUNED_LARGE_N passages,
# else numba. Measured (benchmarks/retrieval/bm25_topk.py, NQ-test questions, synthetic passages), pruned/numba: top-10
# x1.1-1.8 at 200k-1M, x1.3-1.9 at 5M, x3.1-4.1 at 21M; top-100 x0.5-0.9 at 200k-1M, x1.02 at 5M, x2.4 at 21M (where
# the exhaustive scorer's array of one score per passage no longer fits the CPU caches).
PRUNED_MAX_K = 10
PRUNED_LARGE_K, PRUNED_LARGE_N = 100, 5_000_000


def pruned_pays(k: int, num_docs: int) -> bool:
    """Whether MaxScore (``pruned``) beats scoring every passage (``numba``) for a top-``k`` over ``num_docs``."""
    return k <= PRUNED_MAX_K or (k <= PRUNED_LARGE_K and num_docs >= PRUNED_LARGE_N)


PROGRESS_STEP = 64  # queries per batch while a bar shows: enough to keep numba's threads busy, ~2 s at 21M passages
_NUMBA_WARM = False


@lru_cache(maxsize=1)
def numba_installed() -> bool:
    """numba is importable (``densepr[fast]``). bm25s's compiled scorer is then cached on disk
    (``$NUMBA_CACHE_DIR``, else ``<densepr cache>/numba``): compiling takes seconds, loading under one."""
    try:
        import numba
        from bm25s.numba import retrieve_utils
    except ImportError:
        return False
    use_densepr_cache(numba)
    retrieve_utils._retrieve_internal_jitted_serial.enable_caching()  # bm25s compiles it uncached
    return True


def _numba_warm() -> None:
    global _NUMBA_WARM
    _NUMBA_WARM = True


class BM25Index:
    """A Lucene-style BM25 index over a :class:`Corpus` (rows are corpus row numbers)."""

    def __init__(self, model: bm25s.BM25, analyzer: LuceneAnalyzer, manifest: dict, term_max: np.ndarray | None = None) -> None:
        self.model, self.analyzer, self.manifest = model, analyzer, manifest
        self._scorers: dict[str, bm25s.BM25] = {}  # backend -> shallow copy of model (see _scorer)
        self._term_max = term_max

    @property
    def term_max(self) -> np.ndarray:
        """Each term's largest score (float32 [V]): the ``pruned`` backend's bounds. Saved with the
        index; computed on first use (one pass over the scores) for one loaded from a read-only
        directory written before it."""
        if self._term_max is None:
            self._term_max = term_max_of(self.model)
        return self._term_max

    def _term_ids(self, terms: list[str]) -> list[int]:
        """bm25s's ``get_tokens_ids`` (unknown terms left out, repeats kept), in one search of the compact vocabulary."""
        vocab = self.model.vocab_dict
        return vocab.ids(terms) if isinstance(vocab, CompactVocab) else self.model.get_tokens_ids(terms)

    @property
    def k1(self) -> float:
        return float(self.manifest["k1"])

    @property
    def b(self) -> float:
        return float(self.manifest["b"])

    @classmethod
    def build(
        cls, corpus: Corpus | StreamedCorpus, k1: float = 0.9, b: float = 0.4, stemmer: str | None = "porter", lengths: str = "lucene",
        workers: int = 1, chunk_passages: int = 50_000, workdir: str | os.PathLike[str] | None = None, progress: bool = False,
    ) -> BM25Index:
        """Analyse ``title + " " + text`` of every passage and build the sparse score matrix.

        ``corpus``: a :class:`Corpus`, a passage store, or a :class:`~densepr.data.store.StreamedCorpus`
        (a file read chunk by chunk, with at most ``workers + 1`` chunks in flight; its fingerprint is
        computed and a repeated id refused as it is read).

        Passages are analysed in chunks of ``chunk_passages`` rows, by ``workers`` processes
        (spawned; each reads its rows from the store, or receives only its chunk's texts), each
        writing its chunk's postings to ``workdir``; they are then merged into bm25s's CSC score
        matrix in files mapped from ``workdir`` (unlinked once mapped). The vocabulary order, and
        so every array, is the single-process build's (bm25s's, a Python ``set`` of the terms
        in order of first occurrence).

        Peak memory, this process: the corpus as given (a store: ~0; ``load_corpus``: ~1.1 KB per
        passage; streamed: ``(workers + 1) x chunk_passages`` passages' texts, one block of 16,384 for
        the fingerprint, and 8 B per passage, ~56 B while sorted at the end) + ~200 B per vocabulary
        term (the term dictionary, df, idf, offsets) + 24 B per passage (lengths, norms) + ~40 B per posting of one chunk (merge temporaries) + 12 B per
        posting of the corpus in mapped pages (indices, scores, term frequencies: page cache,
        which the kernel may write back and evict). Each worker: ~250 MB (Python, the analyzer)
        + one chunk's texts + ~50 B per term occurrence of one chunk. Measured at 200,000
        synthetic 100-word passages (415k terms, 11.1M postings, ``load_corpus``): 681 MiB in
        this process with 2 workers, 869 MiB with 1; today's single-process build took 1,511 MiB.
        Streamed from the file instead: 558 MiB with 2 workers, 736 MiB with 1; with chunks of 10,000
        this process peaks at 201 MiB while the chunks are analysed (195 MiB at 50,000 passages: it
        does not grow with the corpus; 374 MiB when given the corpus parsed), then 419 MiB merging.

        Args:
            lengths: ``lucene`` (document lengths rounded as Lucene stores them: Anserini's
                default) or ``exact`` (Anserini's ``-bm25.accurate``).
            workers: analysing processes (1: in this process).
            chunk_passages: passages per chunk.
            workdir: where the chunks' postings and the arrays are written while built (default: the temp directory).
        """
        return cls(*build_model(corpus, k1, b, stemmer, lengths, workers, chunk_passages, workdir, progress))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write bm25s's files, the compact vocabulary (24 B per term + its UTF-8 bytes; ~90 B per
        term more in memory while written), ``term_max.npy`` (4 B per term) and the manifest beside
        ``directory``, then swap them in (``fileio.atomic_dir``: a failed or disk-full save leaves
        the previous index as it was; a directory holding anything else than a BM25 index is refused)."""
        with atomic_dir(directory, KIND, (*OWN_FILES, *COMPACT_FILES)) as tmp:
            model = copy.copy(self.model)  # what bm25s writes, adapted below; self.model is left as it is
            if not isinstance(model.vocab_dict, dict):  # a loaded index's compact vocabulary: bm25s writes a dict
                model.vocab_dict = dict(model.vocab_dict.items())
            # mapped score arrays: bm25s's np.save would read them whole into this process's RSS, so written here
            mapped = {k: a for k in ("data", "indices") if isinstance(a := model.scores[k], np.memmap)}
            model.scores = {**model.scores, **{k: a[:0] for k, a in mapped.items()}}
            model.save(tmp, show_progress=False)
            for k, a in mapped.items():
                save_npy_released(tmp / BM25S_FILES[k], a)
            write_vocab(tmp, model.vocab_dict)
            save_npy(tmp / TERM_MAX, np.asarray(self.term_max, dtype=np.float32))
            files = sorted(p.name for p in tmp.iterdir() if p.name.endswith(".index.npy") or p.name.endswith(".index.json"))
            files += COMPACT_FILES
            meta = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "files")}
            self.manifest = write_manifest(tmp, KIND, files, **meta)

    @staticmethod
    def check_output(directory: str | os.PathLike[str]) -> None:
        """Refuse, before building, an output directory :meth:`save` would refuse."""
        check_target(directory, KIND, (*OWN_FILES, *COMPACT_FILES))

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = True, corpus: Corpus | None = None) -> BM25Index:
        """Load an index (memory-mapped by default).

        Checks: the files' sizes and checksums (``fileio.read_manifest``), the arrays' shapes and
        ranges (:func:`check_arrays`; arrays above 32 MiB on samples) and, if given, the corpus.

        Queries' terms are looked up in the compact vocabulary (``vocab_*`` files, mapped:
        :class:`~densepr.retrieve.bm25_vocab.CompactVocab` is ``model.vocab_dict``); bm25s's
        ``vocab.index.json`` is not read. An index saved before those files existed gains them
        here (built from its JSON once, listed in its manifest, with ``term_max.npy``) when its
        directory is writable; a read-only one is searched through the JSON's dict, as before
        (its ``term_max`` computed on first pruned search).
        """
        directory = Path(directory)
        manifest = read_manifest(directory, KIND)
        if manifest.get("analyzer") != LuceneAnalyzer.name:
            raise DenseprError(f"{directory}: built with analyzer {manifest.get('analyzer')!r}, this densepr uses {LuceneAnalyzer.name!r}; rebuild the index")
        if corpus is not None:
            check_corpus(manifest, corpus, f"BM25 index {directory}")
        compact = all(f in manifest.get("files", {}) for f in COMPACT_FILES)
        try:
            model = bm25s.BM25.load(str(directory), mmap=mmap, show_progress=False, verbosity=0, load_vocab=not compact)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise DenseprError(f"{directory}: bm25s cannot read it ({e}); rebuild the index") from None
        if not compact:
            check_arrays(directory, manifest, model)  # before building anything from it
            manifest, compact = add_compact_vocab(directory, manifest, model)
        term_max = None
        if compact:
            model.vocab_dict = CompactVocab(directory, "r" if mmap else None)
            model.unique_token_ids_set = range(len(model.vocab_dict))  # what bm25s's numba path filters ids with
            try:
                term_max = np.load(directory / TERM_MAX, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DenseprError(f"{directory / TERM_MAX}: unreadable ({e}); rebuild the index") from None
            check_arrays(directory, manifest, model, term_max=term_max)
        return cls(model, LuceneAnalyzer(manifest.get("stemmer")), manifest, term_max)

    def search(self, queries: Sequence[str], k: int = 100, batch_size: int = 4096, backend: str | None = None,
               show_progress: bool = False) -> SearchResult:  # fmt: skip
        """Top-k passages per query, best first, equal scores in passage order (as Lucene breaks ties).
        Passages matching no query term are not returned (as in Lucene).

        Args:
            backend: ``pruned`` (exact top-k with MaxScore pruning, :mod:`densepr.retrieve.bm25_topk`:
                scores only the passages that can still reach the top k), ``numba`` (bm25s's compiled
                scorer: every passage scored), both needing ``numba`` (compiled once per machine, loaded
                from the disk cache once per process), ``numpy`` (bm25s's), or None: when numba is installed
                and either already loaded here or the batch is large enough to pay for loading it
                (:data:`NUMBA_WORTH_WORK`: queries x passages), the faster of pruned and numba as measured
                (:func:`pruned_pays`), else numpy. All give the same passages and scores.
        """
        compiled = "pruned" if pruned_pays(k, self.num_docs) else "numba"
        worth = _NUMBA_WARM or len(queries) * self.num_docs >= NUMBA_WORTH_WORK
        backend = backend or (compiled if numba_installed() and worth else "numpy")
        if backend not in BACKENDS:
            raise DenseprError(f"BM25 backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if backend in ("numba", "pruned") and not numba_installed():
            raise DenseprError(f"the {backend} BM25 backend needs numba (pip install 'densepr[fast]')")
        n_docs = self.num_docs
        k_eff = min(k, n_docs)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        # a few more than k, so that passages tied at the k-th score are cut in passage order
        fetch = min(k_eff + TIE_MARGIN, n_docs)
        model = self._scorer(backend) if backend != "pruned" else self.model
        # a bar moves every PROGRESS_STEP queries (was: once per 4,096, so 1,000 queries showed 0 until done)
        batch_size = min(batch_size, PROGRESS_STEP) if show_progress else batch_size
        with progress_bar(len(queries), "BM25 search", show_progress, unit="q") as advance:
            for start in range(0, len(queries), batch_size):
                self._search_batch(queries[start : start + batch_size], start, k_eff, fetch, n_docs, model, backend, rows, scores)
                advance(min(batch_size, len(queries) - start))
        if backend != "numpy":
            _numba_warm()
        return SearchResult(rows, scores)

    def warm(self) -> None:
        """Load the compiled scorers now (when numba is installed), so that a long-lived process
        (``densepr serve``) answers every later query with them, one at a time too."""
        if numba_installed() and self.num_docs:
            vocab = self.model.vocab_dict
            term = vocab.term(0) if hasattr(vocab, "term") else next(iter(vocab), "")
            for backend in ("pruned", "numba"):  # both compiled scorers
                self.search([term], PRUNED_MAX_K + 1, backend=backend)

    def _search_batch(self, batch, start, k_eff, fetch, n_docs, model, backend, rows, scores) -> None:
        """Top-k of one batch of queries into ``rows``/``scores`` from row ``start``."""
        terms = self.analyzer.many(batch)
        ids = [self._term_ids(t) for t in terms]  # what bm25s scores (unknown terms dropped, repeats kept)
        if backend == "pruned":
            s = model.scores
            docs, sc = bm25_topk.topk(ids, k_eff, s["data"], s["indices"], s["indptr"], n_docs, self.term_max)
            matched = (docs >= 0) & (sc > 0)
            rows[start : start + len(terms), :k_eff] = np.where(matched, docs + self.offset, -1)
            scores[start : start + len(terms), :k_eff] = np.where(matched, sc, 0.0)
            return
        docs, sc = np.zeros((len(ids), fetch), dtype=np.int64), np.zeros((len(ids), fetch), dtype=np.float32)
        keep = [i for i, q in enumerate(ids) if q]  # queries with no indexed term match nothing
        if keep:
            d, x = model.retrieve([ids[i] for i in keep], k=fetch, show_progress=False, n_threads=0)
            docs[keep], sc[keep] = d, x
        order = np.lexsort((docs, -sc), axis=-1)  # score descending, then passage order
        docs, sc = np.take_along_axis(docs, order, -1), np.take_along_axis(sc, order, -1)
        for r in np.flatnonzero((sc[:, k_eff - 1] > 0) & (sc[:, k_eff - 1] == sc[:, -1]) & (fetch < n_docs)):
            full = model.get_scores_from_ids(ids[r]).astype(np.float32)  # more ties than the margin: exact, rarely
            top = np.lexsort((np.arange(n_docs), -full))[:fetch]
            docs[r], sc[r] = top, full[top]
        docs, sc = docs[:, :k_eff], sc[:, :k_eff]
        matched = sc > 0
        rows[start : start + len(terms), :k_eff] = np.where(matched, docs + self.offset, -1)
        scores[start : start + len(terms), :k_eff] = np.where(matched, sc, 0.0)

    @property
    def num_docs(self) -> int:
        """Passages this index (or shard) scores."""
        return int(self.model.scores["num_docs"])

    @property
    def offset(self) -> int:
        """Corpus row of this index's first passage (0; a shard's start)."""
        return int(self.manifest.get("shard", {}).get("start", 0))

    def shard(self, i: int, n: int) -> BM25Index:
        """Passages ``[i N / n, (i + 1) N / n)`` alone, for one searcher of ``n`` (``densepr serve --ray``).

        Scores stay those of the whole index: bm25s stores, per term, each passage's precomputed
        score, with idf from the whole corpus's document frequencies and the length norm from its
        average length; a shard keeps its passages' entries, so its scores are the whole index's
        and merging the shards' top-k lists (:func:`densepr.ranking.merge_shards`) gives its top-k.
        Searches return corpus rows. The slice is copied (1/n of the matrix); the rest is not read
        when the index was loaded memory-mapped.
        """
        total = self.num_docs
        if not 0 <= i < n or n > max(total, 1):
            raise DenseprError(f"BM25 shard {i} of {n}: need 0 <= shard < shards <= {total} passages")
        if "shard" in self.manifest:
            raise DenseprError("this BM25 index is already a shard; shard the whole index")
        lo, hi = (int(x) for x in np.linspace(0, total, n + 1).astype(np.int64)[i : i + 2])
        s = self.model.scores
        whole = sp.csc_matrix((s["data"], s["indices"], s["indptr"]), shape=(total, len(s["indptr"]) - 1))
        part = whole[lo:hi]  # rows are passages, columns terms: CSC keeps each term's entries together
        if not part.has_sorted_indices:  # the pruned backend binary-searches each column's passages
            part.sort_indices()
        model = copy.copy(self.model)
        model.scores = {"data": part.data.astype(s["data"].dtype, copy=False), "indices": part.indices.astype(s["indices"].dtype, copy=False),
                        "indptr": part.indptr.astype(s["indptr"].dtype, copy=False), "num_docs": hi - lo}  # fmt: skip
        shard = {"index": i, "of": n, "start": lo, "count": hi - lo}
        return BM25Index(model, self.analyzer, {**self.manifest, "shard": shard}, self.term_max)  # the whole's bounds hold for a part

    def _scorer(self, backend: str) -> bm25s.BM25:
        """bm25s's model with its ``backend`` set: one shallow copy per backend sharing the index's
        arrays, so that searches in several threads never change a backend another one reads."""
        if backend not in self._scorers:
            scorer = copy.copy(self.model)
            scorer.backend = backend
            self._scorers[backend] = scorer
        return self._scorers[backend]
