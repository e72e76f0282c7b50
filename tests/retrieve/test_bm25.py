"""BM25: Lucene's formula with k1=0.9, b=0.4, Anserini-like analysis, on-disk round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from densepr.data import Corpus, Passage
from densepr.errors import DenseprError, MismatchError
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.bm25_analyzer import LuceneAnalyzer
from densepr.retrieve.bm25_build import lucene_length


def test_analyzer_mimics_lucene_english():
    a = LuceneAnalyzer()
    # "U.S." is one UAX#29 token "u.s", which Porter stems to "u."; stopwords go.
    assert a("The cats are running in the U.S.") == ["cat", "run", "u."]
    assert a("Röntgen's rays") == ["röntgen", "rai"]  # possessive dropped, Porter stem
    assert a("3,000 state-of-the-art foo_bar ___ 1.5x") == ["3,000", "state", "art", "foo_bar", "1.5x"]
    assert a("日本語") == ["日", "本", "語"]  # one token per ideograph
    # Lucene's Porter (Martin Porter's C version), not Snowball's: short words, -logi, -bli.
    assert a("us vs technology possibly assembly") == ["us", "vs", "technolog", "possibl", "assembl"]
    assert a("İzmir") == ["izmir"]  # lower-cased per code point, as Java does
    assert LuceneAnalyzer(stemmer=None)("Running dogs") == ["running", "dogs"]


def english_like_words(n: int, seed: int = 0) -> list[str]:
    """Random words built to reach every Porter rule: consonant-vowel stems (doubled consonants, y after
    vowels and consonants, digits, an accent now and then) with one or two of Porter's suffixes."""
    import random

    rnd = random.Random(seed)
    cons, vows = "bcdfghjklmnpqrstvwxyz", "aeiouy"
    suffixes = ("", "s", "es", "ies", "sses", "ss", "ed", "ing", "eed", "y", "ly", "ate", "ational", "tional", "enci", "anci",
                "izer", "bli", "abli", "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism", "iveness",
                "fulness", "ousness", "aliti", "iviti", "biliti", "logi", "logy", "bly", "icate", "ative", "alize", "iciti",
                "ical", "ful", "ness", "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent",
                "ion", "sion", "tion", "ou", "ism", "iti", "ous", "ive", "ize", "e", "le", "ll", "at", "bl", "iz")  # fmt: skip
    out = []
    for _ in range(n):
        stem = ""
        for _ in range(rnd.randint(1, 4)):
            c = rnd.choice(cons)
            stem += c * rnd.choice((1, 1, 1, 2)) + rnd.choice(vows) * rnd.choice((0, 1, 1, 2))
        if rnd.random() < 0.02:
            stem += rnd.choice(("é", "ö", "1", "9"))
        out.append(stem + rnd.choice(suffixes) + rnd.choice(("",) * 6 + suffixes))
    return out


def test_the_fast_stemmer_is_martin_porters_on_every_kind_of_word():
    """BM25 stems with Snowball's C "porter" and sends the words where Martin Porter's C version (Lucene's)
    departs from it to NLTK's port of that version: every stem equals NLTK's alone, on the departures
    (-logi, -bli, any undoubled consonant, 1-2 letters) and on 200,000 random English-like words."""
    from nltk.stem.porter import PorterStemmer

    ref = PorterStemmer(mode=PorterStemmer.MARTIN_EXTENSIONS).stem
    stem = LuceneAnalyzer()._load_stemmer()
    departures = ["analogy", "archaeology", "assembly", "possibly", "nobly", "meshhed", "bucked", "yakked", "revved",
                  "fizzed", "hopping", "falling", "hissing", "as", "is", "us", "a", "ed", "sky", "generalization"]  # fmt: skip
    words = departures + english_like_words(200_000)
    differ = [(w, ref(w), stem(w)) for w in words if ref(w) != stem(w)]
    assert not differ, differ[:20]


def unicode_words(text: str) -> list[str]:
    """The analyzer's words by the Unicode (UAX#29) split alone: what words() must equal."""
    from densepr.retrieve.bm25_analyzer import _SEGMENT, _TOKEN

    return [w for w in _SEGMENT.split(text) if w and _TOKEN.search(w)]


