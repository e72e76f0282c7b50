"""Artefact manifests: each file's size and sha256 (sampled above ``FULL_HASH_BYTES``), written last
and checked on load (see :mod:`densepr.fileio`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from densepr.errors import DenseprError
from densepr.fileio.atomic import read_json, write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: files above FULL_HASH_BYTES also carry a sampled sha256
FULL_HASH_BYTES = 32 << 20  # files up to this size are fully hashed on load (~20 ms at 1.5 GB/s)
SAMPLE_BLOCK = 1 << 16
SAMPLE_BLOCKS = 32  # larger files: 32 blocks of 64 KiB (2 MiB read) whatever their size


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sampled_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of the file's size and ``SAMPLE_BLOCKS`` blocks of ``SAMPLE_BLOCK`` bytes at
    fixed offsets (the first, the last and the others evenly spaced between): a check of a large
    file that costs the same (2 MiB read) whatever its size."""
    size = os.stat(path).st_size
    h = hashlib.sha256(str(size).encode())
    last = max(size - SAMPLE_BLOCK, 0)
    offsets = sorted({round(i * last / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})
    with open(path, "rb") as fh:
        for off in offsets:
            fh.seek(off)
            h.update(fh.read(SAMPLE_BLOCK))
    return h.hexdigest()


def file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A file's manifest entry: its size and sha256 (and, above ``FULL_HASH_BYTES``, its sampled sha256)."""
    size = Path(path).stat().st_size
    entry: dict[str, Any] = {"bytes": size, "sha256": sha256_file(path)}
    if size > FULL_HASH_BYTES:
        entry["sampled_sha256"] = sampled_sha256(path)
    return entry


def write_manifest(directory: str | os.PathLike[str], kind: str, files: list[str], **meta: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json``: the artefact kind, metadata, and each file's size and
    sha256 (and, above ``FULL_HASH_BYTES``, its sampled sha256, for the check on load).

    The manifest is written last, so its presence means the artefact is complete.
    """
    directory = Path(directory)
    entries = {name: file_entry(directory / name) for name in files}
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **meta, "files": entries}
    write_json(directory / MANIFEST, manifest)
    return manifest


def check_file(fpath: Path, entry: dict[str, Any], verify: str = "sample", mpath: Path | None = None) -> None:
    """Check one file against its manifest entry (``verify`` as in :func:`read_manifest`)."""
    if not fpath.is_file():
        raise DenseprError(f"{fpath}: missing" + (f" (listed in {mpath})" if mpath else ""))
    if verify == "none":
        return
    size = fpath.stat().st_size
    if size != entry["bytes"]:
        raise DenseprError(f"{fpath}: {size} bytes, manifest says {entry['bytes']}: file truncated or altered; rebuild it")
    full = verify == "sha256" or (verify == "sample" and size <= FULL_HASH_BYTES)
    if full and sha256_file(fpath) != entry["sha256"]:
        raise DenseprError(f"{fpath}: sha256 differs from {mpath or 'its manifest'}: file altered or corrupt; rebuild it")
    if verify == "sample" and not full and "sampled_sha256" in entry and sampled_sha256(fpath) != entry["sampled_sha256"]:
        raise DenseprError(f"{fpath}: sampled sha256 differs from {mpath or 'its manifest'}: file altered or corrupt; rebuild it")


def read_manifest(directory: str | os.PathLike[str], kind: str, verify: str = "sample") -> dict[str, Any]:
    """Load ``directory/manifest.json`` and check the files it lists.

    Args:
        directory: the artefact directory.
        kind: the artefact kind expected (e.g. ``"dense-index"``); another kind is refused.
        verify: ``"sample"`` (the check on load: every size, the sha256 of each file up to
            ``FULL_HASH_BYTES``, the sampled sha256 of larger ones), ``"sha256"`` (every byte:
            ``densepr verify``), ``"size"`` (catches truncation only) or ``"none"``.

    Raises:
        DenseprError: the directory, manifest or a listed file is missing, of the wrong kind,
            truncated or altered.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DenseprError(f"{directory}: no such directory (expected a {kind} built by densepr)")
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise DenseprError(f"{directory}: no {MANIFEST}; not a complete {kind} (was its build interrupted?)")
    manifest = read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else None
        raise DenseprError(f"{mpath}: expected a {kind} manifest, found kind {found!r}")
    for name, entry in manifest.get("files", {}).items():
        check_file(directory / name, entry, verify, mpath)
    return manifest


def write_dir_manifest(directory: str | os.PathLike[str], kind: str, **meta: Any) -> dict[str, Any]:
    """A manifest of every file now in ``directory`` (recursively, except manifests of its own)."""
    directory = Path(directory)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not p.name.endswith(".tmp"))  # fmt: skip
    return write_manifest(directory, kind, files, **meta)


def check_dir_manifest(directory: str | os.PathLike[str], kinds: tuple[str, ...], verify: str = "sha256") -> dict[str, Any] | None:
    """Check ``directory``'s manifest when it has one (directories from elsewhere may not); None when absent."""
    mpath = Path(directory) / MANIFEST
    if not mpath.is_file():
        return None
    kind = read_json(mpath).get("kind") if isinstance(read_json(mpath), dict) else None
    if kind not in kinds:
        raise DenseprError(f"{mpath}: expected a {' or '.join(kinds)} manifest, found kind {kind!r}")
    return read_manifest(directory, kind, verify)


def verify_tree(
    root: str | os.PathLike[str], verify: str = "sha256", checks: dict[str, Callable[[Path, dict], None]] | None = None
) -> list[tuple[Path, str, str | None]]:
    """Check every manifest under ``root``: ``[(directory, kind, None or the problem), ...]``.

    ``checks`` maps an artefact kind to a further check of a directory whose files passed
    (e.g. the ranges of a BM25 index's arrays); it raises :class:`DenseprError` on a problem.
    """
    root = Path(root)
    if not root.exists():
        raise DenseprError(f"{root}: no such file or directory")
    out: list[tuple[Path, str, str | None]] = []
    for mpath in sorted(root.rglob(MANIFEST)) if root.is_dir() else []:
        kind = "?"
        try:
            data = read_json(mpath)
            kind = str(data.get("kind", "?")) if isinstance(data, dict) else "?"
            manifest = read_manifest(mpath.parent, kind, verify)
            if checks and kind in checks:
                checks[kind](mpath.parent, manifest)
            out.append((mpath.parent, kind, None))
        except DenseprError as e:
            out.append((mpath.parent, kind, str(e)))
    return out
