"""The main job's regression check and lambda tuning (the full job itself runs in CI as a smoke run)."""

from __future__ import annotations

import copy

import numpy as np

from densepr.data import load_qa
from densepr.evaluate.answers import AnswerMatcher
from densepr.evaluate.topk import topk_curve
from densepr.evaluate.tuning import tune_lambda
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import encode_corpus
from densepr.models.encoder import Encoder
from densepr.reproduce import ReproduceConfig, check_against, load_expected, uses_defaults
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import fuse_hybrid
from densepr.retrieve.retriever import Retriever


def _summary(top20: float) -> dict:
    rep = {"all": {"n": 10, "top1": 5.0, "top20": top20}, "answerable": {"n": 4, "top1": 12.5, "top20": 50.0}}
    return {"results": {"nq-test": {"n_all": 10, "n_answerable": 4, "methods": {"bm25": rep}}}}


def test_check_against_tolerance_and_counts():
    expected = {"smoke": {"tolerance": 0.5, **_summary(20.0)}}
    assert check_against(_summary(20.4), expected, "smoke") == []
    problems = check_against(_summary(21.0), expected, "smoke")
    assert problems == ["nq-test bm25 all top20: 21.0 vs committed 20.0 (tolerance ±0.5)"]
    changed = copy.deepcopy(_summary(20.0))
    changed["results"]["nq-test"]["n_answerable"] = 5
    assert "n_answerable 5 != committed 4" in check_against(changed, expected, "smoke")[0]
    assert check_against(_summary(20.0), expected, "full") == ["no committed figures for profile 'full'"]
    assert check_against({"results": {}}, expected, "smoke") == ["nq-test: not evaluated"]


def test_packaged_expected_figures_cover_both_profiles():
    expected = load_expected()
    for profile in ("full", "smoke"):
        entry = expected[profile]
        assert set(entry["results"]) == {"nq-test", "trivia-test", "wq-test", "curated-test", "squad-test"}
        assert entry["tolerance"] > 0 and entry["config"]["profile"] == profile


def test_only_default_runs_are_compared():
    assert uses_defaults(ReproduceConfig(profile="smoke"))
    assert not uses_defaults(ReproduceConfig(encoder="/some/checkpoint"))


def test_tune_lambda_picks_the_best_grid_point(corpus, qa_tsv, tiny_bert, tmp_path):
    enc = Encoder.load(tiny_bert, device="cpu")
    encode_corpus(enc, corpus, tmp_path / "emb")
    dense = DenseIndex.build(tmp_path / "emb")
    dense.bind(corpus)
    r = Retriever(corpus, BM25Index.build(corpus), dense, enc, depth=12)
    qas = load_qa(qa_tsv)
    m = AnswerMatcher(corpus.texts)
    grid = (0.0, 0.1, 1.0, 10.0)
    best, scores = tune_lambda(r, m, [qas], grid, k=1)
    both = r.retrieve_all(qas.questions, 12, ["bm25", "dense"])
    brute = {lam: round(100 * float(topk_curve(m.hits(fuse_hybrid(both["dense"], both["bm25"], lam, 1).rows, qas), 1)[-1]), 2) for lam in grid}
    assert scores == {str(k): v for k, v in brute.items()}
    assert scores[str(best)] == max(brute.values())
    assert best == min(lam for lam in grid if brute[lam] == max(brute.values()))
    assert np.isfinite(list(scores.values())).all()
