"""Artefact directories (BM25 index, dense index, embeddings): rebuilt atomically beside the old
version, refused on load when they do not match their corpus or were altered, never written over
an artefact of another kind."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from densepr.data import Corpus, Passage, write_passages_tsv
from densepr.errors import DenseprError, MismatchError
from densepr.fileio import atomic, dirs
from densepr.fileio import manifest as manifests
from densepr.fileio.atomic import NoSpaceError
from densepr.fileio.manifest import MANIFEST
from densepr.index.dense import DenseIndex
from densepr.index.embeddings import Embeddings, encode_corpus
from densepr.models.encoder import Encoder
from densepr.retrieve.bm25 import BM25Index
from tests.support.cli import run
from tests.support.tiny import PASSAGES, counting_encodes, make_tiny_bert

QUERIES = ["who created python", "highest peak in north america", "first nobel prize in physics", "kangaroo hopping"]


def _big_corpus(n: int, tag: str = "") -> Corpus:
    """``n`` passages cycling through the test passages, each made distinct."""
    return Corpus.from_passages(
        Passage(str(i), PASSAGES[i % len(PASSAGES)][0], f"{PASSAGES[i % len(PASSAGES)][1]} {tag} copy {i}") for i in range(n)
    )


def _shifted(corpus: Corpus) -> Corpus:
    """The same ids in the same order, the titles and texts shifted down one row (the issue's case)."""
    rot = lambda xs: xs[-1:] + xs[:-1]  # noqa: E731
    return Corpus.from_passages(Passage(i, t, x) for i, t, x in zip(corpus.ids, rot(corpus.titles), rot(corpus.texts)))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _siblings(directory: Path) -> list[str]:
    """Work directories left beside ``directory`` (there should be none after a build, failed or not)."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return Encoder.load(tiny_bert, device="cpu")


# -- rebuilding in place is atomic ---------------------------------------------------------------
READER = textwrap.dedent(
    """
    import json, sys
    from densepr.retrieve.bm25 import BM25Index
    index = BM25Index.load(sys.argv[1])  # memory-mapped, as the server loads it
    qs = json.loads(sys.argv[2])
    print(json.dumps(index.search(qs, k=5).rows.tolist()), flush=True)
    sys.stdin.readline()  # the parent rebuilds the index meanwhile
    print(json.dumps(index.search(qs, k=5).rows.tolist()), flush=True)
    print(json.dumps(BM25Index.load(sys.argv[1]).search(qs, k=5).rows.tolist()), flush=True)
    """
)


def test_rebuilding_bm25_under_a_running_reader(tmp_path, corpus):
    """The issue's SIGBUS: a process that memory-maps the index keeps its version; a reload sees the new one."""
    d = tmp_path / "bm25"
    BM25Index.build(_big_corpus(3000)).save(d)
    new_corpus = corpus  # smaller: rewriting the mapped files in place killed the reader with SIGBUS
    child = subprocess.Popen([sys.executable, "-c", READER, str(d), json.dumps(QUERIES)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        before = json.loads(child.stdout.readline() or "null")
        assert before is not None, child.stderr.read()
        rebuilt = BM25Index.build(new_corpus)
        rebuilt.save(d)  # over the index the child has mapped
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, f"reader died (rc {child.returncode}{', SIGBUS' if child.returncode == -signal.SIGBUS else ''}): {err}"
    again, reloaded = (json.loads(line) for line in out.splitlines())
    assert again == before  # the old version, intact
    assert reloaded == rebuilt.search(QUERIES, k=5).rows.tolist() != before  # the new one on reload
    assert _siblings(d) == []


def test_rebuilding_a_dense_index_under_a_mapped_reader(tmp_path, corpus, encoder):
    from tests.index.test_index import _embeddings_dir

    encode_corpus(encoder, corpus, tmp_path / "emb")
    d = tmp_path / "dense"
    DenseIndex.build(tmp_path / "emb").save(d)
    old = DenseIndex.load(d, mmap=True)
    q = encoder.encode_questions(QUERIES)
    before = old.search(q, 5)
    (tmp_path / "new").mkdir()
    vecs = np.random.default_rng(1).standard_normal((50, encoder.dim)).astype(np.float32)
    DenseIndex.build(_embeddings_dir(tmp_path / "new", vecs)).save(d)
    after = old.search(q, 5)
    np.testing.assert_array_equal(after.rows, before.rows)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert len(DenseIndex.load(d)) == 50 and _siblings(d) == []


def _fail_midway(monkeypatch, module, name: str, after: int = 1, exc: BaseException | None = None) -> None:
    """From its ``after``-th call on, make the writer ``module.name`` (``np.save`` or
    ``faiss.write_index``) write a few bytes and fail as on a full disk."""
    real = getattr(module, name)
    calls = []

    def writer(*args, **kw):
        calls.append(args)
        if len(calls) < after:
            return real(*args, **kw)
        target = args[1] if name == "write_index" else args[0]
        if isinstance(target, (str, os.PathLike)):
            Path(target).write_bytes(b"\x93NUMPY half")
        else:
            target.write(b"\x93NUMPY half")
        raise exc or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, writer)


def test_a_disk_full_bm25_rebuild_keeps_the_previous_index(tmp_path, corpus, monkeypatch):
    d = tmp_path / "bm25"
    BM25Index.build(corpus).save(d)
    files, before = _snapshot(d), BM25Index.load(d).search(QUERIES, k=5).rows
    bigger = BM25Index.build(_big_corpus(100))  # built first: the build writes its chunks' postings with np.save too
    _fail_midway(monkeypatch, np, "save", after=2)  # bm25s writes its arrays with np.save
    with pytest.raises(NoSpaceError, match=r"bm25/indices\.csc\.index\.npy: no space left on device .*previous .*bm25 is untouched"):
        bigger.save(d)
    monkeypatch.undo()
    assert _snapshot(d) == files and _siblings(d) == []  # not a byte changed, nothing left beside it
    np.testing.assert_array_equal(BM25Index.load(d, corpus=corpus).search(QUERIES, k=5).rows, before)


def test_a_disk_full_bm25_build_names_its_work_directory_and_leaves_nothing(tmp_path, corpus, monkeypatch):
    """The chunked build writes each chunk's postings to a work directory: a full disk there is a
    NoSpaceError naming it (not a bare [Errno 28]), and the work directory is removed."""
    work = tmp_path / "work"
    work.mkdir()
    _fail_midway(monkeypatch, np, "save", after=2)
    with pytest.raises(NoSpaceError, match=r"\.bm25-build-[^:]*: no space left on device while writing it; nothing was replaced"):
        BM25Index.build(_big_corpus(100), workdir=work, chunk_passages=10)
    monkeypatch.undo()
    assert list(work.iterdir()) == []


def test_a_disk_full_dense_rebuild_keeps_the_previous_index(tmp_path, corpus, encoder, monkeypatch, capsys):
    import faiss

    encode_corpus(encoder, corpus, tmp_path / "emb")
    d = tmp_path / "dense"
    assert run(capsys, "index", "dense", str(tmp_path / "emb"), str(d))[0] == 0
    files = _snapshot(d)
    full = RuntimeError("Error in faiss::write_index: write error in x.faiss: 1 != 256 (No space left on device)")
    _fail_midway(monkeypatch, faiss, "write_index", after=2, exc=full)  # 1: the build's trained.faiss; FAISS raises RuntimeError
    code, _, err = run(capsys, "index", "dense", str(tmp_path / "emb"), str(d))
    assert code == 1 and "Traceback" not in err
    assert "dense/index.faiss: no space left on device while writing it; the previous" in err.replace("\n", "")
    monkeypatch.undo()
    assert _snapshot(d) == files and _siblings(d) == []
    assert len(DenseIndex.load(d, corpus=corpus)) == len(corpus)


def test_failed_writes_name_the_file(tmp_path, monkeypatch):
    _fail_midway(monkeypatch, np, "save")
    with pytest.raises(NoSpaceError, match=r"x\.npy: no space left on device while writing it; nothing was replaced"):
        atomic.save_npy(tmp_path / "x.npy", np.zeros(3))
    assert list(tmp_path.iterdir()) == []
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    with pytest.raises(NoSpaceError, match=r"y\.json: disk quota exceeded"):
        with atomic.atomic_write(tmp_path / "y.json") as fh:
            fh.write("{")
            raise quota
    with pytest.raises(OSError, match="Permission"):  # other errors pass through unchanged
        with atomic.atomic_write(tmp_path / "z.json"):
            raise PermissionError(errno.EACCES, "Permission denied")


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only): a real disk-full, not a simulated one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); the failing-writer tests cover this")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_rebuild_on_a_full_disk_keeps_the_previous_artefact(small_disk, encoder):
    small = _big_corpus(200)
    d = small_disk / "bm25"
    BM25Index.build(small).save(d)
    files, before = _snapshot(d), BM25Index.load(d).search(QUERIES, k=5).rows
    with pytest.raises(NoSpaceError, match=r"bm25/.*: no space left on device while writing it; the previous"):
        BM25Index.build(_big_corpus(20_000, "much bigger")).save(d)
    assert _snapshot(d) == files and _siblings(d) == []
    np.testing.assert_array_equal(BM25Index.load(d, corpus=small).search(QUERIES, k=5).rows, before)
    import faiss

    flat = faiss.IndexFlatIP(128)
    flat.add(np.random.default_rng(0).standard_normal((4000, 128)).astype(np.float32))  # 2 MiB: cannot fit
    index = DenseIndex.from_faiss(flat, [str(i) for i in range(4000)])
    with pytest.raises(NoSpaceError, match=r"disk/dense/index\.faiss: no space left on device"):
        index.save(small_disk / "dense")
    assert not (small_disk / "dense").exists() and _siblings(small_disk / "dense") == []


