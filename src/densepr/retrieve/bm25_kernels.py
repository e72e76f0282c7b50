"""BM25 indexing's two hot loops compiled with numba (``densepr[fast]``), each the exact equal of its numpy
version (tests/retrieve/test_bm25_kernels.py compares them), which stays the path without numba.

- :func:`ascii_words`: a block's joined ASCII text -> its words (UAX#29's ASCII rules, as
  :mod:`densepr.retrieve.bm25_blocks`'s masks) and each word's distinct-word number, by first occurrence,
  from a hash table that compares the words' bytes (numpy: two polynomial hashes and a sort).
- :func:`chunk_postings`: a chunk's term ids -> its postings sorted by term then passage, with term
  frequencies, document frequencies and lengths, in one pass and a counting sort (numpy: a Python dict
  for the order of first occurrence and a sort of every word).

Both are O(words) where numpy's sort is O(words log words), and allocate a few arrays the size of the
input. Compiled once per machine into numba's disk cache (``bm25.numba_installed`` sets where).
"""

from __future__ import annotations

from functools import lru_cache
from threading import Lock

import numpy as np

_COMPILE = Lock()


def ascii_words(b, cls, joins_letters, joins_digits):
    """Words of the ASCII bytes ``b``: maximal runs of word characters (``cls[byte] > 0``: letter 1,
    digit 2, ``_`` 3) and of one joiner between two letters (``joins_letters``) or two digits
    (``joins_digits``). Returns each word's start and stop (int64), its distinct-word number (equal
    bytes, equal number; numbered by first occurrence) and each distinct word's first word."""
    n = len(b)
    starts = np.empty(n // 2 + 1, dtype=np.int64)
    stops = np.empty(n // 2 + 1, dtype=np.int64)
    m = 0
    inword = False
    for i in range(n):
        x = b[i]
        inside = cls[x] > 0
        if not inside and 0 < i < n - 1:
            left, right = cls[b[i - 1]], cls[b[i + 1]]
            inside = (joins_letters[x] and left == 1 and right == 1) or (joins_digits[x] and left == 2 and right == 2)
        if inside and not inword:
            starts[m] = i
            inword = True
        elif not inside and inword:
            stops[m] = i
            m += 1
            inword = False
    if inword:
        stops[m] = n
        m += 1
    cap = 16
    while cap < 2 * m:
        cap *= 2
    mask = np.uint64(cap - 1)
    table = np.full(cap, -1, dtype=np.int64)
    inverse = np.empty(m, dtype=np.int64)
    first = np.empty(m, dtype=np.int64)
    nd = 0
    for w in range(m):
        s, e = starts[w], stops[w]
        h = np.uint64(14695981039346656037)  # FNV-1a
        for j in range(s, e):
            h = (h ^ np.uint64(b[j])) * np.uint64(1099511628211)
        slot = h & mask
        while True:
            d = table[slot]
            if d < 0:
                table[slot] = nd
                first[nd] = w
                inverse[w] = nd
                nd += 1
                break
            o = first[d]
            os_ = starts[o]
            same = stops[o] - os_ == e - s
            if same:
                for j in range(e - s):
                    if b[os_ + j] != b[s + j]:
                        same = False
                        break
            if same:
                inverse[w] = d
                break
            slot = (slot + np.uint64(1)) & mask
    return starts[:m], stops[:m], inverse, first[:nd]


def chunk_postings(occ, words_in, n_known):
    """A chunk's postings from ``occ``, every word's term id (``< n_known``; -1: dropped) in passage order,
    and ``words_in``, each passage's word count. Terms are renumbered by first occurrence. Returns the
    terms in that order (their ids in ``occ``), then per posting sorted by (term, passage): term
    (int32), passage (int32), frequency (int64); each term's document frequency (int64) and each
    passage's length in kept words (int32)."""
    local = np.full(n_known, -1, dtype=np.int64)
    order = np.empty(min(n_known, len(occ)), dtype=np.int64)
    nl = 0
    for x in occ:
        if x >= 0 and local[x] < 0:
            local[x] = nl
            order[nl] = x
            nl += 1
    n_docs = len(words_in)
    last = np.full(nl, -1, dtype=np.int64)
    slot = np.empty(nl, dtype=np.int64)
    pt = np.empty(len(occ), dtype=np.int32)
    pd = np.empty(len(occ), dtype=np.int32)
    ptf = np.empty(len(occ), dtype=np.int64)
    df = np.zeros(nl, dtype=np.int64)
    dl = np.zeros(n_docs, dtype=np.int32)
    npost = 0
    pos = 0
    for d in range(n_docs):
        for j in range(pos, pos + words_in[d]):
            x = occ[j]
            if x < 0:
                continue
            t = local[x]
            dl[d] += 1
            if last[t] != d:  # the term's first time in this passage: a new posting
                last[t] = d
                slot[t] = npost
                pt[npost] = t
                pd[npost] = d
                ptf[npost] = 1
                df[t] += 1
                npost += 1
            else:
                ptf[slot[t]] += 1
        pos += words_in[d]
    cursor = np.empty(nl, dtype=np.int64)  # counting sort by term; passages stay ascending within one
    acc = 0
    for t in range(nl):
        cursor[t] = acc
        acc += df[t]
    tid = np.empty(npost, dtype=np.int32)
    doc = np.empty(npost, dtype=np.int32)
    tf = np.empty(npost, dtype=np.int64)
    for p in range(npost):
        t = pt[p]
        q = cursor[t]
        cursor[t] += 1
        tid[q] = t
        doc[q] = pd[p]
        tf[q] = ptf[p]
    return order[:nl], tid, doc, tf, df, dl


def use_densepr_cache(numba) -> None:
    """numba's compiled functions cached under ``$NUMBA_CACHE_DIR``, else ``<densepr cache>/numba``."""
    import os

    if not os.environ.get("NUMBA_CACHE_DIR"):
        from densepr.data.fetch import default_cache_dir

        numba.config.CACHE_DIR = str(default_cache_dir() / "numba")


@lru_cache(maxsize=1)
def compiled():
    """``(ascii_words, chunk_postings)`` compiled, or None without numba (the numpy paths are used)."""
    try:
        import numba
    except ImportError:
        return None
    use_densepr_cache(numba)
    with _COMPILE:
        return tuple(numba.njit(cache=True, nogil=True)(f) for f in (ascii_words, chunk_postings))
