"""Hybrid and RRF fusion against direct ports of Pyserini's rules; the Retriever over an index directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from densepr.data.runs import read_trec_run, write_dpr_results, write_trec_run
from densepr.errors import DenseprError
from densepr.fileio.atomic import write_json
from densepr.models.encoder import Encoder
from densepr.ranking import SearchResult
from densepr.retrieve.fusion import fuse_hybrid, fuse_rrf
from densepr.retrieve.retriever import Retriever


def pyserini_hybrid(dense: dict, sparse: dict, alpha: float, k: int) -> list[tuple[int, float]]:
    """pyserini.search.hybrid.HybridSearcher._hybrid_results (no normalisation), as published."""
    min_dense = min(dense.values()) if dense else 0
    min_sparse = min(sparse.values()) if sparse else 0
    out = []
    for doc in set(dense) | set(sparse):
        d = dense.get(doc, min_dense)
        s = sparse.get(doc, min_sparse)
        out.append((doc, alpha * s + d))
    return sorted(out, key=lambda x: (-x[1], x[0]))[:k]


def as_result(lists: list[dict], width: int) -> SearchResult:
    rows = np.full((len(lists), width), -1, dtype=np.int64)
    scores = np.zeros((len(lists), width), dtype=np.float32)
    for i, d in enumerate(lists):
        ranked = sorted(d.items(), key=lambda x: -x[1])
        rows[i, : len(ranked)] = [r for r, _ in ranked]
        scores[i, : len(ranked)] = [s for _, s in ranked]
    return SearchResult(rows, scores)


score_lists = st.dictionaries(st.integers(0, 30), st.floats(-5, 40, width=32), max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(score_lists, score_lists), min_size=1, max_size=4), st.sampled_from([0.0, 0.5, 1.1, 3.0]), st.integers(1, 12))
def test_hybrid_equals_pyserini(pairs, lam, k):
    dense = as_result([d for d, _ in pairs], 8)
    sparse = as_result([s for _, s in pairs], 8)
    fused = fuse_hybrid(dense, sparse, lam, k)
    for i, (d, s) in enumerate(pairs):
        expected = pyserini_hybrid({r: float(np.float32(v)) for r, v in d.items()}, {r: float(np.float32(v)) for r, v in s.items()}, lam, k)
        got = [(int(r), float(sc)) for r, sc in zip(fused.rows[i], fused.scores[i]) if r >= 0]
        assert [r for r, _ in got] == [r for r, _ in expected] or np.allclose([x for _, x in got], [x for _, x in expected], rtol=1e-5)
        np.testing.assert_allclose([x for _, x in got], [x for _, x in expected], rtol=1e-5, atol=1e-5)


def test_hybrid_fills_missing_scores_with_the_list_minimum():
    dense = as_result([{1: 0.9, 2: 0.5}], 2)
    sparse = as_result([{2: 10.0, 3: 4.0}], 2)
    fused = fuse_hybrid(dense, sparse, lam=0.1, k=3)
    # 1: 0.9 + 0.1*4 (min bm25); 2: 0.5 + 0.1*10; 3: 0.5 (min dense) + 0.1*4
    assert fused.rows[0].tolist() == [2, 1, 3]
    np.testing.assert_allclose(fused.scores[0], [1.5, 1.3, 0.9], rtol=1e-6)


def test_rrf():
    a = as_result([{1: 3.0, 2: 2.0, 3: 1.0}], 3)
    b = as_result([{3: 9.0, 4: 1.0}], 2)
    fused = fuse_rrf([a, b], k=4, c=60)
    expected = {1: 1 / 61, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 62}
    order = sorted(expected, key=lambda r: (-expected[r], r))
    assert fused.rows[0].tolist() == order
    np.testing.assert_allclose(fused.scores[0], [expected[r] for r in order], rtol=1e-6)


def test_retriever_over_an_index_directory(index_dir, corpus):
    r = Retriever.load(index_dir, device="cpu")
    assert r.modes == ["bm25", "dense", "hybrid", "rrf"] and r.hybrid_lambda == 1.1
    hits = r.search("who created the python programming language", k=3, mode="bm25")
    assert hits[0].title == "Python" and hits[0].rank == 1
    assert 1 <= len(hits) <= 3 and all(h.score > 0 for h in hits)  # BM25 returns matching passages only
    assert len(r.search("who created python", k=4)) == 4  # hybrid by default
    all_modes = r.retrieve_all(["great lakes ocean", "mozart salzburg"], k=5)
    assert set(all_modes) == {"bm25", "dense", "hybrid", "rrf"}
    for res in all_modes.values():
        assert res.rows.shape == (2, 5) and (res.rows < len(corpus)).all()
    write_json(index_dir / "hybrid.json", {"lambda": 0.25})
    assert Retriever.load(index_dir, device="cpu").hybrid_lambda == 0.25


def test_the_tuned_lambda_is_written_and_read_by_the_index_directory(tmp_path):
    """IndexDir writes hybrid.json (densepr tune-hybrid) and reads its lambda back; the paper's without one."""
    from densepr.retrieve.fusion import PAPER_LAMBDA
    from densepr.retrieve.index_dir import IndexDir

    d = IndexDir(tmp_path)
    assert d.hybrid_lambda() == PAPER_LAMBDA
    d.write_hybrid(0.5, {"0.5": 61.0, "1.1": 60.0}, ["nq-dev"], 100, "top-20 accuracy")
    assert d.hybrid_lambda() == 0.5
    assert json.loads(d.hybrid.read_text()) == {"lambda": 0.5, "tuned_on": ["nq-dev"], "questions_per_set": 100,
                                                "metric": "top-20 accuracy", "grid": {"0.5": 61.0, "1.1": 60.0}}  # fmt: skip


