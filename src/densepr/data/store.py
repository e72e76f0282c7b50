"""A memory-mapped passage store: a corpus opened in constant time and memory, whatever its size.

``passages.tsv`` stays the interchange format; an index directory gains ``store/``, built once from
it (:func:`build_store`) and opened without parsing it (:func:`open_store`). Nothing is held per
passage in Python: row access decodes one id, title or text from the mapped files, so only the
passages a caller reads (the hits it returns) are ever decoded.

On disk (a directory artefact, swapped in whole by :func:`~densepr.fileio.atomic_dir`)::

    ids.bin, titles.bin, texts.bin       each column's values, UTF-8, concatenated in row order
    id_offsets.npy, title_offsets.npy,   int64 [n + 1]: the value of row i is bytes
      text_offsets.npy                     ``off[i]:off[i + 1]`` of its .bin (off[0] = 0, off[n] = its size)
    id_hashes.npy                        uint64 [n]: the 64-bit BLAKE2b of every id, sorted
    id_order.npy                         int64 [n]: the row of each entry of id_hashes (ties in row order)
    manifest.json                        written last, kind "passage-store": every file's size and sha256
                                         (sampled above 32 MiB, :mod:`densepr.fileio`), "corpus": the
                                         :meth:`Corpus.fingerprint` computed while building (the same
                                         value the in-memory corpus gives, so indexes built over either
                                         match), "source": the passage file's name, size, mtime_ns and
                                         sampled sha256 when it was read

``row(id)`` hashes the id and binary-searches ``id_hashes`` (then compares the ids of the rows with
that hash), so no id-to-row dict is built. Values that are lone surrogates (possible in JSON lines)
are stored with ``surrogatepass``, as the fingerprint encodes them.

Building streams the file through the parsers of :mod:`densepr.data.passages`; it holds 32 bytes
per passage (three offsets and a hash) plus one block of ``FP_ROWS`` passages for the fingerprint,
and about 56 bytes per passage while it sorts the hashes (~1.2 GB at 21M passages).
A repeated id is found after the hashes are sorted (equal neighbours) and refused like
:meth:`Corpus.from_passages` refuses it. Opening checks the manifest (sizes, sampled hashes), the
arrays' shapes and end offsets, and, given the source file, that it is the one the store was built
from; ``densepr verify`` checks every byte.

:class:`StreamedCorpus` is the same streaming pass without a store: a plain passages file read part by
part by ``densepr index bm25`` and ``densepr encode``; :func:`open_passages` prefers an index
directory's store (``passages.tsv`` with ``store/`` beside it, or a directory it can be built in).
"""

from __future__ import annotations

import hashlib
import mmap
import operator
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from densepr.data.passages import (
    FP_ROWS,
    PASSAGES_FILE,
    BytesRead,
    Corpus,
    Fingerprinter,
    Passage,
    corpus_fingerprint,
    ids_sha256,
    iter_passages,
)
from densepr.errors import DenseprError, InputError, MismatchError
from densepr.fileio.atomic import NoSpaceError, save_npy
from densepr.fileio.dirs import atomic_dir
from densepr.fileio.manifest import MANIFEST, read_manifest, sampled_sha256, write_manifest

KIND = "passage-store"
STORE_DIR = "store"  # its name inside an index directory
REBUILD = "delete the store directory: densepr rebuilds it from passages.tsv on the next load"  # how a damaged store is repaired
COLUMNS = ("id", "title", "text")
FILES = (*(f"{c}s.bin" for c in COLUMNS), *(f"{c}_offsets.npy" for c in COLUMNS), "id_hashes.npy", "id_order.npy")
TEXT_ENCODING = ("utf-8", "surrogatepass")
_ROWS_BLOCK = 1 << 20  # ids looked up at a time by StoreCorpus.rows


def hash64(raw: bytes) -> int:
    """The 64-bit BLAKE2b of an id's UTF-8 bytes (what id_hashes.npy holds)."""
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _id_hash(pid: str) -> int:
    return hash64(pid.encode(*TEXT_ENCODING))


