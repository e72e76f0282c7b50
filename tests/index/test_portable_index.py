"""Index directories that can be copied or moved: the question encoder is found by its path relative to
the index (or inside it, bundled), checked by its weights id, and a missing one is named with the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from densepr.fileio import MANIFEST, read_json
from tests.support.cli import run
from tests.support.tiny import make_tiny_bert


def _build(capsys, root: Path, qa_tsv: Path, passages_tsv: Path, *dense_flags: str) -> Path:
    """root/enc (a tiny encoder), root/emb, root/index (passages.tsv + dense/) built by the CLI."""
    make_tiny_bert(root / "enc", pooling="cls")
    idx = root / "index"
    idx.mkdir(parents=True)
    shutil.copyfile(passages_tsv, idx / "passages.tsv")
    for step in (("encode", str(idx / "passages.tsv"), str(root / "emb"), "--encoder", str(root / "enc"), "--device", "cpu"),
                 ("index", "dense", str(root / "emb"), str(idx / "dense"), *dense_flags)):  # fmt: skip
        code, _, err = run(capsys, *step)
        assert code == 0, err
    return idx


def _retrieve(capsys, idx: Path, qa_tsv: Path, out: Path, *flags: str) -> tuple[int, str]:
    code, _, err = run(capsys, "retrieve", "--qa", str(qa_tsv), "--index", str(idx), "-k", "5", "--mode", "dense", "-o", str(out), "--device", "cpu", *flags)
    return code, err


def _ranking(path: Path) -> list:
    return [[(c["id"], round(c["score"], 4)) for c in r["ctxs"]] for r in json.loads(path.read_text())]


@pytest.fixture
def built(tmp_path, capsys, qa_tsv, passages_tsv):
    idx = _build(capsys, tmp_path / "a", qa_tsv, passages_tsv)
    code, err = _retrieve(capsys, idx, qa_tsv, tmp_path / "before.json")
    assert code == 0, err
    return tmp_path / "a", _ranking(tmp_path / "before.json")


def test_manifest_names_the_encoder_by_weights_id_and_relative_path(built):
    root, _ = built
    m = read_json(root / "index" / "dense" / MANIFEST)
    info = m["question_encoder_info"]
    assert info["relative_path"] == "../../enc" and len(info["weights_id"]) == 16
    assert m["question_encoder"] == str((root / "enc").resolve())  # still there, for older readers


def test_index_moved_with_its_encoder_retrieves_the_same(built, tmp_path, capsys, qa_tsv):
    root, before = built
    moved = shutil.move(root, tmp_path / "elsewhere" / "b")  # the index and its encoder, side by side as before
    code, err = _retrieve(capsys, Path(moved) / "index", qa_tsv, tmp_path / "after.json")
    assert code == 0, err
    assert _ranking(tmp_path / "after.json") == before


def test_index_copied_alone_finds_the_encoder_where_it_was(built, tmp_path, capsys, qa_tsv):
    root, before = built
    copy = shutil.copytree(root / "index", tmp_path / "copy" / "deeper" / "index")
    code, err = _retrieve(capsys, copy, qa_tsv, tmp_path / "after.json")
    assert code == 0, err
    assert _ranking(tmp_path / "after.json") == before


def test_missing_encoder_names_the_manifest_and_the_flag(built, tmp_path, capsys, qa_tsv):
    root, before = built
    shutil.move(root / "enc", tmp_path / "kept-enc")
    code, err = _retrieve(capsys, root / "index", qa_tsv, tmp_path / "after.json")
    assert code == 1
    assert str(root / "index" / "dense" / MANIFEST) in err and "--question-encoder" in err and "Traceback" not in err
    assert "not a Hugging Face model directory" not in err
    code, err = _retrieve(capsys, root / "index", qa_tsv, tmp_path / "after.json", "--question-encoder", str(tmp_path / "kept-enc"))
    assert code == 0, err
    assert _ranking(tmp_path / "after.json") == before


def test_another_encoder_at_the_recorded_place_is_refused(built, tmp_path, capsys, qa_tsv):
    root, _ = built
    shutil.rmtree(root / "enc")
    make_tiny_bert(root / "enc", seed=7, pooling="cls")  # same shape, other weights: scores would be garbage
    code, err = _retrieve(capsys, root / "index", qa_tsv, tmp_path / "after.json")
    assert code == 1 and "not the one this index was built with" in err and "--question-encoder" in err


def test_old_manifest_with_an_absolute_path_still_works(built, tmp_path, capsys, qa_tsv):
    root, before = built
    mpath = root / "index" / "dense" / MANIFEST
    m = read_json(mpath)
    del m["question_encoder_info"]  # as densepr wrote it before: the absolute path only
    mpath.write_text(json.dumps(m))
    code, err = _retrieve(capsys, root / "index", qa_tsv, tmp_path / "after.json")
    assert code == 0, err
    assert _ranking(tmp_path / "after.json") == before
    shutil.rmtree(root / "enc")
    code, err = _retrieve(capsys, root / "index", qa_tsv, tmp_path / "after.json")
    assert code == 1 and str(mpath) in err and "--question-encoder" in err


def test_bundled_encoder_travels_inside_the_index(tmp_path, capsys, qa_tsv, passages_tsv):
    idx = _build(capsys, tmp_path / "a", qa_tsv, passages_tsv, "--bundle-encoder")
    code, err = _retrieve(capsys, idx, qa_tsv, tmp_path / "before.json")
    assert code == 0, err
    assert read_json(idx / "dense" / MANIFEST)["question_encoder_info"]["relative_path"] == "question_encoder"
    shutil.rmtree(tmp_path / "a" / "enc")  # the original is gone: only the copy inside the index remains
    moved = shutil.move(idx, tmp_path / "moved")
    code, err = _retrieve(capsys, moved, qa_tsv, tmp_path / "after.json")
    assert code == 0, err
    assert _ranking(tmp_path / "after.json") == _ranking(tmp_path / "before.json")
    code, out, err = run(capsys, "verify", str(moved))
    assert code == 0, out + err


def test_an_unfinished_encoding_from_before_resumes(tmp_path, capsys, passages_tsv, tiny_bert):
    emb = tmp_path / "emb"
    args = ("encode", str(passages_tsv), str(emb), "--encoder", str(tiny_bert), "--part-size", "5", "--device", "cpu")
    assert run(capsys, *args)[0] == 0
    (emb / MANIFEST).unlink()
    (emb / "part-00002.npy").unlink()  # killed before its last part
    plan = read_json(emb / "encoding.json")
    del plan["question_encoder_info"]  # as densepr wrote encoding.json before
    (emb / "encoding.json").write_text(json.dumps(plan))
    first = (emb / "part-00000.npy").stat().st_mtime_ns
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert (emb / MANIFEST).is_file() and (emb / "part-00000.npy").stat().st_mtime_ns == first  # resumed, not redone


def test_the_ray_app_finds_a_moved_index_encoder_as_retrieve_does(built, tmp_path):
    """``serve --ray`` replicas get the encoder's folder from IndexInfo: found relative to the moved index (not
    the stale absolute path), a missing one named with the flag, an explicit one not looked up."""
    from densepr.errors import DenseprError
    from densepr.serve.ray_app import IndexInfo

    root, _ = built
    moved = Path(shutil.move(root, tmp_path / "elsewhere" / "b"))
    assert IndexInfo.read(moved / "index").question_encoder == str((moved / "enc").resolve())
    shutil.rmtree(moved / "enc")
    with pytest.raises(DenseprError, match="--question-encoder"):
        IndexInfo.read(moved / "index")
    assert IndexInfo.read(moved / "index", locate_encoder=False).question_encoder == str((root / "enc").resolve())
