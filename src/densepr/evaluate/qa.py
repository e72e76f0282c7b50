"""End-to-end QA metrics: exact match and token F1 (SQuAD normalisation, as DPR's reader evaluation; DrQA's rule for regex answers)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from densepr.evaluate.answers import compile_pattern, normalize

PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (as DPR's ``exact_match_score``): lower-case, drop
    punctuation and the articles a/an/the, collapse white space. Unicode is NFD-normalised first."""
    text = normalize(text).lower()
    text = "".join(ch for ch in text if ch not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str], match: str = "string") -> bool:
    """DPR's EM: the normalised prediction equals a normalised answer. For regex answers
    (CuratedTREC), DrQA's rule: the pattern matches at the start of the prediction."""
    if match == "regex":
        for a in answers:
            c = compile_pattern(a)
            if c is not None and c.match(normalize(prediction)) is not None:
                return True
        return False
    p = normalize_answer(prediction)
    return any(p == normalize_answer(a) for a in answers)


def f1_score(prediction: str, answers: Sequence[str], match: str = "string") -> float:
    """SQuAD token F1 against the best answer (for regex answers F1 is defined as EM)."""
    if match == "regex":
        return float(exact_match(prediction, answers, match))
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