def test_reencoding_a_complete_directory_replaces_it_only_when_complete(tmp_path, corpus, encoder, monkeypatch):
    out = tmp_path / "emb"
    encode_corpus(encoder, corpus, out, part_size=5)
    files = _snapshot(out)
    other = Encoder.load(make_tiny_bert(tmp_path / "other", seed=7, pooling="cls"), device="cpu")
    _fail_midway(monkeypatch, np, "save", after=2)  # the second part fails: a disk-full mid-encode
    with pytest.raises(NoSpaceError, match="part-00001.npy"):
        encode_corpus(other, corpus, out, part_size=5)
    monkeypatch.undo()
    assert _snapshot(out) == files  # untouched, and loadable
    assert Embeddings.open(out, corpus).manifest["encoder"]["path"] == encoder.name
    building = out.with_name("emb.building")
    assert (building / "part-00000.npy").is_file() and not (building / "part-00001.npy").exists()  # resumable
    m = encode_corpus(other, corpus, out, part_size=5)
    assert m["encoder"]["path"] == other.name and not building.exists() and _siblings(out) == []
    assert Embeddings.open(out, corpus).manifest["encoder"]["weights_id"] == m["encoder"]["weights_id"]
    # the same settings again: nothing to do, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    encode_corpus(other, corpus, out, part_size=5)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_unfinished_encoding_with_other_settings_is_refused(tmp_path, corpus, encoder):
    out = tmp_path / "emb"
    encode_corpus(encoder, corpus, out, part_size=5)
    (out / MANIFEST).unlink()  # as a killed run leaves it
    other = Encoder.load(make_tiny_bert(tmp_path / "other", seed=7, pooling="cls"), device="cpu")
    with pytest.raises(MismatchError, match="unfinished encoding with another encoder"):
        encode_corpus(other, corpus, out, part_size=5)


