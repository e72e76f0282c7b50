"""Encoding into shards (resumable), the FAISS index (exact), and their integrity checks."""

from __future__ import annotations

import numpy as np
import pytest

from densepr.embeddings import Embeddings, encode_corpus
from densepr.encoder import Encoder
from densepr.errors import DenseprError, MismatchError
from densepr.fileio import atomic_write
from densepr.index import DenseIndex

from .conftest import make_tiny_bert


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.load(tiny_bert, device="cpu")


def test_shards_hold_every_passage_once_in_order(tmp_path, corpus, encoder):
    m = encode_corpus(encoder, corpus, tmp_path / "emb", shard_size=5, batch_size=4)
    assert [s["count"] for s in m["shards"]] == [5, 5, 2] and m["count"] == len(corpus)
    emb = Embeddings.open(tmp_path / "emb", corpus)
    ids, vecs = zip(*emb.shards())
    assert [i for part in ids for i in part] == corpus.ids
    full = np.concatenate(vecs)
    np.testing.assert_allclose(full, encoder.encode_passages(corpus.titles, corpus.texts), rtol=1e-4, atol=1e-5)


def test_encoding_resumes_from_the_first_missing_shard(tmp_path, corpus, encoder):
    out = tmp_path / "emb"
    encode_corpus(encoder, corpus, out, shard_size=5)
    before = np.load(out / "part-00001.npy")
    (out / "part-00001.npy").unlink()
    (out / "manifest.json").unlink()
    calls = []
    original = encoder.encode_passages
    encoder.encode_passages = lambda *a, **k: calls.append(len(a[0])) or original(*a, **k)
    try:
        encode_corpus(encoder, corpus, out, shard_size=5)
    finally:
        del encoder.encode_passages
    assert calls == [5]  # only the missing shard was encoded again
    np.testing.assert_allclose(np.load(out / "part-00001.npy"), before, rtol=1e-5)
    assert Embeddings.open(out).manifest["count"] == len(corpus)


def test_resuming_with_another_encoder_is_refused(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb", shard_size=5)
    other = Encoder.load(make_tiny_bert(tmp_path / "other", seed=7, pooling="cls"), device="cpu")
    with pytest.raises(MismatchError, match="another encoder"):
        encode_corpus(other, corpus, tmp_path / "emb", shard_size=5)


def test_float16_storage(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb16", dtype="float16")
    (_, vecs), = Embeddings.open(tmp_path / "emb16").shards()
    assert vecs.dtype == np.float16


def test_flat_index_is_exact_inner_product(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb", shard_size=4)
    index = DenseIndex.build(tmp_path / "emb")
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx", corpus=corpus)
    p = np.concatenate([v for _, v in Embeddings.open(tmp_path / "emb").shards()])
    q = encoder.encode_questions(["who created python", "great lakes", "mozart"])
    res = loaded.search(q, k=5)
    brute = q @ p.T
    for i in range(len(q)):
        order = np.argsort(-brute[i], kind="stable")[:5]
        np.testing.assert_allclose(res.scores[i], brute[i][order], rtol=1e-5, atol=1e-5)
        assert set(res.rows[i]) == set(order)  # corpus rows (ids are in corpus order here)
    assert loaded.manifest["encoder"]["dim"] == encoder.dim and loaded.manifest["question_encoder"] == encoder.name
    assert loaded.search(q[:1], k=40).rows[0][len(corpus):].tolist() == [-1] * (40 - len(corpus))


def test_index_errors(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb")
    index = DenseIndex.build(tmp_path / "emb")
    with pytest.raises(MismatchError, match="question encoder does not match"):
        index.search(np.zeros((1, encoder.dim + 1), dtype=np.float32))
    with pytest.raises(DenseprError, match="unknown index type"):
        DenseIndex.build(tmp_path / "emb", "hnsw-typo")
    index.save(tmp_path / "idx")
    f = tmp_path / "idx" / "index.faiss"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DenseprError, match="truncated or altered"):
        DenseIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").unlink()
    with pytest.raises(DenseprError, match="no manifest.json"):
        DenseIndex.load(tmp_path / "idx")
    with pytest.raises(DenseprError, match="expected a dense-index manifest"):
        DenseIndex.load(tmp_path / "emb")


def test_interrupted_write_leaves_nothing_under_the_final_name(tmp_path):
    target = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write('{"half": ')
            raise RuntimeError("killed")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    with atomic_write(target) as fh:
        fh.write("{}")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write("garbage")
            raise RuntimeError("killed")
    assert target.read_text() == "{}"  # the previous complete file survives
