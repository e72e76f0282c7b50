"""Many passages' words at once: BM25 indexing's analysis with numpy instead of a Python loop per passage.

:func:`block_term_ids` gives, for a block of passages, every word's term id in passage and word order,
exactly as analysing each passage with :func:`densepr.retrieve.bm25_analyzer.words` and looking its
words up one by one would (:func:`passage_term_ids`, the reference, which the tests fuzz it against).

How: the block's texts are joined into one ASCII string; a word is a maximal run of ``[A-Za-z0-9_]``
and of the joiners between them (``:.'`` between letters, ``,;.'`` between digits: UAX#29's WB6/7 and
WB11/12), found with vectorised masks. Whitespace-delimited runs holding a non-ASCII character are cut
out first (as :func:`words` does) and split by the Unicode rules in Python; a passage has few. Equal
words are grouped by a polynomial hash over the bytes, checked by a second one and by length (a block
whose hashes collide is analysed the reference way), so a Python string is made once per distinct word
of the block, not once per word. Measured on 30,000 passages of the 1M synthetic corpus (about 27% hold a
non-ASCII run), blocks of 2,000, the words already known: 39 us a passage against the reference's 45.
With numba the split and grouping are one compiled pass (:func:`densepr.retrieve.bm25_kernels.ascii_words`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from densepr.retrieve import bm25_kernels
from densepr.retrieve.bm25_analyzer import _NON_ASCII_RUN, _SEGMENT, _TOKEN, words

_CLASS = np.zeros(256, dtype=np.uint8)  # 1 letter, 2 digit, 3 underscore, 0 anything else
_CLASS[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)] = 1
_CLASS[np.frombuffer(b"0123456789", dtype=np.uint8)] = 2
_CLASS[ord("_")] = 3
_JOINS_LETTERS = np.zeros(256, dtype=bool)
_JOINS_LETTERS[np.frombuffer(b":.'", dtype=np.uint8)] = True
_JOINS_DIGITS = np.zeros(256, dtype=bool)
_JOINS_DIGITS[np.frombuffer(b",;.'", dtype=np.uint8)] = True
_CUT = "\x01"  # stands in the joined text for a cut-out non-ASCII run: not a word character, joins nothing
_SHIFT = 24  # a word's order key: its offset in the joined text << _SHIFT (a cut-out run's words: + their rank)
_P1, _P2 = np.uint64(0x100000001B3), np.uint64(0x9E3779B97F4A7C15)  # odd: invertible modulo 2**64


def _powers(p: np.uint64, n: int) -> tuple[np.ndarray, np.ndarray]:
    """p**i and p**-i modulo 2**64 for i < n (numpy's uint64 arithmetic wraps)."""
    fwd = np.full(n, p, dtype=np.uint64)
    bwd = np.full(n, pow(int(p), -1, 1 << 64), dtype=np.uint64)
    fwd[0] = bwd[0] = 1
    return np.cumprod(fwd, dtype=np.uint64), np.cumprod(bwd, dtype=np.uint64)


_POWERS: dict = {}


def _hashes(b: np.ndarray, starts: np.ndarray, ends: np.ndarray, p: np.uint64) -> np.ndarray:
    """Each word's sum of byte * p**(position in the word), modulo 2**64."""
    have = _POWERS.get(p)
    if have is None or len(have[0]) < len(b) + 1:
        have = _powers(p, max(len(b) + 1, 1 << 20))
        if len(have[0]) <= 1 << 23:  # kept for the next blocks unless a huge one asked (16 B a byte of text)
            _POWERS[p] = have
    fwd, bwd = have
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(b) + 1, dtype=np.uint64)
        np.cumsum(b * fwd[: len(b)], out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * bwd[starts]


def passage_term_ids(texts: Iterable[str], ids: dict[str, int], add: Callable[[Iterable[str]], None]) -> tuple[list[int], list[int]]:
    """The reference: each text's words (:func:`words`) looked up in ``ids`` (raw word -> term id, -1 if
    dropped); the words not there are first passed to ``add`` (which must put them there), in order of
    first occurrence. Returns every word's id, in text and word order, and each text's word count."""
    out: list[int] = []
    counts: list[int] = []
    unknown = itertools.repeat(None)
    for text in texts:
        ws = words(text)
        got = list(map(ids.get, ws))
        if None in got:
            add(dict.fromkeys(itertools.compress(ws, map(operator.is_, got, unknown))))
            got = list(map(ids.__getitem__, ws))
        counts.append(len(got))
        out += got
    return out, counts


def numpy_words(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`densepr.retrieve.bm25_kernels.ascii_words` with numpy (distinct words numbered in hash order, not
    by first occurrence; any number serves); None when two distinct words share a hash."""
    cls = _CLASS[b]
    letter, digit = cls == 1, cls == 2
    inside = cls > 0
    mid = b[1:-1]
    inside[1:-1] |= (_JOINS_LETTERS[mid] & letter[:-2] & letter[2:]) | (_JOINS_DIGITS[mid] & digit[:-2] & digit[2:])
    edge = np.diff(inside.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, stops = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    uniq, inverse = np.unique(_hashes(b, starts, stops, _P1), return_inverse=True)
    first = np.empty(len(uniq), dtype=np.int64)
    first[inverse] = np.arange(len(inverse), dtype=np.int64)  # one occurrence of each (which one: any)
    h2, length = _hashes(b, starts, stops, _P2), stops - starts
    if not (np.array_equal(h2[first][inverse], h2) and np.array_equal(length[first][inverse], length)):
        return None
    return starts, stops, inverse, first


def block_term_ids(texts: Sequence[str], ids: dict[str, int], add: Callable[[Iterable[str]], None],
                   compiled: bool | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """:func:`passage_term_ids` of ``texts`` (as int64 arrays), computed a block at a time: with the
    compiled split (:mod:`densepr.retrieve.bm25_kernels`) where numba is installed (``compiled`` None),
    or as ``compiled`` says (True needs numba: the numpy split otherwise)."""
    parts: list[str] = []
    run_words: list[str] = []
    run_keys: list[int] = []
    ends: list[int] = []
    pos = 0
    for text in texts:
        if text.isascii():
            parts.append(text)
            pos += len(text)
        else:
            for j, piece in enumerate(_NON_ASCII_RUN.split(text)):
                if j % 2:
                    ws = [w for w in _SEGMENT.split(piece) if w and _TOKEN.search(w)]
                    if len(ws) >= 1 << _SHIFT:  # cannot be ordered by its key: the reference way
                        return tuple(map(np.asarray, passage_term_ids(texts, ids, add)))
                    run_words += ws
                    run_keys += range(pos << _SHIFT, (pos << _SHIFT) + len(ws))
                    parts.append(_CUT)
                    pos += 1
                elif piece:
                    parts.append(piece)
                    pos += len(piece)
        parts.append("\n")
        pos += 1
        ends.append(pos)
    joined = "".join(parts)
    # what is left outside the cut-out runs is ASCII but for Unicode spaces (a run is a whitespace-delimited
    # token holding a non-ASCII character): each becomes "?", one byte, like them no word character
    b = np.frombuffer(joined.encode("ascii", "replace"), dtype=np.uint8)
    kernels = bm25_kernels.compiled() if compiled is not False else None
    split = kernels[0](b, _CLASS, _JOINS_LETTERS, _JOINS_DIGITS) if kernels is not None else numpy_words(b)
    if split is None:
        return tuple(map(np.asarray, passage_term_ids(texts, ids, add)))  # two words, one hash: never seen, but exact
    starts, stops, inverse, first = split
    distinct = [joined[s:e] for s, e in zip(starts[first].tolist(), stops[first].tolist())]
    for group in (distinct, run_words):
        missing = [w for w in group if w not in ids]
        if missing:
            add(dict.fromkeys(missing))
    term = np.fromiter(map(ids.__getitem__, distinct), dtype=np.int64, count=len(distinct))[inverse]
    keys = starts << _SHIFT
    if run_words:  # the cut-out runs' words, put in their places
        at = np.searchsorted(keys, np.asarray(run_keys, dtype=np.int64))
        term = np.insert(term, at, np.fromiter(map(ids.__getitem__, run_words), dtype=np.int64, count=len(run_words)))
        keys = np.insert(keys, at, np.asarray(run_keys, dtype=np.int64))
    counts = np.diff(np.searchsorted(keys >> _SHIFT, np.asarray(ends, dtype=np.int64)), prepend=0)
    return term, counts
