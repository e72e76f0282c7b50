"""BM25 at scale: the pruned (MaxScore) top-k equals the exhaustive scorers; the compact vocabulary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densepr.data import Corpus, Passage
from densepr.errors import DenseprError
from densepr.fileio.manifest import file_entry
from densepr.ranking import merge_shards
from densepr.retrieve import bm25_vocab
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.bm25_files import COMPACT_FILES, TERM_MAX, check_arrays
from densepr.retrieve.bm25_vocab import CompactVocab, write_vocab

numba = pytest.importorskip("numba", reason="numba is not installed (pip install 'densepr[fast]')")


def random_corpus(seed: int, n: int = 300, vocab: int = 40) -> Corpus:
    """Zipf-like terms, short passages and many repeated ones: lots of equal scores."""
    rng = np.random.default_rng(seed)
    words = [f"t{i}x" for i in range(vocab)]
    p = 1 / np.arange(1, vocab + 1)
    p /= p.sum()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 9)), p=p)) for _ in range(n // 2)]
    texts += [texts[int(i)] for i in rng.integers(0, len(texts), n - len(texts))]  # duplicates: exact ties
    return Corpus.from_passages(Passage(f"d{i}", "", t) for i, t in enumerate(texts))


def random_queries(seed: int, vocab: int = 40, n: int = 120) -> list[str]:
    rng = np.random.default_rng(seed + 1000)
    words = [f"t{i}x" for i in range(vocab)] + ["unknownword", "absentterm"]
    qs = [" ".join(rng.choice(words, size=int(rng.integers(1, 7)))) for _ in range(n)]
    return [*qs, "t0x t0x t0x", "t1x t39x t1x", "unknownword", "", "the of", "t0x"]


def same(a, b) -> bool:
    return np.array_equal(a.rows, b.rows) and np.array_equal(a.scores, b.scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_exhaustive_scorers(seed):
    index = BM25Index.build(random_corpus(seed))
    qs = random_queries(seed)
    for k in (1, 2, 5, 10, 50, 400):  # 400: more than the passages
        want = index.search(qs, k=k, backend="numpy")
        assert same(index.search(qs, k=k, backend="numba"), want)
        got = index.search(qs, k=k, backend="pruned")
        assert same(got, want), k
    one_by_one = [index.search([q], k=5, backend="pruned") for q in qs]
    batch = index.search(qs, k=5, backend="numpy")
    assert np.array_equal(np.concatenate([r.rows for r in one_by_one]), batch.rows)


def test_pruned_over_shards_merges_to_the_whole():
    index = BM25Index.build(random_corpus(3, n=200))
    qs = random_queries(3)
    whole = index.search(qs, k=10, backend="numpy")
    parts = [index.shard(i, 3) for i in range(3)]
    for part in parts:
        assert same(part.search(qs, k=10, backend="pruned"), part.search(qs, k=10, backend="numpy"))
    merged = merge_shards([part.search(qs, k=10, backend="pruned") for part in parts], 10)
    assert np.array_equal(merged.scores, whole.scores)
    np.testing.assert_array_equal(merged.rows[whole.rows >= 0], whole.rows[whole.rows >= 0])


def test_compact_vocab_round_trip_and_collisions(tmp_path, monkeypatch):
    vocab = {"alpha": 2, "日": 0, "a\ud800b": 3, "beta": 1, "x" * 300: 4}  # a lone surrogate, a long term
    write_vocab(tmp_path, vocab)
    v = CompactVocab(tmp_path)
    assert dict(v.items()) == vocab and list(v) == ["日", "beta", "alpha", "a\ud800b", "x" * 300] and len(v) == 5
    assert v["alpha"] == 2 and "gamma" not in v and v.get("gamma") is None and 7 not in v
    assert v.ids(["beta", "gamma", "beta", "日"]) == [1, 1, 0]  # repeats kept, unknown terms left out
    # Every term with the same hash: lookups still find the right term by comparing its bytes.
    monkeypatch.setattr(bm25_vocab, "hash64", lambda raw: 42)
    write_vocab(tmp_path / "c", vocab)
    v = CompactVocab(tmp_path / "c")
    assert [v.get_id(t) for t in vocab] == list(vocab.values()) and v.ids(["zeta", "alpha"]) == [2]
    with pytest.raises(DenseprError, match="ids are not"):
        write_vocab(tmp_path / "d", {"a": 0, "b": 2})


def test_saved_index_is_searched_through_the_compact_vocabulary(tmp_path):
    corpus = random_corpus(4)
    index = BM25Index.build(corpus)
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25", corpus=corpus)
    assert isinstance(loaded.model.vocab_dict, CompactVocab)
    assert dict(loaded.model.vocab_dict.items()) == index.model.vocab_dict
    np.testing.assert_array_equal(loaded.term_max, index.term_max)
    qs = random_queries(4)
    in_memory = BM25Index.load(tmp_path / "bm25", mmap=False)
    for backend in ("numpy", "numba", "pruned"):
        assert same(loaded.search(qs, k=7, backend=backend), index.search(qs, k=7, backend="numpy"))
        assert same(in_memory.search(qs, k=7, backend=backend), index.search(qs, k=7, backend="numpy"))
    loaded.save(tmp_path / "again")  # a loaded index saves again (bm25s's JSON written from the compact vocabulary)
    assert json.loads((tmp_path / "again" / "vocab.index.json").read_text(encoding="utf-8")) == index.model.vocab_dict
    check_arrays(tmp_path / "again", json.loads((tmp_path / "again" / "manifest.json").read_text()), full=True)


def _make_old_format(d) -> None:
    """What an index saved before the compact vocabulary looks like: bm25s's files and a manifest listing them."""
    manifest = json.loads((d / "manifest.json").read_text())
    for f in COMPACT_FILES:
        (d / f).unlink()
        del manifest["files"][f]
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_index_saved_before_the_compact_vocabulary_loads(tmp_path, monkeypatch):
    import densepr.retrieve.bm25_files as bm25_files

    corpus = random_corpus(5)
    index = BM25Index.build(corpus)
    index.save(tmp_path / "bm25")
    _make_old_format(tmp_path / "bm25")
    qs = random_queries(5)
    want = index.search(qs, k=5, backend="numpy")
    # A directory it may not write in: searched through bm25s's dict, the bounds computed on use.
    monkeypatch.setattr(bm25_files, "write_vocab", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    ro = BM25Index.load(tmp_path / "bm25", corpus=corpus)
    assert isinstance(ro.model.vocab_dict, dict) and not (tmp_path / "bm25" / TERM_MAX).exists()
    assert same(ro.search(qs, k=5, backend="pruned"), want) and same(ro.search(qs, k=5, backend="numba"), want)
    monkeypatch.undo()
    # A writable one gains the compact vocabulary, listed in its manifest, and keeps it.
    up = BM25Index.load(tmp_path / "bm25", corpus=corpus)
    assert isinstance(up.model.vocab_dict, CompactVocab)
    assert set(COMPACT_FILES) <= set(json.loads((tmp_path / "bm25" / "manifest.json").read_text())["files"])
    assert same(up.search(qs, k=5, backend="pruned"), want)
    assert isinstance(BM25Index.load(tmp_path / "bm25").model.vocab_dict, CompactVocab)


def _rewrite(d, name: str, array: np.ndarray) -> None:
    """Replace an array and its manifest entry: damage only the deeper checks can see."""
    np.save(d / name, array)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"][name] = file_entry(d / name)
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_corrupt_compact_vocabulary_is_refused_naming_the_file(tmp_path):
    index = BM25Index.build(random_corpus(6))
    d = tmp_path / "bm25"
    index.save(d)
    raw = bytearray((d / "vocab_hashes.npy").read_bytes())
    raw[-3] ^= 0xFF
    (d / "vocab_hashes.npy").write_bytes(bytes(raw))
    with pytest.raises(DenseprError, match="vocab_hashes.npy"):
        BM25Index.load(d)
    index.save(d)
    hashes = np.load(d / "vocab_hashes.npy")
    _rewrite(d, "vocab_hashes.npy", hashes[::-1].copy())  # not sorted
    with pytest.raises(DenseprError, match=r"vocab_hashes.npy: hashes not sorted"):
        BM25Index.load(d)
    index.save(d)
    hashes[-1] = np.iinfo(np.uint64).max  # sorted, but not the last term's hash
    _rewrite(d, "vocab_hashes.npy", hashes)
    with pytest.raises(DenseprError, match=r"vocab_hashes.npy: entry .* is not the hash of term"):
        BM25Index.load(d)
    index.save(d)
    ids = np.load(d / "vocab_ids.npy")
    ids[0] = ids[1]
    _rewrite(d, "vocab_ids.npy", ids)  # in range, so only the full check (densepr verify) sees a term listed twice
    with pytest.raises(DenseprError, match=r"vocab_ids.npy: term id .* listed [02] times"):
        check_arrays(d, json.loads((d / "manifest.json").read_text()), full=True)
    index.save(d)
    _rewrite(d, TERM_MAX, np.asarray(index.term_max) * np.float32(0.5))  # too low a bound would drop true hits
    with pytest.raises(DenseprError, match=r"term_max.npy: term \d+'s largest score"):
        BM25Index.load(d)


def test_columns_must_list_passages_in_order(tmp_path):
    index = BM25Index.build(random_corpus(7))
    d = tmp_path / "bm25"
    index.save(d)
    indptr, indices = np.load(d / "indptr.csc.index.npy"), np.load(d / "indices.csc.index.npy")
    col = int(np.argmax(np.diff(indptr)))  # the longest column
    indices[indptr[col] : indptr[col + 1]] = indices[indptr[col] : indptr[col + 1]][::-1]
    _rewrite(d, "indices.csc.index.npy", indices)
    with pytest.raises(DenseprError, match="not increasing within a term's column"):
        BM25Index.load(d)


def test_threshold_selection_is_the_kth_largest():
    from densepr.retrieve import bm25_topk

    bm25_topk._kernel()  # the compiled functions
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 50, 1000):
        acc = rng.integers(0, 4, n * 2).astype(np.float32)  # many equal values
        rows = rng.permutation(n * 2)[:n].astype(np.int32)
        for k in {1, 2, n // 2 or 1, n, n + 1}:
            want = np.sort(acc[rows])[::-1][k - 1] if k <= n else 0.0
            assert bm25_topk._kth_largest(acc, rows, n, k, np.zeros(n, np.float32)) == want


def test_the_backend_follows_the_work_and_a_server_warms_the_compiled_scorers(monkeypatch, tmp_path):
    """numpy's cost grows with queries x passages: one query over a large corpus gets the compiled
    scorers, and a long-lived service loads them up front so single questions never fall back to numpy."""
    from densepr.retrieve import bm25 as bm25_mod
    from densepr.retrieve.retriever import Retriever
    from densepr.serve.service import Service

    index = BM25Index.build(random_corpus(3))
    used = []
    real = BM25Index._search_batch
    monkeypatch.setattr(BM25Index, "_search_batch", lambda self, *a: (used.append(a[6]), real(self, *a))[1])
    monkeypatch.setattr(bm25_mod, "_NUMBA_WARM", False)
    index.search(["t0x"], 5)
    assert used[-1] == "numpy"  # 1 query x 300 passages: less work than loading numba
    monkeypatch.setattr(bm25_mod, "NUMBA_WORTH_WORK", 300)  # as if the corpus were large
    index.search(["t0x"], 5)
    assert used[-1] == "pruned"
    monkeypatch.setattr(bm25_mod, "NUMBA_WORTH_WORK", 10**12)
    monkeypatch.setattr(bm25_mod, "_NUMBA_WARM", False)
    corpus = random_corpus(3)
    Service(Retriever(corpus, index, None, None, 1.1))
    index.search(["t0x"], 5)
    index.search(["t0x"], 50)
    assert used[-2:] == ["pruned", "numba"]


def test_a_large_corpus_gets_the_pruned_top_100(monkeypatch):
    """MaxScore wins at top-100 once the corpus is large (measured: x2.4 at 21M, x0.5-0.9 at 1M): the default
    backend switches by corpus size, with the same rows and scores either way."""
    from densepr.retrieve import bm25 as bm25_mod

    index = BM25Index.build(random_corpus(4))
    used = []
    real = BM25Index._search_batch
    monkeypatch.setattr(BM25Index, "_search_batch", lambda self, *a: (used.append(a[6]), real(self, *a))[1])
    monkeypatch.setattr(bm25_mod, "NUMBA_WORTH_WORK", 1)
    small = index.search(["t0x t1x", "t2x t3x"], 100)
    assert used[-1] == "numba" and not bm25_mod.pruned_pays(101, 10**9)
    monkeypatch.setattr(bm25_mod, "PRUNED_LARGE_N", index.num_docs)  # as if this corpus were 5M passages
    large = index.search(["t0x t1x", "t2x t3x"], 100)
    assert used[-1] == "pruned"
    assert np.array_equal(small.rows, large.rows) and np.array_equal(small.scores, large.scores)