def test_retriever_errors(index_dir, tmp_path, corpus):
    r = Retriever.load(index_dir, device="cpu")
    with pytest.raises(DenseprError, match="empty question"):
        r.search("   ")
    with pytest.raises(DenseprError, match="unknown mode"):
        r.search("q", mode="splade")
    only_bm25 = Retriever(corpus, bm25=r.bm25)
    with pytest.raises(DenseprError, match="needs both a BM25 and a dense index"):
        only_bm25.search("q", mode="hybrid")
    with pytest.raises(DenseprError, match="not an index directory"):
        Retriever.load(tmp_path / "nowhere")
    from tests.support.tiny import make_tiny_bert

    wide = Encoder.load(make_tiny_bert(tmp_path / "wide", hidden=64, pooling="cls"), device="cpu")
    with pytest.raises(DenseprError, match="not built as a pair"):
        Retriever(corpus, r.bm25, r.dense, wide)


def test_result_files_round_trip(tmp_path, corpus):
    from densepr.data.runs import iter_dpr_results

    res = SearchResult(np.array([[3, 1, -1], [0, -1, -1]]), np.array([[2.5, 1.0, 0], [7.0, 0, 0]], dtype=np.float32))
    write_trec_run(tmp_path / "run.trec", ["q0", "q1"], res, corpus.ids, tag="t")
    assert read_trec_run(tmp_path / "run.trec") == {"q0": [(corpus.ids[3], 2.5), (corpus.ids[1], 1.0)], "q1": [(corpus.ids[0], 7.0)]}
    hits = np.array([[True, False, False], [False, False, False]])
    write_dpr_results(tmp_path / "r.json", ["a?", "b?"], [["x"], ["y"]], res, corpus, hits)
    recs = list(iter_dpr_results(tmp_path / "r.json"))
    assert [len(r.ctxs) for r in recs] == [2, 1]
    assert recs[0].ctxs[0] == {"id": corpus.ids[3], "title": corpus.titles[3], "text": corpus.texts[3], "score": 2.5, "has_answer": True}
