"""Text to BM25 terms as Anserini's ``DefaultEnglishAnalyzer`` (the analysis of :mod:`densepr.retrieve.bm25`).

UAX#29 word segmentation (``U.S``, ``don't``, ``3,000`` stay whole; each CJK ideograph is a
token), English possessive ``'s`` removed, lower-cased, Lucene's 33 English stopwords dropped,
Lucene's Porter stemmer (Martin Porter's C version: words of 1-2 letters untouched,
``logi -> log``, ``bli -> ble``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import regex
from bm25s.stopwords import STOPWORDS_EN

from densepr.errors import DenseprError

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
    """Text to BM25 terms as Anserini's DefaultEnglishAnalyzer (see :mod:`densepr.retrieve.bm25`).

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
