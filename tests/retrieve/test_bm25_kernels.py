"""BM25 indexing's compiled kernels (retrieve/bm25_kernels.py) equal the numpy paths they replace, on
fuzzed input: the same words and grouping of a block's bytes, the same postings of a chunk. Each kernel's
plain-Python body is checked too, so the algorithm is tested where numba is not installed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from densepr.retrieve import bm25_kernels
from densepr.retrieve.bm25_blocks import _CLASS, _JOINS_DIGITS, _JOINS_LETTERS, numpy_words
from densepr.retrieve.bm25_build import chunk_postings_numpy


def _kernels(compiled: bool):
    if not compiled:
        return bm25_kernels.ascii_words, bm25_kernels.chunk_postings
    pytest.importorskip("numba", reason="numba is not installed (pip install 'densepr[fast]')")
    return bm25_kernels.compiled()


def _texts(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces = ["a", "Z", "0", "9", "_", " ", ".", ",", ";", ":", "'", "-", "\n", "?", "\x01", "U.S.", "3,000", "don't", "x1.5y",
              "a:b", "1;2", "__", "ab", "ba", "abc", "cab"]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))).encode("ascii") for _ in range(n)]


def _words(b: bytes, split) -> tuple[list[bytes], list[int]]:
    starts, stops, inverse, first = split
    words = [b[s:e] for s, e in zip(starts.tolist(), stops.tolist())]
    # the grouping: each word's distinct word is one with the same bytes, and distinct words differ
    distinct = [words[f] for f in first.tolist()]
    assert [distinct[i] for i in inverse.tolist()] == words and len(set(distinct)) == len(distinct)
    return words, [s for s in starts.tolist()]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the plain-Python hash wraps as numba's does
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "numba"])
def test_ascii_words_equals_the_numpy_split(compiled):
    ascii_words, _ = _kernels(compiled)
    for seed, n in ((0, 300), (1, 1)):
        for text in _texts(seed, n) + [b"", b"a", b".", b"a.b", b"1,2", b"a,b", b"1.a"]:
            b = np.frombuffer(text, dtype=np.uint8)
            want = numpy_words(b)
            got = ascii_words(b, _CLASS, _JOINS_LETTERS, _JOINS_DIGITS)
            assert _words(text, got) == _words(text, want)
            assert got[3].tolist() == sorted(got[3].tolist())  # numbered by first occurrence


def test_ascii_words_on_a_large_block_with_many_repeats():
    ascii_words, _ = _kernels(True)
    text = b"\n".join(_texts(7, 4000))
    b = np.frombuffer(text, dtype=np.uint8)
    assert _words(text, ascii_words(b, _CLASS, _JOINS_LETTERS, _JOINS_DIGITS)) == _words(text, numpy_words(b))


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "numba"])
def test_chunk_postings_equal_the_numpy_ones(compiled):
    _, chunk_postings = _kernels(compiled)
    rng = np.random.default_rng(3)
    for n_docs, n_known, dropped in ((200, 50, 0.2), (1, 5, 0.0), (30, 1000, 0.9), (10, 3, 1.0), (0, 4, 0.0)):
        words_in = rng.integers(0, 25, n_docs)
        words_in[::7] = 0  # passages with no words
        occ = rng.integers(0, n_known, int(words_in.sum()))
        occ[rng.random(len(occ)) < dropped] = -1
        got, want = chunk_postings(occ, words_in, n_known), chunk_postings_numpy(occ, words_in, n_known)
        names = ("terms", "tid", "doc", "tf", "df", "dl")
        for name, g, w in zip(names, got, want):
            assert np.array_equal(g, w), name
        assert [g.dtype for g in got[1:3]] == [np.int32, np.int32] and got[5].dtype == np.int32 and got[4].dtype == np.int64