def source_state(path: str | os.PathLike[str]) -> dict:
    """What identifies the passage file a store was built from: checked on open, costs a stat and 2 MiB read."""
    st = os.stat(path)
    return {"name": Path(path).name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sampled_sha256": sampled_sha256(path)}


class _Column(Sequence[str]):
    """A read-only column of the store: ``len``, ``[i]``, slices (lists) and iteration, decoded on access."""

    def __init__(self, data: mmap.mmap | bytes, offsets: np.ndarray) -> None:
        self._data, self._off, self._n = data, offsets, len(offsets) - 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            lo, hi, step = i.indices(self._n)
            if step != 1:
                return [self[j] for j in range(lo, hi, step)]
            return self._block(lo, hi) if hi > lo else []
        i = operator.index(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("passage row out of range")
        a, b = self._off[i : i + 2].tolist()
        return self._data[a:b].decode(*TEXT_ENCODING)

    def _block(self, lo: int, hi: int) -> list[str]:
        off = self._off[lo : hi + 1].tolist()
        base = off[0]
        blob = self._data[base : off[-1]]
        return [blob[a - base : b - base].decode(*TEXT_ENCODING) for a, b in zip(off, off[1:])]

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, self._n, 4096):
            yield from self._block(lo, min(lo + 4096, self._n))

    def __repr__(self) -> str:
        return f"<{self._n} stored values>"


class StoreCorpus(Corpus):
    """A :class:`Corpus` over a passage store: the same API (``len``, ``[row]``, iteration, ``ids``,
    ``titles``, ``texts``, ``row(id)``, ``fingerprint()``), with the columns read from the mapped files."""

    def __init__(self, directory: str | os.PathLike[str], manifest: dict) -> None:
        self.directory, self.manifest = Path(directory), manifest
        self._maps: list[mmap.mmap] = []
        cols = [_Column(self._map(self.directory / f"{c}s.bin"), self._array(f"{c}_offsets.npy", np.int64)) for c in COLUMNS]
        self.ids, self.titles, self.texts = cols
        self._hashes = self._array("id_hashes.npy", np.uint64)
        self._order = self._array("id_order.npy", np.int64)
        self._row_of, self._fingerprint = None, None
        n = manifest["corpus"]["count"]
        for name, col in zip(COLUMNS, cols):
            size = manifest["files"][f"{name}s.bin"]["bytes"]
            if len(col) != n or col._off[0] != 0 or col._off[-1] != size:
                raise DenseprError(f"{self.directory / f'{name}_offsets.npy'}: {len(col._off)} offsets from {col._off[0]} to "
                                   f"{col._off[-1]}, expected {n + 1} from 0 to {size} (the size of {name}s.bin); {REBUILD}")  # fmt: skip
        for name, a in (("id_hashes.npy", self._hashes), ("id_order.npy", self._order)):
            if len(a) != n:
                raise DenseprError(f"{self.directory / name}: {len(a)} entries, expected {n}; {REBUILD}")

    def _map(self, path: Path) -> mmap.mmap | bytes:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""  # mmap refuses an empty file (e.g. every title empty)
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps.append(m)
        return m

    def _array(self, name: str, dtype: type) -> np.ndarray:
        path = self.directory / name
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DenseprError(f"{path}: unreadable ({e}); {REBUILD}") from None
        if a.dtype != dtype or a.ndim != 1:
            raise DenseprError(f"{path}: {a.dtype} array of shape {a.shape}, expected 1-d {np.dtype(dtype)}; {REBUILD}")
        return a.view(np.ndarray)  # still the mapping; a plain ndarray slices without np.memmap's per-slice overhead

    def __iter__(self) -> Iterator[Passage]:
        return (Passage(*v) for v in zip(self.ids, self.titles, self.texts))

    def __repr__(self) -> str:
        return f"StoreCorpus({str(self.directory)!r}, {len(self)} passages)"

    def __reduce__(self):  # to another process: it opens the same store
        return (open_store, (str(self.directory),))

    def fingerprint(self) -> dict:
        """The fingerprint computed when the store was built (its files are checked against the manifest on open)."""
        return dict(self.manifest["corpus"])

    def row(self, passage_id: str) -> int:
        """Row number of a passage id (KeyError if absent): a binary search of the sorted id hashes."""
        if not isinstance(passage_id, str):
            raise KeyError(passage_id)
        h = _id_hash(passage_id)
        i = int(np.searchsorted(self._hashes, np.uint64(h)))
        while i < len(self._hashes) and int(self._hashes[i]) == h:
            r = int(self._order[i])
            if self.ids[r] == passage_id:
                return r
            i += 1
        raise KeyError(passage_id)

    def rows(self, passage_ids: Sequence[str]) -> np.ndarray:
        """Row numbers (int64) of many passage ids, as :meth:`row` gives them (KeyError naming the first
        absent one). This store's own ids in row order (the common case: an index built over it) are
        recognised by their hash in its fingerprint, without reading ids.bin; others are found by one
        vectorised search of the sorted id hashes, their ids then compared byte for byte."""
        n = len(passage_ids)
        if n == len(self):  # ids hold no whitespace, so their joined text (what the fingerprint hashes) determines them
            if ids_sha256(passage_ids) == self.manifest["corpus"]["ids_sha256"]:
                return np.arange(n, dtype=np.int64)
        out = np.zeros(n, dtype=np.int64)
        for lo in range(0, n, _ROWS_BLOCK):  # a block at a time: its ids' bytes and hashes are all held per id
            out[lo : lo + _ROWS_BLOCK] = self._rows_block(passage_ids[lo : lo + _ROWS_BLOCK])
        return out

    def _rows_block(self, passage_ids: Sequence[str]) -> np.ndarray:
        n = len(passage_ids)
        raw = [p.encode(*TEXT_ENCODING) if isinstance(p, str) else b"" for p in passage_ids]
        want = np.fromiter(map(hash64, raw), dtype=np.uint64, count=n)
        pos = np.minimum(np.searchsorted(self._hashes, want), len(self._hashes) - 1)
        rows = self._order[pos]
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=n)
        off = self.ids._off
        ok = (self._hashes[pos] == want) & (off[rows + 1] - off[rows] == lens) & (lens > 0)
        if ok.any():  # compare the candidates' stored ids with the given ones, all at once
            starts, seg = off[rows[ok]], lens[ok]
            first = np.cumsum(seg) - seg
            gather = np.repeat(starts - first, seg) + np.arange(int(seg.sum()))
            stored = np.frombuffer(self.ids._data, dtype=np.uint8)[gather]
            given = np.frombuffer(b"".join(b for b, k in zip(raw, ok.tolist()) if k), dtype=np.uint8)
            ok[np.flatnonzero(ok)] = np.add.reduceat(stored != given, first) == 0
        for i in np.flatnonzero(~ok).tolist():  # a hash shared by several rows, or absent: the exact lookup decides
            rows[i] = self.row(passage_ids[i])
        return rows


