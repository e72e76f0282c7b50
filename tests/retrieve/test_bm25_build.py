"""BM25's chunked, multi-process build: the same arrays as the single-process (bm25s) build."""

from __future__ import annotations

import numpy as np
import pytest

from densepr.data import Corpus, Passage, load_wiki_summaries
from densepr.errors import DenseprError
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.bm25_analyzer import LuceneAnalyzer
from densepr.retrieve.bm25_build import LuceneBM25


def reference(corpus: Corpus, lengths: str = "lucene") -> LuceneBM25:
    """Today's build: every passage's terms in one process, indexed by bm25s."""
    analyzer = LuceneAnalyzer("porter")
    model = LuceneBM25(k1=0.9, b=0.4, method="lucene", lengths=lengths)
    model.index([analyzer(f"{t} {x}") for t, x in zip(corpus.titles, corpus.texts)], show_progress=False, create_empty_token=False)
    return model


def assert_identical(index: BM25Index, model: LuceneBM25) -> None:
    assert list(index.model.vocab_dict.items()) == list(model.vocab_dict.items())  # same terms, ids and order
    for name in ("data", "indices", "indptr"):
        got, want = np.asarray(index.model.scores[name]), model.scores[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name
    assert index.model.scores["num_docs"] == model.scores["num_docs"]


def _mixed_corpus() -> Corpus:
    words = "the running runner's U.S. don't 3,000 cats cat dog dogs logical İstanbul 東京 a an of".split()
    rng = np.random.default_rng(0)
    rows = [Passage(str(i), " ".join(rng.choice(words, 2)), " ".join(rng.choice(words, int(rng.integers(0, 40)))))
            for i in range(40)]  # fmt: skip
    rows.append(Passage("empty", "", "the of a"))  # no indexed term
    return Corpus.from_passages(rows)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("workers", [1, 2])
def test_chunked_build_equals_single_process(chunk, workers, tmp_path):
    corpus = _mixed_corpus()
    index = BM25Index.build(corpus, workers=workers, chunk_passages=chunk, workdir=tmp_path)
    assert_identical(index, reference(corpus))
    assert list(tmp_path.iterdir()) == []  # nothing left in the build directory


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_the_build_without_numba_equals_single_process(chunk, tmp_path, monkeypatch):
    """Where numba is not installed the chunks are analysed by the numpy paths: the same arrays."""
    from densepr.retrieve import bm25_kernels

    monkeypatch.setattr(bm25_kernels, "compiled", lambda: None)
    corpus = _mixed_corpus()
    assert_identical(BM25Index.build(corpus, workers=1, chunk_passages=chunk, workdir=tmp_path), reference(corpus))


def test_exact_lengths_and_store_corpus(tmp_path, corpus):
    from densepr.data import write_passages_tsv
    from densepr.data.store import build_store, open_store

    write_passages_tsv(corpus, tmp_path / "passages.tsv")
    build_store(tmp_path / "passages.tsv", tmp_path / "store")
    store = open_store(tmp_path / "store")
    index = BM25Index.build(store, lengths="exact", workers=2, chunk_passages=2)  # workers read their rows from the store
    assert_identical(index, reference(corpus, "exact"))


def test_bad_build_arguments(corpus):
    with pytest.raises(DenseprError, match="workers"):
        BM25Index.build(corpus, workers=0)


def test_failed_save_leaves_the_old_index_loadable(tmp_path, corpus, monkeypatch):
    BM25Index.build(corpus).save(tmp_path / "bm25")
    before = {p.name: p.read_bytes() for p in (tmp_path / "bm25").iterdir()}
    other = Corpus.from_passages([Passage("x", "t", "something else entirely")])
    index = BM25Index.build(other)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(index.model, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "bm25")
    assert {p.name: p.read_bytes() for p in (tmp_path / "bm25").iterdir()} == before
    assert BM25Index.load(tmp_path / "bm25", corpus=corpus).num_docs == len(corpus)


def test_embedded_corpus_arrays_are_byte_identical(embedded):
    corpus = load_wiki_summaries(embedded.summaries)
    index = BM25Index.build(corpus, workers=2, chunk_passages=3000)
    assert_identical(index, reference(corpus))


def test_failure_mid_merge_leaves_no_files_and_the_old_index(tmp_path, corpus, monkeypatch):
    import densepr.retrieve.bm25_build as bm25

    BM25Index.build(corpus).save(tmp_path / "bm25")

    def boom(*a, **k):
        raise MemoryError("killed mid-merge")

    monkeypatch.setattr(bm25, "lucene_length", boom)  # called after the postings are merged, before the scores
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(MemoryError):
        BM25Index.build(_mixed_corpus(), chunk_passages=5, workdir=work)
    assert list(work.iterdir()) == []
    assert BM25Index.load(tmp_path / "bm25", corpus=corpus).search(["capital"], k=2).rows.shape == (1, 2)


def test_cli_index_bm25_with_workers_equals_the_library_build(tmp_path, capsys, corpus, passages_tsv):
    from tests.support.cli import run

    code, out, err = run(capsys, "index", "bm25", str(passages_tsv), str(tmp_path / "bm25"), "--workers", "2", "--chunk-passages", "2")
    assert code == 0, err
    loaded = BM25Index.load(tmp_path / "bm25", corpus=corpus)
    want = BM25Index.build(corpus).model
    for name in ("data", "indices", "indptr"):  # the vocabulary order is the CLI process's own (string hashing): compare by term
        assert loaded.model.scores[name].dtype == want.scores[name].dtype
    terms = sorted(want.vocab_dict)
    for model in (loaded.model, want):
        model.columns = [(np.asarray(model.scores["indices"][a:b]).tobytes(), np.asarray(model.scores["data"][a:b]).tobytes())
                         for a, b in ((model.scores["indptr"][model.vocab_dict[t]], model.scores["indptr"][model.vocab_dict[t] + 1]) for t in terms)]  # fmt: skip
    assert sorted(loaded.model.vocab_dict) == terms and loaded.model.columns == want.columns


# -- `densepr index bm25` on a file streamed, or through an index directory's store (issue 34) --------------------
def _write(corpus: Corpus, path) -> None:
    import json

    from densepr.data import write_passages_tsv

    if path.suffix == ".tsv":
        write_passages_tsv(corpus, path)
    else:
        path.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in corpus), encoding="utf-8")


