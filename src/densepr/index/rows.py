"""Rows of an embeddings directory read at scattered places: what re-ranking a compressed index reads.

Re-ranking (``--rerank R``) re-scores each query's k x R candidates with their exact vectors, rows
a few KB long scattered over files that, at DPR's 21M passages, are larger than RAM (30 GiB as
float16). Read through the memory map, each missing row is a page fault served one at a time, with the
kernel's read-around; read with ``pread``, each row alone, :data:`READ_THREADS` at a time, a cold
top-100 query re-scoring 1,000 rows took 64 ms instead of 1.2 s (p50; top-1000: 0.35 s instead of
1.37 s) on this machine's disk (``benchmarks/scale/rerank_reads.py``, the page cache dropped before each).
Files that fit in memory stay in the page cache once read, and there the map's gather is faster
(1M vectors, 1.5 GB: top-100 with re-ranking 4.0 ms a query through the map, 7.4 ms with ``pread``
in the same ``scale.py --steps dense-search`` run before this rule),
so ``pread`` is used only for vectors larger than half of the machine's memory.
"""

from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

READ_THREADS = 8  # reads in flight at once (more threads gained little on this disk)
PREAD_ABOVE = 0.5  # read with pread when the mapped vectors exceed this fraction of physical memory


def physical_memory() -> int:
    """This machine's RAM in bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="densepr-rows")
        return _pool


class RowReader:
    """Rows by global row number over ``parts`` (``[rows, dim]`` arrays in row order, e.g. the
    memory-mapped parts of an embeddings directory), as float32.

    With ``pread`` (default: when the parts' bytes exceed :data:`PREAD_ABOVE` of physical memory),
    parts that are whole C-ordered ``.npy`` memory maps are read with ``os.preadv`` (one read per
    row, several threads); other parts (in memory, a slice of a map, a platform without ``preadv``),
    and every part without ``pread``, are indexed directly. The values are the same either way.
    """

    def __init__(self, parts: list[np.ndarray], pread: bool | None = None) -> None:
        self.parts = parts
        if pread is None:
            ram = physical_memory()
            pread = bool(ram) and sum(p.nbytes for p in parts) > PREAD_ABOVE * ram
        self.pread = pread
        self.starts = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
        self.dim = parts[0].shape[1] if parts else 0
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, p: int) -> int | None:
        """An open descriptor of part ``p``'s file, or None when the part is not a whole ``.npy`` map
        (a slice of one, an array in memory) or has another dtype than the first part."""
        a = self.parts[p]
        whole_map = isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.flags.c_contiguous and a.filename
        if not (self.pread and hasattr(os, "preadv") and whole_map and a.dtype == self.parts[0].dtype):
            return None
        with self._lock:
            if p not in self._fds:
                self._fds[p] = os.open(a.filename, os.O_RDONLY)
            return self._fds[p]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), dim]``: the vectors of the sorted global ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        which = np.searchsorted(self.starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(which)) + 1
        jobs: list[tuple[int, int, int]] = []  # (part, first, end) of rows read from files
        for lo, hi in zip(np.r_[0, bounds].tolist(), np.r_[bounds, len(rows)].tolist()):
            p = int(which[lo])
            if self._file(p) is None:
                out[lo:hi] = self.parts[p][rows[lo:hi] - self.starts[p]]
            else:
                jobs.append((p, lo, hi))
        if jobs:
            self._read(rows, jobs, out)
        return out

    def _read(self, rows: np.ndarray, spans: list[tuple[int, int, int]], out: np.ndarray) -> None:
        buf = np.empty((len(rows), self.dim), dtype=self.parts[0].dtype)
        row_bytes = buf.strides[0]
        view = memoryview(buf).cast("B")
        reads = [(p, j) for p, lo, hi in spans for j in range(lo, hi)]

        def work(chunk: list[tuple[int, int]]) -> None:
            for p, j in chunk:
                at = self.parts[p].offset + int(rows[j] - self.starts[p]) * row_bytes
                if os.preadv(self._fds[p], [view[j * row_bytes : (j + 1) * row_bytes]], at) != row_bytes:
                    raise OSError(f"{self.parts[p].filename}: short read at byte {at} (file truncated since it was opened?)")

        step = -(-len(reads) // READ_THREADS)
        list(_threads().map(work, [reads[i : i + step] for i in range(0, len(reads), step)]))
        for _, lo, hi in spans:
            out[lo:hi] = buf[lo:hi]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
