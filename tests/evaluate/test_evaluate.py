"""DPR's has_answer and top-k accuracy, checked against a literal port of the reference loop."""

from __future__ import annotations

import json
import re
import unicodedata
import warnings

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from densepr.data import QA, QASet
from densepr.evaluate.answers import AnswerMatcher, has_answer, simple_tokenize
from densepr.evaluate.topk import accuracy_report, topk_curve

# --- the oracle: DPR's dpr/data/qa_validation.py + dpr/utils/tokenizers.py, loop for loop ---------
_DPR_RE = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE + regex.UNICODE + regex.MULTILINE)


def dpr_words(text: str) -> list[str]:
    return [m.group().lower() for m in _DPR_RE.finditer(text)]


def dpr_has_answer(answers, text, match_type="string") -> bool:
    text = unicodedata.normalize("NFD", text)
    if match_type == "string":
        text = dpr_words(text)
        for single_answer in answers:
            single_answer = dpr_words(unicodedata.normalize("NFD", single_answer))
            for i in range(0, len(text) - len(single_answer) + 1):
                if single_answer == text[i : i + len(single_answer)]:
                    return True
    elif match_type == "regex":
        for single_answer in answers:
            single_answer = unicodedata.normalize("NFD", single_answer)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pattern = re.compile(single_answer, flags=re.IGNORECASE + re.UNICODE + re.MULTILINE)
            except BaseException:
                continue
            if pattern.search(text) is not None:
                return True
    return False


# --- specific behaviours ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answers, text, expected",
    [
        (["Wilhelm Conrad Röntgen"], "prize went to wilhelm conrad ro\u0308ntgen in 1901", True),  # NFD vs NFC, case
        (["31"], "the answer is 315", False),  # token boundary, not substring
        (["31"], "primes: 29, 31, 37", True),
        (["U.S."], "born in the U.S. in 1950", True),  # punctuation tokens
        (["July 5 , 2018"], "released on July 5, 2018 worldwide", True),  # DPR's spaced commas
        (["New York"], "new-york times", False),  # '-' is a token between them
        (["the Saint Lawrence River"], "via the Saint  Lawrence\nRiver", True),  # whitespace is irrelevant
        (["Moses"], "Aaron", False),
        (["  "], "anything at all", True),  # an answer with no tokens matches, as in DPR's loop
    ],
)
def test_string_match(answers, text, expected):
    assert has_answer(answers, text) is expected
    assert dpr_has_answer(answers, text) is expected


def test_regex_match_is_case_insensitive_search_and_ignores_bad_patterns():
    text = "Denali is 20,310 Feet tall"
    assert has_answer([r"20,?310\s*f(ee|oo)t"], text, "regex")
    assert not has_answer([r"6,?194\s*m"], text, "regex")
    assert not has_answer([r"(unclosed"], text, "regex")  # compile error: never matches, no exception
    assert has_answer([r"(unclosed", "denali"], text, "regex")


def test_simple_tokenizer_splits_like_drqa():
    assert simple_tokenize("Röntgen's X-ray, 1901!") == ["Röntgen", "'", "s", "X", "-", "ray", ",", "1901", "!"]


# --- properties against the oracle ---------------------------------------------------------------
alphabet = st.sampled_from(list("ab c1 ,.-'\u0301é\u00e9AB\n\t") + ["ö", "o\u0308", "İ", "ß", "\u2009", "中"])
texts = st.lists(alphabet, max_size=40).map("".join)  # pieces may be 2 code points (decomposed)


@settings(max_examples=400, deadline=None)
@given(answers=st.lists(texts, min_size=1, max_size=3), text=texts)
def test_has_answer_equals_dpr_reference(answers, text):
    assert has_answer(answers, text) == dpr_has_answer(answers, text)


