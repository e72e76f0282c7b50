"""Building a BM25 index's score matrix: passages analysed in chunks (by worker processes), their
postings merged into bm25s's CSC matrix with Lucene 8's scores (:class:`densepr.retrieve.bm25.BM25Index.build`)."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp

from densepr.data.passages import Corpus
from densepr.data.store import StoreCorpus, StreamedCorpus, open_store
from densepr.errors import DenseprError
from densepr.fileio.atomic import no_space_names
from densepr.fileio.pages import MappedPages
from densepr.progress import progress_bar
from densepr.retrieve import bm25_kernels
from densepr.retrieve.bm25_analyzer import LuceneAnalyzer
from densepr.retrieve.bm25_blocks import block_term_ids

MERGE_RSS = 1 << 30  # mapped pages a BM25 build's merge keeps resident at most (see _merge_chunks)
TICK_ROWS = 2_000  # passages analysed between two moves of the analyse bar (a chunk is 50,000 by default)


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


class LuceneBM25(bm25s.BM25):
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


def analyse_total(corpus: Corpus | StreamedCorpus) -> tuple[int, str]:
    """The analyse bar's total and unit, known before the corpus is read: its passages (a corpus, a store, a
    parquet file's row count from its footer), or a streamed text file's size in bytes (read once, so never
    counted first)."""
    if not isinstance(corpus, StreamedCorpus):
        return len(corpus), "passages"
    from densepr.data.parquet import is_parquet

    if is_parquet(corpus.path):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(corpus.path).metadata.num_rows, "passages"
        except Exception:  # not readable: the build refuses it, naming the file, once it reads it
            return 0, "passages"
    return (corpus.path.stat().st_size if corpus.path.is_file() else 0), "bytes"


def _chunk_sources(corpus: Corpus | StreamedCorpus, size: int, unit: str) -> Iterator[tuple[tuple, int, int, int]]:
    """``(source, lo, hi, units)`` per chunk of ``size`` rows, read lazily: what a worker needs to read rows
    ``[lo, hi)`` (the store's directory, or the chunk's titles and texts), and the chunk's share of the
    analyse bar (its passages, or the bytes of the file it was read from)."""
    if isinstance(corpus, StoreCorpus):
        n = len(corpus)
        yield from ((("store", str(corpus.directory)), lo, min(lo + size, n), min(lo + size, n) - lo) for lo in range(0, n, size))
        return
    read = 0
    for i, _ids, titles, texts in corpus.blocks(size):
        if unit == "bytes":  # the file read up to the end of this chunk's last passage
            units, read = corpus.read.n - read, corpus.read.n
        else:
            units = len(texts)
        yield ("rows", titles, texts), i * size, i * size + len(texts), units


class _Bar:
    """The analyse bar's advances: each chunk's share (:func:`_chunk_sources`) moved as its passages are analysed
    (every :data:`TICK_ROWS`, told by :func:`_analyse_chunk`, here or from a worker) and completed with its result."""

    def __init__(self, advance: Callable[[int], None]) -> None:
        self.advance, self.chunks, self.shown = advance, {}, 0  # chunk -> [passages, units, units shown]

    def add(self, i: int, passages: int, units: int) -> None:
        self.chunks[i] = [passages, units, 0]

    def tick(self, i: int, done: int) -> None:
        c = self.chunks.get(i)
        if c is None:  # a worker's last tick read after its chunk's result
            return
        shown = c[1] * done // max(c[0], 1)
        self.advance(shown - c[2])
        self.shown += shown - c[2]
        c[2] = shown

    def done(self, i: int) -> None:
        self.tick(i, self.chunks[i][0])
        del self.chunks[i]


def _analyse_all(tasks: Iterator[tuple], workers: int, bar: _Bar) -> list[dict]:
    """:func:`_analyse_chunk` over ``tasks`` in order: here (one worker, or one chunk), else by up to
    ``workers`` spawned processes with at most one chunk more than them in flight, so that a streamed
    corpus is read no further ahead than that (``Pool.imap`` would read every task ahead in a thread)."""
    head = list(itertools.islice(tasks, workers)) if workers > 1 else []  # fewer chunks than workers: fewer processes
    procs = len(head)
    tasks = itertools.chain(iter(lambda: head.pop(0) if head else None, None), tasks)  # head's chunks not held once sent
    chunks = []
    if procs <= 1:
        for t in tasks:
            chunks.append(_analyse_chunk(t, bar.tick))
            bar.done(t[-1])
        return chunks
    import multiprocessing

    # spawn: the CLI process holds torch's threads, which fork would copy mid-state
    ctx = multiprocessing.get_context("spawn")
    ticks = ctx.SimpleQueue()  # workers' (chunk, passages analysed) as they go

    def result(res) -> dict:
        while not res.ready():
            res.wait(0.2)
            while not ticks.empty():
                bar.tick(*ticks.get())
        chunk = res.get()
        bar.done(chunk["chunk"])
        return chunk

    with ctx.Pool(procs, initializer=_init_worker, initargs=(ticks,)) as pool:
        pending: deque = deque()
        for t in tasks:
            pending.append(pool.apply_async(_analyse_chunk, (_spilled(t),)))
            del t  # the chunk's texts are on disk now, for a worker to read
            while len(pending) > procs:
                chunks.append(result(pending.popleft()))
        while pending:
            chunks.append(result(pending.popleft()))
    return chunks


def _spilled(task: tuple) -> tuple:
    """``task`` with a streamed chunk's titles and texts written to a file in the build directory, for the
    worker to read: a task sent to a pool stays a few bytes. (A chunk's tens of MB through the pool's pipe
    could leave its task thread blocked mid-write when an error stops the build, and ``Pool.terminate``
    then waited on that thread: seen once, ten minutes.)"""
    source, lo, hi, stemmer, tmp, i = task
    if source[0] != "rows":
        return task
    path = Path(tmp) / f"chunk{i:06d}.rows.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump([list(source[1]), list(source[2])], f, ensure_ascii=False)
    return ("file", str(path)), lo, hi, stemmer, tmp, i


_WORKER_TICKS = None  # a worker's queue for its progress (set by _init_worker)


def _init_worker(ticks) -> None:
    global _WORKER_TICKS
    _WORKER_TICKS = ticks


class _Words:
    """A worker's raw word -> term id map, kept from chunk to chunk (a new chunk's words are mostly known:
    analysed once per worker, not once per chunk), and its terms by id. Forgotten between two chunks once it
    holds :data:`WORDS_KEPT` words, which bounds a worker's memory whatever the corpus's vocabulary."""

    def __init__(self, stemmer: str | None) -> None:
        self.analyzer = LuceneAnalyzer(stemmer)
        self.ids: dict[str, int] = {}  # raw word -> term id, -1 if dropped
        self.term_ids: dict[str, int] = {}
        self.terms: list[str] = []
        self.key = f"{os.getpid()}.{next(_GENERATIONS)}"  # names this numbering of terms in the chunks it analyses
        self.written: dict[str, int] = {}  # build directory -> terms already written there (each chunk writes the rest)

    def new_terms(self, build: str) -> tuple[int, list[str]]:
        """The terms not yet written to ``build``'s chunks, and the id of the first: a chunk of that build
        writes them, so that the merge learns every term of this numbering once, not once per chunk."""
        first = self.written.get(build, 0)
        self.written[build] = len(self.terms)
        return first, self.terms[first:]

    def add(self, new: Iterable[str]) -> None:
        for w in new:
            term = self.analyzer.analyse(w)  # not .term: remembered here
            if not term:
                self.ids[w] = -1
                continue
            t = self.term_ids.get(term)
            if t is None:
                t = self.term_ids[term] = len(self.terms)
                self.terms.append(term)
            self.ids[w] = t


WORDS_KEPT = 1 << 21  # raw words a worker remembers (~300 MB with their terms) before it starts over
_WORKER_WORDS: dict = {}
_GENERATIONS = itertools.count()


def chunk_postings_numpy(occ: np.ndarray, words_in: np.ndarray, n_known: int) -> tuple[np.ndarray, ...]:
    """:func:`densepr.retrieve.bm25_kernels.chunk_postings` with numpy and a dict (the path without numba)."""
    n_docs = len(words_in)
    # worker term ids -> the chunk's own, numbered in order of first occurrence (as one process numbers them)
    seen = np.fromiter(dict.fromkeys(occ.tolist()), dtype=np.int64)
    seen = seen[seen >= 0]
    local = np.full(n_known, -1, dtype=np.int64)
    local[seen] = np.arange(len(seen), dtype=np.int64)
    kept = occ >= 0
    docs = np.repeat(np.arange(n_docs, dtype=np.int64), words_in)[kept]
    dl = np.bincount(docs, minlength=n_docs).astype(np.int32)
    key, tf = np.unique(local[occ[kept]] * max(n_docs, 1) + docs, return_counts=True)
    tid, doc = np.divmod(key, max(n_docs, 1))
    return seen, tid.astype(np.int32), doc.astype(np.int32), tf, np.bincount(tid, minlength=len(seen)).astype(np.int64), dl


def _analyse_chunk(task: tuple, tick: Callable[[int, int], None] | None = None) -> dict:
    """Analyse rows ``[lo, hi)`` and write their postings (sorted by local term, then passage):
    local term ids (int32), passages (int32, chunk-local), term frequencies (uint16, or uint32
    if any exceeds it), per-term document frequencies, passage lengths; the chunk's terms in order of
    first occurrence as the worker numbers them (``seen``), and the worker's terms this build has not had
    yet (JSON; the result names the numbering and its first new id). ``tick(chunk, passages analysed)``
    every :data:`TICK_ROWS` (in a worker: sent to the analyse bar through its queue)."""
    source, lo, hi, stemmer, tmp, i = task
    known = _WORKER_WORDS.get(stemmer)
    if known is None or len(known.ids) > WORDS_KEPT:
        known = _WORKER_WORDS[stemmer] = _Words(stemmer)
    if tick is None and _WORKER_TICKS is not None:
        tick = lambda chunk, done: _WORKER_TICKS.put((chunk, done))  # noqa: E731
    if source[0] == "store":
        # opened per chunk (~15 ms): the mapping, and with it the pages read, goes when the chunk's texts are
        # copied out, so a worker's RSS stays one chunk's (kept open, it grew by every text read: 7 GB at 21M)
        store = open_store(source[1], verify="none")
        titles, texts = store.titles[lo:hi], store.texts[lo:hi]
        del store
    elif source[0] == "file":  # written by _spilled
        with open(source[1], encoding="utf-8") as f:
            titles, texts = json.load(f)
        os.unlink(source[1])
    else:
        titles, texts = source[1], source[2]
    occ = []  # every word's worker term id, dropped ones (-1) included, a block of passages at a time
    words_in = np.zeros(hi - lo, dtype=np.int64)
    for at in range(0, hi - lo, TICK_ROWS):
        block = [f"{t} {x}" for t, x in zip(titles[at : at + TICK_ROWS], texts[at : at + TICK_ROWS])]
        term, counts = block_term_ids(block, known.ids, known.add)
        occ.append(term)
        words_in[at : at + len(block)] = counts
        if tick is not None and at + len(block) < hi - lo:  # the chunk's end is told by its result
            tick(i, at + len(block))
    occ = np.concatenate(occ) if occ else np.zeros(0, dtype=np.int64)
    kernels = bm25_kernels.compiled()
    postings = chunk_postings_numpy if kernels is None else kernels[1]
    seen, tid, doc, tf, df, dl = postings(occ, words_in, len(known.terms))
    first_new, new = known.new_terms(str(tmp))
    base = Path(tmp) / f"chunk{i:06d}"
    np.save(f"{base}.seen.npy", seen)
    np.save(f"{base}.tid.npy", tid)
    np.save(f"{base}.doc.npy", doc)
    np.save(f"{base}.tf.npy", tf.astype(np.uint16 if len(tf) == 0 or tf.max() <= np.iinfo(np.uint16).max else np.uint32))
    np.save(f"{base}.df.npy", df)
    np.save(f"{base}.dl.npy", dl)
    with open(f"{base}.new.json", "w", encoding="utf-8") as f:
        json.dump(new, f, ensure_ascii=False)
    return {"base": str(base), "start": lo, "passages": hi - lo, "chunk": i, "terms": known.key, "first_new": first_new}


def _merge_chunks(chunks: list[dict], n_docs: int, model: bm25s.BM25, lengths: str, tmp: Path, progress: bool) -> tuple[dict, dict]:
    """Merge the chunks' postings into the score matrix, exactly as ``LuceneBM25.build_index_from_ids``
    computes it for the whole corpus at once (same vocabulary order, same float64 arithmetic)."""

    def load(c: dict, what: str) -> np.ndarray:
        return np.load(f"{c['base']}.{what}.npy", allow_pickle=False)

    def new_terms(c: dict) -> list[str]:
        with open(f"{c['base']}.new.json", encoding="utf-8") as f:
            return json.load(f)

    # Each term gets an id in order of first occurrence in the corpus (``first``), learnt once per worker
    # numbering (a worker writes each of its terms once, in the first chunk that has it): a chunk's terms
    # map through their numbering's array, and only terms new to a numbering are looked up by string.
    first: dict[str, int] = {}
    # worker numbering -> (its term ids -> first-occurrence ids, -1: not yet; how many it has), grown by doubling
    numberings: dict[str, tuple[np.ndarray, int]] = {}
    pending: dict[str, dict[int, str]] = {}  # worker numbering -> its terms not yet met in a chunk, by id
    df_first = np.zeros(1024, dtype=np.int64)
    dl = np.zeros(n_docs, dtype=np.int64)
    for c in chunks:
        new, seen = new_terms(c), load(c, "seen")
        held, n = numberings.get(c["terms"], (np.zeros(0, dtype=np.int64), 0))
        if c["first_new"] != n:
            raise DenseprError(f"BM25 build: chunk {c['chunk']} starts its new terms at {c['first_new']}, after {n}")
        if n + len(new) > len(held):
            held = np.concatenate([held[:n], np.zeros(max(n + len(new), 2 * len(held)) - n, dtype=np.int64)])
        held[n : n + len(new)] = np.fromiter((first.get(t, -1) for t in new), dtype=np.int64, count=len(new))
        numberings[c["terms"]] = held, n + len(new)
        to_first = held[: n + len(new)]
        wait = pending.setdefault(c["terms"], {})
        missing = seen[to_first[seen] < 0]  # new to the corpus: numbered in the chunk's order of first occurrence
        if not wait:  # every one is among the chunk's new terms, none in ``first`` (looked up just above)
            to_first[missing] = np.arange(len(first), len(first) + len(missing), dtype=np.int64)
            first.update(zip([new[w] for w in (missing - c["first_new"]).tolist()], range(len(first), len(first) + len(missing))))
        for w in missing.tolist() if wait else ():
            t = new[w - c["first_new"]] if w >= c["first_new"] else wait.pop(w)
            g = first.get(t)
            to_first[w] = g if g is not None else first.setdefault(t, len(first))
        # terms a worker knew before this build (a build in this process before it) wait until a chunk has them
        wait.update((c["first_new"] + j, new[j]) for j in np.flatnonzero(to_first[c["first_new"] :] < 0).tolist())
        gmap = to_first[seen]
        np.save(f"{c['base']}.gmap.npy", gmap)
        if len(first) > len(df_first):
            df_first = np.concatenate([df_first, np.zeros(max(len(first), 2 * len(df_first)) - len(df_first), dtype=np.int64)])
        df_first[gmap] += load(c, "df")
        dl[c["start"] : c["start"] + c["passages"]] = load(c, "dl")
    del numberings, pending
    # bm25s's vocabulary: a set filled term by term in order of first occurrence (an iterator, not the dict
    # itself, which a set would presize: another table, another order), numbered in the set's order
    unique: set[str] = set()
    unique.update(iter(first))
    at_first = np.fromiter(map(first.__getitem__, unique), dtype=np.int64, count=len(unique))
    del first
    final = np.empty(len(at_first), dtype=np.int64)
    final[at_first] = np.arange(len(at_first), dtype=np.int64)
    vocab = {t: i for i, t in enumerate(unique)}
    del unique
    n_vocab = len(vocab)
    df = np.zeros(n_vocab, dtype=np.int64)
    df[final] = df_first[:n_vocab]
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
            gmap, tid, ldf = final[load(c, "gmap")], load(c, "tid"), load(c, "df")
            lstart = np.zeros(len(ldf), dtype=np.int64)
            np.cumsum(ldf[:-1], out=lstart[1:])
            pos = cursor[gmap][tid] + np.arange(len(tid), dtype=np.int64) - lstart[tid]
            indices[pos] = load(c, "doc") + c["start"]
            tfs[pos] = load(c, "tf")
            cursor[gmap] += ldf
            for what in ("tid", "doc", "tf", "df", "dl", "seen", "gmap"):
                os.unlink(f"{c['base']}.{what}.npy")
            os.unlink(f"{c['base']}.new.json")
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
        first, last = np.searchsorted(indptr, [lo, hi - 1], side="right") - 1
        term_of = np.repeat(np.arange(first, last + 1), np.diff(np.clip(indptr[first : last + 2], lo, hi)))
        tf = tfs[lo:hi].astype(np.float64)
        data[lo:hi] = idf[term_of] * tf / (tf + norm[indices[lo:hi]])
        pages.check()
    pages.release()
    return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}, vocab


def build_model(
    corpus: Corpus | StreamedCorpus, k1: float, b: float, stemmer: str | None, lengths: str, workers: int,
    chunk_passages: int, workdir: str | os.PathLike[str] | None, progress: bool,
) -> tuple[bm25s.BM25, LuceneAnalyzer, dict]:
    """The score matrix (a bm25s model), analyzer and manifest of ``corpus``'s index: see :meth:`BM25Index.build`."""
    if lengths not in ("lucene", "exact"):
        raise DenseprError(f"lengths must be 'lucene' or 'exact', not {lengths!r}")
    if workers < 1 or chunk_passages < 1:
        raise DenseprError(f"workers ({workers}) and chunk_passages ({chunk_passages}) must be at least 1")
    analyzer = LuceneAnalyzer(stemmer)
    model = LuceneBM25(k1=k1, b=b, method="lucene", lengths=lengths)
    total, unit = analyse_total(corpus)
    # a full disk while the postings are written names the build directory (removed on the way out)
    with tempfile.TemporaryDirectory(prefix=".bm25-build-", dir=workdir) as tmp, no_space_names(tmp):
        with progress_bar(total, "BM25 analyse", enabled=progress, unit=unit) as advance:
            bar = _Bar(advance)

            def tasks() -> Iterator[tuple]:
                for i, (src, lo, hi, units) in enumerate(_chunk_sources(corpus, chunk_passages, unit)):
                    bar.add(i, hi - lo, units)
                    yield src, lo, hi, stemmer, tmp, i

            chunks = _analyse_all(tasks(), workers, bar)
            if total > bar.shown:  # a file's blank lines after its last passage
                advance(total - bar.shown)
        n = sum(c["passages"] for c in chunks)
        fingerprint = corpus.fingerprint()  # a streamed file's: computed while read (a repeated id refused then)
        model.scores, model.vocab_dict = _merge_chunks(chunks, n, model, lengths, Path(tmp), progress)
    model.unique_token_ids_set, model.nonoccurrence_array = set(model.vocab_dict.values()), None  # as bm25s.index sets them
    manifest = {"k1": k1, "b": b, "method": "lucene", "lengths": lengths, "analyzer": analyzer.name,
                "stemmer": stemmer, "fields": "title text", "corpus": fingerprint}  # fmt: skip
    return model, analyzer, manifest
