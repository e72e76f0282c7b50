"""Text to BM25 terms as Anserini's ``DefaultEnglishAnalyzer`` (the analysis of :mod:`densepr.retrieve.bm25`).

UAX#29 word segmentation (``U.S``, ``don't``, ``3,000`` stay whole; each CJK ideograph is a
token), English possessive ``'s`` removed, lower-cased, Lucene's 33 English stopwords dropped,
Lucene's Porter stemmer (Martin Porter's C version: words of 1-2 letters untouched,
``logi -> log``, ``bli -> ble``).

Stemming runs on Snowball's C "porter" (PyStemmer: 0.8 us a word against NLTK's 10.9), which is the
published algorithm; the words where Martin Porter's C version departs from it (:data:`_DEPARTS`) go to
NLTK's port of that version. Equal to NLTK on all 1,183,585 distinct words of the embedded corpus and a
1M-passage synthetic one (benchmarks/retrieval/stemmer_parity.py); tests/retrieve/test_bm25.py checks every departure kind.
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
# Where Martin Porter's C stemmer (Lucene's) departs from the published algorithm (Snowball's "porter"):
# step 2's added -logi -> -log and -bli -> -ble (the paper has -abli -> -able), seen after step 1c's y -> i;
# step 1b's undoubling of any double consonant (Snowball's list: bb dd ff gg mm nn pp rr tt; l s z kept by both).
_DEPARTS = re.compile(r"log[iy]|bl[iy]|cc|hh|jj|kk|qq|vv|ww|xx|yy")
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


def martin_porter(word: str) -> str:
    """Martin Porter's reference C stemmer (which Lucene's PorterStemmer ports), as NLTK's
    MARTIN_EXTENSIONS mode: exact, 10.9 us a word (loaded on first use: importing nltk costs ~150 MB)."""
    global _MARTIN
    if _MARTIN is None:
        from nltk.stem.porter import PorterStemmer

        _MARTIN = PorterStemmer(mode=PorterStemmer.MARTIN_EXTENSIONS).stem
    return _MARTIN(word)


_MARTIN = None


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
        self._stem = None  # loaded on first use (a build's merging process never stems)
        self._terms: dict[str, str] = {}  # raw word -> its term ("" if dropped): one lookup per word instead of five steps

    def _load_stemmer(self):
        import Stemmer

        snowball = Stemmer.Stemmer("porter")
        snowball.maxCacheSize = 0  # remembered here, per word, with the rest of its analysis
        fast, departs = snowball.stemWord, _DEPARTS.search

        def stem(w: str) -> str:
            if len(w) <= 2:
                return w  # Martin Porter's C version leaves words of 1-2 letters alone
            return martin_porter(w) if departs(w) else fast(w)

        self._stem = stem
        return stem

    def term(self, word: str) -> str:
        """The term a word (from :func:`words`) is indexed as, "" if dropped (remembered per word)."""
        t = self._terms.get(word)
        if t is None:
            if len(self._terms) >= _TERM_CACHE:
                self._terms.clear()
            t = self._terms[word] = self.analyse(word)
        return t

    def analyse(self, word: str) -> str:
        """The term of a word (from :func:`words`), "" if dropped; not remembered (:meth:`term` is)."""
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
