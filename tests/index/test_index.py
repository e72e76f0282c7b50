"""Encoding into shards (resumable), the FAISS index (exact), and their integrity checks."""

from __future__ import annotations

import numpy as np
import pytest

from densepr.errors import DenseprError, MismatchError
from densepr.fileio.atomic import atomic_write
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.models.encoder import Encoder
from tests.support.tiny import counting_encodes, make_tiny_bert


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.load(tiny_bert, device="cpu")


def test_parts_hold_every_passage_once_in_order(tmp_path, corpus, encoder):
    m = encode_corpus(encoder, corpus, tmp_path / "emb", part_size=5, batch_size=4)
    assert [s["count"] for s in m["parts"]] == [5, 5, 2] and m["count"] == len(corpus)
    emb = Embeddings.open(tmp_path / "emb", corpus)
    ids, vecs = zip(*emb.parts())
    assert [i for part in ids for i in part] == corpus.ids
    full = np.concatenate(vecs)
    np.testing.assert_allclose(full, encoder.encode_passages(corpus.titles, corpus.texts), rtol=1e-4, atol=1e-5)


def test_encoding_resumes_from_the_first_missing_part(tmp_path, corpus, encoder):
    out = tmp_path / "emb"
    encode_corpus(encoder, corpus, out, part_size=5)
    before = np.load(out / "part-00001.npy")
    (out / "part-00001.npy").unlink()
    (out / "manifest.json").unlink()
    with counting_encodes(encoder) as calls:
        encode_corpus(encoder, corpus, out, part_size=5)
    assert calls == [5]  # only the missing part was encoded again
    np.testing.assert_allclose(np.load(out / "part-00001.npy"), before, rtol=1e-5)
    assert Embeddings.open(out).manifest["count"] == len(corpus)