@settings(max_examples=200, deadline=None)
@given(answers=st.lists(st.text(st.sampled_from(list("ab.|*?()[]\\s+1")), min_size=1, max_size=8), min_size=1, max_size=3), text=texts)
def test_regex_mode_equals_dpr_reference(answers, text):
    assert has_answer(answers, text, "regex") == dpr_has_answer(answers, text, "regex")


# --- the corpus-level matcher --------------------------------------------------------------------
TEXTS = [
    "Wilhelm Conrad Röntgen won the first Nobel Prize in Physics.",
    "The Saint Lawrence River joins the Great Lakes to the ocean.",
    "Denali is 20,310 feet tall.",
    "Thirty-one is 31, a prime.",
    "Nothing to see here.",
]


def test_matcher_hits_and_answerable_agree_with_reference():
    qas = QASet("t", [QA("q1", ("Röntgen",)), QA("q2", ("31", "thirty")), QA("q3", ("Mars",)), QA("q4", ("great lakes",))])
    rows = np.array([[4, 0, -1], [3, 2, 1], [0, 1, 2], [1, -1, -1]])
    m = AnswerMatcher(TEXTS)
    hits = m.hits(rows, qas)
    for i, qa in enumerate(qas.items):
        for j, r in enumerate(rows[i]):
            assert hits[i, j] == (r >= 0 and dpr_has_answer(qa.answers, TEXTS[r]))
    assert m.answerable(qas).tolist() == [any(dpr_has_answer(q.answers, t) for t in TEXTS) for q in qas.items]
    assert m.answerable(qas).tolist() == [True, True, False, True]
    other = np.array([[0, 4, 1], [2, -1, -1], [0, 0, 0], [2, 1, 0]])
    many = AnswerMatcher(TEXTS).hits_many([rows, other], qas)  # shared per-pair cache, same answers
    np.testing.assert_array_equal(many[0], hits)
    np.testing.assert_array_equal(many[1], m.hits(other, qas))


def test_answerable_regex_scans_every_passage():
    qas = QASet("c", [QA("a", (r"20,?310\s*feet",)), QA("b", (r"^nothing",)), QA("c", (r"feet tall\.\s*thirty",))], "regex")
    # The third pattern only matches across two passages: it must not count.
    assert AnswerMatcher(TEXTS).answerable(qas).tolist() == [True, True, False]


@settings(max_examples=60, deadline=None)
@given(
    passages=st.lists(st.text(st.sampled_from(list("ab c\n.1")), max_size=12), min_size=1, max_size=6),
    patterns=st.lists(st.sampled_from(["a", "^b", "c$", r"a\s+b", r"\bc", "1.a", "b$", "^$", r"\n"]), min_size=1, max_size=2),
)
def test_answerable_regex_equals_brute_force(passages, patterns):
    qas = QASet("r", [QA("q", tuple(patterns))], "regex")
    expected = any(dpr_has_answer(patterns, p, "regex") for p in passages)
    assert AnswerMatcher(passages).answerable(qas)[0] == expected


def test_topk_curve_and_report():
    hits = np.array(
        [
            [False, True, False],  # first hit at rank 2
            [True, False, False],  # rank 1
            [False, False, False],  # none
            [False, False, True],  # rank 3
        ]
    )
    assert topk_curve(hits).tolist() == [0.25, 0.5, 0.75]
    assert topk_curve(hits, 5).tolist() == [0.25, 0.5, 0.75, 0.75, 0.75]  # short lists miss beyond their end
    rep = accuracy_report(hits, np.array([True, True, False, False]), ks=(1, 2))
    assert rep["all"] == {"n": 4, "top1": 25.0, "top2": 50.0}
    assert rep["answerable"] == {"n": 2, "top1": 50.0, "top2": 100.0}


