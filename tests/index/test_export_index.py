"""`densepr export-index` / `export-run`: each export opened by its consumer's own reader.

* Pyserini's FAISS layout: loaded as ``pyserini.search.faiss.FaissSearcher.load_index`` does (castorini/pyserini,
  pyserini/search/faiss/_searcher.py: ``faiss.read_index(dir/index)``, ``[line.rstrip() for line in open(dir/docid)]``,
  then ``index.search(q, k)``), the same top-k ids and scores as densepr's own search.
* parquet: ``pyarrow.parquet.read_table``, the same ids, titles, texts and vectors.
* Pyserini's DPR retrieval JSON: the fields and the top-k accuracy as pyserini/eval/evaluate_dpr_retrieval.py
  (``evaluate_retrieval``) reads and computes them, equal to densepr's.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from densepr.data import Corpus, Passage, write_passages_tsv
from densepr.errors import DenseprError
from densepr.fileio import save_npy, write_ids, write_json
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import finalize
from densepr.index.export import export_parquet, export_pyserini
from densepr.index.types import IndexParams
from tests.support.cli import run
from tests.support.tiny import PASSAGES

N, DIM = 600, 16


def _make_index(root: Path, index_type: str = "flat", shards: int = 1, **params) -> Path:
    """An index directory: passages.tsv (N passages) and dense/ over random vectors in densepr's embeddings layout."""
    corpus = Corpus.from_passages(Passage(f"doc{i}", PASSAGES[i % 12][0], f"{PASSAGES[i % 12][1]} ({i})") for i in range(N))
    write_passages_tsv(corpus, root / "idx" / "passages.tsv")
    emb = root / "emb"
    emb.mkdir(parents=True)
    write_json(emb / "encoding.json", {"encoder": {"path": "synthetic", "dim": DIM}, "question_encoder": "synthetic",
                                       "corpus": corpus.fingerprint(), "part_size": 250, "dtype": "float32"})  # fmt: skip
    rng = np.random.default_rng(0)
    for i in range(0, N, 250):
        write_ids(emb / f"part-{i // 250:05d}.ids", corpus.ids[i : i + 250])
        save_npy(emb / f"part-{i // 250:05d}.npy", rng.standard_normal((min(250, N - i), DIM), dtype=np.float32))
    finalize(emb, corpus, DIM)
    DenseIndex.build(emb, index_type, IndexParams(train_size=N, **params), num_shards=shards).save(root / "idx" / "dense")
    return root / "idx"


def _vectors(root: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((root / "emb").glob("part-*.npy"))])


def _pyserini_search(directory: Path, q: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """What Pyserini's FaissSearcher does with the directory (load_index, then batch_search)."""
    index = faiss.read_index(str(directory / "index"))
    with open(directory / "docid") as fh:
        docids = [line.rstrip() for line in fh.readlines()]
    assert index.ntotal == len(docids) and index.d == q.shape[1]
    scores, rows = index.search(q, k)
    return [[docids[i] for i in r if i != -1] for r in rows], scores


@pytest.mark.parametrize(("index_type", "shards", "params"), [
    ("flat", 1, {}), ("flat", 3, {}), ("flat-sq8", 2, {}), ("hnsw", 1, {"hnsw_m": 8, "ef_search": 64}),
    ("ivf-flat", 2, {"nlist": 8, "nprobe": 3}), ("ivf-pq", 1, {"nlist": 8, "nprobe": 2, "pq_m": 4}),
])  # fmt: skip
def test_pyserini_layout_gives_densepr_top_k(tmp_path, index_type, shards, params):
    idx = _make_index(tmp_path, index_type, shards, **params)
    m = export_pyserini(idx, tmp_path / "pyserini")
    mine = DenseIndex.load(idx / "dense")
    q = np.random.default_rng(1).standard_normal((5, DIM), dtype=np.float32)
    ids, scores = _pyserini_search(tmp_path / "pyserini", q, 10)
    res = mine.search(q, k=10)
    assert ids == [[mine.ids[r] for r in row] for row in res.rows]
    np.testing.assert_allclose(scores, res.scores, rtol=1e-4, atol=2e-3 if index_type == "hnsw" else 1e-4)
    assert m["count"] == N and (shards == 1 or m["how"] == f"merged {shards} shards")
    if index_type == "flat" and shards == 1:
        assert m["how"] in ("linked", "copied")


def test_sharded_hnsw_is_refused_with_a_reason(tmp_path):
    idx = _make_index(tmp_path, "hnsw", 2, hnsw_m=8)
    with pytest.raises(DenseprError, match="HNSW graphs cannot be merged"):
        export_pyserini(idx, tmp_path / "pyserini")
    assert not (tmp_path / "pyserini").exists()


def test_pyserini_export_never_overwrites_foreign_files_and_replaces_its_own(tmp_path):
    idx = _make_index(tmp_path)
    out = tmp_path / "pyserini"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DenseprError, match="refusing to overwrite"):
        export_pyserini(idx, out)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "index").exists()
    (out / "notes.txt").unlink()
    export_pyserini(idx, out)
    export_pyserini(idx, out)  # an earlier export is replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["docid", "index", "manifest.json"]