def test_resuming_with_another_encoder_is_refused(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb", part_size=5)
    (tmp_path / "emb" / "manifest.json").unlink()  # unfinished, as a killed run leaves it
    other = Encoder.load(make_tiny_bert(tmp_path / "other", seed=7, pooling="cls"), device="cpu")
    with pytest.raises(MismatchError, match="another encoder"):
        encode_corpus(other, corpus, tmp_path / "emb", part_size=5)
    # over a complete directory, another encoder re-encodes beside it and swaps (tests/test_artefacts.py)


def test_float16_storage(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb16", dtype="float16")
    (_, vecs), = Embeddings.open(tmp_path / "emb16").parts()
    assert vecs.dtype == np.float16


def test_flat_index_is_exact_inner_product(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb", part_size=4)
    index = DenseIndex.build(tmp_path / "emb")
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx", corpus=corpus)
    p = np.concatenate([v for _, v in Embeddings.open(tmp_path / "emb").parts()])
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


# -- sharded encoding -----------------------------------------------------------------------------
def test_three_shards_encode_every_passage_exactly_once(tmp_path, corpus, encoder):
    single = encode_corpus(encoder, corpus, tmp_path / "one", part_size=2)
    results = [encode_corpus(encoder, corpus, tmp_path / "three", part_size=2, shard_id=i, num_shards=3) for i in (2, 0, 1)]
    assert results[0] is None and results[1] is None  # not complete until the last shard ran
    assert results[2]["count"] == single["count"] == len(corpus)
    a, b = Embeddings.open(tmp_path / "one"), Embeddings.open(tmp_path / "three")
    ids_a = [i for ids, _ in a.parts() for i in ids]
    ids_b = [i for ids, _ in b.parts() for i in ids]
    assert ids_b == ids_a == corpus.ids  # none dropped, none doubled, corpus order
    np.testing.assert_allclose(np.concatenate([v for _, v in b.parts()]), np.concatenate([v for _, v in a.parts()]), rtol=1e-5, atol=1e-6)
    from densepr.index.embeddings import shard_parts

    assert [list(shard_parts(6, i, 3)) for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert sorted(p for i in range(4) for p in shard_parts(10, i, 4)) == list(range(10))


# -- index types ----------------------------------------------------------------------------------
def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, dim)).astype(np.float32) * 3
    return (centers[rng.integers(0, 20, n)] + rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def _embeddings_dir(tmp_path, vecs: np.ndarray, part: int = 700, **meta):
    """An embeddings directory holding ``vecs`` (as encode_corpus writes it), without a model; ``meta``: more manifest keys."""
    from densepr.fileio.atomic import save_npy, write_json
    from densepr.fileio.ids import write_ids
    from densepr.fileio.manifest import write_manifest

    d = tmp_path / "emb"
    d.mkdir()
    parts, files = [], []
    for i in range(0, len(vecs), part):
        save_npy(d / f"part-{i // part:05d}.npy", vecs[i : i + part])
        write_ids(d / f"part-{i // part:05d}.ids", [f"p{j}" for j in range(i, min(len(vecs), i + part))])
        parts.append({"vectors": f"part-{i // part:05d}.npy", "ids": f"part-{i // part:05d}.ids", "count": len(vecs[i : i + part])})
        files += [parts[-1]["vectors"], parts[-1]["ids"]]
    write_json(d / "encoding.json", {})
    write_manifest(d, "embeddings", files, dim=vecs.shape[1], count=len(vecs), dtype="float32",
                   encoder={"path": "synthetic", "weights_id": "x"}, question_encoder="synthetic", parts=parts, **meta)  # fmt: skip
    return d


def test_mapped_ids_read_as_read_ids_does(tmp_path, monkeypatch):
    from densepr.fileio import ids as id_files
    from densepr.fileio.ids import IdLines, open_ids, read_ids, write_ids

    monkeypatch.setattr(id_files, "_ID_CHUNK", 4096)  # many chunks, ids across their edges
    ids = [f"é{i}-{'x' * (i % 7)}" for i in range(3000)]
    write_ids(tmp_path / "ids.txt", ids)
    (tmp_path / "cut.txt").write_bytes((tmp_path / "ids.txt").read_bytes() + "unfinishé".encode())
    for name in ("ids.txt", "cut.txt"):
        mapped, listed = open_ids(tmp_path / name), read_ids(tmp_path / name)
        assert listed == ids and mapped == ids and list(mapped) == ids and len(mapped) == 3000
        assert [mapped[i] for i in (0, 1234, -1)] == [ids[0], ids[1234], ids[-1]] and mapped[::1000] == ids[::1000]
        view = mapped[1000:2500]
        assert view == ids[1000:2500] and view[-1] == ids[2499] and list(view[10:12]) == ids[1010:1012]
        assert view.sha256() == IdLines.from_strings(ids[1000:2500]).sha256()
        write_ids(tmp_path / "again.txt", view)
        assert read_ids(tmp_path / "again.txt") == ids[1000:2500]
    with pytest.raises(IndexError):
        open_ids(tmp_path / "ids.txt")[3000]
    assert IdLines(b"") == [] and list(IdLines(b"")[0:0]) == [] and IdLines.concat([ids[:2], mapped[2:]]) == ids
    with pytest.raises(DenseprError, match="contains a line break"):
        IdLines.from_strings(["a", "b\nc"])


def test_a_loaded_index_holds_its_ids_as_bytes_and_no_row_map_when_bound_in_corpus_order(tmp_path):
    """Issue 34: 21M ids as a list of str are ~1.5 GB; the ids file's bytes are ~200 MB, and an index over a
    corpus in the same order needs no row map. (Old code: a list of str per load and an int64 map per bind.)"""
    import tracemalloc

    from densepr.data.passages import Corpus, Passage, write_passages_tsv
    from densepr.data.store import build_store, open_store

    n = 50_000
    corpus = Corpus.from_passages(Passage(f"p{j}", "", f"text {j}") for j in range(n))
    DenseIndex.build(_embeddings_dir(tmp_path, _clustered(n, 4), part=20_000, corpus=corpus.fingerprint())).save(tmp_path / "idx")
    write_passages_tsv(corpus, tmp_path / "p.tsv")
    build_store(tmp_path / "p.tsv", tmp_path / "store")
    q = _clustered(5, 4, seed=3)
    ref = DenseIndex.from_faiss(DenseIndex.load(tmp_path / "idx").shards[0].index, [f"p{j}" for j in range(n)])
    ref._rows = np.arange(n)[::-1].copy()  # a map that differs from no map: rows n-1-i
    want = ref.search(q, 10).rows
    for c in (corpus, open_store(tmp_path / "store")):
        tracemalloc.start()
        index = DenseIndex.load(tmp_path / "idx", corpus=c)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert held < 200_000, held  # Python memory kept by the index: the list of 50,000 str alone is ~3 MB
        assert index._rows is None and len(index) == n
        assert np.array_equal(n - 1 - index.search(q, 10).rows, want)  # corpus rows = index rows
        assert index.ids[12_345] == "p12345" and index.ids[-1] == f"p{n - 1}" and list(index.ids[3:5]) == ["p3", "p4"]
        assert index.ids == [f"p{j}" for j in range(n)]
        index.save(tmp_path / "again")
        assert (tmp_path / "again" / "ids.txt").read_bytes() == (tmp_path / "idx" / "ids.txt").read_bytes()
        assert np.array_equal(index.shard(0)._rows, np.arange(n))


def _recall(res, exact, k):
    return np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(res.rows, exact.rows)])


# One case per entry of the type table (a new type must add its case: test_every_index_type_has_a_case).
TYPE_CASES = {
    "flat": ({}, 1.0),
    "flat-fp16": ({}, 0.99),
    "flat-sq8": ({}, 0.9),
    "hnsw": ({"hnsw_m": 16, "ef_construction": 80, "ef_search": 128}, 0.95),
    "ivf-flat": ({"nlist": 16, "nprobe": 16}, 0.999),  # every cell visited: exact
    "ivf-pq": ({"nlist": 16, "nprobe": 16, "pq_m": 16}, 0.5),
    "opq-pq": ({"nlist": 16, "nprobe": 16, "pq_m": 16}, 0.5),
}


def test_every_index_type_has_a_case():
    from densepr.index.types import INDEX_TYPES

    assert set(TYPE_CASES) == set(INDEX_TYPES)


@pytest.mark.parametrize("index_type, params, min_recall", [(t, *case) for t, case in TYPE_CASES.items()])
def test_index_types_against_exact_search(tmp_path, index_type, params, min_recall):
    from densepr.index.types import IndexParams

    vecs, queries = _clustered(3000, 32), _clustered(40, 32, seed=9)
    emb = _embeddings_dir(tmp_path, vecs)
    exact = DenseIndex.build(emb).search(queries, 20)
    index = DenseIndex.build(emb, index_type, IndexParams(train_size=3000, **params))
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx")
    res = loaded.search(queries, 20)
    assert _recall(res, exact, 20) >= min_recall
    assert loaded.manifest["type"] == index_type and loaded.manifest["params"]["train_size"] == 3000
    if index_type in ("flat", "hnsw", "ivf-flat"):  # float vectors kept: scores are the true inner products
        valid = res.rows >= 0
        true = np.einsum("qd,qkd->qk", queries, vecs[np.where(valid, res.rows, 0)])
        np.testing.assert_allclose(res.scores[valid], true[valid], rtol=1e-3, atol=1e-2)


def test_sharded_index_ranks_exactly_like_one_index(tmp_path):
    vecs, queries = _clustered(2000, 16), _clustered(30, 16, seed=5)
    emb = _embeddings_dir(tmp_path, vecs)
    one = DenseIndex.build(emb).search(queries, 50)
    three = DenseIndex.build(emb, num_shards=3)
    three.save(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").glob("index-*.faiss")) == [f"index-0000{i}.faiss" for i in range(3)]
    for mmap in (False, True):
        res = DenseIndex.load(tmp_path / "sharded", mmap=mmap).search(queries, 50)
        np.testing.assert_array_equal(res.rows, one.rows)
        np.testing.assert_allclose(res.scores, one.scores, rtol=1e-6)
    # HNSW shards share one norm bound, so their recovered inner products compare across shards.
    h1 = DenseIndex.build(emb, "hnsw").search(queries, 10)
    h3 = DenseIndex.build(emb, "hnsw", num_shards=3).search(queries, 10)
    assert _recall(h3, one, 10) >= 0.95 and _recall(h1, one, 10) >= 0.95


def test_torch_exact_path_equals_faiss(tmp_path):
    vecs, queries = _clustered(1000, 16), _clustered(10, 16, seed=3)
    index = DenseIndex.build(_embeddings_dir(tmp_path, vecs))
    ref = index.search(queries, 10)
    index.use_torch("cpu", "float32")
    got = index.search(queries, 10)
    np.testing.assert_array_equal(got.rows, ref.rows)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5)
    sc, ix = index._search_torch(queries, 10, block=64)  # many blocks, running top-k merged
    np.testing.assert_array_equal(ix, ref.rows)
    np.testing.assert_allclose(sc, ref.scores, rtol=1e-5)


def test_batched_flat_search_equals_faiss_own(tmp_path):
    vecs, queries = _clustered(3000, 24), _clustered(64, 24, seed=4)
    index = DenseIndex.build(_embeddings_dir(tmp_path, vecs), num_shards=2)
    ref_sc, ref_ix = index._search_shards(queries, 30)  # FAISS IndexFlatIP per shard, merged
    got = index.search(queries, 30)  # 64 queries: the batched GEMM over FAISS's storage
    np.testing.assert_array_equal(got.rows, ref_ix)
    np.testing.assert_allclose(got.scores, ref_sc, rtol=1e-5, atol=1e-5)


def test_compressed_index_reranks_from_the_vectors_on_disk(tmp_path):
    from densepr.index.types import IndexParams

    vecs, queries = _clustered(3000, 32), _clustered(40, 32, seed=9)
    emb = _embeddings_dir(tmp_path, vecs)
    exact = DenseIndex.build(emb).search(queries, 20)
    DenseIndex.build(emb, "ivf-pq", IndexParams(nlist=16, nprobe=16, pq_m=4, train_size=3000)).save(tmp_path / "pq")
    plain = DenseIndex.load(tmp_path / "pq").search(queries, 20)
    reranked_index = DenseIndex.load(tmp_path / "pq", rerank=10)
    reranked = reranked_index.search(queries, 20)
    assert _recall(reranked, exact, 20) > max(_recall(plain, exact, 20) + 0.1, 0.9)
    true = np.einsum("qd,qkd->qk", queries, vecs[reranked.rows])  # scores are exact inner products
    np.testing.assert_allclose(reranked.scores, true, rtol=1e-5, atol=1e-5)
    assert (np.diff(reranked.scores, axis=1) <= 0).all()
    index = DenseIndex.load(tmp_path / "pq")
    index.set_search(rerank=10)  # switched on after loading: the recorded embeddings are mapped
    np.testing.assert_array_equal(index.search(queries, 20).rows, reranked.rows)
    with pytest.raises(DenseprError, match="not search parameters: pq_m"):
        index.set_search(pq_m=8)
    with pytest.raises(DenseprError, match="needs the embeddings directory"):
        DenseIndex.load(tmp_path / "pq", rerank=4, vectors=tmp_path / "nowhere")
    other = _embeddings_dir(tmp_path / "o", vecs[:100]) if (tmp_path / "o").mkdir() is None else None
    with pytest.raises(MismatchError, match="do not match"):
        DenseIndex.load(tmp_path / "pq", rerank=4, vectors=other)



def test_combining_index_directories_checks_they_belong_together(tmp_path, corpus, encoder):
    encode_corpus(encoder, corpus, tmp_path / "emb")
    whole = DenseIndex.build(tmp_path / "emb")
    half = DenseIndex.from_faiss(whole.shards[0].index, whole.ids, encoder=whole.manifest["encoder"])
    both = DenseIndex.combine([half, half])
    assert len(both) == 2 * len(corpus)
    other = DenseIndex.from_faiss(whole.shards[0].index, whole.ids, encoder={"path": "other", "weights_id": "zz"})
    with pytest.raises(MismatchError, match="different passage encoders"):
        DenseIndex.combine([half, other])


def test_plan_counts_bytes():
    from densepr.index.dense_plan import plan

    rows = {r["type"]: r for r in plan(21_015_324, 768)}
    assert rows["flat"]["ram_bytes"] == 21_015_324 * 768 * 4  # the 65 GB DPR's users know
    assert rows["flat-fp16"]["bytes_per_passage"] == 1536 and rows["flat-sq8"]["bytes_per_passage"] == 768
    assert rows["ivf-pq"]["bytes_per_passage"] == 768 // 4 + 8 and rows["ivf-pq"]["ram_bytes"] < rows["flat"]["ram_bytes"] / 15
    rr = rows["ivf-pq+rerank"]  # same RAM, plus the float32 vectors on disk
    assert rr["ram_bytes"] == rows["ivf-pq"]["ram_bytes"] and rr["disk_bytes"] == rows["ivf-pq"]["disk_bytes"] + rows["flat"]["disk_bytes"]


def test_cluster_plan_shards_replicas_and_encode_hours():
    from densepr.index.dense_plan import PAPER_ENCODE_RATE, cluster_plan, plan

    rows = {r["type"]: r for r in cluster_plan(plan(21_015_324, 768), 21_015_324, nodes=4, node_ram_gib=64, gpus=8)}
    flat = rows["flat"]  # 60.1 GiB in 44.8 GiB per node (70% of 64): two shards, two replicas of the whole index
    assert (flat["shards"], flat["replicas"], flat["exact_merge"]) == (2, 2, True) and flat["ram_per_shard"] == flat["ram_bytes"] / 2
    assert (rows["ivf-pq"]["shards"], rows["ivf-pq"]["replicas"]) == (1, 4) and rows["ivf-pq"]["exact_merge"]  # one shard: nothing to merge
    assert rows["hnsw"]["shards"] == 2 and not rows["hnsw"]["exact_merge"]  # per-shard graphs: approximate merge
    assert abs(flat["encode_hours"] - 8.8) < 1e-9 and abs(PAPER_ENCODE_RATE - 82.9) < 0.1  # the paper: 8.8 h on 8 GPUs
    tiny = {r["type"]: r for r in cluster_plan(plan(21_015_324, 768), 21_015_324, nodes=1, node_ram_gib=16, gpus=1)}
    assert not tiny["flat"]["fits"] and tiny["flat"]["replicas"] == 0 and tiny["ivf-pq"]["fits"]


def test_interrupted_index_save_leaves_no_file(tmp_path, monkeypatch):
    import faiss

    index = DenseIndex.build(_embeddings_dir(tmp_path, _clustered(200, 8)))

    def broken(idx, path):
        with open(path, "wb") as fh:
            fh.write(b"half an index")
        raise RuntimeError("killed")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError):
        index.save(tmp_path / "idx")
    assert not (tmp_path / "idx" / "index.faiss").exists() and not (tmp_path / "idx" / "manifest.json").exists()
    assert not list((tmp_path / "idx").glob("*.tmp"))