def build_store(source: str | os.PathLike[str], directory: str | os.PathLike[str]) -> dict:
    """Build a passage store at ``directory`` from a passages file (TSV or JSON lines), streaming it.

    Returns the manifest. Bad input is refused as :func:`~densepr.data.passages.load_corpus` refuses
    it (located :class:`InputError`); the previous store, if any, is left as it was.
    """
    source = Path(source)
    state = source_state(source) if source.is_file() else None  # before reading: an edit during the build makes it stale
    with atomic_dir(directory, KIND, FILES) as build:
        offsets = [array("q", [0]) for _ in COLUMNS]
        scan = _Scan(source)
        outs = [open(build / f"{c}s.bin", "wb", buffering=1 << 20) for c in COLUMNS]  # noqa: SIM115
        try:
            for p in iter_passages(source):
                for value, out, off in zip((p.id, p.title, p.text), outs, offsets):
                    raw = value.encode(*TEXT_ENCODING)
                    out.write(raw)
                    off.append(off[-1] + len(raw))
                scan.add(p)
        finally:
            for out in outs:
                out.close()

        def ids_of(rows: list[int]) -> list[bytes]:
            with open(build / "ids.bin", "rb") as fh:
                return [_read_at(fh, offsets[0][r], offsets[0][r + 1]) for r in rows]

        fingerprint, sorted_hashes, order = scan.finish(ids_of)
        for c, off in zip(COLUMNS, offsets):
            save_npy(build / f"{c}_offsets.npy", np.frombuffer(off, dtype=np.int64))
        save_npy(build / "id_hashes.npy", sorted_hashes)
        save_npy(build / "id_order.npy", order.astype(np.int64))
        return write_manifest(build, KIND, list(FILES), corpus=fingerprint, source=state)