def test_killed_builds_leave_nothing_the_next_build_keeps(tmp_path, corpus):
    d = tmp_path / "bm25"
    BM25Index.build(corpus).save(d)
    stale = tmp_path / f".bm25.building-999999999@{dirs._HOST}-abcd"  # a build whose process is gone
    stale.mkdir()
    (stale / "data.csc.index.npy").write_bytes(b"half")
    live = tmp_path / f".bm25.building-{os.getpid()}@{dirs._HOST}-efgh"  # one still running: kept
    live.mkdir()
    BM25Index.build(corpus).save(d)
    assert not stale.exists() and live.exists()


def test_the_swap_falls_back_to_rename_where_exchange_is_missing(tmp_path, corpus, monkeypatch):
    d = tmp_path / "bm25"
    BM25Index.build(corpus).save(d)
    monkeypatch.setattr(dirs, "_exchange", lambda a, b: False)
    BM25Index.build(_big_corpus(50)).save(d)
    assert BM25Index.load(d).manifest["corpus"]["count"] == 50 and _siblings(d) == []


# -- loading refuses what does not match -----------------------------------------------------------
def test_texts_shifted_under_the_same_ids_are_refused(index_dir, corpus, capsys):
    shifted = _shifted(corpus)
    assert shifted.ids == corpus.ids
    with pytest.raises(MismatchError, match="same 12 ids but other titles or texts"):
        BM25Index.load(index_dir / "bm25", corpus=shifted)
    with pytest.raises(MismatchError, match="same 12 ids but other titles or texts"):
        DenseIndex.load(index_dir / "dense", corpus=shifted)
    with pytest.raises(MismatchError, match="same 12 ids but other titles or texts"):
        Embeddings.open(index_dir.parent / "emb", shifted)
    write_passages_tsv(shifted, index_dir / "passages.tsv")
    code, out, err = run(capsys, "search", "who created python", "--index", str(index_dir), "--mode", "bm25")
    assert code == 1 and "other titles or texts" in err
    code, out, _ = run(capsys, "verify", str(index_dir))
    assert code == 1 and out.count("FAILED") == 2 and "other titles or texts" in out


