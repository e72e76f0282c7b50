"""Writing one file crash-safely: a temporary file beside it, fsync'ed, renamed over the final name
(:func:`atomic_write`, :func:`atomic_path`), and a full disk reported as a :class:`NoSpaceError` naming the file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from densepr.errors import DenseprError, InputError

UMASK = os.umask(0o022)
os.umask(UMASK)
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
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file normal permissions
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on success it replaces ``path`` (see :func:`atomic_path`)."""
    binary = "b" in mode
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else "") as fh:
        yield fh


def fsync_dir(directory: Path) -> None:
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


def file_name(name: str) -> str:
    """``name`` (a QA set's name, possibly a path) as one file name: other than letters, digits, ``.``,
    ``_`` and ``-``, every character becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