@pytest.mark.parametrize(("index_type", "drop_embeddings"), [("flat", False), ("hnsw", True), ("flat", True)])
def test_parquet_holds_ids_texts_and_vectors(tmp_path, index_type, drop_embeddings):
    idx = _make_index(tmp_path, index_type, 2 if index_type == "flat" else 1, hnsw_m=8)
    want = _vectors(tmp_path)
    if drop_embeddings:  # the vectors then come from the index itself
        import shutil

        shutil.rmtree(tmp_path / "emb")
    m = export_parquet(idx, tmp_path / "out.parquet", row_group=128)
    f = pq.ParquetFile(tmp_path / "out.parquet")
    assert f.metadata.num_row_groups == m["row_groups"] == -(-N // 128)
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.column_names == ["id", "title", "text", "vector"] and t.num_rows == N
    assert t["id"].to_pylist() == [f"doc{i}" for i in range(N)]
    assert t["title"][13].as_py() == PASSAGES[1][0] and t["text"][13].as_py() == f"{PASSAGES[1][1]} (13)"
    np.testing.assert_array_equal(np.stack(t["vector"].to_numpy(zero_copy_only=False)), want)
    meta = json.loads(t.schema.metadata[b"densepr"])
    assert meta["metric"] == "inner_product" and meta["dim"] == DIM


def test_parquet_of_a_compressed_index_needs_its_embeddings(tmp_path):
    idx = _make_index(tmp_path, "ivf-pq", nlist=8, pq_m=4)
    (tmp_path / "emb").rename(tmp_path / "moved")
    with pytest.raises(DenseprError, match="pass --vectors"):
        export_parquet(idx, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    export_parquet(idx, tmp_path / "out.parquet", vectors=tmp_path / "moved")
    np.testing.assert_array_equal(np.stack(pq.read_table(tmp_path / "out.parquet")["vector"].to_numpy(zero_copy_only=False)),
                                  np.concatenate([np.load(p) for p in sorted((tmp_path / "moved").glob("part-*.npy"))]))  # fmt: skip


def test_cli_export_index(tmp_path, capsys):
    idx = _make_index(tmp_path)
    code, out, err = run(capsys, "export-index", str(idx), "--format", "pyserini", "-o", str(tmp_path / "ps"))
    assert code == 0, err
    assert "flat index of 600 x 16 vectors" in out and (tmp_path / "ps" / "index").is_file()
    code, out, err = run(capsys, "export-index", str(idx / "dense"), "--format", "parquet", "-o", str(tmp_path / "p.parquet"),
                         "--passages", str(idx / "passages.tsv"))  # fmt: skip
    assert code == 0, err
    assert "600 passages" in out and pq.read_table(tmp_path / "p.parquet").num_rows == 600
    for args, message in [
        (("--format", "csv", "-o", str(tmp_path / "x")), "expected pyserini or parquet"),
        (("--format", "pyserini", "-o", str(tmp_path / "p.parquet")), "is a file, not a directory"),
    ]:
        code, out, err = run(capsys, "export-index", str(idx), *args)
        assert code == 1 and message in err and "Traceback" not in err
    code, _, err = run(capsys, "export-index", str(tmp_path), "--format", "parquet", "-o", str(tmp_path / "q.parquet"))
    assert code == 1 and "neither a dense index nor an index directory" in err
    code, out, err = run(capsys, "verify", str(tmp_path / "ps"))  # the export's manifest: every byte checked
    assert code == 0 and "1 of 1 artefacts verified" in out, err


def test_cli_export_run_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('[{"question": "q", "answers": []}]')
    code, _, err = run(capsys, "export-run", str(tmp_path / "bad.json"), "-o", str(tmp_path / "out.json"))
    assert code == 1 and "bad.json" in err and "ctxs" in err and "Traceback" not in err
    code, _, err = run(capsys, "export-run", str(tmp_path / "bad.json"), "-o", str(tmp_path), "--format", "pyserini")
    assert code == 1 and "is a directory" in err
    code, _, err = run(capsys, "export-run", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o.json"), "--format", "trec")
    assert code == 1 and "expected pyserini" in err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "o.json").exists()


def _pyserini_topk(path: Path, topk: list[int]) -> dict[int, float]:
    """Top-k accuracy as pyserini/eval/evaluate_dpr_retrieval.py's evaluate_retrieval computes it from the file
    (its loop over retrieval[qid]['answers'] / ['contexts'] / ctx['has_answer'], first hit before max_k)."""
    retrieval = json.loads(path.read_text(encoding="utf-8"))
    accuracy: dict[int, list[int]] = {k: [] for k in topk}
    max_k = max(topk)
    for qid in retrieval:
        assert isinstance(retrieval[qid]["answers"], list)
        has_ans_idx = max_k
        for idx, ctx in enumerate(retrieval[qid]["contexts"]):
            if idx >= max_k:
                break
            assert "has_answer" in ctx  # else Pyserini would judge ctx['text'].split('\n')[1]
            if ctx["has_answer"]:
                has_ans_idx = idx
                break
        for k in topk:
            accuracy[k].append(0 if has_ans_idx >= k else 1)
    return {k: 100 * float(np.mean(v)) for k, v in accuracy.items()}


def test_dpr_results_as_pyserini_retrieval_json(tmp_path, capsys, index_dir, qa_tsv):
    res = tmp_path / "res.json"
    code, out, err = run(capsys, "retrieve", "--qa", str(qa_tsv), "--index", str(index_dir), "--mode", "bm25", "-k", "5", "-o", str(res))
    assert code == 0, err
    code, out, err = run(capsys, "export-run", str(res), "-o", str(tmp_path / "pyserini.json"))
    assert code == 0, err
    got = json.loads((tmp_path / "pyserini.json").read_text(encoding="utf-8"))
    dpr = json.loads(res.read_text(encoding="utf-8"))
    assert list(got) == [str(i) for i in range(len(dpr))]
    first = got["0"]
    assert first["question"] == dpr[0]["question"] and first["answers"] == dpr[0]["answers"]
    c, d = first["contexts"][0], dpr[0]["ctxs"][0]
    assert set(c) == {"docid", "score", "text", "has_answer"} and c["docid"] == d["id"] and c["score"] == pytest.approx(d["score"])
    assert c["text"].split("\n") == [d["title"], d["text"]]  # Pyserini reads [0] as the title, [1] as the text

    code, out, err = run(capsys, "evaluate", str(res), "--ks", "1,5")
    assert code == 0, err
    acc = _pyserini_topk(tmp_path / "pyserini.json", [1, 5])
    assert f"top-1 {acc[1]:.2f}" in out and f"top-5 {acc[5]:.2f}" in out


def test_dpr_results_without_has_answer_are_judged_by_dprs_rule(tmp_path):
    from densepr.evaluate.pyserini_run import dpr_results_to_pyserini

    src = tmp_path / "res.json"
    src.write_text(json.dumps([{"question": "q", "answers": ["Guido van Rossum"], "ctxs": [
        {"id": "a", "title": "Two\nlines", "text": "nothing here", "score": "3.5"},
        {"id": "b", "title": "Python", "text": "created by\nGuido van Rossum", "score": 2.0}]}]))  # fmt: skip
    assert dpr_results_to_pyserini(src, tmp_path / "out.json") == 1
    ctxs = json.loads((tmp_path / "out.json").read_text())["0"]["contexts"]
    assert [c["has_answer"] for c in ctxs] == [False, True] and ctxs[0]["score"] == 3.5
    assert [c["text"] for c in ctxs] == ["Two lines\nnothing here", "Python\ncreated by Guido van Rossum"]
    src.write_text(json.dumps([{"question": "q", "answers": [], "ctxs": [{"id": "a", "text": "t", "score": "high"}]}]))
    with pytest.raises(DenseprError, match="score 'high' is not a number"):
        dpr_results_to_pyserini(src, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


# -- the parquet file loaded into vector stores, as the README's recipes do (each skipped where the client is not installed) --
def _qdrant(f: pq.ParquetFile, queries: np.ndarray, tmp: Path) -> list[tuple[list[str], list[float]]]:
    from qdrant_client import QdrantClient, models

    dim = f.schema_arrow.field("vector").type.list_size
    client = QdrantClient(path=str(tmp / "qdrant"))  # local mode; url="http://localhost:6333" for a server
    client.create_collection("passages", vectors_config=models.VectorParams(size=dim, distance=models.Distance.DOT))
    row = 0
    for b in f.iter_batches(batch_size=10_000):  # point ids are integers or UUIDs: the row; the passage id goes in the payload
        vecs = b.column("vector").flatten().to_numpy().reshape(-1, dim)
        client.upload_collection("passages", vectors=vecs, payload=b.select(["id", "title", "text"]).to_pylist(), ids=range(row, row + len(vecs)))
        row += len(vecs)
    hits = [client.query_points("passages", query=q.tolist(), limit=10).points for q in queries]
    client.close()
    return [([h.payload["id"] for h in hs], [h.score for h in hs]) for hs in hits]


def _lancedb(f: pq.ParquetFile, queries: np.ndarray, tmp: Path) -> list[tuple[list[str], list[float]]]:
    import lancedb

    tbl = lancedb.connect(str(tmp / "lancedb")).create_table("passages", f.iter_batches(batch_size=10_000), schema=f.schema_arrow)
    hits = [tbl.search(q.tolist()).distance_type("dot").limit(10).to_list() for q in queries]
    return [([h["id"] for h in hs], [1 - h["_distance"] for h in hs]) for hs in hits]  # LanceDB's dot distance is 1 - q.p


def _milvus(f: pq.ParquetFile, queries: np.ndarray, tmp: Path) -> list[tuple[list[str], list[float]]]:
    pytest.importorskip("milvus_lite")
    from pymilvus import MilvusClient

    client = MilvusClient(str(tmp / "milvus.db"))  # Milvus Lite: a local file
    client.create_collection("passages", dimension=f.schema_arrow.field("vector").type.list_size, primary_field_name="id",
                             id_type="string", max_length=512, metric_type="IP")  # fmt: skip
    for b in f.iter_batches(batch_size=10_000):
        client.insert("passages", b.to_pylist())
    hits = client.search("passages", data=queries.tolist(), limit=10, output_fields=["title", "text"])
    client.close()
    return [([h["id"] for h in hs], [h["distance"] for h in hs]) for hs in hits]


@pytest.mark.parametrize(("client", "load"), [("qdrant_client", _qdrant), ("lancedb", _lancedb), ("pymilvus", _milvus)])
def test_parquet_loads_into_vector_stores_with_densepr_top_k(tmp_path, client, load):
    pytest.importorskip(client)
    idx = _make_index(tmp_path)
    export_parquet(idx, tmp_path / "p.parquet", row_group=256)
    q = np.random.default_rng(2).standard_normal((4, DIM), dtype=np.float32)
    mine = DenseIndex.load(idx / "dense")
    res = mine.search(q, k=10)
    got = load(pq.ParquetFile(tmp_path / "p.parquet"), q, tmp_path)
    assert [ids for ids, _ in got] == [[mine.ids[r] for r in row] for row in res.rows]
    np.testing.assert_allclose([s for _, s in got], res.scores, rtol=1e-4, atol=1e-4)
