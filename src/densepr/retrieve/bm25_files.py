"""A BM25 index's files: their names, the compact vocabulary an older index gains on load, and the
checks of the arrays (:func:`check_arrays`) run on load and by ``densepr verify``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import bm25s
import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import NoSpaceError, save_npy, write_json
from densepr.fileio.manifest import FULL_HASH_BYTES, MANIFEST, file_entry, read_manifest
from densepr.retrieve import bm25_topk
from densepr.retrieve.bm25_vocab import FILES as VOCAB_FILES
from densepr.retrieve.bm25_vocab import CompactVocab, check_vocab, write_vocab

KIND = "bm25-index"
OWN_FILES = ("*.index.npy", "*.index.json")  # what bm25s writes: an interrupted (pre-atomic) build left only these
TERM_MAX = "term_max.npy"
COMPACT_FILES = (*VOCAB_FILES, TERM_MAX)  # what an index saved before them gains on load (see BM25Index.load)
# bm25s.BM25.save's file names for the score arrays BM25Index.save writes itself
BM25S_FILES = {k: inspect.signature(bm25s.BM25.save).parameters[f"{k}_name"].default for k in ("data", "indices")}


def term_max_of(model: bm25s.BM25) -> np.ndarray:
    """Each term's largest score (``term_max.npy``): the bounds the pruned backend prunes with."""
    s = model.scores
    return bm25_topk.column_max(s["data"], s["indptr"])


def add_compact_vocab(directory: Path, manifest: dict, model: bm25s.BM25) -> tuple[dict, bool]:
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
                save_npy(directory / TERM_MAX, term_max_of(model))
                now = {**now, "files": {**now["files"], **{f: file_entry(directory / f) for f in COMPACT_FILES}}}
                write_json(directory / MANIFEST, now)  # atomic: a reader sees the old manifest or this one
            return now, True
    except (PermissionError, NoSpaceError, OSError):  # read-only or full: the compact vocabulary is an optimisation
        return manifest, False


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
