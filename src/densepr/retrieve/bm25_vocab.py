"""BM25's term dictionary as memory-mapped arrays: opened in constant time and memory, whatever its size.

bm25s keeps its vocabulary as a JSON object (``vocab.index.json``) loaded into a Python dict: at
DPR's 21M passages (~8M terms) that costs seconds and ~1 GB. An index directory also holds::

    vocab_terms.bin      every term's UTF-8 bytes, concatenated in term-id order
    vocab_offsets.npy    int64 [V + 1]: term id i is bytes ``off[i]:off[i + 1]`` of vocab_terms.bin
    vocab_hashes.npy     uint64 [V]: the 64-bit BLAKE2b of every term (the passage store's ``hash64``), sorted
    vocab_ids.npy        int64 [V]: the term id of each entry of vocab_hashes (equal hashes in id order)

A term is found by hashing it, binary-searching ``vocab_hashes`` and comparing the bytes of the
term(s) with that hash, so a hash collision never maps a query term to another term. On disk and
mapped: 24 B per term + its UTF-8 bytes (~0.3 GB at 8M terms); in memory only the pages a lookup
touches (~log2(V) hashes per term looked up). bm25s's ``vocab.index.json`` stays beside it, so
``bm25s.BM25.load`` still opens the index.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from densepr.data.store import TEXT_ENCODING, hash64
from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_write, save_npy

FILES = ("vocab_terms.bin", "vocab_offsets.npy", "vocab_hashes.npy", "vocab_ids.npy")
_DTYPES = {"vocab_offsets.npy": np.int64, "vocab_hashes.npy": np.uint64, "vocab_ids.npy": np.int64}


def write_vocab(directory: str | os.PathLike[str], vocab: Mapping[str, int]) -> None:
    """Write the compact vocabulary of ``vocab`` (term -> id, ids ``0..V-1``) into ``directory``, each file atomically."""
    directory = Path(directory)
    n = len(vocab)
    terms: list = [None] * n
    for t, i in vocab.items():
        if not 0 <= i < n or terms[i] is not None:
            raise DenseprError(f"{directory}: the BM25 vocabulary's ids are not 0..{n - 1} (term {t!r} has id {i}); rebuild the index")
        terms[i] = t.encode(*TEXT_ENCODING)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, terms), dtype=np.int64, count=n), out=off[1:])
    hashes = np.fromiter(map(hash64, terms), dtype=np.uint64, count=n)
    order = np.argsort(hashes, kind="stable")
    with atomic_write(directory / "vocab_terms.bin", "wb") as fh:
        for lo in range(0, n, 1 << 16):
            fh.write(b"".join(terms[lo : lo + (1 << 16)]))
    del terms
    save_npy(directory / "vocab_offsets.npy", off)
    save_npy(directory / "vocab_hashes.npy", hashes[order])
    save_npy(directory / "vocab_ids.npy", order.astype(np.int64))


class CompactVocab(Mapping[str, int]):
    """A read-only ``term -> id`` mapping over the files :func:`write_vocab` wrote (memory-mapped by
    default): what bm25s's ``vocab_dict`` is, without a Python dict. ``ids(terms)`` looks up many at once."""

    def __init__(self, directory: str | os.PathLike[str], mmap_mode: str | None = "r") -> None:
        self.directory = Path(directory)
        arrays = {}
        for name, dtype in _DTYPES.items():
            path = self.directory / name
            try:
                a = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise DenseprError(f"{path}: unreadable ({e}); rebuild the index") from None
            if a.dtype != dtype or a.ndim != 1:
                raise DenseprError(f"{path}: {a.dtype} array of shape {a.shape}, expected 1-d {np.dtype(dtype)}; rebuild the index")
            arrays[name] = a.view(np.ndarray)
        self.offsets, self.hashes, self.order = arrays["vocab_offsets.npy"], arrays["vocab_hashes.npy"], arrays["vocab_ids.npy"]
        self._n = len(self.hashes)
        path = self.directory / "vocab_terms.bin"
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.blob = b"" if size == 0 else (mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if mmap_mode else fh.read())
        if len(self.order) != self._n or len(self.offsets) != self._n + 1:
            raise DenseprError(f"{self.directory / 'vocab_ids.npy'}: {len(self.order)} ids and {len(self.offsets)} offsets for "
                               f"{self._n} hashes; rebuild the index")  # fmt: skip
        if self._n and (int(self.offsets[0]) != 0 or int(self.offsets[-1]) != size):
            raise DenseprError(f"{self.directory / 'vocab_offsets.npy'}: offsets run from {int(self.offsets[0])} to "
                               f"{int(self.offsets[-1])}, vocab_terms.bin has {size} bytes; rebuild the index")  # fmt: skip

    def __len__(self) -> int:
        return self._n

    def term(self, i: int) -> str:
        a, b = self.offsets[i : i + 2].tolist()
        return self.blob[a:b].decode(*TEXT_ENCODING)

    def _find(self, raw: bytes, h: int, i: int) -> int:
        """The id of ``raw`` (hash ``h``) from position ``i`` of the sorted hashes on, or -1."""
        while i < self._n and int(self.hashes[i]) == h:
            t = int(self.order[i])
            if 0 <= t < self._n:
                a, b = self.offsets[t : t + 2].tolist()
                if self.blob[a:b] == raw:
                    return t
            i += 1
        return -1

    def get_id(self, term: str) -> int:
        """``term``'s id, or -1 when it is not in the vocabulary."""
        if not isinstance(term, str):
            return -1
        raw = term.encode(*TEXT_ENCODING)
        h = hash64(raw)
        return self._find(raw, h, int(np.searchsorted(self.hashes, np.uint64(h))))

    def ids(self, terms: Sequence[str]) -> list[int]:
        """The ids of ``terms`` in order, unknown terms left out (bm25s's ``get_tokens_ids``): one search for all."""
        if not terms or not self._n:
            return []
        raw = [t.encode(*TEXT_ENCODING) for t in terms]
        h = np.fromiter(map(hash64, raw), dtype=np.uint64, count=len(raw))
        pos = np.searchsorted(self.hashes, h).tolist()
        found = (self._find(r, int(x), p) for r, x, p in zip(raw, h.tolist(), pos))
        return [t for t in found if t >= 0]

    def __getitem__(self, term: str) -> int:
        i = self.get_id(term)
        if i < 0:
            raise KeyError(term)
        return i

    def __contains__(self, term: object) -> bool:
        return isinstance(term, str) and self.get_id(term) >= 0

    def __iter__(self) -> Iterator[str]:  # terms in id order: what bm25s's dict iterates
        for lo in range(0, self._n, 4096):
            off = self.offsets[lo : min(lo + 4096, self._n) + 1].tolist()
            base = off[0]
            blob = self.blob[base : off[-1]]
            yield from (blob[a - base : b - base].decode(*TEXT_ENCODING) for a, b in zip(off, off[1:]))

    def __repr__(self) -> str:
        return f"CompactVocab({str(self.directory)!r}, {self._n} terms)"


