"""Exact top-k BM25 with MaxScore pruning (Turtle & Flood 1995) over bm25s's CSC score matrix.

bm25s scores a query by adding each query term's column into a dense float32 accumulator of N
passages, then selecting the top k of all N: every query costs O(N) whatever it matches. Here a
query's distinct terms are processed in decreasing order of their upper bound (the largest score
in their column, :func:`column_max`, times their repetitions in the query), term at a time, into
an accumulator reused across queries, recording the passages touched. After each term, once the
sum of the remaining terms' bounds is below the k-th best partial score, no passage not yet
touched can enter the top k: accumulation stops, and only the touched passages whose partial
score plus the remaining bound can still reach that threshold are completed in the remaining
(row-sorted) columns: a column of at most 8 entries per candidate is scanned, a longer one searched
(galloping forward) for each candidate; after each term, candidates whose bound falls short are
dropped and the threshold rises to the k-th best partial score. The survivors' final scores are then recomputed exactly as
bm25s computes them (float32, adding the query's terms in query order, repeated terms repeatedly),
so the result is the exhaustive scorer's: same passages, same float32 scores, equal scores in
passage order, passages matching no term left out.

Pruning compares float sums: every comparison keeps a relative margin of ``8 (n + 2) 2^-23`` for a
query of n terms (above float32's rounding of n additions), so a passage is only dropped when it
provably cannot reach the k-th score; the margin only costs a few more completions.

Cost per query: the postings of the terms accumulated (phase 1; on 200k synthetic passages and
NQ questions ~20% of the query's postings at top-10, ~26% at top-100), a few passes over the
passages touched, and for each candidate left a gallop or a scan in the other terms' columns;
nothing proportional to N (bm25s: N zeroed floats, all postings, then a top-k over N). Measured
(benchmarks/retrieval/bm25_topk.py, batched, 200k and 1M passages): x1.1-1.3 bm25s's numba scorer at
top-10, x0.65-0.9 at top-100 (the bounds, one per term, leave many candidates to complete there;
block-max bounds would tighten them).

Memory per searching thread: 12 B per passage (float32 accumulator, int32 touched list, float32
selection scratch), allocated zeroed on its first query (pages become resident only as queries
touch them) and reused; per query, 12 B per surviving candidate, freed after it.
Needs numba (``densepr[fast]``), compiled once per machine into its disk cache.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from densepr.fileio.pages import release_pages

_LOCAL = threading.local()
_COMPILE = threading.Lock()


def column_max(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """The largest score of every column (term) of a CSC matrix, float32 (0 for an empty column):
    MaxScore's per-term upper bound. Reads the data once."""
    indptr = np.asarray(indptr, dtype=np.int64)
    out = np.zeros(len(indptr) - 1, dtype=np.float32)
    nonempty = np.flatnonzero(np.diff(indptr) > 0)
    # ~2^24 postings at a time (a column is never split): bounded temporaries, and a mapped
    # matrix's pages released as read, whatever the corpus
    cuts = np.unique(np.searchsorted(indptr[nonempty], np.arange(0, int(indptr[-1]), 1 << 24), side="left"))
    cuts = [*cuts.tolist(), len(nonempty)]
    for a, z in zip(cuts[:-1], cuts[1:]):
        cols = nonempty[a:z]
        if len(cols) == 0:
            continue
        start, end = int(indptr[cols[0]]), int(indptr[cols[-1] + 1])
        out[cols] = np.maximum.reduceat(np.asarray(data[start:end]), indptr[cols] - start)
        release_pages(data)
    return out


# The kernel's functions, plain Python until _kernel() compiles them (module-level, so numba caches them on disk).