def test_an_index_from_an_ids_only_fingerprint_is_refused(index_dir, corpus):
    m = json.loads((index_dir / "bm25" / MANIFEST).read_text())
    del m["corpus"]["content_sha256"]  # as densepr wrote it before the fingerprint covered texts
    (index_dir / "bm25" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MismatchError, match="fingerprinted passage ids only.*rebuild it"):
        BM25Index.load(index_dir / "bm25", corpus=corpus)


def _flip_at(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("victim", ["dense/index.faiss", "dense/ids.txt", "bm25/data.csc.index.npy", "bm25/indices.csc.index.npy",
                                    "bm25/indptr.csc.index.npy", "bm25/vocab.index.json"])  # fmt: skip
def test_bytes_changed_in_place_are_refused_on_load(index_dir, victim):
    """Same size, bytes changed at a random place: small files are hashed whole on load."""
    target = index_dir / victim
    rng = np.random.default_rng(zlib.crc32(victim.encode()))
    _flip_at(target, int(rng.integers(0, target.stat().st_size)))
    load = DenseIndex.load if victim.startswith("dense") else BM25Index.load
    with pytest.raises(DenseprError, match=f"{target.name}: sha256 differs"):
        load(target.parent)


def test_large_files_are_checked_on_samples_on_load_and_whole_by_verify(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setattr(manifests, "FULL_HASH_BYTES", 1024)  # every file of this index counts as large
    monkeypatch.setattr(manifests, "SAMPLE_BLOCK", 64)
    d = tmp_path / "dense"
    vecs = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    from tests.index.test_index import _embeddings_dir

    DenseIndex.build(_embeddings_dir(tmp_path, vecs)).save(d)
    entry = json.loads((d / MANIFEST).read_text())["files"]["index.faiss"]
    assert entry["bytes"] > 1024 and "sampled_sha256" in entry
    f = d / "index.faiss"
    _flip_at(f, f.stat().st_size - 1)  # the last block is always sampled
    with pytest.raises(DenseprError, match="index.faiss: sampled sha256 differs"):
        DenseIndex.load(d)
    _flip_at(f, f.stat().st_size - 1)
    DenseIndex.load(d)
    _flip_at(f, 100)  # between two sampled blocks: only the full check sees it
    DenseIndex.load(d)
    code, out, _ = run(capsys, "verify", str(d))
    assert code == 1 and "index.faiss: sha256 differs" in out


def _rewrite_array(d: Path, name: str, change) -> None:
    """Change a BM25 array and re-record the manifest, as a writer bug (not tampering) would leave it."""
    arr = np.load(d / name)
    change(arr)
    np.save(d / name, arr)
    m = json.loads((d / MANIFEST).read_text())
    meta = {k: v for k, v in m.items() if k not in ("kind", "format_version", "files")}
    manifests.write_manifest(d, m["kind"], list(m["files"]), **meta)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("indices.csc.index.npy", lambda a: a.__setitem__(3, 10_000), "document index 10000 outside 0..11"),
        ("indices.csc.index.npy", lambda a: a.__setitem__(0, -1), "document index -1 outside"),
        ("indptr.csc.index.npy", lambda a: a.__setitem__(5, a[7] + 1), "indptr decreases"),
        ("indptr.csc.index.npy", lambda a: a.__setitem__(-1, a[-1] - 1), "indptr runs from 0 to"),
        ("data.csc.index.npy", lambda a: a.__setitem__(2, np.nan), "a score is negative, infinite or NaN"),
    ],
    ids=["doc-too-large", "doc-negative", "indptr-decreasing", "indptr-end", "score-nan"],
)
def test_out_of_range_bm25_arrays_are_refused(tmp_path, corpus, capsys, name, change, message):
    d = tmp_path / "index" / "bm25"
    BM25Index.build(corpus).save(d)
    _rewrite_array(d, name, change)
    with pytest.raises(DenseprError, match=f"BM25 index arrays are inconsistent \\({message}"):
        BM25Index.load(d)
    code, out, _ = run(capsys, "verify", str(d))
    assert code == 1 and "FAILED" in out and "inconsistent" in out


