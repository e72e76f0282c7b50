"""DPR's evaluation: ``has_answer`` exactly as the reference code, top-k accuracy, and qrels metrics.

A retrieved passage is a hit when its *text* (never its title) contains a gold answer
(``dpr/data/qa_validation.py``, also Pyserini's ``evaluate_dpr_retrieval.py``):

* ``string`` match: NFD-normalise passage and answer, tokenise both with DrQA's
  SimpleTokenizer (runs of ``[\\p{L}\\p{N}\\p{M}]`` or any single non-space, non-control
  character), lower-case, and look for the answer's tokens as a contiguous subsequence.
* ``regex`` match (CuratedTREC): NFD-normalise, then ``re.search`` each answer pattern with
  IGNORECASE | UNICODE | MULTILINE; a pattern that does not compile never matches.

Top-k accuracy is the fraction of questions with at least one hit among the first k passages.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import regex

from .data.qa import QASet

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
        lists: dict[str, list[int]] = {}
        for row in range(len(self.texts)):
            for tok in set(self._passage_tokens(row).split()):
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


def first_hit_rank(hits: np.ndarray, none: int | None = None) -> np.ndarray:
    """0-based rank of the first hit per question; ``none`` (default: the list length) when no hit."""
    any_hit = hits.any(axis=1)
    return np.where(any_hit, hits.argmax(axis=1), hits.shape[1] if none is None else none)


def topk_curve(hits: np.ndarray, max_k: int | None = None) -> np.ndarray:
    """Top-k accuracy for k = 1..max_k (index k-1), as fractions in [0, 1].

    Lists shorter than ``max_k`` count as misses beyond their end.
    """
    max_k = max_k or hits.shape[1]
    if len(hits) == 0:
        return np.zeros(max_k)
    first = first_hit_rank(hits[:, :max_k], none=max_k)
    counts = np.bincount(first, minlength=max_k + 1)[:max_k]
    return np.cumsum(counts) / len(hits)


def accuracy_report(hits: np.ndarray, answerable: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 20, 100)) -> dict:
    """Top-k accuracy (percent) on all questions and on the answerable subset.

    Returns:
        ``{"all": {"n": N, "top1": .., "top5": ..}, "answerable": {...}}`` with accuracies in
        percent, rounded to 2 decimals; ``answerable`` is omitted when no mask is given.
    """
    def one(h: np.ndarray) -> dict:
        curve = topk_curve(h, max(ks))
        return {"n": int(len(h)), **{f"top{k}": round(100 * float(curve[k - 1]), 2) for k in ks}}

    out = {"all": one(hits)}
    if answerable is not None:
        out["answerable"] = one(hits[answerable])
    return out


def qrels_metrics(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    metrics: Sequence[str] = ("ndcg_cut_10", "recall_20", "recall_100", "mrr_10"),
) -> dict[str, float]:
    """Mean trec_eval metrics (via pytrec_eval) over the judged queries; ``mrr_10`` is MRR@10.

    Queries judged but absent from the run score 0, as trec_eval's ``-c`` does.
    """
    import pytrec_eval

    def cut(r: dict[str, float], k: int) -> dict[str, float]:
        return dict(sorted(r.items(), key=lambda kv: -kv[1])[:k])

    out: dict[str, float] = {}
    plain = [m for m in metrics if m != "mrr_10"]
    full_run = {q: run.get(q, {}) for q in qrels}
    if plain:
        measures = {m.rsplit("_", 1)[0] if m.rsplit("_", 1)[-1].isdigit() else m for m in plain}
        per_q = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(full_run)
        for m in plain:
            out[m] = float(np.mean([per_q.get(q, {}).get(m, 0.0) for q in qrels]))
    if "mrr_10" in metrics:
        per_q = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate({q: cut(r, 10) for q, r in full_run.items()})
        out["mrr_10"] = float(np.mean([per_q.get(q, {}).get("recip_rank", 0.0) for q in qrels]))
    return out


# -- end-to-end QA: exact match and F1 ---------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (as DPR's ``exact_match_score``): lower-case, drop
    punctuation and the articles a/an/the, collapse white space. Unicode is NFD-normalised first."""
    import string

    text = normalize(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str], match: str = "string") -> bool:
    """DPR's EM: the normalised prediction equals a normalised answer. For regex answers
    (CuratedTREC), DrQA's rule: the pattern matches at the start of the prediction."""
    if match == "regex":
        for a in answers:
            c = _compile(a)
            if c is not None and c.match(normalize(prediction)) is not None:
                return True
        return False
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def f1_score(prediction: str, answers: Sequence[str], match: str = "string") -> float:
    """SQuAD token F1 against the best answer (for regex answers F1 is defined as EM)."""
    if match == "regex":
        return float(exact_match(prediction, answers, match))
    from collections import Counter

    pred = normalize_answer(prediction).split()
    best = 0.0
    for a in answers:
        gold = normalize_answer(a).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not pred and not gold:
            best = max(best, 1.0)
    return best
