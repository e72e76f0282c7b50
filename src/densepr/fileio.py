"""Crash-safe file writing and artefact manifests.

Every artefact densepr writes goes to a temporary file in the destination directory, is
fsync'ed, then renamed over the final name, so an interrupted run never leaves a
half-written file under a name a later stage would trust. Directory artefacts (BM25
index, embeddings, FAISS index) carry a ``manifest.json`` listing each file's size and
sha256, checked when loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from densepr.errors import DenseprError, InputError

MANIFEST = "manifest.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success fsync it and rename it to ``path``.

    For libraries that write by file name (FAISS). On an exception the temp file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path`` (see :func:`atomic_path`)."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else "") as fh:
        yield fh


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not all filesystems allow opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as UTF-8 JSON, atomically."""
    with atomic_write(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; a missing or malformed file raises a located :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a file")
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a BOM is tolerated
            return json.load(fh)
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=e.lineno) from None


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` through :func:`atomic_write` (never pickles: object arrays are refused)."""
    if array.dtype == object:
        raise TypeError("refusing to save an object array: it would need pickle")
    with atomic_write(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_ids(path: str | os.PathLike[str], ids: list[str]) -> None:
    """Write passage ids one per line, atomically (ids must not contain line breaks)."""
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise DenseprError(f"passage id {bad!r} contains a line break; ids must be single-line strings")
    with atomic_write(path) as fh:
        fh.write("".join(f"{i}\n" for i in ids))


def read_ids(path: str | os.PathLike[str]) -> list[str]:
    """Read an ids file written by :func:`write_ids`."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read().split("\n")[:-1]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike[str], kind: str, files: list[str], **meta: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json``: the artefact kind, metadata, and each file's size and sha256.

    The manifest is written last, so its presence means the artefact is complete.
    """
    directory = Path(directory)
    entries = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)} for name in files}
    manifest = {"kind": kind, "format_version": 1, **meta, "files": entries}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike[str], kind: str, verify: str = "size") -> dict[str, Any]:
    """Load ``directory/manifest.json`` and check the files it lists.

    Args:
        directory: the artefact directory.
        kind: the artefact kind expected (e.g. ``"dense-index"``); another kind is refused.
        verify: ``"size"`` (cheap: catches truncation), ``"sha256"`` (full) or ``"none"``.

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
        fpath = directory / name
        if not fpath.is_file():
            raise DenseprError(f"{fpath}: missing (listed in {mpath})")
        size = fpath.stat().st_size
        if verify != "none" and size != entry["bytes"]:
            raise DenseprError(f"{fpath}: {size} bytes, manifest says {entry['bytes']}: file truncated or altered; rebuild it")
        if verify == "sha256" and sha256_file(fpath) != entry["sha256"]:
            raise DenseprError(f"{fpath}: sha256 differs from {mpath}: file altered or corrupt; rebuild it")
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


def verify_tree(root: str | os.PathLike[str], verify: str = "sha256") -> list[tuple[Path, str, str | None]]:
    """Check every manifest under ``root``: ``[(directory, kind, None or the problem), ...]``."""
    root = Path(root)
    if not root.exists():
        raise DenseprError(f"{root}: no such file or directory")
    out: list[tuple[Path, str, str | None]] = []
    for mpath in sorted(root.rglob(MANIFEST)) if root.is_dir() else []:
        kind = "?"
        try:
            data = read_json(mpath)
            kind = str(data.get("kind", "?")) if isinstance(data, dict) else "?"
            read_manifest(mpath.parent, kind, verify)
            out.append((mpath.parent, kind, None))
        except DenseprError as e:
            out.append((mpath.parent, kind, str(e)))
    return out


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory artefact, its manifests first: if this is interrupted, what is left
    has no manifest, so nothing trusts (or verifies) a half-deleted artefact."""
    path = Path(path)
    if not path.exists():
        return
    for m in path.rglob(MANIFEST):
        m.unlink(missing_ok=True)
    import shutil

    shutil.rmtree(path, ignore_errors=True)
