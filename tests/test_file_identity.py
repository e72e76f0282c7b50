"""One file-identity function (densepr.fileio.identity) gives the values the old per-module rules stored on
disk: encoder weights ids in embeddings and index manifests, reading keys, reader export fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from densepr.fileio.identity import QUICK_HASH_BYTES, file_identity
from densepr.fileio.manifest import sha256_file
from densepr.index.embeddings import weights_id


def _encoder_dir(root: Path) -> Path:
    d = root / "enc"
    d.mkdir()
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 5000)  # over HEAD_BYTES: only its first MiB counts
    (d / "b.safetensors").write_bytes(b"xyz" * 10)
    (d / "config.json").write_text("{}")
    return d


def test_weights_id_keeps_the_value_stored_in_manifests(tmp_path):
    """The literal is what densepr before the one identity function wrote as ``weights_id`` for these files."""
    d = _encoder_dir(tmp_path)
    assert weights_id(d) == "5b0c69b2e702b03a"
    assert weights_id(tmp_path / "not-a-dir") == hashlib.sha256().hexdigest()[:16]  # a hub name: no local weights


def _old_reading_identity(root: Path, paths: list[Path]) -> list:
    """pipeline._identity as it was (reading keys stored beside evaluate-qa's kept pieces hash it)."""
    files = sorted({f for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()})
    return [[os.path.relpath(f, root), sha256_file(f) if f.stat().st_size < 16 << 20 else [f.stat().st_size, f.stat().st_mtime_ns]]
            for f in files]  # fmt: skip


def test_quick_rule_is_the_old_reading_key_rule(tmp_path):
    import json

    d = _encoder_dir(tmp_path)
    sub = d / "a-b"
    sub.mkdir()
    (sub / "x").write_text("x")  # "a-b/x" sorts before "b.safetensors" as a string, after "a" as a path
    with open(d / "large.bin", "wb") as fh:  # sparse: above QUICK_HASH_BYTES, identified by size and time
        fh.truncate(QUICK_HASH_BYTES + 1)
    outside = tmp_path / "q.json"
    outside.write_text("{}")
    paths = [d, outside, tmp_path / "missing"]
    got = file_identity(d, paths, "quick")
    assert json.dumps(got) == json.dumps(_old_reading_identity(d, paths))
    assert dict(got)["large.bin"][0] == QUICK_HASH_BYTES + 1 and dict(got)["../q.json"] == sha256_file(outside)


def test_sha256_rule_is_the_old_reader_export_rule(tmp_path):
    d = _encoder_dir(tmp_path)
    old = [f"{f.relative_to(d).as_posix()} {sha256_file(f)}" for f in sorted(p for p in d.rglob("*") if p.is_file())]
    assert [f"{n} {s}" for n, s in file_identity(d, [d], "sha256")] == old


def test_an_unknown_rule_is_refused(tmp_path):
    with pytest.raises(ValueError, match="rule 'mtime'"):
        file_identity(tmp_path, [tmp_path], "mtime")  # type: ignore[arg-type]
