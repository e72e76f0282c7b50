"""A corpus at the paper's size: N synthetic 100-word passages whose term statistics follow the embedded corpus.

DPR's ``psgs_w100.tsv`` (21,015,324 passages) cannot be fetched here, so the scale benchmark
runs on this. What it fits, on the embedded corpus (the 10,033 Wikipedia summaries as
``densepr reproduce`` reads them, one passage per summary), over **whitespace words** of the
passage texts (``text.split()``: DPR's 100-word unit), counted as **keys**: lower-cased, leading
and trailing punctuation off (what BM25's analyzer sees before stopwords and stemming):

* **Heaps' law** ``V(n) = K n^beta``: least squares on log V vs log n over 60 log-spaced
  prefixes of the token stream (corpus order), from 10^4 tokens to all of them.
* **Zipf-Mandelbrot** ``f(r) = C / (r + q)^s``: least squares on log f vs log r over 200
  log-spaced ranks among the words seen at least 3 times (the hapax plateau left out).
* **The generating distribution over ranks**: the Zipf-Mandelbrot fit for ranks 1..R0, then a
  power-law tail ``p(r) ~ r^-a`` (continuous at R0, unbounded support; a continuous Pareto
  sampled by inverse CDF, truncated at 2^62). Sampling i.i.d. from Zipf-Mandelbrot over a fixed
  vocabulary of ``V_max = Heaps(total tokens)`` words does not follow Heaps' law: with s ~ 1 it
  gives 2.5-4x the Heaps vocabulary at 10^5-10^8 tokens and, since not every one of V_max words
  is drawn, less than V_max at the end. So (R0, a) are calibrated numerically so that the
  *expected* vocabulary ``E V(n) = sum_r 1 - exp(-n p_r)`` matches the Heaps fit from 10^5
  tokens to the paper's size (2.1 billion tokens); the residual is recorded in the JSON
  (``calibration.max_abs_log_error``).
* **Burstiness**: real text repeats its topic's words, so each token after a passage's first is,
  with probability rho, a copy of a uniformly chosen earlier token of its passage (the marginal
  frequencies stay the model's; the vocabulary is that of the (1 - rho) n fresh draws, which the
  calibration above accounts for). rho is fitted so that 100-word passages hold as many distinct
  keys as the first 100 words of the embedded passages that have 100 (66 per 100).
* **Words**: rank r <= the embedded vocabulary is the embedded corpus's r-th most frequent key,
  written as one of its surface forms (``The``, ``the``, ``the,``) drawn with their embedded shares;
  beyond it a deterministic pronounceable lower-case string of 3+ consonant-vowel syllables
  (consonants ``bdfhklmnprsvz``, vowels ``aiou``: no ``e``, ``t``, ``g``, ``y``, so Porter's
  stemmer leaves them whole), skipping any that spells an embedded word.
* **Titles**: one per article of a geometric number of passages (mean 3.7, psgs_w100's 21M
  passages over ~5.7M articles), 1-3 words drawn from the same distribution without its 100
  most frequent words, capitalised.

Passages are numbered 1..N; passage i is the same whatever N (chunks of 100,000 passages are
drawn from their own generator seeded by ``(seed, chunk)``), so a corpus is a prefix of any
larger one with the same seed. Streaming and in constant memory: a chunk at a time, written to
``OUTPUT.partial`` (with ``OUTPUT.partial.json`` recording the chunks done, so a killed run
continues where it stopped) and renamed over OUTPUT at the end. Same TSV layout and quoting as
``densepr.data.passages.write_passages_tsv`` (``csv.writer``, tab, header ``id text title``).

``--check`` compares the generated corpus with the embedded one at the same number of tokens
(vocabulary, hapax fraction, top-100 word frequencies, passage length, BM25 terms and distinct
terms per passage, BM25 vocabulary) and with the
Heaps prediction at its full size; prints a table and writes
``benchmarks/scale/results/synthetic-corpus.json`` (fitted parameters included).

    python benchmarks/scale/synthetic_corpus.py --passages N --output PATH [--seed S] [--check]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from densepr.data.passages import TSV_HEADER, iter_passages_tsv
from densepr.fileio.atomic import write_json

RESULTS = Path(__file__).parent / "results" / "synthetic-corpus.json"
PAPER_PASSAGES = 21_015_324  # psgs_w100.tsv
WORDS = 100  # per passage: DPR's rule
CHUNK = 100_000  # passages per chunk: part of the definition (chunk k is drawn from rng(seed, k))
ARTICLE_MEAN = 3.7  # passages per article
TITLE_SKIP = 100  # title words are drawn without the 100 most frequent words
MAX_RANK = float(2**62)
CONSONANTS, VOWELS = "bdfhklmnprsvz", "aiou"
SYLLABLES = [c + v for c in CONSONANTS for v in VOWELS]  # 52
MIN_SYLLABLES = 3
_CV_WORD = re.compile(f"(?:[{CONSONANTS}][{VOWELS}]){{{MIN_SYLLABLES},}}")
VERSION = 1


# -- the embedded corpus and the fits ---------------------------------------------------------------
def embedded_corpus(cache_dir: str | os.PathLike[str] | None = None):
    """The embedded corpus as ``densepr reproduce`` builds passages.tsv (None if not fetched)."""
    from densepr.data import EmbeddedData, load_wiki_summaries

    data = EmbeddedData(cache_dir)
    if not data.available:
        return None
    return load_wiki_summaries(data.summaries)


def fit_heaps(tokens: list[str], start: int = 10_000, points: int = 60) -> dict:
    """K, beta of V(n) = K n^beta by least squares on log-log over prefixes of the token stream."""
    marks = np.unique(np.geomspace(min(start, len(tokens)), len(tokens), points).astype(np.int64))
    seen: set[str] = set()
    vs, j = [], 0
    for i, w in enumerate(tokens, 1):
        seen.add(w)
        if i == marks[j]:
            vs.append(len(seen))
            j += 1
            if j == len(marks):
                break
    beta, log_k = np.polyfit(np.log(marks), np.log(vs), 1)
    return {"K": float(np.exp(log_k)), "beta": float(beta), "prefixes": len(marks), "from_tokens": int(marks[0]), "to_tokens": int(marks[-1])}


def fit_zipf_mandelbrot(freqs: np.ndarray, min_count: int = 3, points: int = 200) -> dict:
    """C, q, s of f(r) = C / (r + q)^s (relative frequencies) by least squares on log f over log-spaced ranks."""
    from scipy.optimize import least_squares

    total = float(freqs.sum())
    top = int((freqs >= min_count).sum())
    r = np.unique(np.geomspace(1, top, points).astype(np.int64))
    y = np.log(freqs[r - 1] / total)
    res = least_squares(lambda p: p[0] - p[2] * np.log(r + p[1]) - y, [0.0, 1.0, 1.0], bounds=([-50, -0.99, 0.1], [50, 1e4, 5]))
    log_c, q, s = res.x
    return {"C": float(np.exp(log_c)), "q": float(q), "s": float(s), "ranks_fitted": top, "min_count": min_count}


@dataclass
class Model:
    """The rank distribution (Zipf-Mandelbrot head to R0, Pareto tail of exponent a) and the words."""

    q: float
    s: float
    r0: int
    a: float
    words: list[str]  # the embedded words (keys) by rank (most frequent first)
    forbidden: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # syllable codes that spell an embedded word
    surfaces: dict[str, Counter] | None = None  # key -> its surface forms' counts in the embedded corpus
    rho: float = 0.0  # share of a passage's tokens that repeat an earlier token of the passage (burstiness)

    def __post_init__(self) -> None:
        head = (np.arange(1, self.r0 + 1) + self.q) ** -self.s
        # The tail density at R0 + 1 continues the head: P_tail * (a - 1) / (R0 + 1) = (R0 + 1 + q)^-s.
        tail = (self.r0 + 1 + self.q) ** -self.s * (self.r0 + 1) / (self.a - 1)
        z = head.sum() + tail
        self.head_p, self.tail_p = head / z, tail / z
        self.head_cdf = np.cumsum(self.head_p)
        self._words = np.array(self.words, dtype=object)
        self.set_surfaces(self.surfaces)

    def set_surfaces(self, surfaces: dict[str, Counter] | None) -> None:
        self.surfaces = surfaces
        # Surface forms of key k: entries of _forms whose _form_cdf lies in (k, k + 1] (k + the running share)
        forms, cdf = [], []
        for k, w in enumerate(self.words if surfaces else ()):
            c = (surfaces or {}).get(w) or Counter({w: 1})
            total, run = sum(c.values()), 0
            for form, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])):
                run += n
                forms.append(form)
                cdf.append(k + run / total)
        self._forms, self._form_cdf = np.array(forms, dtype=object), np.array(cdf)

    def tail_density(self, r: np.ndarray) -> np.ndarray:
        xm = self.r0 + 1
        return self.tail_p * (self.a - 1) / xm * (r / xm) ** -self.a

    def expected_vocab(self, n: float) -> float:
        """E V(n) = sum_r 1 - exp(-m p_r) over the m = (1 - rho) n fresh draws among n tokens (a repeat
        adds no word): the head exactly, the tail by quadrature on a log grid."""
        n = n * (1 - self.rho)
        head = float(np.sum(-np.expm1(-n * self.head_p)))
        xm = self.r0 + 1
        hi = max(xm * 10.0, (n * self.tail_density(np.array(float(xm))) * 1e12) ** (1 / self.a) * xm)
        x = np.geomspace(xm, hi, 4000)
        y = -np.expm1(-n * self.tail_density(x))
        return head + float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))

    def sample(self, rng: np.random.Generator, n: int, skip: int = 0) -> np.ndarray:
        """n ranks (1-based, int64); ``skip``: ranks 1..skip never drawn (shifted past)."""
        u = rng.random(n)
        ranks = np.empty(n, np.int64)
        head = u < self.head_cdf[-1]
        ranks[head] = np.searchsorted(self.head_cdf, u[head], side="right") + 1
        # the tail: a continuous Pareto from R0 + 1, by inverse CDF of the tail's share of u
        v = (u[~head] - self.head_cdf[-1]) / self.tail_p  # uniform in [0, 1)
        lo = self.r0 + 1
        cut = 1.0 - (MAX_RANK / lo) ** (1 - self.a)  # truncated at MAX_RANK
        ranks[~head] = np.floor(lo * (1.0 - v * cut) ** (-1.0 / (self.a - 1)))
        return ranks + skip

    def passage_ranks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, WORDS) ranks: i.i.d. draws, then each token after the first, with probability rho, replaced
        by a uniformly chosen earlier token of its passage (a cache model: words recur within a passage
        as in real text; each token's marginal distribution stays the model's)."""
        ranks = self.sample(rng, n * WORDS).reshape(n, WORDS)
        repeat, pos = rng.random((n, WORDS)) < self.rho, rng.random((n, WORDS))
        for j in range(1, WORDS):
            rows = np.flatnonzero(repeat[:, j])
            ranks[rows, j] = ranks[rows, (pos[rows, j] * j).astype(np.int64)]
        return ranks

    def to_words(self, ranks: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Object array of the words of ``ranks``: embedded words (with ``rng``, each token one of its
        key's surface forms, drawn with their embedded shares), then syllable strings."""
        out = np.empty(len(ranks), dtype=object)
        real = ranks <= len(self._words)
        if rng is None:
            out[real] = self._words[ranks[real] - 1]
        else:
            k = ranks[real] - 1
            pick = np.searchsorted(self._form_cdf, k + rng.random(len(k)), side="right")
            out[real] = self._forms[np.minimum(pick, len(self._forms) - 1)]
        if not real.all():
            uniq, inv = np.unique(ranks[~real] - len(self._words) - 1, return_inverse=True)
            out[~real] = synthetic_words(skip_codes(uniq, self.forbidden))[inv]
        return out


def _offsets() -> np.ndarray:
    """Where the codes of each syllable count start: 3-syllable words first, then 4, ..."""
    n = [len(SYLLABLES) ** k for k in range(MIN_SYLLABLES, 12)]
    return np.concatenate([[0], np.cumsum(n, dtype=np.int64)]).astype(np.int64)


def synthetic_words(codes: np.ndarray) -> np.ndarray:
    """Code c -> the c-th pronounceable word (3 syllables, then 4, ...; base-52 digits), vectorised."""
    offs = _offsets()
    length = np.searchsorted(offs, codes, side="right") - 1 + MIN_SYLLABLES
    out = np.empty(len(codes), dtype=object)
    syl = np.frombuffer("".join(SYLLABLES).encode(), dtype=np.uint8).reshape(-1, 2)
    for k in np.unique(length):
        sel = length == k
        local = codes[sel] - offs[k - MIN_SYLLABLES]
        digits = np.empty((len(local), k), np.int64)
        for i in range(k - 1, -1, -1):
            local, digits[:, i] = np.divmod(local, len(SYLLABLES))
        chars = np.ascontiguousarray(syl[digits].reshape(len(digits), 2 * k))
        out[sel] = chars.view(f"S{2 * k}").ravel().astype(f"U{2 * k}").astype(object)
    return out


def word_code(word: str) -> int:
    """Inverse of :func:`synthetic_words` for a CV word of 3+ syllables."""
    k = len(word) // 2
    c = 0
    for i in range(k):
        c = c * len(SYLLABLES) + SYLLABLES.index(word[2 * i : 2 * i + 2])
    return int(_offsets()[k - MIN_SYLLABLES] + c)


def skip_codes(j: np.ndarray, forbidden: np.ndarray) -> np.ndarray:
    """The j-th code not in ``forbidden`` (sorted): synthetic words never spell an embedded word."""
    c = j.copy()
    while True:
        nxt = j + np.searchsorted(forbidden, c, side="right")
        if np.array_equal(nxt, c):
            return c
        c = nxt


def distinct_share(model: Model, passages: int = 4000) -> float:
    """Mean share of distinct words in the model's 100-word passages (a fixed sample)."""
    r = np.sort(model.passage_ranks(np.random.default_rng(12345), passages), axis=1)
    return float(np.mean((np.diff(r, axis=1) != 0).sum(1) + 1) / WORDS)


def fit_rho(model: Model, target: float) -> float:
    """The repeat share rho whose passages hold ``target`` distinct words per word (bisection)."""
    lo, hi = 0.0, 0.95
    for _ in range(20):
        model.rho = (lo + hi) / 2
        lo, hi = (model.rho, hi) if distinct_share(model) > target else (lo, model.rho)
    return (lo + hi) / 2


def calibrate(zm: dict, heaps: dict, words: list[str], forbidden: np.ndarray, total_tokens: float, rho: float = 0.0) -> tuple[Model, dict]:
    """(R0, a) minimising the RMS log error of E V(n) against Heaps over n = 10^5 .. total_tokens."""
    from scipy.optimize import minimize_scalar

    ns = np.geomspace(1e5, total_tokens, 12)
    want = np.log(heaps["K"] * ns ** heaps["beta"])

    def err(r0: int, a: float) -> np.ndarray:
        m = Model(zm["q"], zm["s"], r0, a, words, forbidden, rho=rho)
        return np.log([m.expected_vocab(n) for n in ns]) - want

    best = None
    for r0 in np.unique(np.geomspace(100, 30_000, 16).astype(int)):
        res = minimize_scalar(lambda a, r0=int(r0): float(np.sqrt(np.mean(err(r0, a) ** 2))), bounds=(1.05, 2.5), method="bounded",
                              options={"xatol": 1e-4})  # fmt: skip
        if best is None or res.fun < best[0]:
            best = (res.fun, int(r0), float(res.x))
    _, r0, a = best
    e = err(r0, a)
    model = Model(zm["q"], zm["s"], r0, a, words, forbidden, rho=rho)
    return model, {"R0": r0, "a": a, "tokens_from": 1e5, "tokens_to": float(total_tokens), "rms_log_error": float(np.sqrt(np.mean(e**2))),
                   "max_abs_log_error": float(np.abs(e).max()), "head_mass": float(model.head_cdf[-1])}  # fmt: skip


_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def key(word: str) -> str:
    """A whitespace word as a vocabulary entry: lower-cased, leading and trailing punctuation off
    (``"(City,"`` -> ``city``), as BM25's analyzer sees it before stemming; a word of punctuation only stays itself."""
    return _EDGE.sub("", word.lower()) or word


def fit(corpus, passages: int = PAPER_PASSAGES) -> tuple[Model, dict]:
    """Fit everything on the embedded corpus; the calibration runs to the tokens of max(passages, 21M)."""
    surface = [w for t in corpus.texts for w in t.split()]
    tokens = [key(w) for w in surface]
    surfaces: dict[str, Counter] = {}
    for k, w in zip(tokens, surface):
        surfaces.setdefault(k, Counter())[w] += 1
    counts = Counter(tokens)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    words = [w for w, _ in ranked]
    freqs = np.array([c for _, c in ranked], dtype=np.float64)
    heaps = fit_heaps(tokens)
    zm = fit_zipf_mandelbrot(freqs)
    lowered = {m for w in words for m in re.findall("[a-z]+", w.lower()) if _CV_WORD.fullmatch(m)}
    forbidden = np.array(sorted(word_code(w) for w in lowered), dtype=np.int64)
    total = float(max(passages, PAPER_PASSAGES) * WORDS)
    # Burstiness: the distinct share of the first 100 words of the embedded passages that have 100
    # (real text repeats its topic's words); rho is fitted to it and (R0, a) calibrated again for it.
    windows = [[key(w) for w in t.split()[:WORDS]] for t in corpus.texts if len(t.split()) >= WORDS]
    target = float(np.mean([len(set(w)) / WORDS for w in windows]))
    rho = 0.0
    for _ in range(2):
        model, cal = calibrate(zm, heaps, words, forbidden, total, rho)
        rho = fit_rho(model, target)
    model, cal = calibrate(zm, heaps, words, forbidden, total, rho)
    cal["burstiness"] = {"rho": rho, "distinct_share_target": target, "from_passages": len(windows), "distinct_share": distinct_share(model)}
    model.set_surfaces(surfaces)
    params = {"unit": "whitespace words of passage texts (text.split()), lower-cased, leading/trailing punctuation off", "embedded": {
        "passages": len(corpus), "tokens": len(tokens), "vocabulary": len(words), "surface_forms": len(set(surface))},
        "heaps": heaps, "zipf_mandelbrot": zm, "calibration": cal,
        "heaps_at_paper_size": {"tokens": PAPER_PASSAGES * WORDS, "vocabulary": heaps["K"] * (PAPER_PASSAGES * WORDS) ** heaps["beta"],
                                "expected_vocabulary": model.expected_vocab(PAPER_PASSAGES * WORDS)},
        "synthetic_words": {"consonants": CONSONANTS, "vowels": VOWELS, "min_syllables": MIN_SYLLABLES, "embedded_words_skipped": len(forbidden)},
        "titles": {"words": "1-3", "article_mean_passages": ARTICLE_MEAN, "skip_top_ranks": TITLE_SKIP},
        "chunk": CHUNK, "version": VERSION}  # fmt: skip
    return model, params


# -- generation -------------------------------------------------------------------------------------
def chunk_rows(model: Model, seed: int, chunk: int, first: int, n: int) -> list[tuple[str, str, str]]:
    """Rows (id, text, title) of passages first..first+n-1 (1-based) of chunk ``chunk``: the chunk's
    first n passages (the whole chunk is always drawn, so a corpus is a prefix of any larger one)."""
    rng, want, n = np.random.default_rng([seed, chunk]), n, CHUNK
    words = model.to_words(model.passage_ranks(rng, n).ravel(), rng).reshape(n, WORDS)
    # articles: geometric lengths; each a title of 1-3 words
    lengths = rng.geometric(1 / ARTICLE_MEAN, size=n)
    starts = np.cumsum(lengths) - lengths
    articles = int(np.searchsorted(starts, n))
    title_len = rng.integers(1, 4, size=articles)
    title_words = model.to_words(model.sample(rng, int(title_len.sum()), skip=TITLE_SKIP))
    bounds = np.cumsum(title_len)
    titles = [" ".join(w[:1].upper() + w[1:] for w in title_words[b - k : b]) for b, k in zip(bounds.tolist(), title_len.tolist())]
    article_of = np.repeat(np.arange(articles), lengths[:articles])[:n]
    return [(str(first + i), " ".join(ws), titles[a]) for i, (ws, a) in enumerate(zip(words[:want].tolist(), article_of[:want].tolist()))]


def generate(model: Model, passages: int, output: str | os.PathLike[str], seed: int = 0, log=print) -> dict:
    """Write the corpus, chunk by chunk, to OUTPUT.partial (resumable), then rename it to OUTPUT."""
    output = Path(output)
    partial, state_path = output.with_name(output.name + ".partial"), output.with_name(output.name + ".partial.json")
    want = {"passages": passages, "seed": seed, "version": VERSION, "chunk": CHUNK}
    done, size = 0, 0
    if partial.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        if {k: state.get(k) for k in want} == want and partial.stat().st_size >= state["bytes"]:
            done, size = state["chunks_done"], state["bytes"]
            log(f"resuming {partial} after {done} chunks ({min(done * CHUNK, passages):,} passages)")
    t0 = time.perf_counter()
    chunks = -(-passages // CHUNK)
    with open(partial, "r+b" if done else "wb") as fh:
        fh.truncate(size)
        fh.seek(size)
        if not done:
            fh.write(("\t".join(TSV_HEADER) + "\n").encode())
        for k in range(done, chunks):
            first = k * CHUNK + 1
            rows = chunk_rows(model, seed, k, first, min(CHUNK, passages - k * CHUNK))
            for i in range(0, len(rows), 10_000):  # encoded in pieces: a whole chunk's text as one str is ~4x its bytes
                buf = io.StringIO()
                csv.writer(buf, delimiter="\t", lineterminator="\n").writerows(rows[i : i + 10_000])  # write_passages_tsv's dialect
                fh.write(buf.getvalue().encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            write_json(state_path, {**want, "chunks_done": k + 1, "bytes": fh.tell()})
            log(f"  {first + len(rows) - 1:,} / {passages:,} passages, {time.perf_counter() - t0:.0f} s")
    os.replace(partial, output)
    state_path.unlink()
    return {"passages": passages, "seed": seed, "seconds": round(time.perf_counter() - t0, 1), "bytes": output.stat().st_size}


# -- the check ----------------------------------------------------------------------------------------
def token_stats(texts, marks: list[int], top_words: list[str]) -> dict:
    """Vocabulary, hapax fraction and top-word frequencies after each number of tokens in ``marks``
    (taken at the first passage boundary at or after it), and the mean passage length."""
    counts: Counter = Counter()
    memo: dict[str, str] = {}  # word -> key: the regex once per distinct word
    out, marks = {}, sorted(marks)
    n_tok = n_pass = 0
    j = 0
    for text in texts:
        toks = [memo.get(w) or memo.setdefault(w, key(w)) for w in text.split()]
        counts.update(toks)
        n_tok += len(toks)
        n_pass += 1
        while j < len(marks) and n_tok >= marks[j]:
            v = len(counts)
            out[marks[j]] = {"tokens": n_tok, "passages": n_pass, "vocabulary": v,
                             "hapax_fraction": sum(1 for c in counts.values() if c == 1) / v,
                             "top_freq": [counts[w] / n_tok for w in top_words]}  # fmt: skip
            j += 1
    return {"points": out, "tokens": n_tok, "passages": n_pass, "mean_words": n_tok / max(n_pass, 1)}


def bm25_terms(texts, titles) -> dict:
    from densepr.retrieve.bm25_analyzer import LuceneAnalyzer

    an = LuceneAnalyzer()
    terms = [an(f"{t} {x}") for t, x in zip(titles, texts)]
    return {"passages": len(terms), "terms_per_passage": float(np.mean([len(t) for t in terms])),
            "distinct_terms_per_passage": float(np.mean([len(set(t)) for t in terms])), "vocabulary": len({w for t in terms for w in t})}  # fmt: skip


def check(path: str | os.PathLike[str], corpus, model: Model, params: dict) -> dict:
    """The generated corpus against the embedded one (same number of tokens) and Heaps (every size)."""
    emb_tokens = params["embedded"]["tokens"]
    top = model.words[:100]
    emb = token_stats(corpus.texts, [emb_tokens], top)["points"][emb_tokens]

    def texts_of(path):
        for p in iter_passages_tsv(path):
            yield p.text

    n_total = sum(1 for _ in iter_passages_tsv(path)) * WORDS
    marks = sorted({int(m) for m in np.geomspace(min(10_000, n_total), n_total, 12)} | ({emb_tokens} if emb_tokens <= n_total else set()))
    gen = token_stats(texts_of(path), marks, top)
    heaps = params["heaps"]
    rows = []
    for m in marks:
        p = gen["points"][m]
        rows.append({"tokens": p["tokens"], "passages": p["passages"], "vocabulary": p["vocabulary"],
                     "heaps": heaps["K"] * p["tokens"] ** heaps["beta"], "expected": model.expected_vocab(p["tokens"]),
                     "hapax_fraction": p["hapax_fraction"]})  # fmt: skip
    res = {"corpus": str(path), "passages": gen["passages"], "tokens": gen["tokens"], "mean_words": gen["mean_words"], "growth": rows,
           "embedded_mean_words": float(np.mean([len(t.split()) for t in corpus.texts]))}  # fmt: skip
    if emb_tokens in gen["points"]:
        g = gen["points"][emb_tokens]
        a, b = np.array(emb["top_freq"]), np.array(g["top_freq"])
        from scipy.stats import spearmanr

        n_pass = g["passages"]
        sample = [p for _, p in zip(range(n_pass), iter_passages_tsv(path))]
        res["same_size"] = {
            "tokens": emb_tokens, "embedded": {k: emb[k] for k in ("passages", "vocabulary", "hapax_fraction")},
            "generated": {k: g[k] for k in ("tokens", "passages", "vocabulary", "hapax_fraction")},
            "heaps": heaps["K"] * emb_tokens ** heaps["beta"],
            "top100_pearson": float(np.corrcoef(a, b)[0, 1]), "top100_spearman": float(spearmanr(a, b).statistic),
            "top100_share": {"embedded": float(a.sum()), "generated": float(b.sum())},
            "bm25_terms": {"embedded": bm25_terms(corpus.texts, corpus.titles),
                           "generated": bm25_terms([p.text for p in sample], [p.title for p in sample])},
        }  # fmt: skip
        # per 100 words: the embedded passages of 100 words or more (their first 100) beside as many generated ones
        long = [i for i, t in enumerate(corpus.texts) if len(t.split()) >= WORDS]
        res["same_size"]["bm25_terms_100_words"] = {
            "embedded": bm25_terms([" ".join(corpus.texts[i].split()[:WORDS]) for i in long], [corpus.titles[i] for i in long]),
            "generated": bm25_terms([p.text for p in sample[: len(long)]], [p.title for p in sample[: len(long)]])}  # fmt: skip
    return res


def print_check(res: dict, params: dict) -> None:
    h, c = params["heaps"], params["calibration"]
    print(f"fits (whitespace words, lower-cased, edge punctuation off): Heaps K={h['K']:.3f} beta={h['beta']:.4f}; Zipf-Mandelbrot q={params['zipf_mandelbrot']['q']:.3f} "
          f"s={params['zipf_mandelbrot']['s']:.4f}; tail from R0={c['R0']} with a={c['a']:.4f} (calibration max |log err| {c['max_abs_log_error']:.3f}); "
          f"repeats within a passage rho={c['burstiness']['rho']:.3f}")
    if "same_size" in res:
        s = res["same_size"]
        e, g = s["embedded"], s["generated"]
        print(f"\nat the embedded corpus's size ({s['tokens']:,} tokens)   embedded   generated")
        print(f"  passages                              {e['passages']:>10,} {g['passages']:>10,}")
        print(f"  vocabulary (Heaps {s['heaps']:,.0f})            {e['vocabulary']:>10,} {g['vocabulary']:>10,}")
        print(f"  hapax fraction                        {e['hapax_fraction']:>10.3f} {g['hapax_fraction']:>10.3f}")
        print(f"  mean words per passage                {res['embedded_mean_words']:>10.1f} {res['mean_words']:>10.1f}")
        print(f"  top-100 words' share of tokens        {s['top100_share']['embedded']:>10.3f} {s['top100_share']['generated']:>10.3f}")
        print(f"  top-100 frequencies: Pearson {s['top100_pearson']:.4f}, Spearman {s['top100_spearman']:.4f}")
        be, bg = s["bm25_terms"]["embedded"], s["bm25_terms"]["generated"]
        print(f"  BM25 terms per passage (title+text)   {be['terms_per_passage']:>10.1f} {bg['terms_per_passage']:>10.1f}")
        w = s["bm25_terms_100_words"]
        print(f"  per 100 words ({w['embedded']['passages']:,} passages each): BM25 terms {w['embedded']['terms_per_passage']:.1f} vs "
              f"{w['generated']['terms_per_passage']:.1f}, distinct {w['embedded']['distinct_terms_per_passage']:.1f} vs {w['generated']['distinct_terms_per_passage']:.1f}")
        print(f"  BM25 vocabulary                       {be['vocabulary']:>10,} {bg['vocabulary']:>10,}")
    print("\nvocabulary growth of the generated corpus")
    print(f"  {'tokens':>13} {'passages':>10} {'vocabulary':>11} {'Heaps':>11} {'ratio':>6} {'hapax':>6}")
    for r in res["growth"]:
        print(f"  {r['tokens']:>13,} {r['passages']:>10,} {r['vocabulary']:>11,} {r['heaps']:>11,.0f} {r['vocabulary'] / r['heaps']:>6.3f} {r['hapax_fraction']:>6.3f}")


def _peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, required=True)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare with the embedded corpus; write " + str(RESULTS.relative_to(Path(__file__).parents[2])))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.passages <= 0:
        print("error: --passages must be positive", file=sys.stderr)
        return 2
    if args.output.is_dir() or not args.output.parent.is_dir():
        print(f"error: {args.output}: {'is a directory' if args.output.is_dir() else 'its folder does not exist'}", file=sys.stderr)
        return 2
    corpus = embedded_corpus(args.cache_dir)
    if corpus is None:
        print("error: the embedded corpus is not fetched; run `densepr data fetch` first", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    model, params = fit(corpus, args.passages)
    fit_s = time.perf_counter() - t0
    print(f"fitted in {fit_s:.1f} s")
    run = generate(model, args.passages, args.output, args.seed)
    run["peak_rss_mib"] = _peak_rss_mib()
    print(f"wrote {args.passages:,} passages to {args.output} in {run['seconds']} s")
    if args.check:
        t0 = time.perf_counter()
        res = check(args.output, corpus, model, params)
        res["check_seconds"] = round(time.perf_counter() - t0, 1)
        res["peak_rss_mib"] = _peak_rss_mib()  # of the whole process: fit, generation and check
        from densepr.machine import machine_info
        print_check(res, params)
        write_json(args.results, {"machine": machine_info(), "params": params, "generate": {**run, "fit_seconds": round(fit_s, 1)}, "check": res,
                                  "command": "python benchmarks/scale/synthetic_corpus.py " + " ".join(argv if argv is not None else sys.argv[1:])})  # fmt: skip
        print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
