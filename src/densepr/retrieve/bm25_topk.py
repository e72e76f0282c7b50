"""Exact top-k BM25 with MaxScore pruning (Turtle & Flood 1995) over bm25s's CSC score matrix.

bm25s scores a query by adding each query term's column into a dense float32 accumulator of N
passages, then selecting the top k of all N: every query costs O(N) whatever it matches. Here a
query's distinct terms are processed in decreasing order of their upper bound (the largest score
in their column, :func:`column_max`, times their repetitions in the query), term at a time, into
an accumulator reused across queries, recording the passages touched. After each term, once the
sum of the remaining terms' bounds is below the k-th best partial score, no passage not yet
touched can enter the top k: accumulation stops, and only the touched passages whose partial
score plus the remaining bound can still reach that threshold are completed, by binary search in
the remaining (row-sorted) columns. The survivors' final scores are then recomputed exactly as
bm25s computes them (float32, adding the query's terms in query order, repeated terms repeatedly),
so the result is the exhaustive scorer's: same passages, same float32 scores, equal scores in
passage order, passages matching no term left out.

Pruning compares float sums: every comparison keeps a relative margin of ``8 (n + 2) 2^-23`` for a
query of n terms (above float32's rounding of n additions), so a passage is only dropped when it
provably cannot reach the k-th score; the margin only costs a few more completions.

Memory per searching thread: 9 B per passage (float32 accumulator, int32 touched list, one mark
byte), allocated zeroed on its first query (pages become resident only once a query touches them)
and reused; per query, 8 B per touched passage at most, freed after it.
Needs numba (``densepr[fast]``), compiled once per machine into its disk cache.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

_LOCAL = threading.local()
_COMPILE = threading.Lock()


def column_max(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """The largest score of every column (term) of a CSC matrix, float32 (0 for an empty column):
    MaxScore's per-term upper bound. Reads the data once."""
    indptr = np.asarray(indptr, dtype=np.int64)
    out = np.zeros(len(indptr) - 1, dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(indptr) > 0)
    step = 1 << 22  # columns at a time: bounded temporaries whatever the vocabulary
    for lo in range(0, len(nonempty), step):
        cols = nonempty[lo : lo + step]
        start, end = int(indptr[cols[0]]), int(indptr[cols[-1] + 1])
        out[cols] = np.maximum.reduceat(np.asarray(data[start:end]), indptr[cols] - start)
    return out


# The kernel's functions, plain Python until _kernel() compiles them (module-level, so numba caches them on disk).


def _find(indices, lo, hi, d):
    """Position of passage d in the row-sorted slice indices[lo:hi], or -1."""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < d:
            lo = mid + 1
        else:
            hi = mid
    if lo < end and indices[lo] == d:
        return lo
    return -1


def _kth_largest(values, k):
    """The k-th largest of values (0 when fewer): the score a passage must reach to enter the top k."""
    if len(values) < k:
        return 0.0
    return np.partition(values, len(values) - k)[len(values) - k]