def _gallop(indices, lo, hi, d):
    """First position in the row-sorted indices[lo:hi] holding a passage >= d (hi if none): exponential
    then binary search from lo, so walking a column for increasing passages reads it forward only."""
    step = 1
    while lo + step < hi and indices[lo + step] < d:
        lo += step
        step *= 2
    if lo < hi and indices[lo] >= d:
        return lo
    hi = min(lo + step, hi)
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < d:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _kth_largest(acc, rows, n, k, scratch):
    """The k-th largest of acc[rows[:n]] (0 when fewer): the score a passage must reach to enter the
    top k. Quickselect in ``scratch`` (no allocation: it runs after every term of every query)."""
    if n < k:
        return 0.0
    for x in range(n):
        scratch[x] = acc[rows[x]]
    lo, hi, want = 0, n - 1, n - k  # the want-th smallest
    while lo < hi:
        a, b, c = scratch[lo], scratch[(lo + hi) >> 1], scratch[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:
            while scratch[i] < pivot:
                i += 1
            while scratch[j] > pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            break
    return np.float64(scratch[want])


def _one(ids, k, data, indices, indptr, term_max, acc, touched, scratch, out_rows, out_scores):
    """One query's top k into out_rows/out_scores (see the module docstring); leaves acc zeroed."""
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
    # Phase 1: term at a time, highest bound first, into acc. A passage is touched once acc > 0 (zero
    # scores are not counted: they change no sum and bm25s returns no zero-score passage); the
    # touched list is written unconditionally and advanced only for a new passage: no branch to mispredict.
    nt, done, stop, theta = 0, 0.0, u, 0.0
    for i in range(u):
        t, m = uniq[order[i]], mult[order[i]]
        for j in range(indptr[t], indptr[t + 1]):
            v = data[j]
            d = indices[j]
            touched[nt] = d
            nt += (acc[d] == 0) & (v > 0)
            acc[d] += v
            for _ in range(m - 1):
                acc[d] += v
        done += bound[order[i]]
        if i < u - 1 and nt >= k and rem[i] < done:  # done bounds every partial score: else no stop possible
            # k touched passages above rem / tol: then rem < theta * tol, and no passage untouched so
            # far can reach the top k. Counting them (stopping at k) is cheaper than selecting theta.
            need, above = rem[i] / tol, 0
            for x in range(nt):
                if acc[touched[x]] > need:
                    above += 1
                    if above == k:
                        break
            if above == k:
                stop = i + 1
                break
    theta = _kth_largest(acc, touched, nt, k, scratch)
    # Phase 2: the candidates (touched[:nc], partial scores kept in acc, the others' zeroed) that may
    # still reach the threshold are completed term by term: a short column is scanned, a long one
    # searched for each candidate (galloping forward, candidates in passage order); after each term
    # those whose bound falls short are dropped and the threshold rises to the k-th partial score.
    cut = theta * tol
    left = rem[stop - 1] if stop > 0 else 0.0
    nc = 0
    for x in range(nt):
        d = touched[x]
        if acc[d] + left >= cut:
            touched[nc] = d  # x >= nc: already read
            nc += 1
        else:
            acc[d] = 0
    in_order = stop <= 1  # one column's passages, in passage order
    for i in range(stop, u):
        t, m = uniq[order[i]], mult[order[i]]
        lo, hi = indptr[t], indptr[t + 1]
        if hi - lo <= 8 * nc:
            for j in range(lo, hi):
                d = indices[j]
                if acc[d] > 0:
                    acc[d] += m * data[j]
        else:
            if not in_order:
                touched[:nc] = np.sort(touched[:nc])
                in_order = True
            pos = lo
            for x in range(nc):
                d = touched[x]
                pos = _gallop(indices, pos, hi, d)
                if pos < hi and indices[pos] == d:
                    acc[d] += m * data[pos]
        kept = 0
        for x in range(nc):
            d = touched[x]
            if acc[d] + rem[i] >= cut:
                touched[kept] = d
                kept += 1
            else:
                acc[d] = 0
        nc = kept
        if nc >= 4 * k and i < u - 1:  # partial scores only grow: the k-th best so far is a valid threshold
            cut = max(cut, _kth_largest(acc, touched, nc, k, scratch) * tol)
    if nc >= k:
        cut = max(cut, _kth_largest(acc, touched, nc, k, scratch) * tol)
    # The survivors' scores as bm25s computes them: float32, the query's terms in query order (each
    # survivor's sum built term by term, so its additions happen in that order), each column walked
    # forward once for the survivors in passage order.
    exact_d = np.empty(nc, dtype=np.int64)
    ne = 0
    for x in range(nc):
        d = touched[x]
        if acc[d] >= cut:
            exact_d[ne] = d
            ne += 1
        acc[d] = 0
    exact_d = np.sort(exact_d[:ne])
    exact_s = np.zeros(ne, dtype=np.float32)
    for t in ids:
        pos, hi = indptr[t], indptr[t + 1]
        for x in range(ne):
            pos = _gallop(indices, pos, hi, exact_d[x])
            if pos == hi:
                break
            if indices[pos] == exact_d[x]:
                exact_s[x] += data[pos]
    best = np.argsort(-exact_s, kind="mergesort")  # stable: equal scores stay in passage order
    for r in range(min(k, ne)):
        out_rows[r] = exact_d[best[r]]
        out_scores[r] = exact_s[best[r]]


def _batch(flat, ptr, k, data, indices, indptr, term_max, acc, touched, scratch, out_rows, out_scores):
    for q in range(len(ptr) - 1):
        if ptr[q + 1] > ptr[q]:
            _one(flat[ptr[q] : ptr[q + 1]], k, data, indices, indptr, term_max, acc, touched, scratch, out_rows[q], out_scores[q])


@lru_cache(maxsize=1)
def _kernel():
    """The compiled batch kernel: each function above replaced by its numba dispatcher (calls between
    them resolve to the compiled ones), cached under numba's cache directory (set by ``numba_installed``)."""
    import numba

    with _COMPILE:  # lru_cache may run this twice in racing threads; wrap each function once
        g = globals()
        for name in ("_gallop", "_kth_largest", "_one", "_batch"):
            if not isinstance(g[name], numba.core.dispatcher.Dispatcher):
                g[name] = numba.njit(cache=True, nogil=True)(g[name])
        return g["_batch"]


def _buffers(n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's accumulator, touched list and selection scratch (the kernel leaves the accumulator zeroed)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or len(bufs[0]) < n_docs:
        # touched has one entry more: phase 1 writes the next slot before knowing whether the passage is new
        bufs = _LOCAL.bufs = tuple(np.zeros(n_docs + extra, dtype=dt) for dt, extra in ((np.float32, 0), (np.int32, 1), (np.float32, 0)))
    return bufs


def topk(query_ids: list[list[int]], k: int, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_docs: int,
         term_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top ``k`` (``1 <= k <= n_docs``) passages of each query (its term ids, repeats counted, unknown
    terms already dropped), best first, equal scores in passage order: rows int64 (-1 past the
    passages matched) and float32 scores (0 there), as the exhaustive scorer ranks them."""
    rows = np.full((len(query_ids), k), -1, dtype=np.int64)
    scores = np.zeros((len(query_ids), k), dtype=np.float32)
    if not query_ids or k < 1:
        return rows, scores
    ptr = np.zeros(len(query_ids) + 1, dtype=np.int64)
    np.cumsum([len(q) for q in query_ids], out=ptr[1:])
    flat = np.fromiter((t for q in query_ids for t in q), dtype=np.int64, count=int(ptr[-1]))
    acc, touched, scratch = _buffers(n_docs)
    _kernel()(flat, ptr, k, data, indices, indptr, term_max, acc, touched, scratch, rows, scores)
    return rows, scores