def _files(d) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
@pytest.mark.parametrize("chunk, workers", [(1, 1), (7, 1), (1000, 1), (1, 2), (7, 2), (3, 3)])
def test_cli_streamed_build_is_byte_identical(tmp_path, capsys, suffix, chunk, workers):
    """Every array and the manifest are today's (the corpus parsed whole), whatever the chunks and workers."""
    from densepr.data import load_corpus
    from tests.support.cli import run

    src = tmp_path / f"corpus{suffix}"
    _write(_mixed_corpus(), src)
    BM25Index.build(load_corpus(src)).save(tmp_path / "want")
    code, out, err = run(capsys, "index", "bm25", str(src), str(tmp_path / "got"), "--workers", str(workers), "--chunk-passages", str(chunk))
    assert code == 0, err
    assert "over 41 passages" in out
    assert _files(tmp_path / "got") == _files(tmp_path / "want")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "got", "want"])  # no store, no build leftovers


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_streamed_build_never_holds_the_corpus(tmp_path, capsys, monkeypatch, workers):
    """The file is read chunk by chunk, at most one chunk more than the workers ahead of the analysis,
    and never parsed into a Corpus (today's CLI called load_corpus: fails there)."""
    import densepr.data.store as store
    import densepr.retrieve.bm25_build as bm25
    from densepr.data import load_corpus
    from tests.support.cli import run

    src = tmp_path / "corpus.tsv"
    _write(_mixed_corpus(), src)
    BM25Index.build(load_corpus(src)).save(tmp_path / "want")
    monkeypatch.setattr(Corpus, "from_passages", classmethod(lambda *a, **k: pytest.fail("the corpus was parsed whole")))
    read, ahead = [0], []
    real_iter, real_bar = store.iter_passages, bm25.progress_bar

    def counting(path, bytes_read=None):
        for p in real_iter(path, bytes_read):
            read[0] += 1
            yield p

    def bar(total, description, *a, **k):
        done = [0]

        def advance(n):
            done[0] += n
            if description == "BM25 analyse":
                ahead.append(read[0] - done[0])

        from contextlib import contextmanager

        @contextmanager
        def cm():
            with real_bar(total, description, *a, **k):
                yield advance

        return cm()

    monkeypatch.setattr(store, "iter_passages", counting)
    monkeypatch.setattr(bm25, "progress_bar", bar)
    monkeypatch.setattr(bm25, "analyse_total", lambda corpus: (41, "passages"))  # the bar in passages (not the file's bytes)
    code, _, err = run(capsys, "index", "bm25", str(src), str(tmp_path / "got"), "--workers", str(workers), "--chunk-passages", "3")
    assert code == 0, err
    assert _files(tmp_path / "got") == _files(tmp_path / "want")
    assert len(ahead) == 14 and max(ahead) <= 3 * (workers + 1)  # 41 passages in chunks of 3; a pass-ahead would read all 41


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad, message", [
    ("36\tno title here\n", "corpus.tsv, line 43: expected 3 tab-separated columns"),
    ("7\ta repeated id\tT\n", "corpus.tsv, passage 42: field 'id': duplicate passage id '7' (first seen as passage 8)"),
])  # fmt: skip
def test_cli_streamed_build_refuses_a_bad_line_deep_in_the_file(tmp_path, capsys, workers, bad, message):
    from tests.support.cli import run

    src = tmp_path / "corpus.tsv"
    _write(_mixed_corpus(), src)
    with open(src, "a", encoding="utf-8") as fh:
        fh.write(bad + "99\tafter it\tT\n")
    code, _, err = run(capsys, "index", "bm25", str(src), str(tmp_path / "bm25"), "--workers", str(workers), "--chunk-passages", "4")
    assert code == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.tsv"]  # no index, no build leftovers