def _one(ids, k, data, indices, indptr, term_max, acc, mark, touched, out_rows, out_scores):
    """One query's top k into out_rows/out_scores (see the module docstring); leaves acc and mark zeroed."""
    n = len(ids)
    tol = 1.0 - 8.0 * (n + 2) * 2.0**-23
    uniq = np.unique(ids)
    u = len(uniq)
    mult = np.zeros(u, dtype=np.int64)
    for t in ids:
        mult[np.searchsorted(uniq, t)] += 1
    bound = np.empty(u, dtype=np.float64)
    for i in range(u):
        bound[i] = mult[i] * np.float64(term_max[uniq[i]])
    order = np.argsort(-bound, kind="mergesort")
    rem = np.zeros(u, dtype=np.float64)  # rem[i]: bound of the terms after the i-th
    for i in range(u - 2, -1, -1):
        rem[i] = rem[i + 1] + bound[order[i + 1]]
    nt, maxp, stop, theta = 0, 0.0, u, 0.0
    for i in range(u):  # term at a time, highest bound first
        t, m = uniq[order[i]], mult[order[i]]
        for j in range(indptr[t], indptr[t + 1]):
            d = indices[j]
            if mark[d] == 0:
                mark[d] = 1
                touched[nt] = d
                nt += 1
            for _ in range(m):
                acc[d] += data[j]
            if acc[d] > maxp:
                maxp = acc[d]
        if i < u - 1 and nt >= k and rem[i] < maxp:
            theta = _kth_largest(acc[touched[:nt]].astype(np.float64), k)
            if rem[i] < theta * tol:
                stop = i + 1  # no passage untouched so far can reach the top k
                break
    if nt >= k:
        theta = _kth_largest(acc[touched[:nt]].astype(np.float64), k)
    cut = theta * tol
    full = np.empty(nt, dtype=np.float64)  # survivors' scores; their rows go back into touched[:nc]
    nc = 0
    for x in range(nt):
        d = touched[x]
        p = np.float64(acc[d])
        acc[d] = 0
        mark[d] = 0
        if p + (rem[stop - 1] if stop > 0 else 0.0) < cut:
            continue
        alive = True
        for i in range(stop, u):  # complete it in the terms not accumulated
            t = uniq[order[i]]
            j = _find(indices, indptr[t], indptr[t + 1], d)
            if j >= 0:
                p += mult[order[i]] * np.float64(data[j])
            if p + rem[i] < cut:
                alive = False
                break
        if alive:
            touched[nc] = d
            full[nc] = p
            nc += 1
    cut = _kth_largest(full[:nc].copy(), k) * tol
    exact_d = np.empty(nc, dtype=np.int64)
    exact_s = np.empty(nc, dtype=np.float32)
    ne = 0
    for x in range(nc):
        if full[x] < cut:
            continue
        d = touched[x]
        s = np.float32(0.0)
        for t in ids:  # bm25s's own sum: float32, query order
            j = _find(indices, indptr[t], indptr[t + 1], d)
            if j >= 0:
                s += data[j]
        exact_d[ne] = d
        exact_s[ne] = s
        ne += 1
    exact_d, exact_s = exact_d[:ne], exact_s[:ne]
    by_row = np.argsort(exact_d, kind="mergesort")
    exact_d, exact_s = exact_d[by_row], exact_s[by_row]
    best = np.argsort(-exact_s, kind="mergesort")  # stable: equal scores stay in passage order
    for r in range(min(k, ne)):
        out_rows[r] = exact_d[best[r]]
        out_scores[r] = exact_s[best[r]]


def _batch(flat, ptr, k, data, indices, indptr, term_max, acc, mark, touched, out_rows, out_scores):
    for q in range(len(ptr) - 1):
        if ptr[q + 1] > ptr[q]:
            _one(flat[ptr[q] : ptr[q + 1]], k, data, indices, indptr, term_max, acc, mark, touched, out_rows[q], out_scores[q])


@lru_cache(maxsize=1)
def _kernel():
    """The compiled batch kernel: each function above replaced by its numba dispatcher (calls between
    them resolve to the compiled ones), cached under numba's cache directory (set by ``numba_installed``)."""
    import numba

    with _COMPILE:  # lru_cache may run this twice in racing threads; wrap each function once
        g = globals()
        for name in ("_find", "_kth_largest", "_one", "_batch"):
            if not isinstance(g[name], numba.core.dispatcher.Dispatcher):
                g[name] = numba.njit(cache=True, nogil=True)(g[name])
        return g["_batch"]


def _buffers(n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's accumulator, marks and touched list (zeroed between queries by the kernel)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or len(bufs[0]) < n_docs:
        bufs = _LOCAL.bufs = (np.zeros(n_docs, dtype=np.float32), np.zeros(n_docs, dtype=np.uint8), np.zeros(n_docs, dtype=np.int32))
    return bufs


def topk(query_ids: list[list[int]], k: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_docs: int,
         term_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top ``k`` (``1 <= k <= n_docs``) passages of each query (its term ids, repeats counted, unknown
    terms already dropped), best first, equal scores in passage order: rows int64 (-1 past the
    passages matched) and float32 scores (0 there), as the exhaustive scorer ranks them."""
    rows = np.full((len(query_ids), k), -1, dtype=np.int64)
    scores = np.zeros((len(query_ids), k), dtype=np.float32)
    if not query_ids:
        return rows, scores
    ptr = np.zeros(len(query_ids) + 1, dtype=np.int64)
    np.cumsum([len(q) for q in query_ids], out=ptr[1:])
    flat = np.fromiter((t for q in query_ids for t in q), dtype=np.int64, count=int(ptr[-1]))
    acc, mark, touched = _buffers(n_docs)
    _kernel()(flat, ptr, k, data, indices, indptr, term_max, acc, mark, touched, rows, scores)
    return rows, scores
