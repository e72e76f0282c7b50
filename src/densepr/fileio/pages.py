"""Memory-mapped arrays' pages released from this process's RSS (:class:`MappedPages`), so a pass over
arrays larger than memory keeps only a budget of them resident."""

from __future__ import annotations

import mmap
import os

import numpy as np

from densepr.fileio.atomic import atomic_write


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