def test_a_dense_index_whose_shards_disagree_with_the_manifest_is_refused(index_dir, tmp_path):
    d = index_dir / "dense"
    m = json.loads((d / MANIFEST).read_text())
    m["shards"][0]["count"] = 11
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MismatchError, match="holds 12 vectors, the manifest says 11"):
        DenseIndex.load(d)


# -- an artefact directory of another kind is never overwritten ----------------------------------
def test_writing_one_kind_over_another_is_refused(index_dir, passages_tsv, tiny_bert, capsys):
    emb = index_dir.parent / "emb"
    dense, bm25 = index_dir / "dense", index_dir / "bm25"
    before = {d: _snapshot(d) for d in (dense, bm25, emb)}
    attempts = [
        (("index", "bm25", str(passages_tsv), str(dense)), "holds a densepr 'dense-index' artefact"),
        (("index", "bm25", str(passages_tsv), str(emb)), "holds a densepr 'embeddings' artefact"),
        (("encode", str(passages_tsv), str(bm25), "--encoder", str(tiny_bert), "--device", "cpu"), "holds a densepr 'bm25-index'"),
        (("index", "dense", str(emb), str(bm25)), "holds a densepr 'bm25-index' artefact"),
        (("index", "bm25", str(passages_tsv), str(index_dir)), "not empty and not a 'bm25-index' artefact densepr wrote"),
        (("index", "dense", str(emb), str(index_dir / "passages.tsv")), "is a file, not a"),
    ]
    for args, message in attempts:
        code, _, err = run(capsys, *args)
        assert code == 1 and message in err.replace("\n", ""), (args, err)
    with pytest.raises(DenseprError, match="is a file, not a 'dense-index' directory; refusing to replace it"):
        DenseIndex.load(dense).save(index_dir / "passages.tsv")
    assert {d: _snapshot(d) for d in (dense, bm25, emb)} == before
    code, out, _ = run(capsys, "verify", str(index_dir.parent))
    assert code == 0 and "3 of 3 artefacts verified" in out


def test_rebuilding_the_same_kind_in_place_still_works(index_dir, passages_tsv, capsys):
    code, _, err = run(capsys, "index", "bm25", str(passages_tsv), str(index_dir / "bm25"))
    assert code == 0, err
    code, _, err = run(capsys, "index", "dense", str(index_dir.parent / "emb"), str(index_dir / "dense"))
    assert code == 0, err
    code, out, _ = run(capsys, "verify", str(index_dir))
    assert code == 0 and "2 of 2 artefacts verified" in out


def test_a_damaged_embeddings_part_is_encoded_again_beside_the_rest(tmp_path, corpus, encoder):
    out = tmp_path / "emb"
    encode_corpus(encoder, corpus, out, part_size=5)
    good = np.load(out / "part-00001.npy")
    _flip_at(out / "part-00001.npy", 200)  # same size: only the checksum tells
    with pytest.raises(DenseprError, match="part-00001.npy: sha256 differs"):
        Embeddings.open(out)
    with counting_encodes(encoder) as calls:
        encode_corpus(encoder, corpus, out, part_size=5)
    assert calls == [5]  # the intact parts were reused, not encoded again
    np.testing.assert_allclose(np.load(out / "part-00001.npy"), good, rtol=1e-5)
    assert Embeddings.open(out, corpus).manifest["count"] == len(corpus) and _siblings(out) == []