def test_a_new_index_type_is_one_table_entry(tmp_path, monkeypatch):
    """Registering a type in the table is all it takes: build, save, load, search, plan."""
    import faiss

    from densepr.index import types
    from densepr.index.dense_plan import plan

    extra = types.IndexType("flat-copy", "a second name for exact float32 search", lambda dim, p: faiss.IndexFlatIP(dim),
                            lambda dim, p: 4 * dim, exact=True)  # fmt: skip
    monkeypatch.setitem(types.INDEX_TYPES, "flat-copy", extra)
    vecs, queries = _clustered(500, 16), _clustered(10, 16, seed=3)
    emb = _embeddings_dir(tmp_path, vecs)
    DenseIndex.build(emb, "flat-copy").save(tmp_path / "copy")
    loaded = DenseIndex.load(tmp_path / "copy")
    assert loaded.spec is extra
    np.testing.assert_array_equal(loaded.search(queries, 10).rows, DenseIndex.build(emb).search(queries, 10).rows)
    assert any(r["type"] == "flat-copy" and r["bytes_per_passage"] == 64 for r in plan(1000, 16))


# -- `densepr encode` reads the passages part by part (issue 34) ----------------------------------------------------
@pytest.mark.parametrize("name", ["p.tsv", "p.jsonl", "idx/passages.tsv"])
def test_cli_encode_reads_the_passages_part_by_part(tmp_path, capsys, monkeypatch, corpus, tiny_bert, name):
    """The corpus is never parsed whole (today's CLI called load_corpus: fails there): a file is streamed,
    each part read only once the parts before it are encoded; an index directory's passages.tsv through
    store/ beside it. Whole runs, shards and a resumed run write the in-memory encode's part files."""
    import json

    import densepr.data.store as store
    from densepr.data import Corpus, write_passages_tsv
    from tests.support.cli import run

    src = tmp_path / name
    src.parent.mkdir(exist_ok=True)
    if src.suffix == ".tsv":
        write_passages_tsv(corpus, src)
    else:
        src.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in corpus), encoding="utf-8")
    if src.name == "passages.tsv":  # an index directory with its store (`densepr index bm25 idx/passages.tsv idx/bm25` made it)
        store.build_store(src, src.parent / "store")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, tmp_path / "want", part_size=2)
    parts = sorted(p.name for p in (tmp_path / "want").glob("part-*"))
    monkeypatch.setattr(Corpus, "from_passages", classmethod(lambda *a, **k: pytest.fail("the corpus was parsed whole")))
    read, encoded, ahead = [0], [0], []
    real_iter, real_encode = store.iter_passages, Encoder.encode_passages

    def counting(path, bytes_read=None):
        read[0] = 0  # this pass's passages
        for p in real_iter(path, bytes_read):
            read[0] += 1
            yield p

    def encode(self, titles, texts, *a, **k):
        encoded[0] += len(texts)
        ahead.append(read[0] - encoded[0])
        return real_encode(self, titles, texts, *a, **k)

    monkeypatch.setattr(store, "iter_passages", counting)
    monkeypatch.setattr(Encoder, "encode_passages", encode)
    args = ("--encoder", str(tiny_bert), "--part-size", "2", "--device", "cpu")
    code, out, err = run(capsys, "encode", str(src), str(tmp_path / "emb"), *args)
    assert code == 0 and "12 passage vectors" in out, err
    assert len(ahead) == 6 and (max(ahead) == 0 if src.name != "passages.tsv" else read[0] == 0)  # the store: the file never parsed

    def same(d):
        assert [(d / p).read_bytes() for p in parts] == [(tmp_path / "want" / p).read_bytes() for p in parts]
        assert Embeddings.open(d, corpus).manifest["count"] == 12  # the corpus fingerprint is the in-memory corpus's

    same(tmp_path / "emb")
    for i in range(3):
        code, _, err = run(capsys, "encode", str(src), str(tmp_path / "shards"), *args, "--shard-id", str(i), "--num-shards", "3")
        assert code == 0, err
    same(tmp_path / "shards")
    (tmp_path / "emb" / "part-00004.npy").unlink()
    (tmp_path / "emb" / "manifest.json").unlink()
    encoded[0], ahead[:] = 0, []
    code, _, err = run(capsys, "encode", str(src), str(tmp_path / "emb"), *args)
    assert code == 0 and len(ahead) == 1, err  # only the missing part encoded again
    same(tmp_path / "emb")


