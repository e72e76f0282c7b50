"""Crash-safe file writing and artefact manifests.

Every artefact densepr writes goes to a temporary file in the destination directory, is
fsync'ed, then renamed over the final name, so an interrupted run never leaves a
half-written file under a name a later stage would trust. Directory artefacts (BM25
index, embeddings, FAISS index) carry a ``manifest.json`` listing each file's size and
sha256, checked when loaded.

Directory artefacts are (re)built beside their final name and swapped in whole
(:func:`atomic_dir`): the previous version's files are never rewritten, only unlinked once the
new version is in place, so a process that has them open or memory-mapped (a running server)
keeps reading the old version until it reloads, and a failed or disk-full build leaves the
previous version as it was. A directory holding another artefact kind, or anything densepr did
not write, is never overwritten.

Checks on load (``read_manifest(..., verify="sample")``, the default): every file's size, then
its sha256 if it is at most ``FULL_HASH_BYTES`` (32 MiB), else a sampled sha256 over
``SAMPLE_BLOCKS`` blocks of 64 KiB (the first, the last and the rest evenly spaced), recorded
in the manifest when it was written. ``densepr verify`` checks every byte (full sha256).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import hashlib
import json
import mmap
import operator
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from densepr.errors import DenseprError, InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: files above FULL_HASH_BYTES also carry a sampled sha256
FULL_HASH_BYTES = 32 << 20  # files up to this size are fully hashed on load (~20 ms at 1.5 GB/s)
SAMPLE_BLOCK = 1 << 16
SAMPLE_BLOCKS = 32  # larger files: 32 blocks of 64 KiB (2 MiB read) whatever their size
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(DenseprError):
    """The disk (or quota) filled up while writing ``path``; ``kept``: the artefact left as it was."""

    def __init__(self, path: str | os.PathLike[str], error: BaseException, kept: str | os.PathLike[str] | None = None) -> None:
        self.path, self.error = str(path), error
        quota = getattr(error, "errno", None) == errno.EDQUOT or os.strerror(errno.EDQUOT) in str(error)
        why = "disk quota exceeded" if quota else "no space left on device"
        left = f"the previous {kept} is untouched" if kept else "nothing was replaced"
        super().__init__(f"{path}: {why} while writing it; {left} (free some space and run again)")


def is_no_space(e: BaseException, where: str | os.PathLike[str] | None = None) -> bool:
    """An OSError ENOSPC/EDQUOT, a library's RuntimeError saying so (FAISS reports write errors
    that way), or, with ``where``, an OSError without errno (numpy's short write: "N requested and
    M written") while the filesystem of ``where`` has less than 1 MiB left."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in _NO_SPACE
    if isinstance(e, RuntimeError) and any(os.strerror(n) in str(e) for n in _NO_SPACE):
        return True
    if isinstance(e, OSError) and where is not None:
        with contextlib.suppress(OSError):
            st = os.statvfs(where)
            return st.f_bavail * st.f_frsize < 1 << 20
    return False


@contextlib.contextmanager
def no_space_names(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a disk-full error raised inside into a :class:`NoSpaceError` naming ``path``, the file
    being written (``write()`` errors name no file; a temporary name would mean nothing)."""
    try:
        yield
    except NoSpaceError:
        raise
    except (OSError, RuntimeError) as e:
        if not is_no_space(e, Path(path).parent):
            raise
        raise NoSpaceError(path, e) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp file name beside ``path``; on success fsync it and rename it to ``path``.

    For libraries that write by file name (FAISS). On an exception the temp file is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    with no_space_names(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    try:
        with no_space_names(path):
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


def release_pages(*arrays: np.ndarray) -> None:
    """Drop memory-mapped arrays' pages from this process's RSS (``MADV_DONTNEED``).

    A shared file mapping's pages stay in the page cache, written ones included, and are read back
    on the next access, so nothing is lost: only the process stops holding them. Arrays that are
    not shared mappings (in memory, or copy-on-write) are left alone.
    """
    for a in arrays:
        m = getattr(a, "_mmap", None)  # np.memmap's mapping, shared by its slices
        if m is not None and getattr(a, "mode", None) in ("r", "r+", "w+") and hasattr(mmap, "MADV_DONTNEED"):
            m.madvise(mmap.MADV_DONTNEED)


def rss_bytes() -> int:
    """This process's resident set size (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


class MappedPages:
    """Release mapped arrays' pages (:func:`release_pages`) whenever this process's RSS has grown
    ``budget`` bytes since the last release: a pass over arrays larger than memory then holds at
    most ``budget`` of them resident, at the cost of reading pages back from the page cache."""

    def __init__(self, *arrays: np.ndarray, budget: int = 1 << 30) -> None:
        self.arrays, self.budget, self.base = arrays, budget, rss_bytes()

    def check(self) -> None:
        now = rss_bytes()
        if now - self.base > self.budget:
            release_pages(*self.arrays)
            self.base = rss_bytes()

    def release(self) -> None:
        release_pages(*self.arrays)


def save_npy_released(path: str | os.PathLike[str], array: np.ndarray, step: int = 1 << 26) -> None:
    """:func:`save_npy`, written ``step`` bytes at a time and, for a memory-mapped array, releasing
    its pages as it goes (``np.save`` would read the whole array into this process's RSS)."""
    if array.dtype == object:
        raise TypeError("refusing to save an object array: it would need pickle")
    whole = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    flat, per = whole.reshape(-1), max(1, step // max(array.itemsize, 1))
    pages = MappedPages(array, budget=step)
    with atomic_write(path, "wb", encoding=None) as fh:
        np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(whole))
        for lo in range(0, len(flat), per):
            fh.write(memoryview(flat[lo : lo + per]).cast("B"))
            pages.check()
    pages.release()


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` through :func:`atomic_write` (never pickles: object arrays are refused)."""
    if array.dtype == object:
        raise TypeError("refusing to save an object array: it would need pickle")
    with atomic_write(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_ids(path: str | os.PathLike[str], ids: Sequence[str]) -> None:
    """Write passage ids one per line, atomically (ids must not contain line breaks)."""
    if isinstance(ids, IdLines):  # already the file's bytes
        with atomic_write(path, "wb", encoding=None) as fh:
            for chunk in ids.chunks():
                fh.write(chunk)
        return
    bad = next((i for i in ids if "\n" in i or "\r" in i), None)
    if bad is not None:
        raise DenseprError(f"passage id {bad!r} contains a line break; ids must be single-line strings")
    with atomic_write(path) as fh:
        fh.write("".join(f"{i}\n" for i in ids))


def read_ids(path: str | os.PathLike[str]) -> list[str]:
    """Read an ids file written by :func:`write_ids` (a list: :func:`open_ids` holds no object per id)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read().split("\n")[:-1]


def open_ids(path: str | os.PathLike[str]) -> IdLines:
    """An ids file written by :func:`write_ids`, memory-mapped (:class:`IdLines`): the same ids as
    :func:`read_ids` gives, counted on open (one pass over the file), decoded only when asked for."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return IdLines(b"")
        return IdLines(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


_ID_CHUNK = 1 << 20  # bytes of ids scanned (and, to count the lines, copied) at a time: a multiple of the page size


class IdLines(Sequence[str]):
    """Passage ids held as the bytes of an ids file (each id, then a line break: what :func:`write_ids`
    writes), memory-mapped or in memory, with no Python object per id (21M ids: ~200 MB of text, not
    ~1.5 GB of strings). ``len`` is counted once; an id is decoded when asked for; the positions of the
    line ends (8 bytes an id) are found the first time an id is asked for by its row, so an index
    bound to a corpus in the same order never builds them. A slice is a view of the same bytes. As
    :func:`read_ids`, bytes after the last line break (an unfinished line) are not an id."""

    def __init__(self, data: bytes | mmap.mmap, _root: IdLines | None = None, _lo: int = 0, _hi: int | None = None) -> None:
        self._root = self if _root is None else _root
        self._data = data
        if _root is None:
            self._ends: np.ndarray | None = None
            self._count = sum(bytes(c).count(b"\n") for c in self._scan(0, len(data)))
        self._lo, self._hi = _lo, self._root._count if _hi is None else _hi

    @classmethod
    def from_strings(cls, ids: Iterable[str]) -> IdLines:
        """The ids of a list (refusing, as :func:`write_ids` does, an id holding a line break)."""
        ids = list(ids)
        bad = next((i for i in ids if "\n" in i or "\r" in i), None)
        if bad is not None:
            raise DenseprError(f"passage id {bad!r} contains a line break; ids must be single-line strings")
        return cls("".join(f"{i}\n" for i in ids).encode("utf-8"))

    @classmethod
    def concat(cls, parts: Iterable[Sequence[str]]) -> IdLines:
        """The ids of several lists in turn, as one (in memory)."""
        return cls(b"".join((p if isinstance(p, IdLines) else cls.from_strings(p)).tobytes() for p in parts))

    def tobytes(self) -> bytes:
        """A copy of the ids' bytes (what :func:`write_ids` writes for them)."""
        return b"".join(map(bytes, self.chunks()))

    def __len__(self) -> int:
        return self._hi - self._lo

    def _scan(self, a: int, b: int) -> Iterator[memoryview]:
        """Bytes ``a:b`` of the data in chunks; a mapped file's pages are dropped from this process once
        read (they stay in the page cache), so a pass over 21M ids does not leave them resident."""
        view, lo = memoryview(self._root._data), a
        while lo < b:
            hi = min(b, lo - lo % _ID_CHUNK + _ID_CHUNK)  # chunks end on multiples of _ID_CHUNK
            yield view[lo:hi]
            if isinstance(self._root._data, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                start = lo - lo % mmap.PAGESIZE
                self._root._data.madvise(mmap.MADV_DONTNEED, start, hi - start)
            lo = hi

    def _line_ends(self) -> np.ndarray:
        root = self._root
        if root._ends is None:
            found, base = [], 0
            for c in root._scan(0, len(root._data)):
                found.append(np.flatnonzero(np.frombuffer(c, dtype=np.uint8) == 10) + base)
                base += len(c)
            root._ends = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
        return root._ends

    def _span(self) -> tuple[int, int]:
        """Bytes of these ids in the data (each id with its line break)."""
        root = self._root
        n = len(root._data)
        if self._lo == 0 and self._hi == root._count and (n == 0 or root._data[n - 1] == 10):
            return 0, n
        ends = self._line_ends()
        return (int(ends[self._lo - 1]) + 1 if self._lo else 0), (int(ends[self._hi - 1]) + 1 if self._hi else 0)

    def chunks(self) -> Iterator[memoryview]:
        """The ids' bytes (UTF-8, one line each), in chunks: what :func:`write_ids` writes for them."""
        return self._scan(*self._span())

    def sha256(self) -> str:
        """Hex sha256 of the ids' bytes: equal to a corpus fingerprint's ``ids_sha256`` exactly when these
        are that corpus's ids in its row order (:func:`densepr.data.passages.ids_text`)."""
        h = hashlib.sha256()
        for c in self.chunks():
            h.update(c)
        return h.hexdigest()

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(lo, hi, step)]
            return IdLines(self._root._data, self._root, self._lo + lo, self._lo + max(lo, hi))
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("id index out of range")
        ends, r = self._line_ends(), self._lo + i
        a = int(ends[r - 1]) + 1 if r else 0
        return bytes(self._root._data[a : int(ends[r])]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        rest = b""
        for c in self.chunks():
            block = rest + bytes(c)
            cut = block.rfind(b"\n") + 1
            rest = block[cut:]
            yield from block[:cut].decode("utf-8").split("\n")[:-1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdLines):
            return len(self) == len(other) and self.sha256() == other.sha256()
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<{len(self)} passage ids>"


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


def file_name(name: str) -> str:
    """``name`` (a QA set's name, possibly a path) as one file name: other than letters, digits, ``.``,
    ``_`` and ``-``, every character becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory artefact, its manifests first: if this is interrupted, what is left
    has no manifest, so nothing trusts (or verifies) a half-deleted artefact. A symbolic link is
    removed itself; nothing under its target is touched. Callers decide what is theirs to delete
    (:func:`writable_dir`)."""
    path = Path(path)
    if path.is_symlink():  # the link only: never what it points to (an index, a user's folder)
        path.unlink()
        return
    if not path.exists():
        return
    for top, _, names in os.walk(path):  # links inside are not followed (os.walk, like rmtree)
        if MANIFEST in names:
            Path(top, MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# -- directory artefacts: built beside, swapped in whole ------------------------------------------
def check_target(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = ()) -> None:
    """Refuse to (re)build a ``kind`` artefact at ``final`` unless ``final`` is absent, an empty
    directory, a ``kind`` artefact (its manifest says so), or a directory without manifest that
    holds only files a ``kind`` build writes (``own``: file name patterns, and directory name
    patterns ending in ``/``; an interrupted build, or a run directory's parts).

    Raises:
        DenseprError: ``final`` is a file, holds an artefact of another kind, or holds files
            densepr did not write there; they are never overwritten.
    """
    final = Path(final)
    if not final.exists():
        return
    advice = f"write the {kind} elsewhere, or delete {final} first"
    if not final.is_dir():
        raise DenseprError(f"{final}: is a file, not a {kind!r} directory; refusing to replace it ({advice})")
    mpath = final / MANIFEST
    if mpath.exists():
        try:
            data = read_json(mpath)
        except DenseprError:
            data = None
        found = data.get("kind") if isinstance(data, dict) else None
        if found != kind:
            what = f"a densepr {found!r} artefact" if found else "an unreadable manifest"
            raise DenseprError(f"{final}: holds {what} ({mpath}), not a {kind!r}; refusing to overwrite it ({advice})")
        return
    foreign = sorted(p.name for p in final.iterdir() if not _owned(p, own))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DenseprError(f"{final}: not empty and not a {kind!r} artefact densepr wrote (it holds {foreign[0]!r}{more}, "
                           f"and no {MANIFEST}); refusing to overwrite it ({advice})")  # fmt: skip


def _owned(p: Path, own: tuple[str, ...]) -> bool:
    """``p`` (an entry of a directory being rebuilt) matches a pattern of ``own``: a file pattern, or a
    directory pattern ending in ``/``; a symbolic link never does (writing through it reaches elsewhere)."""
    if p.is_symlink():
        return False
    if p.is_dir():
        return any(pat.endswith("/") and fnmatch.fnmatchcase(p.name, pat[:-1]) for pat in (*own, ".*.building-*/", ".*.old-*/"))
    return p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in (*own, ".*.tmp"))


def writable_dir(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = ()) -> Path:
    """Where a ``kind`` artefact may be (re)written in place of ``final``, checked by :func:`check_target`:
    ``final`` itself, or, when ``final`` is a symbolic link, its target, under the same rules (the link is
    kept). The one check every writer makes before it writes or deletes anything at ``final``."""
    final = Path(final)
    if not final.is_symlink():
        check_target(final, kind, own)
        return final
    target = final.resolve()  # rebuild where the link points, keep the link
    try:
        check_target(target, kind, own)
    except DenseprError as e:  # name the path the user gave, and where it leads
        raise DenseprError(f"{final} (a link to {target}): {str(e).removeprefix(f'{target}: ')}") from None
    return target


_HOST = socket.gethostname().replace("/", "_").replace("@", "_") or "host"


def sibling_prefix(final: Path, what: str) -> str:
    """Prefix of a sibling work directory of ``final``: ``.NAME.WHAT-PID@HOST-`` (then random)."""
    return f".{final.name}.{what}-{os.getpid()}@{_HOST}-"


def sibling_abandoned(path: Path, final: Path, what: str) -> bool:
    """True for a sibling work directory left by a process of this host that no longer runs."""
    rest = path.name[len(f".{final.name}.{what}-") :]
    pid, _, host = rest.partition("@")
    if not pid.isdigit() or host.rsplit("-", 1)[0] != _HOST:
        return False  # another machine's (shared filesystem): not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


LOCK = ".densepr.lock"


@contextlib.contextmanager
def dir_lock(directory: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.densepr.lock`` for the block, so two jobs never write one
    directory at once: a second is refused at once, told who holds it (pid and host, written in the file).
    The kernel drops the lock when its holder exits or is killed, so a lock file left behind blocks nothing."""
    import fcntl

    directory = Path(directory)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise DenseprError(f"{directory}: another {what} is running in it ({holder}); wait for it to end, "
                               f"or give another output directory") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname() or 'this host'}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _clean_stale(final: Path) -> None:
    """Remove build directories of killed builds of ``final``; put back an old version a crash
    left aside mid-swap (only the fallback swap has that window) if ``final`` is missing."""
    for p in final.parent.glob(f".{glob.escape(final.name)}.old-*"):
        if sibling_abandoned(p, final, "old"):
            if not final.exists() and (p / MANIFEST).is_file():
                os.rename(p, final)
            else:
                remove_tree(p)
    for p in final.parent.glob(f".{glob.escape(final.name)}.building-*"):
        if sibling_abandoned(p, final, "building"):
            remove_tree(p)


def _fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then the directories (so a swap publishes durable data)."""
    for p in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # kernel or filesystem without it
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def install_dir(build: str | os.PathLike[str], final: str | os.PathLike[str], kind: str | None) -> None:
    """Swap the complete ``kind`` artefact ``build`` into place at ``final``, then delete the old one.

    ``build`` must hold its manifest (written last by its builder; ``kind`` None: a directory of parts
    with manifests of their own, see :func:`atomic_dir`). Its files are fsync'ed, then
    the two directories are exchanged atomically (``renameat2(RENAME_EXCHANGE)``; where that is
    unavailable, ``final`` is renamed aside and ``build`` renamed in). The old version's files
    are then unlinked, never rewritten: a process that has them open or memory-mapped keeps
    reading them until it reloads.
    """
    build, final = Path(build), Path(final)
    mpath = build / MANIFEST
    data = read_json(mpath) if mpath.is_file() and kind is not None else None
    if kind is not None and (not isinstance(data, dict) or data.get("kind") != kind):
        raise DenseprError(f"{build}: no {kind} manifest; an incomplete build is never installed")
    _fsync_tree(build)
    if not final.exists():
        os.rename(build, final)
    elif _exchange(build, final):
        _fsync_dir(final.parent)
        remove_tree(build)  # now the old version
        return
    else:
        aside = Path(tempfile.mkdtemp(prefix=sibling_prefix(final, "old"), dir=final.parent))
        os.rename(final, aside)  # onto the empty directory mkdtemp made
        try:
            os.rename(build, final)
        except BaseException:
            os.rename(aside, final)
            raise
        _fsync_dir(final.parent)
        remove_tree(aside)
        return
    _fsync_dir(final.parent)


def _file_being_written(directory: Path) -> Path | None:
    """Best guess at the file a library was writing (by name) into ``directory`` when it failed:
    a ``.npy`` shorter than its header says, else the last one written (mtime, then inode)."""
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    for p in files:
        if p.suffix == ".npy":
            with contextlib.suppress(Exception), open(p, "rb") as fh:
                fmt = np.lib.format
                major, _ = fmt.read_magic(fh)
                shape, _, dtype = fmt.read_array_header_1_0(fh) if major == 1 else fmt.read_array_header_2_0(fh)
                if p.stat().st_size < fh.tell() + int(np.prod(shape)) * dtype.itemsize:
                    return p
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.stat().st_ino), default=None)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], kind: str, own: tuple[str, ...] = (), manifest: bool = True) -> Iterator[Path]:
    """(Re)build the directory artefact ``final`` beside it, then swap it in whole.

    Yields a fresh, empty sibling directory (``.NAME.building-PID@HOST-XXXX``); the caller
    writes the artefact's files there and, last, its manifest (:func:`write_manifest`). On
    success it is installed at ``final`` by :func:`install_dir` (fsync, atomic swap, old version
    deleted). On any exception, a full disk included, the build directory is deleted and
    ``final`` is left exactly as it was (still loadable); a disk-full error becomes a
    :class:`NoSpaceError` naming the file being written. Build directories of killed builds are
    removed by the next build of the same artefact.

    ``final`` is first checked by :func:`check_target` (``own``: names of the files this kind
    writes): an artefact of another kind, or anything densepr did not write, is never
    overwritten. Rebuilding needs room for both versions until the swap. ``manifest=False``: a
    directory of parts that carry their own manifests (a bi-encoder's two encoders); it is installed
    once the caller returns, without a manifest of its own.
    """
    final = writable_dir(final, kind, own)
    existed = final.exists()
    with no_space_names(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(final)
        build = Path(tempfile.mkdtemp(prefix=sibling_prefix(final, "building"), dir=final.parent))
    try:
        os.chmod(build, 0o777 & ~_UMASK)
        yield build
        install_dir(build, final, kind if manifest else None)
    except BaseException as e:
        full = isinstance(e, NoSpaceError) or is_no_space(e, build)
        newest = _file_being_written(build) if full else None
        remove_tree(build)
        if full:
            cause = e.error if isinstance(e, NoSpaceError) else e
            named = e.path if isinstance(e, NoSpaceError) else (getattr(e, "filename", None) or newest or build)
            with contextlib.suppress(ValueError):  # name the file by its final path, not the build directory's
                named = final / Path(named).relative_to(build)
            raise NoSpaceError(named, cause, final if existed else None) from cause
        raise
