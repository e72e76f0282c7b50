"""DPR's ``has_answer``, exactly as the reference code: does a passage contain a gold answer?

A retrieved passage is a hit when its *text* (never its title) contains a gold answer
(``dpr/data/qa_validation.py``, also Pyserini's ``evaluate_dpr_retrieval.py``):

* ``string`` match: NFD-normalise passage and answer, tokenise both with DrQA's
  SimpleTokenizer (runs of ``[\\p{L}\\p{N}\\p{M}]`` or any single non-space, non-control
  character), lower-case, and look for the answer's tokens as a contiguous subsequence.
* ``regex`` match (CuratedTREC): NFD-normalise, then ``re.search`` each answer pattern with
  IGNORECASE | UNICODE | MULTILINE; a pattern that does not compile never matches.

Top-k accuracy over these hits is in :mod:`densepr.evaluate.topk`.
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from densepr.data.passages import Corpus
from densepr.data.qa import QA, QASet, default_match
from densepr.errors import DenseprError
from densepr.fileio.atomic import read_json, write_json
from densepr.progress import progress_bar

# DrQA's SimpleTokenizer, as vendored by DPR (dpr/utils/tokenizers.py).
_ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
_NON_WS = r"[^\p{Z}\p{C}]"
_TOKEN_RE = regex.compile(f"({_ALPHA_NUM})|({_NON_WS})", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def normalize(text: str) -> str:
    """Unicode NFD, as DPR applies to both passages and answers."""
    return unicodedata.normalize("NFD", text)


def simple_tokenize(text: str) -> list[str]:
    """DrQA SimpleTokenizer tokens (surface forms, case kept). Does not normalise."""
    return [m.group() for m in _TOKEN_RE.finditer(text)]


def answer_tokens(text: str) -> list[str]:
    """NFD, tokenise, lower-case: the token sequence DPR compares."""
    return [t.lower() for t in simple_tokenize(normalize(text))]


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str] | None:
    try:
        with warnings.catch_warnings():  # answer files hold odd patterns; warnings are noise here
            warnings.simplefilter("ignore")
            return re.compile(normalize(pattern), flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except (re.error, OverflowError, RecursionError):
        return None  # DPR's regex_match swallows compile errors: such an answer never matches.


def regex_match(text: str, pattern: str) -> bool:
    """DPR's ``regex_match`` (the text should already be NFD-normalised)."""
    compiled = compile_pattern(pattern)
    return compiled is not None and compiled.search(text) is not None


def _joined(tokens: Iterable[str]) -> str:
    # Tokens never contain a space (spaces are \p{Z}), so a contiguous token subsequence is
    # exactly a substring match between space-delimited joins. This turns DPR's O(n*m)
    # Python loop into one C-level `in` test.
    return " " + " ".join(tokens) + " "


def has_answer(answers: Sequence[str], text: str, match: str = "string") -> bool:
    """DPR's ``has_answer``: does ``text`` (a passage's text, not its title) contain any answer?

    Args:
        answers: gold answers (regex patterns when ``match == "regex"``).
        text: the passage text.
        match: ``"string"`` or ``"regex"``.
    """
    if match == "regex":
        text = normalize(text)
        return any(regex_match(text, a) for a in answers)
    if match != "string":
        raise ValueError(f"match must be 'string' or 'regex', not {match!r}")
    haystack = _joined(answer_tokens(text))
    for a in answers:
        toks = answer_tokens(a)
        if not toks or _joined(toks) in haystack:
            return True  # an answer with no tokens matches anything, as in DPR's loop
    return False


def judge_dpr_results(path: str | os.PathLike[str], match: str | None = None) -> tuple[QASet, np.ndarray]:
    """A DPR result JSON judged as DPR's evaluation does: its questions (a set named after the file;
    ``match`` by default by that name, regex for CuratedTREC) and whether each of its passages holds an
    answer, recomputed from the passage's text: ``(questions, longest list)``, False past a shorter list."""
    from densepr.data.runs import iter_dpr_results

    path = Path(path)
    recs = list(iter_dpr_results(path))
    match = match or default_match(path.name)
    qas = QASet(path.name, [QA(r.question, tuple(r.answers)) for r in recs], match)
    width = max(max(len(r.ctxs) for r in recs), 1)
    hits = np.zeros((len(recs), width), dtype=bool)
    for i, r in enumerate(recs):
        for j, c in enumerate(r.ctxs):
            hits[i, j] = has_answer(r.answers, c["text"], match)
    return qas, hits