def test_each_torchrun_process_encodes_its_own_shard(monkeypatch):
    """`densepr encode` under torchrun: shard RANK of WORLD_SIZE unless shards are given; progress on rank 0 only."""
    import os

    import torch

    from densepr.index.embeddings import process_share

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert process_share(None, None, None) == (0, 1, None, True)
    assert process_share(2, 3, "cpu") == (2, 3, "cpu", True)
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        assert process_share(None, None, "cpu") == (1, 2, "cpu", False)
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)  # its share of the CPU
        assert process_share(0, 4, "cpu") == (0, 4, "cpu", False)  # shards given: those
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["ivf-pq", "opq-pq"])
def test_pq_types_skip_polysemous_training_and_rank_the_same(name):
    """Polysemous training only permutes PQ centroids (for Hamming filtering, never used here): without
    it the inner products, hence the top-k, are those of the same index trained with it."""
    import faiss

    from densepr.index.types import IndexParams, get

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((20, 32)).astype(np.float32)
    p = IndexParams(nlist=8, pq_m=8).resolved(len(x), 32)
    made = get(name).make(32, p)
    assert not faiss.downcast_index(faiss.extract_index_ivf(made)).do_polysemous_training
    other = get(name).make(32, p)
    faiss.downcast_index(faiss.extract_index_ivf(other)).do_polysemous_training = True
    results = []
    for index in (made, other):
        index.train(x)
        index.add(x)
        faiss.extract_index_ivf(index).nprobe = 8
        results.append(index.search(q, 10))
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_reader_reads_the_rows_the_memory_map_holds(tmp_path, dtype):
    """Re-ranking's reads (pread of each row, several threads) give exactly the mapped values, across
    part boundaries, for parts in memory and slices of maps (indexed directly) too."""
    from densepr.index.rows import RowReader

    rng = np.random.default_rng(5)
    parts = []
    for i, n in enumerate((7, 1, 300, 50)):
        np.save(tmp_path / f"p{i}.npy", rng.standard_normal((n, 12)).astype(dtype))
        parts.append(np.load(tmp_path / f"p{i}.npy", mmap_mode="r"))
    whole = np.concatenate(parts).astype(np.float32)
    reader = RowReader(parts, pread=True)
    for rows in ([0], [6, 7, 8], list(range(358)), sorted(rng.choice(358, 40, replace=False).tolist()), []):
        np.testing.assert_array_equal(reader.take(np.array(rows, dtype=np.int64)), whole[rows])
    assert reader._fds  # read through the files
    mixed = RowReader([parts[0], np.asarray(parts[1]), parts[2][:100], parts[3]], pread=True)  # in memory / a slice: indexed
    rows = np.array([1, 7, 8, 107, 120], dtype=np.int64)
    expect = np.concatenate([parts[0], parts[1], parts[2][:100], parts[3]]).astype(np.float32)[rows]
    np.testing.assert_array_equal(mixed.take(rows), expect)
    assert sorted(mixed._fds) == [0, 3]
    reader.close()
    mapped = RowReader(parts, pread=False)  # the memory map's gather
    np.testing.assert_array_equal(mapped.take(np.arange(358)), whole)
    assert not mapped._fds


def test_row_reader_reads_with_pread_only_vectors_larger_than_memory(tmp_path, monkeypatch):
    """Vectors that fit in RAM stay in the page cache, where the map's gather is faster; pread is for
    the rest (21M x 768 float16: 30 GiB), whose rows come from disk."""
    from densepr.index import rows as rows_mod

    np.save(tmp_path / "p.npy", np.ones((100, 8), dtype=np.float32))  # 3,200 bytes
    part = [np.load(tmp_path / "p.npy", mmap_mode="r")]
    monkeypatch.setattr(rows_mod, "physical_memory", lambda: 1 << 30)
    assert not rows_mod.RowReader(part).pread
    monkeypatch.setattr(rows_mod, "physical_memory", lambda: 6_000)
    assert rows_mod.RowReader(part).pread
