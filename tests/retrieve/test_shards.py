"""Sharded retrieval (what `densepr serve --ray` searchers hold): BM25 slices scored with the whole
corpus's statistics and dense index shards, whose merged top-k lists equal one index's."""

from __future__ import annotations

import numpy as np
import pytest

from densepr.errors import DenseprError
from densepr.ranking import SearchResult, merge_shards
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.modes import Mode
from densepr.retrieve.retriever import FUSION_DEPTH, Retriever, rank_modes

QUESTIONS = ["who created python", "apollo 11 moon landing", "great lakes ocean", "the of and", "zzz"]


def _equal(a: SearchResult, b: SearchResult, atol: float = 0.0) -> None:
    assert np.array_equal(a.rows, b.rows)
    np.testing.assert_allclose(a.scores, b.scores, atol=atol)


def test_merge_shards_orders_by_score_then_row_and_pads():
    a = SearchResult(np.array([[4, 1, -1]]), np.array([[2.0, 1.0, 0.0]], dtype=np.float32))
    b = SearchResult(np.array([[0, 7, -1]]), np.array([[2.0, 0.5, 0.0]], dtype=np.float32))
    m = merge_shards([a, b], 5)
    assert m.rows.tolist() == [[0, 4, 1, 7, -1]]  # the tie at 2.0 goes to the lower row
    assert m.scores.tolist()[0][:4] == [2.0, 2.0, 1.0, 0.5]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_bm25_shards_score_like_the_whole_index(corpus, n):
    whole = BM25Index.build(corpus)
    want = whole.search(QUESTIONS, k=len(corpus))
    shards = [whole.shard(i, n) for i in range(n)]
    assert sum(s.num_docs for s in shards) == len(corpus) and [s.offset for s in shards] == sorted({s.offset for s in shards})
    for backend in ("numpy", "numba") if _has_numba() else ("numpy",):
        parts = [s.search(QUESTIONS, k=len(corpus), backend=backend) for s in shards]
        for p, s in zip(parts, shards):  # each shard returns only its own passages, as corpus rows
            got = p.rows[p.rows >= 0]
            assert ((got >= s.offset) & (got < s.offset + s.num_docs)).all()
        _equal(merge_shards(parts, len(corpus)), want)
        _equal(merge_shards([s.search(QUESTIONS, k=3, backend=backend) for s in shards], 3), whole.search(QUESTIONS, k=3))


def test_bm25_shard_refuses_bad_numbers(corpus):
    whole = BM25Index.build(corpus)
    for i, n in ((2, 2), (-1, 2), (0, 0), (0, len(corpus) + 1)):
        with pytest.raises(DenseprError, match="shard"):
            whole.shard(i, n)
    with pytest.raises(DenseprError, match="already a shard"):
        whole.shard(0, 2).shard(0, 2)


def test_sharded_retriever_lists_merge_to_every_mode(tmp_path, corpus, index_dir, tiny_bert):
    """Three dense shards + three BM25 slices: fan out, merge per engine, fuse: the single index's lists."""
    from densepr.index.dense import DenseIndex

    DenseIndex.build(tmp_path / "emb", num_shards=3).save(tmp_path / "dense3")
    (index_dir / "dense").rename(tmp_path / "dense1")
    (tmp_path / "dense3").rename(index_dir / "dense")
    whole = Retriever.load(index_dir, device="cpu")
    vectors = whole.encode(QUESTIONS)
    with pytest.raises(DenseprError, match="num-shards 2"):
        whole.shard(0, 2)
    searchers = [whole.shard(i, 3) for i in range(3)]
    assert all(s.question_encoder is None for s in searchers)
    modes = [Mode(m) for m in whole.modes]
    for k in (1, 4, len(corpus)):
        depth = max(k, FUSION_DEPTH)
        parts = [s.lists(QUESTIONS, depth, {"bm25", "dense"}, vectors) for s in searchers]
        merged = {e: merge_shards([p[e] for p in parts], depth) for e in ("bm25", "dense")}
        got = rank_modes(modes, merged["dense"], merged["bm25"], k, whole.hybrid_lambda)
        want = whole.retrieve_all(QUESTIONS, k, modes, vectors=vectors)
        for m in modes:
            _equal(got[m.value], want[m.value], atol=1e-6)


def _has_numba() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True