def test_cli_index_directory_builds_from_its_store(tmp_path, capsys, monkeypatch):
    """An index directory's passages.tsv is read through store/ beside it (built there first)."""
    from densepr.data import load_corpus
    from densepr.data.store import open_store
    from tests.support.cli import run

    idx = tmp_path / "idx"
    idx.mkdir()
    _write(_mixed_corpus(), idx / "passages.tsv")
    BM25Index.build(load_corpus(idx / "passages.tsv")).save(tmp_path / "want")
    monkeypatch.setattr(Corpus, "from_passages", classmethod(lambda *a, **k: pytest.fail("the corpus was parsed whole")))
    code, _, err = run(capsys, "index", "bm25", str(idx / "passages.tsv"), str(idx / "bm25"), "--workers", "2", "--chunk-passages", "5")
    assert code == 0, err
    assert len(open_store(idx / "store", idx / "passages.tsv")) == 41
    assert _files(idx / "bm25") == _files(tmp_path / "want")


def test_cli_builds_no_store_beside_a_passages_file_elsewhere(tmp_path, capsys):
    """A passages.tsv outside the index being built is streamed: no store (about the file's size) is
    written into the user's folder unasked (it was, beside any writable passages.tsv)."""
    from tests.support.cli import run

    data = tmp_path / "data"
    data.mkdir()
    _write(_mixed_corpus(), data / "passages.tsv")
    code, _, err = run(capsys, "index", "bm25", str(data / "passages.tsv"), str(tmp_path / "out" / "bm25"), "--workers", "1")
    assert code == 0, err
    assert sorted(p.name for p in data.iterdir()) == ["passages.tsv"]


def test_a_worker_keeps_no_mapping_of_the_store_after_its_chunk(tmp_path):
    """A worker copies its chunk's texts out of the store and lets the mapping go: kept open, every
    page it read stayed in its RSS (3.1 GB per worker a third of the way through 21M passages)."""
    import gc
    import os

    from densepr.data.passages import write_passages_tsv
    from densepr.data.store import build_store
    from densepr.retrieve.bm25_build import _analyse_chunk

    corpus = _mixed_corpus()
    write_passages_tsv(corpus, tmp_path / "passages.tsv")
    build_store(tmp_path / "passages.tsv", tmp_path / "store")
    (tmp_path / "work").mkdir()
    out = _analyse_chunk((("store", str(tmp_path / "store")), 0, len(corpus), "porter", str(tmp_path / "work"), 0))
    assert out["passages"] == len(corpus)
    gc.collect()
    with open(f"/proc/{os.getpid()}/maps") as fh:
        maps = fh.read()
    assert str(tmp_path / "store") not in maps


