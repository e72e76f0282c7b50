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

import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import regex

from densepr.data.qa import QASet

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
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        with warnings.catch_warnings():  # answer files hold odd patterns; warnings are noise here
            warnings.simplefilter("ignore")
            return re.compile(normalize(pattern), flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except (re.error, OverflowError, RecursionError):
        return None  # DPR's regex_match swallows compile errors: such an answer never matches.


def regex_match(text: str, pattern: str) -> bool:
    """DPR's ``regex_match`` (the text should already be NFD-normalised)."""
    compiled = _compile(pattern)
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


class AnswerMatcher:
    """``has_answer`` over a fixed corpus, with each passage tokenised once.

    Args:
        texts: passage texts, addressed by row number (titles are never matched).
    """

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts
        self._tokens: dict[int, str] = {}
        self._nfd: dict[int, str] = {}
        self._postings: dict[str, np.ndarray] | None = None
        self._concat: str | None = None
        self._starts: np.ndarray | None = None

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
    def _prepare(answers: Sequence[str], match: str) -> list[str] | None:
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

    def _check(self, row: int, prepared: list[str] | None, match: str) -> bool:
        if prepared is None:
            return True
        if match == "regex":
            text = self._passage_nfd(row)
            return any(regex_match(text, p) for p in prepared)
        hay = self._passage_tokens(row)
        return any(p in hay for p in prepared)

    def has_answer(self, row: int, answers: Sequence[str], match: str = "string") -> bool:
        return self._check(row, self._prepare(answers, match), match)

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
            prepared = self._prepare(qa.answers, qas.match)
            seen: dict[int, bool] = {}
            for rows, out in zip(runs, outs):
                for j, row in enumerate(rows[i].tolist()):
                    if row >= 0:
                        hit = seen.get(row)
                        if hit is None:
                            hit = seen[row] = self._check(row, prepared, qas.match)
                        out[i, j] = hit
        return outs

    def _build_postings(self) -> dict[str, np.ndarray]:
        # Every passage is read once, in order (a passage store decodes them block by block), and its tokens
        # are not kept: only the candidates' are, when checked.
        lists: dict[str, list[int]] = {}
        for row, text in enumerate(self.texts):
            toks = self._tokens.get(row)
            for tok in set((toks if toks is not None else _joined(answer_tokens(text))).split()):
                lists.setdefault(tok, []).append(row)
        return {t: np.asarray(v, dtype=np.int64) for t, v in lists.items()}

    def answerable(self, qas: QASet) -> np.ndarray:
        """Which questions have an answer in *some* passage of the corpus (same rule as :meth:`hits`).

        String answers use an inverted index (candidate rows contain every answer token) and
        then the exact check; regex answers are searched in every passage.
        """
        out = np.zeros(len(qas), dtype=bool)
        if qas.match == "string" and self._postings is None:
            self._postings = self._build_postings()
        for i, qa in enumerate(qas.items):
            prepared = self._prepare(qa.answers, qas.match)
            if prepared is None:
                out[i] = len(self.texts) > 0
            elif qas.match == "regex":
                out[i] = any(self._regex_anywhere(p) for p in prepared)
            else:
                out[i] = any(self._string_anywhere(p) for p in prepared)
        return out

    def _regex_anywhere(self, pattern: str) -> bool:
        compiled = _compile(pattern)
        if compiled is None:
            return False
        if "(?<" in pattern or "\\A" in pattern or "\\Z" in pattern:
            # Context-sensitive patterns: check passage by passage.
            return any(compiled.search(self._passage_nfd(r)) for r in range(len(self.texts)))
        if self._concat is None:
            texts = [self._passage_nfd(r) for r in range(len(self.texts))]
            self._concat = "\n".join(texts)
            self._starts = np.cumsum([0] + [len(t) + 1 for t in texts])
        # Search all passages at once, separated by newlines (^, $ and \b see a newline as a
        # passage boundary). A match may straddle two passages, so each candidate is confirmed
        # on its own passage, and the scan resumes at the next passage (not after the match),
        # so no passage is skipped.
        pos = 0
        while (m := compiled.search(self._concat, pos)) is not None:
            row = int(np.searchsorted(self._starts, m.start(), side="right")) - 1
            if compiled.search(self._passage_nfd(row)):
                return True
            pos = int(self._starts[row + 1])
        return False

    def _string_anywhere(self, joined_answer: str) -> bool:
        assert self._postings is not None
        posting = [self._postings.get(t) for t in set(joined_answer.split())]
        if any(p is None for p in posting):
            return False
        posting.sort(key=len)
        cand = posting[0]
        for p in posting[1:]:
            cand = np.intersect1d(cand, p, assume_unique=True)
            if not len(cand):
                return False
        return any(joined_answer in self._passage_tokens(int(r)) for r in cand)