def check_vocab(directory: str | os.PathLike[str], vocab: CompactVocab, n_vocab: int, full: bool, chunks) -> None:
    """Check a compact vocabulary against the matrix's ``n_vocab`` columns: hashes sorted, ids a
    permutation of the columns, offsets non-decreasing; each sampled term's hash (``full``: every
    term's) is the one stored for it. ``chunks(n, whole)``: the slices to read (all, or samples).

    Raises:
        DenseprError: naming the file and what is wrong.
    """
    directory = Path(directory)

    def bad(name: str, what: str) -> DenseprError:
        return DenseprError(f"{directory / name}: {what}; file altered or corrupt; rebuild the index")

    if len(vocab) != n_vocab:
        raise bad("vocab_hashes.npy", f"{len(vocab)} terms, the score matrix has {n_vocab} columns")
    n = len(vocab)
    for name, arr in (("vocab_hashes.npy", vocab.hashes), ("vocab_ids.npy", vocab.order), ("vocab_offsets.npy", vocab.offsets)):
        for sl in chunks(len(arr), full):
            x = np.asarray(arr[sl])
            if not len(x):
                continue
            if name == "vocab_ids.npy":
                if x.min() < 0 or x.max() >= n:
                    raise bad(name, f"term id {int(x.min() if x.min() < 0 else x.max())} outside 0..{n - 1} near entry {sl.start}")
                continue
            prev = np.asarray(arr[sl.start - 1 : sl.start]) if sl.start else x[:1]
            down = np.flatnonzero(np.diff(np.concatenate([prev, x])) < 0) if name == "vocab_offsets.npy" else \
                np.flatnonzero(np.concatenate([prev, x])[1:] < np.concatenate([prev, x])[:-1])  # fmt: skip
            if len(down):
                raise bad(name, f"{'offsets decrease' if name == 'vocab_offsets.npy' else 'hashes not sorted'} near entry {sl.start + int(down[0])}")
    if full:
        seen = np.bincount(np.asarray(vocab.order), minlength=n)
        if n and (seen != 1).any():
            raise bad("vocab_ids.npy", f"term id {int(np.flatnonzero(seen != 1)[0])} listed {int(seen[seen != 1][0])} times")
        positions = range(n)
    else:
        # 64 terms: each lookup maps a few pages of 4 files (and the kernel maps up to 64 KiB around each)
        positions = np.unique(np.linspace(0, n - 1, min(n, 64)).astype(np.int64)).tolist() if n else []
    for p in positions:
        t = int(vocab.order[p])
        a, b = vocab.offsets[t : t + 2].tolist()
        if hash64(vocab.blob[a:b]) != int(vocab.hashes[p]):
            raise bad("vocab_hashes.npy", f"entry {p} is not the hash of term {t} (in vocab_terms.bin)")
