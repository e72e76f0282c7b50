"""Passage-id files: one id a line, written atomically, read whole or memory-mapped (:class:`IdLines`)."""

from __future__ import annotations

import hashlib
import mmap
import operator
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_write


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
