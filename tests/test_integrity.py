"""Integrity: saved artefacts carry manifests (sizes + sha256); truncated or altered files are refused
on load and by ``densepr verify``."""

from __future__ import annotations

from pathlib import Path

import pytest

from densepr.errors import DenseprError
from densepr.index.dense import DenseIndex
from densepr.models.encoder import Encoder
from densepr.models.reader import Reader, ReaderConfig
from densepr.retrieve.bm25 import BM25Index
from tests.support.cli import run
from tests.support.tiny import make_tiny_bert


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a checksum can tell
    path.write_bytes(bytes(data))


@pytest.fixture
def artefacts(tmp_path, index_dir, tiny_bert) -> Path:
    Encoder.load(tiny_bert, device="cpu").save(index_dir / "encoder")
    Reader.load(make_tiny_bert(tmp_path / "r0", seed=2), "cpu", ReaderConfig(max_length=96)).save(index_dir / "reader")
    return index_dir


def test_verify_passes_on_what_densepr_wrote(artefacts, capsys):
    code, out, err = run(capsys, "verify", str(artefacts))
    assert code == 0, err
    kinds = {line.split()[1] for line in out.splitlines() if line.startswith("ok")}
    assert {"bm25-index", "dense-index", "encoder", "reader"} <= kinds
    assert "artefacts verified" in out
    from densepr.retrieve.index_dir import verify_artefacts  # what the command prints

    for quick in (False, True):
        found = verify_artefacts(artefacts, quick)
        assert {k for _, k, _ in found} >= kinds and all(problem is None for _, _, problem in found)


@pytest.mark.parametrize("victim", ["dense/index.faiss", "bm25/params.index.json", "encoder/model.safetensors", "reader/model.safetensors"])
@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "altered"])
def test_damaged_files_are_refused_by_verify(artefacts, capsys, victim, damage):
    target = artefacts / victim
    damage(target)
    code, out, _ = run(capsys, "verify", str(artefacts))
    assert code == 1 and "FAILED" in out and target.name in out
    assert ("bytes, manifest says" in out) if damage is _truncate else ("sha256 differs" in out)


def test_damaged_models_are_refused_on_load(artefacts):
    _flip(artefacts / "encoder/model.safetensors")
    with pytest.raises(DenseprError, match="sha256 differs"):
        Encoder.load(artefacts / "encoder", device="cpu")
    _truncate(artefacts / "reader/model.safetensors")
    with pytest.raises(DenseprError, match="truncated or altered"):
        Reader.load(artefacts / "reader", "cpu")
    _truncate(artefacts / "dense/index.faiss")
    with pytest.raises(DenseprError, match="truncated or altered"):
        DenseIndex.load(artefacts / "dense")
    (artefacts / "bm25/manifest.json").unlink()
    with pytest.raises(DenseprError, match="not a complete"):
        BM25Index.load(artefacts / "bm25")


def test_verify_on_nothing_to_check(tmp_path, capsys):
    code, _, err = run(capsys, "verify", str(tmp_path))
    assert code == 1 and "no manifest.json found" in err
    code, _, err = run(capsys, "verify", str(tmp_path / "missing"))
    assert code == 1 and "no such file or directory" in err