@pytest.mark.parametrize("alphabet", ["ascii", "mixed"])
def test_fast_word_split_equals_the_unicode_split(alphabet):
    import random

    from densepr.retrieve.bm25_analyzer import words

    # the ASCII rules' edge cases (WB6/7, WB11/12, WB13) and the characters UAX#29 treats
    # specially around whitespace (ZWJ, marks, NBSP, ideographic space) and inside words
    ascii_chars = [chr(c) for c in range(128)] + list("aZ09_ .,;:'\"") * 8
    special = ["é", "\u0301", "\u00a0", "\u3000", "\u1680", "\u200d", "\U0001f600", "中", "ก", "\u2019", "\u00b7",
               "א", "ア", "\u200b", "\u0130", "ß", "\u2028", "\ufe0f", "\u0660", "Ⅻ", "½", "²"]  # fmt: skip
    chars = ascii_chars if alphabet == "ascii" else list("aZ09_ .,;:'\"-\t\n") + special
    rng = random.Random(7)
    for _ in range(20_000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 16)))
        got = [w for w in words(text) if w.strip("_")]  # words of only "_": the analyzer drops them
        assert got == unicode_words(text), repr(text)


def test_analyzer_terms_are_the_same_whether_remembered_or_not():
    text = "The Cat's U.S. cats, 3,000 Röntgen's rays  \u200d\U0001f600 foo_bar ___ İzmir"
    a = LuceneAnalyzer()
    first = a(text)
    assert a(text) == first  # second time from the remembered words
    assert first == [a.analyse(w) for w in unicode_words(text) if a.analyse(w)]


def smallfloat_length(n: int) -> int:
    """Lucene 8 SmallFloat.intToByte4 then byte4ToInt, transcribed."""

    def long_to_int4(i: int) -> int:
        bits = i.bit_length()
        if bits < 4:
            return i
        shift = bits - 4
        return ((i >> shift) & 0x07) | ((shift + 1) << 3)

    def int4_to_long(i: int) -> int:
        bits, shift = i & 0x07, (i >> 3) - 1
        return bits if shift == -1 else (bits | 0x08) << shift

    free = 255 - long_to_int4(2**31 - 1)
    byte = n if n < free else free + long_to_int4(n - free)
    return byte if byte < free else free + int4_to_long(byte - free)


def test_document_lengths_are_rounded_like_lucene():
    ns = np.arange(0, 20000)
    np.testing.assert_array_equal(lucene_length(ns), [smallfloat_length(int(n)) for n in ns])
    assert smallfloat_length(108) == 104 and smallfloat_length(23) == 23


def lucene_bm25(query: list[str], docs: list[list[str]], k1=0.9, b=0.4, lossy=True) -> np.ndarray:
    """Lucene 8's BM25Similarity, written out."""
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    scores = np.zeros(n)
    for t in query:
        df = sum(t in d for d in docs)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            dl = smallfloat_length(len(d)) if lossy else len(d)
            if tf:
                scores[i] += idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))
    return scores


@pytest.mark.parametrize("lengths", ["lucene", "exact"])
def test_scores_equal_lucene_formula(corpus, lengths):
    long_texts = [" ".join(["river ocean physics"] * 20), " ".join(f"word{i} prime" for i in range(54))]  # 60 and 108 terms
    corpus = Corpus.from_passages([*corpus, *(Passage(f"long{i}", "Long", t) for i, t in enumerate(long_texts))])
    index = BM25Index.build(corpus, lengths=lengths)
    a = LuceneAnalyzer()
    docs = [a(f"{t} {x}") for t, x in zip(corpus.titles, corpus.texts)]
    assert max(map(len, docs)) > 24  # so that rounding matters
    for q in ["first nobel prize physics", "great lakes ocean river", "prime number number greater", "zzz unknown"]:
        expected = lucene_bm25(a(q), docs, lossy=lengths == "lucene")
        res = index.search([q], k=len(corpus))
        got = np.zeros(len(corpus))
        valid = res.rows[0] >= 0
        got[res.rows[0][valid]] = res.scores[0][valid]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        # Only passages matching a query term come back (Lucene returns no zero-score hits).
        assert valid.sum() == (expected > 0).sum()