def test_qrels_metrics_match_hand_computation():
    from densepr.evaluate.qrels import qrels_metrics

    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d9": 2}}
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0}, "q2": {"d5": 1.0}}
    m = qrels_metrics(run, qrels, ("recall_20", "mrr_10", "ndcg_cut_10"))
    assert m["recall_20"] == pytest.approx(0.5)  # q1 finds both, q2 none
    assert m["mrr_10"] == pytest.approx((1 / 2 + 0) / 2)
    ndcg_q1 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert m["ndcg_cut_10"] == pytest.approx(ndcg_q1 / 2)


@pytest.mark.data
def test_answerable_counts_on_embedded_benchmark(embedded):
    """The answerable subsets as independently measured (shared/README.md): 1503 NQ, 547 TREC."""
    from densepr.data import load_wiki_summaries

    corpus = load_wiki_summaries(embedded.summaries)
    m = AnswerMatcher(corpus.texts)
    assert len(corpus) == 10033
    assert m.answerable(embedded.load_qa("nq-test")).sum() == 1503
    assert m.answerable(embedded.load_qa("curated-test")).sum() == 547


def test_answerable_reads_each_text_once_in_order_and_keeps_only_the_candidates_tokens():
    class Counting(list):  # passage texts that count how they are read (a passage store decodes on access)
        gets = 0

        def __getitem__(self, i):
            Counting.gets += 1
            return super().__getitem__(i)

    texts = Counting(TEXTS * 40)
    qas = QASet("t", [QA("q1", ("Röntgen",)), QA("q3", ("Mars",)), QA("q4", ("great lakes",))])
    m = AnswerMatcher(texts)
    assert m.answerable(qas).tolist() == [True, False, True]
    # one pass over the corpus (iteration), then a read per candidate of the answers found; not every passage kept
    assert Counting.gets <= 2 * 40 and len(m._tokens) <= 2 * 40 < len(texts)


@pytest.mark.parametrize("match", ["string", "regex"])
def test_answerable_holds_nothing_per_passage_of_the_corpus(match):
    """Issue 34: the old scan kept a token -> rows dict (string) or every passage's NFD text joined (regex)
    over the whole corpus (many GB at 21M); now it holds one block of passages at a time."""
    import tracemalloc

    texts = [f"passage {i} about topic{i % 997} and place{i % 991} in year {1000 + i % 1013} word{i}" for i in range(40_000)]
    i = 12_345  # the one passage holding the first answer
    answers = (f"place{i % 991} in year {1000 + i % 1013}", "nowhere")
    answers = answers if match == "string" else (rf"place{i % 991}\s+in year {1000 + i % 1013}\b", "nowhere")
    qas = QASet("t", [QA("q1", answers), QA("q2", ("absent",)), QA("q3", ("topic5",) if match == "string" else (r"^passage 39999 ",))], match)
    m = AnswerMatcher(texts)
    tracemalloc.start()
    got = m.answerable(qas)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got.tolist() == [True, False, True]
    assert got.tolist() == [any(dpr_has_answer(q.answers, t, match) for t in texts) for q in qas.items]
    assert peak < 2_000_000, peak  # the old postings / joined texts: 10-30 MB for these 40,000 passages


