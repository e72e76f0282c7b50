"""The memory-mapped passage store (issue 34): the Corpus API over it equals the in-memory corpus,
bad input and damaged or stale stores are refused with located errors, and retrieval over an index
directory with a store gives the results it gives without."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from densepr.data.passages import FP_ROWS, Corpus, Passage, corpus_fingerprint, load_corpus, write_passages_tsv
from densepr.data.store import StoreCorpus, build_store, ensure_store, open_store
from densepr.errors import DenseprError, InputError, MismatchError
from densepr.fileio import atomic
from densepr.fileio import manifest as manifests
from densepr.retrieve.bm25 import BM25Index


def _store(tmp_path: Path, corpus: Corpus, name: str = "passages.tsv") -> tuple[Path, StoreCorpus]:
    tsv = tmp_path / name
    write_passages_tsv(corpus, tsv)
    build_store(tsv, tmp_path / "store")
    return tsv, open_store(tmp_path / "store", tsv)


def _assert_same(store: StoreCorpus, mem: Corpus) -> None:
    assert len(store) == len(mem)
    assert [store[i] for i in range(len(mem))] == [mem[i] for i in range(len(mem))]
    assert store[-1] == mem[-1] and store[np.int64(len(mem) - 1)] == mem[len(mem) - 1]  # numpy rows, as searches return them
    assert list(store) == list(mem)
    for col in ("ids", "titles", "texts"):
        s, m = getattr(store, col), getattr(mem, col)
        assert len(s) == len(m) and list(s) == m
        assert s[1:4] == m[1:4] and s[::3] == m[::3] and s[-3:] == m[-3:] and s[5:2] == [] and s[:] == m
    assert all(store.row(pid) == mem.row(pid) for pid in mem.ids)
    with pytest.raises(KeyError):
        store.row("no-such-id")
    with pytest.raises(IndexError):
        store[len(mem)]
    fp = mem.fingerprint()
    assert store.fingerprint() == fp  # recorded at build time...
    assert corpus_fingerprint(store.ids, store.titles, store.texts) == fp  # ...and what the stored columns hash to


def test_store_round_trip_equals_the_in_memory_corpus(tmp_path, corpus):
    _, store = _store(tmp_path, corpus)
    _assert_same(store, corpus)
    assert store.manifest["kind"] == "passage-store" and store.manifest["source"]["name"] == "passages.tsv"


def test_store_round_trip_over_several_fingerprint_blocks_and_odd_values(tmp_path):
    # more rows than one fingerprint block; empty titles, non-ASCII text, and (JSON lines only) a lone surrogate
    n = 2 * FP_ROWS + 7
    passages = [Passage(f"p{i}", "" if i % 3 else f"Tïtle {i}", f"word {i} é 中文" * (i % 4)) for i in range(n)]
    tsv_corpus = Corpus.from_passages(passages)
    _, store = _store(tmp_path, tsv_corpus)
    assert store.texts[0] == "" and store.titles[1] == ""
    _assert_same(store, tsv_corpus)

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"id": "a", "title": "", "text": "\\ud800 lone"}\n{"_id": 7, "text": "seven"}\n', encoding="utf-8")
    build_store(jsonl, tmp_path / "jstore")
    _assert_same(open_store(tmp_path / "jstore", jsonl), load_corpus(jsonl))


def test_a_store_is_handed_to_another_process_by_its_directory(tmp_path, corpus):
    import pickle

    _, store = _store(tmp_path, corpus)
    again = pickle.loads(pickle.dumps(store))
    assert isinstance(again, StoreCorpus) and list(again) == list(corpus)


def test_duplicate_ids_are_refused_with_both_passages_named(tmp_path):
    tsv = tmp_path / "passages.tsv"
    tsv.write_text("id\ttext\ttitle\n1\ta\tA\n2\tb\tB\n3\tc\tC\n2\td\tD\n1\te\tE\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"passages.tsv, passage 4: field 'id': duplicate passage id '2' \(first seen as passage 2\)"):
        build_store(tsv, tmp_path / "store")
    assert not (tmp_path / "store").exists()  # nothing installed
    with pytest.raises(InputError, match="duplicate passage id '2' \\(first seen as passage 2\\)"):
        load_corpus(tsv)  # the same rule as the in-memory corpus


def test_bad_input_is_located_as_when_loading(tmp_path):
    tsv = tmp_path / "passages.tsv"
    tsv.write_text("id\ttext\ttitle\n1\ta\tA\n2\tb\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"passages.tsv, line 3: expected 3 tab-separated columns"):
        build_store(tsv, tmp_path / "store")
    tsv.write_text("id\ttext\ttitle\n", encoding="utf-8")
    with pytest.raises(InputError, match="no passages found"):
        build_store(tsv, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_truncated_store_file_is_refused_naming_it(tmp_path, corpus):
    _store(tmp_path, corpus)
    texts = tmp_path / "store" / "texts.bin"
    texts.write_bytes(texts.read_bytes()[:-10])
    with pytest.raises(DenseprError, match=r"store/texts.bin: \d+ bytes, manifest says \d+: file truncated or altered; delete the store directory: "
                       "densepr rebuilds it from passages.tsv on the next load"):  # fmt: skip
        open_store(tmp_path / "store")


def test_altered_bytes_are_refused_naming_the_file(tmp_path, corpus):
    _store(tmp_path, corpus)
    ids = tmp_path / "store" / "ids.bin"
    raw = bytearray(ids.read_bytes())
    raw[0] ^= 1  # same size, other id
    ids.write_bytes(bytes(raw))
    with pytest.raises(DenseprError, match=r"store/ids.bin: sha256 differs"):
        open_store(tmp_path / "store")


def test_altered_bytes_of_a_large_file_are_caught_by_the_sampled_hash(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(manifests, "FULL_HASH_BYTES", 16)  # every file is "large": checked on samples, as at 21M passages
    _store(tmp_path, corpus)
    assert "sampled_sha256" in json.loads((tmp_path / "store" / "manifest.json").read_text())["files"]["texts.bin"]
    texts = tmp_path / "store" / "texts.bin"
    raw = bytearray(texts.read_bytes())
    raw[3] ^= 1
    texts.write_bytes(bytes(raw))
    with pytest.raises(DenseprError, match=r"store/texts.bin: sampled sha256 differs"):
        open_store(tmp_path / "store")


def test_offsets_that_do_not_match_their_data_are_refused(tmp_path, corpus):
    _store(tmp_path, corpus)
    d = tmp_path / "store"
    off = np.load(d / "text_offsets.npy")
    atomic.save_npy(d / "text_offsets.npy", off[:-1])  # one row short, then the manifest rewritten to match
    manifest = json.loads((d / "manifest.json").read_text())
    manifests.write_manifest(d, "passage-store", list(manifest["files"]), corpus=manifest["corpus"], source=manifest["source"])
    with pytest.raises(DenseprError, match=r"store/text_offsets.npy: 12 offsets from 0 to \d+, expected 13"):
        open_store(d)


def test_a_store_of_another_corpus_is_refused_by_an_index(tmp_path, corpus):
    BM25Index.build(corpus).save(tmp_path / "bm25")
    other = Corpus.from_passages(Passage(p.id, p.title, p.text + " edited") for p in corpus)
    _, store = _store(tmp_path, other)
    with pytest.raises(MismatchError, match="same 12 ids but other titles or texts"):
        BM25Index.load(tmp_path / "bm25", corpus=store)
    assert BM25Index.load(tmp_path / "bm25", corpus=_store(tmp_path / "x", corpus)[1]) is not None  # (tmp_path/x made by write)


def test_a_store_older_than_its_passages_file_is_refused_or_rebuilt(tmp_path, corpus):
    tsv, store = _store(tmp_path, corpus)
    edited = Corpus.from_passages(Passage(p.id, p.title, p.text.upper()) for p in corpus)  # same size, other content
    write_passages_tsv(edited, tsv)
    os.utime(tsv, ns=(store.manifest["source"]["mtime_ns"],) * 2)  # even with the old modification time (cp -p)
    with pytest.raises(MismatchError, match="store: built from passages.tsv of \\d+ bytes, but .* now has another content"):
        open_store(tmp_path / "store", tsv)
    rebuilt = ensure_store(tsv, tmp_path / "store")
    assert list(rebuilt) == list(edited) and rebuilt.fingerprint() == edited.fingerprint()
    assert ensure_store(tsv, tmp_path / "store").manifest == rebuilt.manifest  # current: opened, not rebuilt
    write_passages_tsv(corpus, tmp_path / "other.tsv")
    with pytest.raises(MismatchError, match="another size|another modification time|another content"):
        open_store(tmp_path / "store", tmp_path / "other.tsv")


def test_retriever_over_an_index_directory_with_a_store_searches_alike(index_dir, corpus):
    from densepr.index.dense import DenseIndex
    from densepr.models.encoder import Encoder
    from densepr.retrieve.retriever import Retriever

    bm25 = BM25Index.load(index_dir / "bm25", corpus=corpus)
    dense = DenseIndex.load(index_dir / "dense", corpus=corpus)
    plain = Retriever(corpus, bm25, dense, Encoder.load(dense.manifest["question_encoder"], device="cpu"))
    assert not (index_dir / "store").exists()
    r = Retriever.load(index_dir, device="cpu")  # builds the store once...
    assert isinstance(r.corpus, StoreCorpus) and (index_dir / "store" / "manifest.json").is_file()
    built = (index_dir / "store" / "manifest.json").stat().st_mtime_ns
    r = Retriever.load(index_dir, device="cpu")  # ...then opens it
    assert (index_dir / "store" / "manifest.json").stat().st_mtime_ns == built
    questions = ["who created python", "great lakes ocean", "mozart salzburg", "first nobel prize in physics"]
    for mode in ("bm25", "dense", "hybrid", "rrf"):
        for q in questions:
            assert r.search(q, k=5, mode=mode) == plain.search(q, k=5, mode=mode)


def test_an_index_directory_whose_passages_file_was_removed_is_served_from_its_store(index_dir, corpus, capsys):
    """passages.tsv may be deleted once store/ is built (13 GB at DPR's 21M passages): searching, verifying,
    rebuilding BM25 from ``idx/passages.tsv`` and evaluating then read the store alone, with the same results;
    a directory with neither is refused with both named."""
    from densepr.retrieve.index_dir import IndexDir
    from densepr.retrieve.retriever import Retriever
    from tests.support.cli import run

    with_file = Retriever.load(index_dir, device="cpu")  # builds store/
    questions = ["who created python", "great lakes ocean", "mozart salzburg"]
    want = {(q, m): with_file.search(q, k=5, mode=m) for q in questions for m in ("bm25", "dense", "hybrid")}
    (index_dir / "passages.tsv").unlink()
    r = Retriever.load(index_dir, device="cpu")
    assert isinstance(r.corpus, StoreCorpus) and r.corpus.fingerprint() == corpus.fingerprint()
    assert {(q, m): r.search(q, k=5, mode=m) for q in questions for m in ("bm25", "dense", "hybrid")} == want
    assert IndexDir(index_dir).check().holds_passages()
    code, out, err = run(capsys, "verify", str(index_dir))
    assert code == 0 and "FAILED" not in out, out + err
    code, _, err = run(capsys, "index", "bm25", str(index_dir / "passages.tsv"), str(index_dir / "bm25-again"))
    assert code == 0, err
    assert all((index_dir / "bm25-again" / f).read_bytes() == (index_dir / "bm25" / f).read_bytes()
               for f in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"))  # fmt: skip
    shutil.rmtree(index_dir / "store")
    with pytest.raises(DenseprError, match=r"no passages.tsv, no store/"):
        IndexDir(index_dir).check()
    code, out, err = run(capsys, "search", "who created python", "--index", str(index_dir), "--mode", "bm25")
    assert code != 0 and "passages.tsv" in out + err and "Traceback" not in out + err


def test_retriever_rebuilds_a_stale_store_and_reads_a_damaged_one_never(index_dir, corpus):
    from densepr.retrieve.retriever import Retriever

    Retriever.load(index_dir, device="cpu")
    (index_dir / "store" / "texts.bin").write_bytes(b"x")
    with pytest.raises(DenseprError, match="store/texts.bin: 1 bytes, manifest says"):
        Retriever.load(index_dir, device="cpu")
    write_passages_tsv(corpus, index_dir / "passages.tsv")  # rewritten (same passages): the store is rebuilt from it
    assert isinstance(Retriever.load(index_dir, device="cpu").corpus, StoreCorpus)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_retriever_over_a_read_only_index_directory_parses_passages(index_dir):
    from densepr.retrieve.retriever import Retriever

    os.chmod(index_dir, 0o555)
    try:
        r = Retriever.load(index_dir, device="cpu")
    finally:
        os.chmod(index_dir, 0o755)
    assert type(r.corpus) is Corpus and not (index_dir / "store").exists()


def test_verify_checks_a_store_against_its_fingerprint_and_the_passages_beside_it(index_dir, corpus, capsys):
    from tests.support.cli import run

    build_store(index_dir / "passages.tsv", index_dir / "store")
    code, out, err = run(capsys, "verify", str(index_dir))
    assert code == 0 and "passage-store" in out, err
    # texts edited, and the manifest rewritten to match the files: only re-hashing the passages tells
    d = index_dir / "store"
    (d / "texts.bin").write_bytes((d / "texts.bin").read_bytes().replace(b"Mozart", b"MOZART"))
    manifest = json.loads((d / "manifest.json").read_text())
    manifests.write_manifest(d, "passage-store", list(manifest["files"]), corpus=manifest["corpus"], source=manifest["source"])
    code, out, _ = run(capsys, "verify", str(d), "--quick")
    assert code == 0  # sizes and hashes agree with the manifest
    code, out, _ = run(capsys, "verify", str(d))
    assert code == 1 and "FAILED" in out and "do not hash to the fingerprint" in out
    # passages.tsv edited: the store (like the indexes) describes another corpus
    build_store(index_dir / "passages.tsv", d)
    write_passages_tsv(Corpus.from_passages(Passage(p.id, p.title, p.text + "!") for p in corpus), index_dir / "passages.tsv")
    code, out, _ = run(capsys, "verify", str(d), "--quick")
    assert code == 1 and "FAILED" in out and "passage-store" in out and "other titles or texts" in out


def test_retriever_leaves_a_store_path_it_did_not_write_alone(index_dir):
    from densepr.retrieve.retriever import Retriever

    (index_dir / "store").write_text("a user's file", encoding="utf-8")
    r = Retriever.load(index_dir, device="cpu")
    assert type(r.corpus) is Corpus and (index_dir / "store").read_text(encoding="utf-8") == "a user's file"


def test_processes_opening_a_missing_store_at_once_build_it_once(tmp_path, corpus):
    import multiprocessing

    tsv = tmp_path / "passages.tsv"
    write_passages_tsv(corpus, tsv)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        manifests = pool.starmap(_open_and_manifest, [(str(tsv), str(tmp_path / "store"))] * 3)
    assert all(m == manifests[0] for m in manifests)  # one build, opened by all: each build installs a new directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.lock", "passages.tsv", "store"]


def _open_and_manifest(tsv: str, store: str) -> dict:
    s = ensure_store(tsv, store)
    assert list(s) and s.fingerprint()
    return {"inode": os.stat(store).st_ino, **json.loads((Path(store) / "manifest.json").read_text())}


def test_rows_of_many_ids_equal_row_of_each_in_any_order_and_name_the_first_absent(tmp_path):
    passages = [Passage(f"p{i}", "", f"text {i}") for i in range(300)] + [Passage("é-中", "", "x")]
    mem = Corpus.from_passages(passages)
    _, store = _store(tmp_path, mem)
    rng = np.random.default_rng(0)
    ids = list(mem.ids)
    for c in (mem, store):
        assert c.rows(ids).tolist() == list(range(len(ids)))  # the corpus's own ids in row order
        for sel in (rng.permutation(len(ids)), rng.choice(len(ids), 50), np.arange(len(ids))[::-1], np.arange(0)):
            given = [ids[i] for i in sel]
            got = c.rows(given)
            assert got.dtype == np.int64 and got.tolist() == [mem.row(p) for p in given]
        for absent in ("p3000", "p30 ", "q1", "p"):  # longer, same length, other bytes, a prefix
            with pytest.raises(KeyError) as e:
                c.rows([ids[5], absent, "p9999"])
            assert e.value.args[0] == absent


def test_dense_bind_over_a_store_equals_the_in_memory_bind_and_refuses_an_absent_id(tmp_path, corpus):
    import faiss

    from densepr.index.dense import DenseIndex

    _, store = _store(tmp_path, corpus)
    order = list(np.random.default_rng(1).permutation(len(corpus)))
    for ids in (list(corpus.ids), [corpus.ids[i] for i in order]):
        flat = faiss.IndexFlatIP(2)
        flat.add(np.zeros((len(ids), 2), dtype=np.float32))
        a, b = DenseIndex.from_faiss(flat, ids), DenseIndex.from_faiss(flat, ids)
        a.bind(corpus)
        b.bind(store)
        assert a._rows.tolist() == b._rows.tolist() == [corpus.row(p) for p in ids]
    flat = faiss.IndexFlatIP(2)
    flat.add(np.zeros((2, 2), dtype=np.float32))
    for c in (corpus, store):
        with pytest.raises(MismatchError, match="'nope' is not in the corpus"):
            DenseIndex.from_faiss(flat, [corpus.ids[0], "nope"]).bind(c)


def _bm25_dirs(tmp_path: Path, corpus: Corpus) -> tuple[Path, Path]:
    """Two index directories over ``corpus`` (passages.tsv, bm25/): the second's store/ path is taken by
    something else, so the passages there are parsed into memory, as before the store."""
    dirs = []
    for name in ("with-store", "in-memory"):
        d = tmp_path / name
        write_passages_tsv(corpus, d / "passages.tsv")
        BM25Index.build(corpus).save(d / "bm25")
        dirs.append(d)
    (dirs[1] / "store").mkdir()
    return dirs[0], dirs[1]


def test_evaluate_build_train_and_cloze_read_an_index_directory_through_its_store(tmp_path, corpus, qa_tsv, capsys):
    from densepr.train.cloze import index_cloze_records
    from tests.support.cli import run
    from tests.train.test_cloze import TEXT

    corpus = Corpus.from_passages([*corpus, Passage("treaty", "Treaty", TEXT)])  # one passage cloze questions can be made from
    store_dir, mem_dir = _bm25_dirs(tmp_path, corpus)
    trec = tmp_path / "run.trec"
    ids = list(corpus.ids)
    trec.write_text("".join(f"{q} Q0 {ids[(q + j) % len(ids)]} {j + 1} {9 - j} t\n" for q in range(3) for j in range(4)))
    outs = {}
    for d in (store_dir, mem_dir):
        code, out, err = run(capsys, "evaluate", str(trec), "--qa", str(qa_tsv), "--index", str(d), "--ks", "1,4")
        assert code == 0, err
        outs[d] = out
        o = tmp_path / f"{d.name}-train.json"
        code, _, err = run(capsys, "data", "build-train", "--qa", str(qa_tsv), "--index", str(d), "-o", str(o), "--depth", "5",
                           "--hard-negatives", "2", "--random-negatives", "1", "--val-fraction", "0")  # fmt: skip
        assert code == 0, err
        outs[d, "train"] = o.read_text()
        outs[d, "cloze"] = index_cloze_records(d, 5, depth=3)
    assert (store_dir / "store" / "manifest.json").is_file() and not any((mem_dir / "store").iterdir())
    assert outs[store_dir] == outs[mem_dir] and "answerable" in outs[store_dir]
    assert outs[store_dir, "train"] == outs[mem_dir, "train"]
    assert outs[store_dir, "cloze"] == outs[mem_dir, "cloze"]


# -- a passages file streamed part by part (StreamedCorpus: `densepr index bm25` and `encode` on a plain file) --------
def _many(n: int) -> Corpus:
    return Corpus.from_passages(Passage(f"p{i}", f"T{i % 7}", "w " * (i % 5) + f"text {i}") for i in range(n))


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_a_streamed_file_gives_the_in_memory_corpus_block_by_block(tmp_path, suffix):
    from densepr.data.store import StreamedCorpus

    mem = _many(FP_ROWS + 5)  # two fingerprint blocks
    path = tmp_path / f"c{suffix}"
    if suffix == ".tsv":
        write_passages_tsv(mem, path)
    else:
        path.write_text("".join(json.dumps({"_id": p.id, "title": p.title, "text": p.text}) + "\n" for p in mem), encoding="utf-8")
    streamed = StreamedCorpus(path)
    assert list(streamed.blocks(7000)) == list(mem.blocks(7000))  # the first pass also fingerprints it
    assert streamed.fingerprint() == mem.fingerprint() and len(streamed) == len(mem)
    assert list(streamed.blocks(1000, [16, 3, 5])) == list(mem.blocks(1000, [3, 5, 16]))


def test_colliding_id_hashes_are_told_apart_by_the_ids_and_a_repeated_id_is_refused(tmp_path, monkeypatch):
    """Every id given one hash: the build and the streamed pass read the colliding ids back to decide."""
    import densepr.data.store as store

    monkeypatch.setattr(store, "_id_hash", lambda pid: 42)
    mem = _many(30)
    write_passages_tsv(mem, tmp_path / "ok.tsv")
    assert store.StreamedCorpus(tmp_path / "ok.tsv").fingerprint() == mem.fingerprint()
    build_store(tmp_path / "ok.tsv", tmp_path / "store")
    dup = Corpus(ids=[*mem.ids, "p3", "p9", "p3"], titles=[*mem.titles, "a", "b", "c"], texts=[*mem.texts, "x", "y", "z"])
    write_passages_tsv(dup, tmp_path / "dup.tsv")
    for fn in (lambda: store.StreamedCorpus(tmp_path / "dup.tsv").fingerprint(), lambda: build_store(tmp_path / "dup.tsv", tmp_path / "s2")):
        with pytest.raises(InputError, match=r"dup.tsv, passage 31: field 'id': duplicate passage id 'p3' \(first seen as passage 4\)"):
            fn()
    assert not (tmp_path / "s2").exists()


def test_a_file_changed_between_two_streamed_passes_is_refused(tmp_path):
    from densepr.data.store import StreamedCorpus

    write_passages_tsv(_many(10), tmp_path / "c.tsv")
    streamed = StreamedCorpus(tmp_path / "c.tsv")
    assert len(streamed) == 10
    write_passages_tsv(_many(12), tmp_path / "c.tsv")
    with pytest.raises(MismatchError, match="changed while densepr was reading it"):
        list(streamed.blocks(4, [1]))