class AnswerMatcher:
    """``has_answer`` over a fixed corpus, with each passage tokenised once.

    Args:
        texts: passage texts, addressed by row number (titles are never matched).
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts
        self._tokens: dict[int, str] = {}
        self._nfd: dict[int, str] = {}

    def _passage_tokens(self, row: int) -> str:
        s = self._tokens.get(row)
        if s is None:
            s = self._tokens[row] = _joined(answer_tokens(self.texts[row]))
        return s

    def _passage_nfd(self, row: int) -> str:
        s = self._nfd.get(row)
        if s is None:
            s = self._nfd[row] = normalize(self.texts[row])
        return s

    @staticmethod
    def prepare(answers: Sequence[str], match: str) -> list[str] | None:
        """Joined answer token strings, or None when some answer has no tokens (matches all)."""
        if match == "regex":
            return list(answers)
        joined = []
        for a in answers:
            toks = answer_tokens(a)
            if not toks:
                return None
            joined.append(_joined(toks))
        return joined

    def check_prepared(self, row: int, prepared: list[str] | None, match: str) -> bool:
        if prepared is None:
            return True
        if match == "regex":
            text = self._passage_nfd(row)
            return any(regex_match(text, p) for p in prepared)
        hay = self._passage_tokens(row)
        return any(p in hay for p in prepared)

    def has_answer(self, row: int, answers: Sequence[str], match: str = "string") -> bool:
        return self.check_prepared(row, self.prepare(answers, match), match)

    def hits(self, rows: np.ndarray, qas: QASet) -> np.ndarray:
        """``has_answer`` for every retrieved passage.

        Args:
            rows: ``[num_questions, k]`` corpus rows, best first; ``-1`` pads short lists.
            qas: the questions (answers and match type) in the same order.

        Returns:
            ``[num_questions, k]`` bool array.
        """
        return self.hits_many([rows], qas)[0]

    def hits_many(self, runs: Sequence[np.ndarray], qas: QASet) -> list[np.ndarray]:
        """:meth:`hits` for several runs over the same questions, checking each (question,
        passage) pair once however many runs retrieved it."""
        for rows in runs:
            if len(rows) != len(qas):
                raise ValueError(f"{len(rows)} result lists for {len(qas)} questions")
        outs = [np.zeros(rows.shape, dtype=bool) for rows in runs]
        for i, qa in enumerate(qas.items):
            prepared = self.prepare(qa.answers, qas.match)
            seen: dict[int, bool] = {}
            for rows, out in zip(runs, outs):
                for j, row in enumerate(rows[i].tolist()):
                    if row >= 0:
                        hit = seen.get(row)
                        if hit is None:
                            hit = seen[row] = self.check_prepared(row, prepared, qas.match)
                        out[i, j] = hit
        return outs

    def answerable(self, qas: QASet, show_progress: bool = False) -> np.ndarray:
        """Which questions have an answer in *some* passage of the corpus (same rule as :meth:`hits`).

        One pass over the corpus, ``_SCAN_ROWS`` passages at a time, in constant memory (nothing is
        kept per passage): each passage is tokenised and checked against the string answers sharing
        one of its tokens (an answer's longest token is its key), or, for regex answers, the block's
        NFD texts are searched by every pattern not yet matched. The pass stops once every question
        is answerable. At 21M passages it is still a scan of every text (tokenising them all: hours
        on two cores), hence :func:`answerable_subset`'s cache and size limit.
        """
        out = np.zeros(len(qas), dtype=bool)
        pending: dict[int, list[str]] = {}
        for i, qa in enumerate(qas.items):
            prepared = self.prepare(qa.answers, qas.match)
            if prepared is None:
                out[i] = len(self.texts) > 0
            elif prepared:
                pending[i] = prepared
        scan = self._regex_block if qas.match == "regex" else self._string_block
        n = len(self.texts)
        with progress_bar(n, "answerable questions (scan every passage)", show_progress and bool(pending), unit="psg") as advance:
            for lo in range(0, n if pending else 0, _SCAN_ROWS):
                hi = min(n, lo + _SCAN_ROWS)
                for i in scan(lo, self.texts[lo:hi], pending):
                    out[i] = True
                    del pending[i]
                advance(hi - lo)
                if not pending:
                    break
        return out

    def _string_block(self, first: int, texts: Sequence[str], pending: dict[int, list[str]]) -> set[int]:
        by_token: dict[str, list[tuple[int, str]]] = {}
        for i, answers in pending.items():  # a joined answer is in a passage only if each of its tokens is
            for a in answers:
                by_token.setdefault(max(a.split(), key=len), []).append((i, a))
        found: set[int] = set()
        for row, text in enumerate(texts, first):
            hay = self._tokens.get(row) or _joined(answer_tokens(text))
            for tok in set(hay.split()).intersection(by_token):
                found.update(i for i, a in by_token[tok] if a in hay)
        return found

    def _regex_block(self, first: int, texts: Sequence[str], pending: dict[int, list[str]]) -> set[int]:
        nfd = [self._nfd.get(row) or normalize(t) for row, t in enumerate(texts, first)]
        concat = "\n".join(nfd)
        starts = np.cumsum([0] + [len(t) + 1 for t in nfd])
        return {i for i, patterns in pending.items() if any(_regex_in(p, nfd, concat, starts) for p in patterns)}


_SCAN_ROWS = 1 << 12  # passages read, tokenised and searched at a time by AnswerMatcher.answerable


def _regex_in(pattern: str, texts: list[str], concat: str, starts: np.ndarray) -> bool:
    """Does ``pattern`` match one of ``texts`` (NFD; ``concat``: them joined by line breaks, ``starts``: offsets)?"""
    compiled = compile_pattern(pattern)
    if compiled is None:
        return False
    if "(?<" in pattern or "\\A" in pattern or "\\Z" in pattern:
        # Context-sensitive patterns: check passage by passage.
        return any(compiled.search(t) for t in texts)
    # Search the passages at once, separated by newlines (^, $ and \b see a newline as a passage
    # boundary). A match may straddle two passages, so each candidate is confirmed on its own passage,
    # and the scan resumes at the next passage (not after the match), so no passage is skipped.
    pos = 0
    while (m := compiled.search(concat, pos)) is not None:
        row = int(np.searchsorted(starts, m.start(), side="right")) - 1
        if compiled.search(texts[row]):
            return True
        pos = int(starts[row + 1])
    return False


# Above this many passages, `densepr evaluate` skips the answerable subset unless it is cached or asked
# for (--answerable): the scan tokenises every passage, ~4.5 minutes per million 100-word passages on the
# 2-core benchmark machine (NQ test; the 21M-passage Wikipedia: ~1.6 hours), which top-k accuracy need not pay.
ANSWERABLE_SCAN_MAX = 1_000_000
ANSWERABLE_DIR = "answerable"  # the cache's folder in an index directory


def answerable_subset(corpus: Corpus, qas: QASet, cache_dir: str | os.PathLike[str] | None = None, force: bool | None = None,
                      matcher: AnswerMatcher | None = None, show_progress: bool = False) -> np.ndarray | None:  # fmt: skip
    """:meth:`AnswerMatcher.answerable` of ``qas`` over ``corpus``, remembered in ``cache_dir/answerable/``.

    The mask is read from there when a file for this set holds the same corpus fingerprint and question
    fingerprint (a stale or damaged file is recomputed and replaced); else it is computed (one streamed
    pass) and written there (JSON, atomically; a read-only directory only costs the next run the scan).
    ``force``: True computes it whatever the corpus size; False skips it (None); None (default) computes
    it when cached or when the corpus holds at most :data:`ANSWERABLE_SCAN_MAX` passages, else skips it.
    """
    if force is False:
        return None
    fp = {"corpus": corpus.fingerprint(), "questions": qas.fingerprint(), "count": len(qas)}
    path = Path(cache_dir) / ANSWERABLE_DIR / f"{fp['questions'][:32]}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved = read_json(path)
        except DenseprError:
            saved = None
        rows = saved.get("answerable") if isinstance(saved, dict) and all(saved.get(k) == v for k, v in fp.items()) else None
        if isinstance(rows, list) and all(type(r) is int and 0 <= r < len(qas) for r in rows):
            out = np.zeros(len(qas), dtype=bool)
            out[rows] = True
            return out
    if force is None and len(corpus) > ANSWERABLE_SCAN_MAX:
        return None
    out = (matcher or AnswerMatcher(corpus.texts)).answerable(qas, show_progress)
    if path is not None:
        try:
            path.parent.mkdir(exist_ok=True)
            write_json(path, {**fp, "set": qas.name, "answerable": np.flatnonzero(out).tolist()}, indent=None)
        except (OSError, DenseprError):
            pass  # a cache: not writing it loses nothing but the next run's time
    return out