def _read_at(fh, a: int, b: int) -> bytes:
    fh.seek(a)
    return fh.read(b - a)


class _Scan:
    """What one streaming pass over a passages file gathers in bounded memory: the fingerprint (fed
    one block of ``FP_ROWS`` passages at a time) and every id's 64-bit hash (8 B per passage), from
    which :meth:`finish` finds a repeated id. Shared by :func:`build_store` and :class:`StreamedCorpus`."""

    def __init__(self, source: Path) -> None:
        self.source, self.fp, self.hashes = source, Fingerprinter(), array("Q")
        self.block: tuple[list[str], list[str], list[str]] = ([], [], [])

    def add(self, p: Passage) -> None:
        for col, value in zip(self.block, (p.id, p.title, p.text)):
            col.append(value)
        self.hashes.append(_id_hash(p.id))
        if len(self.block[0]) == FP_ROWS:
            self.fp.add(*self.block)
            self.block = ([], [], [])

    def finish(self, ids_of: Callable[[list[int]], list[bytes]]) -> tuple[dict, np.ndarray, np.ndarray]:
        """The fingerprint, the sorted id hashes and their rows; an empty file or a repeated id
        (``ids_of(rows)``: the UTF-8 ids of those rows, asked only for rows whose hashes collide) is refused."""
        if self.block[0]:
            self.fp.add(*self.block)
            self.block = ([], [], [])
        if self.fp.count == 0:
            raise InputError(self.source, "no passages found (empty file?)")
        h = np.frombuffer(self.hashes, dtype=np.uint64)
        order = np.argsort(h, kind="stable")
        sorted_hashes = h[order]
        del h, self.hashes
        _refuse_duplicates(self.source, sorted_hashes, order, ids_of)
        return self.fp.result(), sorted_hashes, order


def _refuse_duplicates(source: Path, sorted_hashes: np.ndarray, order: np.ndarray, ids_of: Callable[[list[int]], list[bytes]]) -> None:
    """A repeated id (two rows with the same hash and the same id: equal neighbours once sorted) is
    refused as :meth:`Corpus.from_passages` refuses it: at the first repetition, naming both passages."""
    same = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not len(same):
        return
    rows = sorted(set(order[np.union1d(same, same + 1)].tolist()))  # every row of a run of equal hashes
    id_at = dict(zip(rows, ids_of(rows)))
    first = None
    same_set = set(same.tolist())
    for i in same.tolist():
        if i - 1 in same_set:
            continue  # not the start of a run of equal hashes
        seen: dict[bytes, int] = {}
        j = i
        while j < len(order) and sorted_hashes[j] == sorted_hashes[i]:  # a run: rows in file order (stable sort)
            row = int(order[j])
            pid = id_at[row]
            if pid in seen and (first is None or row < first[1]):
                first = (seen[pid], row, pid.decode(*TEXT_ENCODING))
            seen.setdefault(pid, row)
            j += 1
    if first is not None:
        a, b, pid = first
        raise InputError(source, f"duplicate passage id {pid!r} (first seen as passage {a + 1})", line=b + 1, field="id", unit="passage")