def _as_terms(known, ids) -> list[str]:
    return [known.terms[i] if i >= 0 else "" for i in ids]


def _numba_or_skip(compiled: bool) -> None:
    if compiled:
        pytest.importorskip("numba", reason="numba is not installed (pip install 'densepr[fast]')")


@pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "numba"])
@pytest.mark.parametrize("alphabet", ["ascii", "mixed"])
def test_block_analysis_equals_passage_by_passage(alphabet, compiled, monkeypatch):
    """The numpy block split (bm25_blocks.block_term_ids) gives every text's words, in order, as the
    per-passage reference does, on random texts full of the split's edge cases: joiners between
    letters and digits, underscores, apostrophes, non-ASCII runs (accents, CJK, emoji, NBSP, ZWJ),
    empty texts; and again when every hash collides (the block falls back to the reference)."""
    import random

    import densepr.retrieve.bm25_blocks as blocks
    from densepr.retrieve.bm25_build import _Words

    pieces = ["a", "Z", "0", "9", "_", " ", ".", ",", ";", ":", "'", "-", "\n", "U.S.", "3,000", "don't", "cat's",
              "the", "running", "x1.5y", "a:b", "1;2", "__"]  # fmt: skip
    if alphabet == "mixed":
        pieces += ["é", "\u0301", "\u00a0", "\u3000", "\u200d", "\U0001f600", "中", "ก", "\u2019", "İ", "ß", "½", "Röntgen's"]
    rng = random.Random(11)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts[5] = texts[6] = ""
    _numba_or_skip(compiled)

    def both() -> None:
        ref, got = _Words("porter"), _Words("porter")
        for lo in range(0, len(texts), 700):
            want_ids, want_counts = blocks.passage_term_ids(texts[lo : lo + 700], ref.ids, ref.add)
            got_ids, got_counts = blocks.block_term_ids(texts[lo : lo + 700], got.ids, got.add, compiled=compiled)
            assert list(got_counts) == want_counts
            assert _as_terms(got, got_ids) == _as_terms(ref, want_ids)

    both()
    if compiled:  # the compiled split compares words' bytes: no hash collision to fall back from
        return
    real = blocks._hashes
    monkeypatch.setattr(blocks, "_hashes", lambda b, s, e, p: real(b, s, e, p) * 0 if p == blocks._P1 else real(b, s, e, p))
    both()


def test_a_streamed_chunk_goes_to_a_worker_as_a_file_and_is_analysed_alike(tmp_path):
    """A task sent to the pool names a file holding the chunk's texts (a chunk's MB through the pool's pipe
    could block its task thread when an error stops the build, and Pool.terminate wait on it); the worker
    reads it, removes it, and writes the same postings as from the texts in memory."""
    import json

    from densepr.retrieve.bm25_build import _analyse_chunk, _spilled

    corpus = _mixed_corpus()
    titles, texts = list(corpus.titles), list(corpus.texts)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    task = (("rows", titles, texts), 0, len(texts), "porter", str(tmp_path / "a"), 0)
    sent = _spilled(task)
    assert sent[0][0] == "file" and len(repr(sent)) < 300
    a = _analyse_chunk(sent)
    assert not (tmp_path / "a" / "chunk000000.rows.json").exists()
    b = _analyse_chunk((("rows", titles, texts), 0, len(texts), "porter", str(tmp_path / "b"), 0))
    for what in ("tid", "doc", "tf", "df", "dl", "seen"):
        assert np.array_equal(np.load(f"{a['base']}.{what}.npy"), np.load(f"{b['base']}.{what}.npy")), what
    # each build directory is sent every term of the worker's numbering once
    assert a["terms"] == b["terms"] and a["first_new"] == b["first_new"] == 0
    assert json.loads(open(f"{a['base']}.new.json").read()) == json.loads(open(f"{b['base']}.new.json").read())
