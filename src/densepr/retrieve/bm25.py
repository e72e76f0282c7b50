"""BM25 as Lucene/Anserini score it (the paper's sparse baseline), on bm25s.

* Scoring: Lucene 8's BM25 (``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, no ``(k1 + 1)``
  factor), k1 = 0.9, b = 0.4: Anserini's and Pyserini's defaults, which DPR's baseline used.
  Document lengths are, by default, rounded as Lucene stores them (one byte per document,
  ``SmallFloat.intToByte4``: exact below 24 terms, then 4 significant bits); ``lengths="exact"``
  matches Anserini's ``-bm25.accurate`` instead.
* Analysis: Anserini's ``DefaultEnglishAnalyzer``: UAX#29 word segmentation (``U.S``, ``don't``,
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
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
import re
import tempfile
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import bm25s
import numpy as np
import regex
import scipy.sparse as sp
from bm25s.stopwords import STOPWORDS_EN

from densepr.data.passages import Corpus, check_corpus
from densepr.data.store import StoreCorpus, StreamedCorpus, open_store
from densepr.errors import DenseprError
from densepr.fileio import (
    FULL_HASH_BYTES,
    MANIFEST,
    MappedPages,
    NoSpaceError,
    atomic_dir,
    check_target,
    file_entry,
    no_space_names,
    read_manifest,
    save_npy,
    save_npy_released,
    write_json,
    write_manifest,
)
from densepr.progress import progress_bar
from densepr.ranking import SearchResult
from densepr.retrieve import bm25_topk
from densepr.retrieve.bm25_vocab import FILES as VOCAB_FILES
from densepr.retrieve.bm25_vocab import CompactVocab, check_vocab, write_vocab

KIND = "bm25-index"
OWN_FILES = ("*.index.npy", "*.index.json")  # what bm25s writes: an interrupted (pre-atomic) build left only these
TERM_MAX = "term_max.npy"
COMPACT_FILES = (*VOCAB_FILES, TERM_MAX)  # what an index saved before them gains on load (see BM25Index.load)
# bm25s.BM25.save's file names for the score arrays BM25Index.save writes itself
_BM25S_FILES = {k: inspect.signature(bm25s.BM25.save).parameters[f"{k}_name"].default for k in ("data", "indices")}
LUCENE_STOPWORDS = frozenset(STOPWORDS_EN)  # Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (33 words)
assert len(LUCENE_STOPWORDS) == 33

_SEGMENT = regex.compile(r"(?w)\b")  # (?w): Unicode (UAX#29) word boundaries, as Lucene's StandardTokenizer
# StandardTokenizer emits segments holding a letter or digit (and emoji); punctuation-only
# and underscore-only segments, fractions and superscripts are dropped.
_TOKEN = regex.compile(r"[\p{L}\p{Nd}\p{Nl}]|\p{Extended_Pictographic}")
# UAX#29 restricted to ASCII, ~4x faster than the Unicode split: runs of letters, digits and
# ``_`` (WB5, WB8-10, WB13a/b), joined across one ``:.'`` between letters (WB6/7) or one ``,;.'``
# between digits (WB11/12). Equal to ``_SEGMENT``'s words on every ASCII text
# (tests/retrieve/test_bm25.py fuzzes it against the Unicode split).
_WORD = r"[A-Za-z0-9_]+"
_ASCII_WORDS = re.compile(rf"{_WORD}(?:(?:(?<=[A-Za-z])[:.'](?=[A-Za-z])|(?<=[0-9])[,;.'](?=[0-9])){_WORD})*")
_TERM_CACHE = 1 << 20  # distinct raw words remembered per analyzer (~150 MB at most), then forgotten


# a whitespace-delimited run holding a non-ASCII character, with the whitespace before it (to which
# UAX#29 attaches a leading ZWJ/mark: WB3d, WB4): split by the Unicode rules; the text between
# such runs by the ASCII ones (UAX#29 breaks at whitespace; a passage has few such runs)
_NON_ASCII_RUN = re.compile(r"(\s*+(?<!\S)[^\s\x80-\U0010ffff]*+[^\x00-\x7f\s]\S*+)")  # possessive: no backtracking


def words(text: str) -> list[str]:
    """The UAX#29 words of ``text`` that StandardTokenizer emits (holding a letter or digit, or an
    emoji), and words of only ``_`` (which :meth:`LuceneAnalyzer.term` drops)."""
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    out: list[str] = []
    for i, piece in enumerate(_NON_ASCII_RUN.split(text)):
        if i % 2:
            out += [w for w in _SEGMENT.split(piece) if w and _TOKEN.search(w)]
        elif piece:
            out += _ASCII_WORDS.findall(piece)
    return out


class LuceneAnalyzer:
    """Text to BM25 terms as Anserini's DefaultEnglishAnalyzer (see module docstring).

    On every passage and question of the embedded benchmark, 99.98% of term sequences are
    identical to Anserini's (the rest: a few symbols and Myanmar/Thai words).
    """

    name = "lucene-english-porter-v2"

    def __init__(self, stemmer: str | None = "porter", stopwords: frozenset[str] = LUCENE_STOPWORDS) -> None:
        if stemmer not in ("porter", None):
            raise DenseprError(f"unknown stemmer {stemmer!r}: 'porter' (Lucene's) or none")
        self.stopwords, self.stemmer = stopwords, stemmer
        self._stem = None  # loaded on first use: importing nltk costs ~150 MB, which a build's merging process never needs
        self._terms: dict[str, str] = {}  # raw word -> its term ("" if dropped): one lookup per word instead of five steps

    def _load_stemmer(self):
        # NLTK's MARTIN_EXTENSIONS mode is Martin Porter's reference C implementation, which
        # Lucene's PorterStemmer ports (Snowball's "porter" differs on short words, -logi, -bli).
        from nltk.stem.porter import PorterStemmer

        self._stem = PorterStemmer(mode=PorterStemmer.MARTIN_EXTENSIONS).stem
        return self._stem

    def term(self, word: str) -> str:
        """The term a word (from :func:`words`) is indexed as, "" if dropped (remembered per word)."""
        t = self._terms.get(word)
        if t is None:
            if len(self._terms) >= _TERM_CACHE:
                self._terms.clear()
            t = self._terms[word] = self._analyse(word)
        return t

    def _analyse(self, word: str) -> str:
        if not word.strip("_"):
            return ""  # only underscores: not a token (an ASCII word may be one)
        w = word.replace("\u0130", "i").lower()  # Java lower-cases İ to i; Python to i + combining dot
        if w.endswith(("'s", "\u2019s", "\uff07s")):  # Lucene's EnglishPossessiveFilter
            w = w[:-2]
        if not w or w in self.stopwords:
            return ""
        return (self._stem or self._load_stemmer())(w) if self.stemmer else w

    def __call__(self, text: str) -> list[str]:
        return [t for t in map(self.term, words(text)) if t]

    def many(self, texts: Sequence[str]) -> list[list[str]]:
        return [self(t) for t in texts]


def lucene_length(length: np.ndarray) -> np.ndarray:
    """Document lengths as Lucene 8 stores and decodes them (``SmallFloat.intToByte4`` then
    ``byte4ToInt``): exact below 24, then rounded down to 4 significant bits."""
    n = np.asarray(length, dtype=np.int64)
    free = 24  # NUM_FREE_VALUES = 255 - longToInt4(Integer.MAX_VALUE)
    x = np.maximum(n - free, 0)
    bits = np.where(x > 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) + 1, 0)
    shift = np.maximum(bits - 4, 0)  # keep the top 4 bits
    rounded = (x >> shift) << shift
    return np.where(n < free, n, free + rounded)


class _LuceneBM25(bm25s.BM25):
    """bm25s with Lucene's exact score matrix (document-length rounding, docCount-based avgdl).

    bm25s invites overriding ``build_index_from_ids``; retrieval, saving and memory-mapped
    loading stay bm25s's.
    """

    def __init__(self, *args, lengths: str = "lucene", **kw) -> None:
        super().__init__(*args, **kw)
        self.lengths = lengths

    def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False):
        self.nonoccurrence_array = None  # only BM25L/BM25+ use it
        n_docs, n_vocab = len(corpus_token_ids), len(unique_token_ids)
        dl = np.fromiter(map(len, corpus_token_ids), dtype=np.int64, count=n_docs)
        rows = np.repeat(np.arange(n_docs, dtype=np.int64), dl)
        cols = np.fromiter((t for doc in corpus_token_ids for t in doc), dtype=np.int64, count=int(dl.sum()))
        tf = sp.csc_matrix((np.ones(len(cols), dtype=np.float64), (rows, cols)), shape=(n_docs, n_vocab))
        tf.sum_duplicates()  # counts per (document, term)
        df = np.diff(tf.indptr)
        doc_count = max(int((dl > 0).sum()), 1)  # Lucene's docCount: documents with the field
        idf = np.log(1 + (doc_count - df + 0.5) / (df + 0.5))
        avgdl = dl.sum() / doc_count
        length = lucene_length(dl) if self.lengths == "lucene" else dl
        norm = self.k1 * (1 - self.b + self.b * length / max(avgdl, 1e-9))
        term_of = np.repeat(np.arange(n_vocab), df)
        data = idf[term_of] * tf.data / (tf.data + norm[tf.indices])
        return {"data": data.astype(self.dtype), "indices": tf.indices.astype(self.int_dtype),
                "indptr": tf.indptr.astype(np.int64), "num_docs": n_docs}  # fmt: skip


def _chunk_sources(corpus: Corpus | StreamedCorpus, size: int) -> Iterator[tuple[tuple, int, int]]:
    """``(source, lo, hi)`` per chunk of ``size`` rows, read lazily: what a worker needs to read rows
    ``[lo, hi)`` (the store's directory, or the chunk's titles and texts)."""
    if isinstance(corpus, StoreCorpus):
        n = len(corpus)
        yield from ((("store", str(corpus.directory)), lo, min(lo + size, n)) for lo in range(0, n, size))
        return
    for i, _ids, titles, texts in corpus.blocks(size):
        yield ("rows", titles, texts), i * size, i * size + len(texts)


def _analyse_all(tasks: Iterator[tuple], workers: int, advance: Callable[[int], None]) -> list[dict]:
    """:func:`_analyse_chunk` over ``tasks`` in order: here (one worker, or one chunk), else by up to
    ``workers`` spawned processes with at most one chunk more than them in flight, so that a streamed
    corpus is read no further ahead than that (``Pool.imap`` would read every task ahead in a thread)."""
    head = list(itertools.islice(tasks, workers)) if workers > 1 else []  # fewer chunks than workers: fewer processes
    procs = len(head)
    tasks = itertools.chain(iter(lambda: head.pop(0) if head else None, None), tasks)  # head's chunks not held once sent
    chunks = []
    if procs <= 1:
        for t in tasks:
            chunks.append(_analyse_chunk(t))
            advance(t[2] - t[1])
        return chunks
    import multiprocessing

    # spawn: the CLI process holds torch's threads, which fork would copy mid-state
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.apply_async(_analyse_chunk, (t,)))
            del t  # the chunk's texts are the pool's now (sent to a worker, then dropped)
            while len(pending) > procs:
                chunks.append(pending.popleft().get())
                advance(chunks[-1]["passages"])
        while pending:
            chunks.append(pending.popleft().get())
            advance(chunks[-1]["passages"])
    return chunks


_WORKER_ANALYZERS: dict = {}


def _analyse_chunk(task: tuple) -> dict:
    """Analyse rows ``[lo, hi)`` and write their postings (sorted by local term, then passage):
    local term ids (int32), passages (int32, chunk-local), term frequencies (uint16, or uint32
    if any exceeds it), per-term document frequencies, passage lengths, and the chunk's
    vocabulary in order of first occurrence (JSON)."""
    source, lo, hi, stemmer, tmp, i = task
    if stemmer not in _WORKER_ANALYZERS:
        _WORKER_ANALYZERS[stemmer] = LuceneAnalyzer(stemmer)
    analyzer = _WORKER_ANALYZERS[stemmer]
    if source[0] == "store":
        # opened per chunk (~15 ms): the mapping, and with it the pages read, goes when the chunk's texts are
        # copied out, so a worker's RSS stays one chunk's (kept open, it grew by every text read: 7 GB at 21M)
        store = open_store(source[1], verify="none")
        titles, texts = store.titles[lo:hi], store.texts[lo:hi]
        del store
    else:
        titles, texts = source[1], source[2]
    vocab: dict[str, int] = {}  # term -> local id, in order of first occurrence
    ids: dict[str, int] = {}  # raw word -> its term's local id, -1 if dropped: one lookup per word
    occ = array("q")  # every word's id (8 B each, not a Python int), dropped ones included
    words_in = np.zeros(hi - lo, dtype=np.int64)
    for d, (t, x) in enumerate(zip(titles, texts)):
        ws = words(f"{t} {x}")
        got = list(map(ids.get, ws))
        if None in got:  # a word new to this chunk (rarer as the chunk goes on)
            for j, w in enumerate(ws):
                if got[j] is None:
                    term = analyzer.term(w)
                    got[j] = ids[w] = vocab.setdefault(term, len(vocab)) if term else -1
        words_in[d] = len(got)
        occ.extend(got)
    tids = np.frombuffer(occ, dtype=np.int64)
    kept = tids >= 0
    docs = np.repeat(np.arange(hi - lo, dtype=np.int64), words_in)[kept]
    dl = np.bincount(docs, minlength=hi - lo).astype(np.int32)
    key, tf = np.unique(tids[kept] * max(hi - lo, 1) + docs, return_counts=True)
    tid, doc = np.divmod(key, max(hi - lo, 1))
    base = Path(tmp) / f"chunk{i:06d}"
    np.save(f"{base}.tid.npy", tid.astype(np.int32))
    np.save(f"{base}.doc.npy", doc.astype(np.int32))
    np.save(f"{base}.tf.npy", tf.astype(np.uint16 if len(tf) == 0 or tf.max() <= np.iinfo(np.uint16).max else np.uint32))
    np.save(f"{base}.df.npy", np.bincount(tid, minlength=len(vocab)).astype(np.int64))
    np.save(f"{base}.dl.npy", dl)
    with open(f"{base}.vocab.json", "w", encoding="utf-8") as f:
        json.dump(list(vocab), f, ensure_ascii=False)
    return {"base": str(base), "start": lo, "passages": hi - lo}


def _merge_chunks(chunks: list[dict], n_docs: int, model: bm25s.BM25, lengths: str, tmp: Path, progress: bool) -> tuple[dict, dict]:
    """Merge the chunks' postings into the score matrix, exactly as ``_LuceneBM25.build_index_from_ids``
    computes it for the whole corpus at once (same vocabulary order, same float64 arithmetic)."""

    def load(c: dict, what: str) -> np.ndarray:
        return np.load(f"{c['base']}.{what}.npy", allow_pickle=False)

    def terms(c: dict) -> list[str]:
        with open(f"{c['base']}.vocab.json", encoding="utf-8") as f:
            return json.load(f)

    unique: set[str] = set()  # bm25s's vocabulary: a set filled in order of first occurrence
    for c in chunks:
        unique.update(terms(c))
    vocab = {t: i for i, t in enumerate(unique)}
    del unique
    n_vocab = len(vocab)
    df = np.zeros(n_vocab, dtype=np.int64)
    dl = np.zeros(n_docs, dtype=np.int64)
    for c in chunks:  # each chunk's local term ids -> global ones, kept beside its postings (read once more below)
        gmap = np.fromiter(map(vocab.__getitem__, terms(c)), dtype=np.int64)
        np.save(f"{c['base']}.gmap.npy", gmap)
        df[gmap] += load(c, "df")
        dl[c["start"] : c["start"] + c["passages"]] = load(c, "dl")
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    nnz = int(indptr[-1])

    def mapped(name: str, dtype) -> np.ndarray:
        path = tmp / name
        a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(nnz,)) if nnz else np.zeros(0, dtype=dtype)
        if nnz:
            path.unlink()  # the mapping stays: nothing left behind however the build ends
        return a

    indices, data = mapped("indices.npy", model.int_dtype), mapped("data.npy", model.dtype)
    tfs = mapped("tf.npy", np.uint32)
    # the scattered writes touch pages all over the mapped arrays (12 B per posting of the corpus):
    # released into the page cache whenever they pass MERGE_RSS, so RSS does not grow with the corpus
    pages = MappedPages(indices, data, tfs, budget=MERGE_RSS)
    cursor = indptr[:-1].copy()
    with progress_bar(len(chunks), "BM25 merge", enabled=progress, unit="chunks") as advance:
        for c in chunks:
            gmap, tid, ldf = load(c, "gmap"), load(c, "tid"), load(c, "df")
            lstart = np.zeros(len(ldf), dtype=np.int64)
            np.cumsum(ldf[:-1], out=lstart[1:])
            pos = cursor[gmap][tid] + np.arange(len(tid), dtype=np.int64) - lstart[tid]
            indices[pos] = load(c, "doc") + c["start"]
            tfs[pos] = load(c, "tf")
            cursor[gmap] += ldf
            for what in ("tid", "doc", "tf", "df", "dl", "gmap"):
                os.unlink(f"{c['base']}.{what}.npy")
            os.unlink(f"{c['base']}.vocab.json")
            pages.check()
            advance(1)
    doc_count = max(int((dl > 0).sum()), 1)  # Lucene's docCount: documents with the field
    idf = np.log(1 + (doc_count - df + 0.5) / (df + 0.5))
    avgdl = dl.sum() / doc_count
    length = lucene_length(dl) if lengths == "lucene" else dl
    norm = model.k1 * (1 - model.b + model.b * length / max(avgdl, 1e-9))
    step = 1 << 20  # entries scored at a time: ~50 B each in temporaries
    for lo in range(0, nnz, step):
        hi = min(lo + step, nnz)
        term_of = np.searchsorted(indptr, np.arange(lo, hi), side="right") - 1
        tf = tfs[lo:hi].astype(np.float64)
        data[lo:hi] = idf[term_of] * tf / (tf + norm[indices[lo:hi]])
        pages.check()
    pages.release()
    return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}, vocab


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
MERGE_RSS = 1 << 30  # mapped pages a BM25 build's merge keeps resident at most (see _merge_chunks)
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
    if not os.environ.get("NUMBA_CACHE_DIR"):
        from densepr.data.fetch import default_cache_dir

        numba.config.CACHE_DIR = str(default_cache_dir() / "numba")
    retrieve_utils._retrieve_internal_jitted_serial.enable_caching()  # bm25s compiles it uncached
    return True


def _term_max_of(model: bm25s.BM25) -> np.ndarray:
    s = model.scores
    return bm25_topk.column_max(s["data"], s["indptr"])


def _compact_vocab(directory: Path, manifest: dict, model: bm25s.BM25) -> tuple[dict, bool]:
    """Give an index saved before the compact vocabulary its files (``COMPACT_FILES``), listed in its manifest:
    built from ``model``'s dict (bm25s's JSON, already loaded) under a lock, so that searchers loading one
    index together build them once. Returns the manifest and whether the files are now there."""
    import fcntl

    try:
        with open(directory / ".compact-vocab.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = read_manifest(directory, KIND, "none")
            if not all(f in now.get("files", {}) for f in COMPACT_FILES):  # else another process built them meanwhile
                write_vocab(directory, model.vocab_dict)
                save_npy(directory / TERM_MAX, _term_max_of(model))
                now = {**now, "files": {**now["files"], **{f: file_entry(directory / f) for f in COMPACT_FILES}}}
                write_json(directory / MANIFEST, now)  # atomic: a reader sees the old manifest or this one
            return now, True
    except (PermissionError, NoSpaceError, OSError):  # read-only or full: the compact vocabulary is an optimisation
        return manifest, False


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
            self._term_max = _term_max_of(self.model)
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
        if lengths not in ("lucene", "exact"):
            raise DenseprError(f"lengths must be 'lucene' or 'exact', not {lengths!r}")
        if workers < 1 or chunk_passages < 1:
            raise DenseprError(f"workers ({workers}) and chunk_passages ({chunk_passages}) must be at least 1")
        analyzer = LuceneAnalyzer(stemmer)
        model = _LuceneBM25(k1=k1, b=b, method="lucene", lengths=lengths)
        total = None if isinstance(corpus, StreamedCorpus) else len(corpus)  # a streamed file's count is known once read
        # a full disk while the postings are written names the build directory (removed on the way out)
        with tempfile.TemporaryDirectory(prefix=".bm25-build-", dir=workdir) as tmp, no_space_names(tmp):
            tasks = ((src, lo, hi, stemmer, tmp, i) for i, (src, lo, hi) in enumerate(_chunk_sources(corpus, chunk_passages)))
            with progress_bar(total, "BM25 analyse", enabled=progress, unit="passages") as advance:
                chunks = _analyse_all(tasks, workers, advance)
            n = sum(c["passages"] for c in chunks)
            fingerprint = corpus.fingerprint()  # a streamed file's: computed while read (a repeated id refused then)
            model.scores, model.vocab_dict = _merge_chunks(chunks, n, model, lengths, Path(tmp), progress)
        model.unique_token_ids_set, model.nonoccurrence_array = set(model.vocab_dict.values()), None  # as bm25s.index sets them
        manifest = {"k1": k1, "b": b, "method": "lucene", "lengths": lengths, "analyzer": analyzer.name,
                    "stemmer": stemmer, "fields": "title text", "corpus": fingerprint}  # fmt: skip
        return cls(model, analyzer, manifest)

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
                save_npy_released(tmp / _BM25S_FILES[k], a)
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
            manifest, compact = _compact_vocab(directory, manifest, model)
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


def _chunks(n: int, full: bool, size: int = 1 << 20, samples: int = 16):
    """Slices covering ``range(n)`` in chunks (``full``), or ``samples`` evenly spaced ones (first and last included)."""
    if full or n <= size * samples:
        return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]
    step = (n - size) / (samples - 1)
    return [slice(round(i * step), round(i * step) + size) for i in range(samples)]


def check_arrays(directory: str | os.PathLike[str], manifest: dict, model: bm25s.BM25 | None = None, full: bool | None = None,
                 term_max: np.ndarray | None = None) -> None:  # fmt: skip
    """Check a BM25 index's sparse matrix: shapes, ``indptr`` starting at 0, non-decreasing and
    ending at the number of entries, document indices within the corpus and increasing within
    each term's column, scores finite and non-negative, vocabulary ids within the matrix; the
    compact vocabulary (:func:`~densepr.retrieve.bm25_vocab.check_vocab`) and each term's largest
    score (``term_max.npy``: sampled terms' on load, every one with ``full``) when the index has them.

    Arrays up to 32 MiB (``fileio.FULL_HASH_BYTES``) are checked whole on load; larger ones on
    16 evenly spaced slices of 1M entries, so loading stays cheap; ``full=True`` (``densepr
    verify``) checks every entry.

    Raises:
        DenseprError: naming the array and what is wrong; the index must be rebuilt.
    """
    directory = Path(directory)
    compact = all(f in manifest.get("files", {}) for f in COMPACT_FILES)
    if model is None:
        model = bm25s.BM25.load(str(directory), mmap=True, show_progress=False, verbosity=0, load_vocab=not compact)
        if compact:
            model.vocab_dict = CompactVocab(directory)
    if compact and term_max is None:
        try:
            term_max = np.load(directory / TERM_MAX, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DenseprError(f"{directory / TERM_MAX}: unreadable ({e}); rebuild the index") from None
    scores = model.scores
    data, indices, indptr = scores["data"], scores["indices"], scores["indptr"]
    n_docs = int(manifest.get("corpus", {}).get("count", scores.get("num_docs") or 0))
    n_vocab = len(model.vocab_dict)

    def bad(what: str) -> DenseprError:
        return DenseprError(f"{directory}: BM25 index arrays are inconsistent ({what}); file altered or corrupt; rebuild it")

    if data.ndim != 1 or indices.ndim != 1 or indptr.ndim != 1 or len(data) != len(indices):
        raise bad(f"data {data.shape}, indices {indices.shape}, indptr {indptr.shape}")
    if int(scores.get("num_docs") or n_docs) != n_docs:
        raise bad(f"{scores.get('num_docs')} documents, the manifest's corpus has {n_docs}")
    if len(indptr) != n_vocab + 1:
        raise bad(f"indptr has {len(indptr)} entries for a vocabulary of {n_vocab} terms")
    if isinstance(model.vocab_dict, CompactVocab):
        check_vocab(directory, model.vocab_dict, n_vocab, bool(full), lambda n, whole: _chunks(n, whole, 1 << 16))  # 16 x 512 KiB read per array
    elif n_vocab and not 0 <= min(model.vocab_dict.values()) <= max(model.vocab_dict.values()) < n_vocab:
        raise bad("vocabulary ids outside the matrix")
    if len(indptr) and (int(indptr[0]) != 0 or int(indptr[-1]) != len(indices)):
        raise bad(f"indptr runs from {int(indptr[0])} to {int(indptr[-1])}, the matrix has {len(indices)} entries")
    for name, arr in (("indptr", indptr), ("indices", indices), ("data", data)):
        whole = full if full is not None else arr.nbytes <= FULL_HASH_BYTES
        for sl in _chunks(len(arr), whole):
            x = np.asarray(arr[sl])
            if not len(x):
                continue
            if name == "indptr":
                prev = np.asarray(indptr[sl.start - 1 : sl.start]) if sl.start else np.zeros(1, dtype=x.dtype)
                if (np.diff(np.concatenate([prev, x])) < 0).any():
                    raise bad(f"indptr decreases near entry {sl.start + int(np.argmax(np.diff(np.concatenate([prev, x])) < 0))}")
                if x.max() > len(indices):
                    raise bad(f"indptr value {int(x.max())} beyond the {len(indices)} entries")
            elif name == "indices" and (x.min() < 0 or x.max() >= n_docs):
                raise bad(f"document index {int(x.min() if x.min() < 0 else x.max())} outside 0..{n_docs - 1}")
            elif name == "indices":  # a column's passages increase (the pruned backend binary-searches them)
                pos = sl.start + 1 + np.flatnonzero(x[1:] <= x[:-1])
                starts = np.asarray(indptr)[np.minimum(np.searchsorted(indptr, pos), len(indptr) - 1)] if len(pos) else pos
                if (starts != pos).any():
                    raise bad(f"document indices not increasing within a term's column near entry {int(pos[starts != pos][0])}")
            elif name == "data" and not (np.isfinite(x).all() and (x >= 0).all()):
                raise bad("a score is negative, infinite or NaN")
    if term_max is not None:
        if term_max.dtype != np.float32 or term_max.shape != (n_vocab,):
            raise DenseprError(f"{directory / TERM_MAX}: {term_max.dtype} array of shape {term_max.shape}, expected float32 "
                               f"[{n_vocab}]; file altered or corrupt; rebuild the index")  # fmt: skip
        if full:
            cols, want = np.arange(n_vocab), bm25_topk.column_max(data, indptr)
        else:  # 64 terms spread over the vocabulary, short columns only: each page read stays mapped (RSS)
            cols = np.unique(np.linspace(0, n_vocab - 1, min(n_vocab, 64)).astype(np.int64))
            cols = cols[np.asarray(indptr)[cols + 1] - np.asarray(indptr)[cols] <= 1 << 12]
            want = np.zeros(n_vocab, dtype=np.float32)
            want[cols] = [np.asarray(data[indptr[j] : indptr[j + 1]]).max(initial=0) for j in cols.tolist()]
        wrong = cols[np.asarray(term_max)[cols] != want[cols]]
        if len(wrong):
            j = int(wrong[0])
            raise DenseprError(f"{directory / TERM_MAX}: term {j}'s largest score is {float(want[j])}, the file says "
                               f"{float(term_max[j])}; file altered or corrupt; rebuild the index")  # fmt: skip