class StreamedCorpus:
    """A passages file read part by part, never held whole: what ``densepr index bm25`` and ``densepr
    encode`` read when the file is not an index directory's (:func:`open_passages`).

    It offers what those read: ``len``, :meth:`fingerprint` and :meth:`blocks`. The count and the
    fingerprint come from a streaming pass (the first complete :meth:`blocks` pass, or one of its
    own), which refuses bad input as :func:`~densepr.data.passages.load_corpus` does (a repeated id
    once the whole file is read); that pass holds one block of ``FP_ROWS`` passages and 8 B per
    passage (its id's hash; ~56 B per passage while they are sorted at the end). A file changed
    (size or modification time) after that pass is refused by the passes after it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fp: dict | None = None
        self._state: tuple | None = None

    def __len__(self) -> int:
        return self.fingerprint()["count"]

    def __repr__(self) -> str:
        return f"StreamedCorpus({str(self.path)!r})"

    def fingerprint(self) -> dict:
        """As :meth:`Corpus.fingerprint`; the first call reads the file through."""
        if self._fp is None:
            for _ in self.blocks(FP_ROWS):
                pass
        return dict(self._fp)

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def _check_unchanged(self) -> None:
        if self._state is not None and self._stat() != self._state:
            raise MismatchError(f"{self.path}: changed while densepr was reading it (size or modification time); run again")

    def blocks(self, size: int, which: Iterable[int] | None = None) -> Iterator[tuple[int, list[str], list[str], list[str]]]:
        """As :meth:`Corpus.blocks`, streamed: the rows before a wanted block are parsed and dropped. ``self.read.n``:
        the bytes this pass has consumed (up to the end of the block last yielded)."""
        want = None if which is None else set(which)
        last = None if want is None else max(want, default=-1)
        scan = None
        if self._fp is None:
            scan, self._state = _Scan(self.path), self._stat() if self.path.is_file() else None  # before reading
        self._check_unchanged()
        cols: tuple[list[str], list[str], list[str]] = ([], [], [])
        row, self.read = 0, BytesRead()
        for p in iter_passages(self.path, self.read):
            if scan is not None:
                scan.add(p)
            i = row // size
            if want is None or i in want:
                for col, value in zip(cols, (p.id, p.title, p.text)):
                    col.append(value)
            row += 1
            if row % size == 0:
                if cols[0]:
                    yield i, *cols
                    cols = ([], [], [])
                if scan is None and last is not None and i >= last:
                    self._check_unchanged()
                    return
        if cols[0]:
            yield (row - 1) // size, *cols
        if scan is not None:
            self._fp = scan.finish(self._ids_of)[0]
        self._check_unchanged()

    def _ids_of(self, rows: list[int]) -> list[bytes]:
        """The UTF-8 ids of ``rows`` (a few: those whose id hashes collide), by reading the file again."""
        want, got = set(rows), {}
        for r, p in enumerate(iter_passages(self.path)):
            if r in want:
                got[r] = p.id.encode(*TEXT_ENCODING)
                if len(got) == len(want):
                    break
        return [got[r] for r in rows]


def open_store(directory: str | os.PathLike[str], source: str | os.PathLike[str] | None = None, verify: str = "sample") -> StoreCorpus:
    """Open a passage store (its manifest checked, ``verify`` as in :func:`~densepr.fileio.read_manifest`).

    ``source``: the passages file it must have been built from; a store of another (or since edited)
    file is refused with a :class:`MismatchError` (:func:`ensure_store` rebuilds it instead).
    """
    directory = Path(directory)
    try:
        manifest = read_manifest(directory, KIND, verify)
    except DenseprError as e:  # a truncated or altered file: say how to get a good store back
        if type(e) is DenseprError and str(e).endswith("; rebuild it"):
            raise DenseprError(f"{str(e).removesuffix('; rebuild it')}; {REBUILD}") from None
        raise
    if source is not None:
        stale = store_stale(manifest, source)
        if stale:
            raise MismatchError(f"{directory}: {stale}; rebuild it (densepr rebuilds it when it loads the index)")
    return StoreCorpus(directory, manifest)


def check_store(directory: str | os.PathLike[str], manifest: dict, full: bool = True) -> None:
    """``densepr verify``'s check of a store whose files match its manifest: its arrays' shapes and, when
    ``full``, that its columns hash to the fingerprint it records (every value read)."""
    store = StoreCorpus(directory, manifest)
    if full:
        fp = corpus_fingerprint(store.ids, store.titles, store.texts)
        if fp != store.fingerprint():
            raise DenseprError(f"{directory}: its passages do not hash to the fingerprint in its manifest; {REBUILD}")


def store_stale(manifest: dict, source: str | os.PathLike[str]) -> str | None:
    """Why a store is not current for ``source`` (another file, or edited since), or None."""
    was, now = manifest.get("source") or {}, source_state(source)
    for key, what in (("bytes", "size"), ("mtime_ns", "modification time"), ("sampled_sha256", "content")):
        if was.get(key) != now[key]:
            return (f"built from {was.get('name', 'a passages file')} of {was.get('bytes')} bytes, but {source} now has another "
                    f"{what} ({now['bytes']} bytes): edited or replaced since")  # fmt: skip
    return None


def ensure_store(source: str | os.PathLike[str], directory: str | os.PathLike[str]) -> StoreCorpus:
    """The store at ``directory`` for ``source``, built first when missing or stale (``source`` changed since)."""
    import fcntl

    directory = Path(directory)

    def current() -> bool:
        return (directory / MANIFEST).is_file() and not store_stale(read_manifest(directory, KIND, "none"), source)

    if not current():
        # One builder at a time (searchers of one index start together); the others wait, then open what it built
        # rather than swapping in a copy of their own under a process that has just opened it.
        with open(directory.parent / f".{directory.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not current():
                build_store(source, directory)
    return open_store(directory, source)


def store_beside(tsv: str | os.PathLike[str]) -> StoreCorpus | None:
    """The store of an index directory's ``passages.tsv`` (``store/`` beside it): opened when current;
    built first when missing or stale (``passages.tsv`` edited since) and the directory is writable.
    None when it cannot be used: a read-only or full directory, or a ``store/`` that is something
    else (or a killed build's leftovers we may not own: not ours to replace). A damaged store is
    refused (its files are named), not silently rebuilt. A ``passages.tsv`` removed once its store was built
    leaves the store to be read alone."""
    tsv = Path(tsv)
    store = tsv.parent / STORE_DIR
    if not tsv.exists() and (store / MANIFEST).is_file():
        return open_store(store)
    if not (store / MANIFEST).is_file() and store.exists():
        return None
    try:
        return ensure_store(tsv, store)
    except (PermissionError, NoSpaceError):  # the store is an optimisation
        return None


def open_passages(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> StoreCorpus | StreamedCorpus:
    """Passages to read part by part, never held whole: an index directory's ``passages.tsv`` through
    its store (:func:`store_beside`), any other file (or one whose store cannot be used) streamed.

    A ``passages.tsv`` counts as an index directory's when a store is already beside it, or when
    ``output`` (what the caller writes) goes into the same directory (``densepr index bm25
    idx/passages.tsv idx/bm25``); a store (about the file's size) is never built unasked beside a
    file elsewhere. An index directory whose ``passages.tsv`` was removed after its store was built is read
    from the store (:func:`store_beside`)."""
    path = Path(path)
    has_store = (path.parent / STORE_DIR / MANIFEST).is_file()
    if path.name == PASSAGES_FILE and (path.is_file() or has_store):
        building = output is not None and Path(output).resolve().parent == path.resolve().parent
        if building or has_store:
            store = store_beside(path)
            if store is not None:
                return store
    return StreamedCorpus(path)