def test_answerable_subset_is_cached_per_corpus_and_question_set(tmp_path, monkeypatch):
    from densepr.data.passages import Corpus, Passage
    from densepr.evaluate import answers

    corpus = Corpus.from_passages(Passage(str(i), "", t) for i, t in enumerate(TEXTS))
    qas = QASet("t", [QA("q1", ("Röntgen",)), QA("q3", ("Mars",)), QA("q4", ("great lakes",))])
    assert answers.answerable_subset(corpus, qas, tmp_path).tolist() == [True, False, True]
    (cached,) = (tmp_path / "answerable").glob("*.json")
    saved = json.loads(cached.read_text())
    assert saved["answerable"] == [0, 2] and saved["corpus"] == corpus.fingerprint() and saved["questions"] == qas.fingerprint()

    class NoScan(AnswerMatcher):
        def answerable(self, qas, show_progress=False):
            raise AssertionError("scanned the corpus again")

    assert answers.answerable_subset(corpus, qas, tmp_path, matcher=NoScan(TEXTS)).tolist() == [True, False, True]
    # above the size limit: read from the cache; without one, skipped unless forced (and then cached)
    monkeypatch.setattr(answers, "ANSWERABLE_SCAN_MAX", 2)
    assert answers.answerable_subset(corpus, qas, tmp_path, matcher=NoScan(TEXTS)).tolist() == [True, False, True]
    other = QASet("t", [QA("q2", ("31",))])
    assert answers.answerable_subset(corpus, other, tmp_path) is None
    assert answers.answerable_subset(corpus, other, tmp_path, force=True).tolist() == [True]
    assert answers.answerable_subset(corpus, other, tmp_path, matcher=NoScan(TEXTS)).tolist() == [True]
    assert answers.answerable_subset(corpus, qas, tmp_path, force=False) is None
    # a cache of another corpus, or damaged, is not trusted: computed again (forced here) and replaced
    edited = Corpus.from_passages(Passage(str(i), "", t.replace("Röntgen", "X")) for i, t in enumerate(TEXTS))
    assert answers.answerable_subset(edited, qas, tmp_path, force=True).tolist() == [False, False, True]
    for bad in ("{not json", json.dumps({**saved, "answerable": [0, 99]})):
        cached.write_text(bad)
        assert answers.answerable_subset(corpus, qas, tmp_path, force=True).tolist() == [True, False, True]
        assert json.loads(cached.read_text())["answerable"] == [0, 2]


def test_qa_results_are_written_and_read_back_by_the_report_module(tmp_path):
    """evaluate-qa's files (qa-results.json, .md, qa-em.png) and what a resumed run keeps of them."""
    from densepr.evaluate.report import QA_RESULTS, read_qa_results, write_qa_results

    per_k = {"1": {"em": 50.0, "em_answerable": 60.0, "f1": 55.0, "retrieval_topk": 70.0}}
    results = {"ks": [1], "sets": {"qa.tsv": {"n_all": 2, "n_answerable": 1, "modes": {"bm25": {"k": per_k}}, "key": "abc"}}}
    write_qa_results(tmp_path / "qa", results)
    assert sorted(p.name for p in (tmp_path / "qa").iterdir()) == sorted(QA_RESULTS)
    assert "| qa.tsv (2 q, 1 answerable) | bm25 | 50.0 |" in (tmp_path / "qa" / "qa-results.md").read_text()
    assert read_qa_results(tmp_path / "qa") == results["sets"]
    assert read_qa_results(tmp_path / "none") == {}
    (tmp_path / "qa" / "qa-results.json").write_text("[1, 2]")  # not what it wrote: read again, and said so
    said = []
    assert read_qa_results(tmp_path / "qa", said.append) == {} and "unreadable" in said[0]


def test_dpr_results_are_judged_from_the_passage_text(tmp_path):
    """has_answer recomputed from each passage's text (the file's own flags ignored), regex for CuratedTREC by name."""
    from densepr.evaluate.answers import judge_dpr_results

    recs = [{"question": "who wrote python", "answers": ["Guido"], "ctxs": [{"text": "Python", "has_answer": True}, {"text": "by Guido van Rossum"}]},
            {"question": "how many", "answers": ["\\d+ lakes"], "ctxs": [{"text": "the 5 lakes"}]}]  # fmt: skip
    for name, match, want in (("r.json", "string", [[False, True], [False, False]]), ("curated-r.json", "regex", [[False, True], [True, False]])):
        (tmp_path / name).write_text(json.dumps(recs))
        qas, hits = judge_dpr_results(tmp_path / name)
        assert (qas.name, qas.match, qas.questions) == (name, match, ["who wrote python", "how many"])
        assert hits.tolist() == want
    assert judge_dpr_results(tmp_path / "r.json", "regex")[0].match == "regex"  # --regex given