def test_title_is_indexed(corpus):
    res = BM25Index.build(corpus).search(["kangaroo"], k=3)
    assert corpus.titles[res.rows[0][0]] == "Kangaroo"
    only_title = Corpus.from_passages([Passage("1", "Zanzibar", "an island"), Passage("2", "Other", "nothing")])
    assert BM25Index.build(only_title).search(["zanzibar"], k=2).rows[0].tolist() == [0, -1]


def test_save_load_mmap_round_trip_and_checks(tmp_path, corpus):
    index = BM25Index.build(corpus)
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25", corpus=corpus)
    qs = ["who created python", "mount mckinley height", "the of"]
    a, b = index.search(qs, k=5), loaded.search(qs, k=5)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores)
    assert (b.rows[2] == -1).all()  # stopwords only: no hits
    assert loaded.k1 == 0.9 and loaded.b == 0.4
    other = Corpus.from_passages([Passage("x", "t", "text")])
    with pytest.raises(MismatchError, match="other ids"):
        BM25Index.load(tmp_path / "bm25", corpus=other)
    npy = next((tmp_path / "bm25").glob("data.csc.index.npy"))
    npy.write_bytes(npy.read_bytes()[:-8])
    with pytest.raises(DenseprError, match="truncated or altered"):
        BM25Index.load(tmp_path / "bm25")
    with pytest.raises(DenseprError, match="no such directory"):
        BM25Index.load(tmp_path / "nothing")


def test_k_larger_than_corpus_pads(corpus):
    res = BM25Index.build(corpus).search(["python"], k=50)
    assert res.rows.shape == (1, 50) and (res.rows[0][1:] == -1).all()


def _tied_corpus(n: int = 60) -> Corpus:
    # many passages with the same text: equal scores, so the order among them is all tie-breaking
    return Corpus.from_passages(Passage(f"d{i}", "", "alpha beta" if i % 3 else "alpha gamma delta") for i in range(n))


def test_ties_are_ordered_by_passage_even_beyond_the_margin(monkeypatch):
    import densepr.retrieve.bm25 as bm25

    idx = BM25Index.build(_tied_corpus())
    for margin in (16, 0):  # 0: every tie straddles the cut, so the exact fallback decides
        monkeypatch.setattr(bm25, "TIE_MARGIN", margin)
        res = idx.search(["alpha beta", "alpha"], k=5, backend="numpy")
        assert res.rows[0].tolist() == [1, 2, 4, 5, 7]  # the 40 'alpha beta' passages, lowest first
        assert res.rows[1].tolist() == [1, 2, 4, 5, 7]  # 'alpha' alone: the shorter passages score higher
    with pytest.raises(DenseprError, match="backend"):
        idx.search(["alpha"], backend="lucene")


def test_numba_backend_equals_numpy(corpus):
    pytest.importorskip("numba", reason="numba is not installed (pip install 'densepr[fast]')")
    for c in (corpus, _tied_corpus()):
        idx = BM25Index.build(c)
        qs = ["alpha beta", "python programming language", "the of and", "", "zzz unknown", "gamma alpha delta"]
        a, b = idx.search(qs, k=7, backend="numpy"), idx.search(qs, k=7, backend="numba")
        assert np.array_equal(a.rows, b.rows) and np.array_equal(a.scores, b.scores)


def test_searches_in_threads_with_either_backend_share_one_index(corpus):
    """Serving searches from several threads: each call's backend is its own, the shared model is never changed."""
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("numba", reason="numba is not installed (pip install 'densepr[fast]')")
    idx = BM25Index.build(corpus)
    before = idx.model.backend
    qs = ["alpha beta", "python programming language", "gamma alpha delta"]
    want = idx.search(qs, k=5, backend="numpy")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: idx.search(qs, k=5, backend=("numpy", "numba", "pruned")[i % 3]), range(18)))
    assert all(np.array_equal(g.rows, want.rows) and np.array_equal(g.scores, want.scores) for g in got)
    assert idx.model.backend == before
