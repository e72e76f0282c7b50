"""A dense index exported for other tools (``densepr export-index``): Pyserini's FAISS layout, or parquet.

* ``pyserini``: the directory Pyserini's ``FaissSearcher(dir, encoder)`` opens: ``dir/index`` (read with
  ``faiss.read_index`` and searched with ``index.search(q, k)``, its scores returned as they are) and
  ``dir/docid`` (one passage id per line, in index order). Every type scores by inner product there, as
  densepr does:

  - one-shard flat, flat-fp16 and flat-sq8 files are already that; they are linked (else copied);
  - shards are merged into one file (``merge_from``; every shard starts from the same trained index);
  - ivf-* get densepr's ``nprobe`` stored in the file (FAISS stores it; its default is 1);
  - hnsw stores DPR's inner-product-to-L2 transform (an extra coordinate, L2 metric), which a question
    vector from Pyserini lacks: the export keeps the same HNSW graph (so the same neighbours are visited)
    over the original vectors, scored by inner product, with densepr's ``efSearch``. A sharded hnsw index
    is refused: HNSW graphs cannot be merged.

  Peak memory: the merged index and one more shard (one-shard flat: none, the file is linked); hnsw: its
  graph and its vectors twice.

* ``parquet``: one row per passage, ``id``, ``title``, ``text`` (from the index directory's passages) and
  ``vector`` (``fixed_size_list<float32>[dim]``), written a row group at a time, so neither the corpus nor
  the vectors are ever held whole. The vectors are the embeddings the index was built from (exact), else
  the ones a flat or hnsw index stores. A passages file without a store is read twice (its ids are checked
  against the index's first). The file's metadata (``densepr`` key) records the metric (inner
  product), dimension and encoders.

Both are written beside their final name and renamed into place (``fileio``): a failed export leaves
nothing half-written, and an earlier export at that path stays until the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from densepr.errors import DenseprError, MismatchError
from densepr.fileio import (
    MANIFEST,
    atomic_dir,
    atomic_path,
    open_ids,
    read_manifest,
    release_pages,
    writable_dir,
    write_ids,
    write_manifest,
)
from densepr.index.types import IndexParams, get

DENSE_KIND = "dense-index"
PYSERINI_KIND = "pyserini-faiss-index"
PYSERINI_FILES = ("index", "docid")
ROW_GROUP = 10_000  # passages per parquet row group: 10k x 768 float32 = 30 MB; ~240 MiB peak measured (50k: ~810 MiB)


def dense_dir(path: str | os.PathLike[str]) -> Path:
    """The dense index directory ``path`` names: itself, or the ``dense/`` of an index directory."""
    p = Path(path)
    for d in (p, p / "dense"):
        if (d / MANIFEST).is_file():
            try:
                kind = json.loads((d / MANIFEST).read_text(encoding="utf-8")).get("kind")
            except (ValueError, OSError, AttributeError):
                kind = None
            if kind == DENSE_KIND:
                return d
    raise DenseprError(f"{p}: neither a dense index nor an index directory with dense/ "
                       "(build one with `densepr index dense` or `densepr reproduce`)")  # fmt: skip


def _shard_entries(manifest: dict) -> list[dict]:
    return manifest.get("shards") or [{"file": "index.faiss", "start": 0, "count": manifest["count"]}]


# -- Pyserini's FAISS layout ------------------------------------------------------------------------
def check_pyserini_output(out: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output directory the export would refuse (another artefact, or files densepr did not write)."""
    writable_dir(out, PYSERINI_KIND, PYSERINI_FILES)


def export_pyserini(index: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict:
    """Write ``out/index`` and ``out/docid`` for Pyserini's ``FaissSearcher`` (see the module docstring).

    Args:
        index: a dense index directory, or an index directory holding ``dense/``.
        out: the directory to write (replaced whole if it is an earlier export).

    Returns:
        The export's manifest (type, dim, count, what was done: ``how``).

    Raises:
        DenseprError: a sharded hnsw index (graphs cannot be merged), or ``out`` holds something else.
    """
    import faiss

    src = dense_dir(index)
    manifest = read_manifest(src, DENSE_KIND)  # sizes and checksums of the shards and ids
    spec, dim = get(manifest.get("type", "flat")), int(manifest["dim"])
    params = IndexParams(**manifest.get("params", {}))
    entries = _shard_entries(manifest)
    if spec.l2_transform and len(entries) > 1:
        raise DenseprError(f"{src}: a sharded hnsw index ({len(entries)} shards) cannot be exported for Pyserini: HNSW graphs "
                           "cannot be merged into one file; rebuild it with --num-shards 1, or export --format parquet")  # fmt: skip
    check_pyserini_output(out)
    with atomic_dir(out, PYSERINI_KIND, PYSERINI_FILES) as tmp:
        if len(entries) == 1 and not spec.ivf and not spec.l2_transform:
            _link_or_copy(src / entries[0]["file"], tmp / "index")  # already an inner-product FAISS file
            how = "linked" if os.path.samefile(src / entries[0]["file"], tmp / "index") else "copied"
        else:
            merged = faiss.read_index(str(src / entries[0]["file"]))
            for e in entries[1:]:  # one more shard held at a time; the same trained quantiser in each (DenseIndex.build clones it)
                other = faiss.read_index(str(src / e["file"]))  # not mapped: merge_from empties it
                merged.merge_from(other, merged.ntotal if spec.ivf else 0)
                del other
            how = f"merged {len(entries)} shards" if len(entries) > 1 else "rewritten"
            if spec.l2_transform:
                merged, how = _hnsw_inner_product(merged, dim, params), "hnsw graph kept, vectors without the extra coordinate, inner product"
            elif spec.ivf:
                faiss.extract_index_ivf(merged).nprobe = params.nprobe  # stored in the file; FAISS's default is 1
            if merged.ntotal != manifest["count"] or merged.d != dim or merged.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise MismatchError(f"{src}: the exported index holds {merged.ntotal} x {merged.d} vectors (metric {merged.metric_type}), "
                                    f"expected {manifest['count']} x {dim} by inner product")  # fmt: skip
            faiss.write_index(merged, str(tmp / "index"))
        write_ids(tmp / "docid", open_ids(src / "ids.txt"))
        notes = []
        if params.rerank > 1 and spec.pq:
            notes.append(f"densepr re-ranks the top k x {params.rerank} from the exact vectors; Pyserini searches the codes only")
        meta = {k: manifest[k] for k in ("type", "dim", "count", "params", "encoder", "question_encoder") if k in manifest}
        return write_manifest(tmp, PYSERINI_KIND, list(PYSERINI_FILES), **meta, metric="inner_product", source=str(src.resolve()),
                              how=how, notes=notes)  # fmt: skip


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (densepr never rewrites an index file in place: a rebuild writes new files), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _hnsw_inner_product(index, dim: int, params: IndexParams):
    """The same HNSW graph over the first ``dim`` coordinates of its vectors, scored by inner product.

    DPR's transform makes ``|q' - x'|^2 = |q|^2 + phi - 2 q.x``: the L2 order over the transformed vectors
    is the inner-product order, so a search over the same graph visits the same nodes and returns the same
    passages, with scores ``q.x`` (what densepr converts its distances back to)."""
    import faiss

    old = faiss.downcast_index(index)
    n = old.ntotal
    new = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    new.hnsw = old.hnsw  # a copy of the graph (levels, neighbours, entry point)
    new.hnsw.efSearch = params.ef_search  # stored in the file: Pyserini searches as wide as densepr
    stored = faiss.rev_swig_ptr(faiss.downcast_index(old.storage).get_xb(), n * (dim + 1)).reshape(n, dim + 1)
    for lo in range(0, n, ROW_GROUP):  # the storage only, a block at a time: the graph is already there
        new.storage.add(np.ascontiguousarray(stored[lo : lo + ROW_GROUP, :dim]))
    new.ntotal = n
    return new


# -- parquet --------------------------------------------------------------------------------------------
def _vector_parts(src: Path, manifest: dict, vectors: str | os.PathLike[str] | None) -> tuple[list[tuple[int, Callable]], str]:
    """The vectors of every index row, as ``(count, fetch(lo, hi))`` parts in row order, and where they come from:
    the embeddings directory (given, else the one recorded at build) when it holds this index's vectors, else the
    vectors a flat or hnsw index stores. Compressed types keep only codes: then the embeddings are required."""
    import faiss

    from densepr.fileio import IdLines
    from densepr.index.embeddings import Embeddings

    emb_dir = vectors or manifest.get("embeddings")
    if emb_dir and (Path(emb_dir) / MANIFEST).is_file():
        emb = Embeddings.open(emb_dir)
        mine, theirs = manifest.get("encoder", {}).get("weights_id"), emb.manifest.get("encoder", {}).get("weights_id")
        parts = list(emb.parts())
        if len(emb) != int(manifest["count"]) or emb.dim != int(manifest["dim"]) or mine != theirs or \
                IdLines.concat(ids for ids, _ in parts).sha256() != open_ids(src / "ids.txt").sha256():  # fmt: skip
            if vectors:
                raise MismatchError(f"{emb_dir}: {len(emb)} x {emb.dim} vectors (encoder {theirs}) are not the {manifest['count']} x "
                                    f"{manifest['dim']} this index was built from (encoder {mine}, same ids in the same order)")  # fmt: skip
        else:
            return [(len(v), lambda lo, hi, v=v: _read_rows(v, lo, hi)) for _, v in parts], str(emb_dir)
    spec, dim = get(manifest.get("type", "flat")), int(manifest["dim"])
    if not (spec.exact or spec.l2_transform):
        raise DenseprError(f"{src}: a {spec.name} index stores compressed codes, not the vectors, and the embeddings it was built "
                           f"from ({emb_dir or 'not recorded'}) are not there; pass --vectors EMBEDDINGS_DIR")  # fmt: skip
    out = []
    for e in _shard_entries(manifest):
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if spec.mmap else 0
        ix = faiss.read_index(str(src / e["file"]), flags)
        out.append((int(ix.ntotal), lambda lo, hi, ix=ix: ix.reconstruct_n(lo, hi - lo)[:, :dim]))  # hnsw: without the extra coordinate
    return out, str(src)


def _read_rows(vecs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a memory-mapped part as float32, its pages released once its last row is read
    (they stay in the page cache; the process does not keep the whole file resident)."""
    out = np.array(vecs[lo:hi], dtype=np.float32)
    if hi >= len(vecs):
        release_pages(vecs)
    return out


def _row_vectors(parts: list[tuple[int, Callable]], size: int) -> Iterator[np.ndarray]:
    """The vectors of consecutive rows, ``size`` at a time, across the parts' boundaries."""
    held: list[np.ndarray] = []
    have = 0
    for count, fetch in parts:
        for lo in range(0, count, size):
            block = fetch(lo, min(count, lo + size))
            held.append(block)
            have += len(block)
            while have >= size:
                joined = np.concatenate(held) if len(held) > 1 else held[0]
                yield joined[:size]
                held, have = [joined[size:]], have - size
    if have:
        yield np.concatenate(held)


def export_parquet(
    index: str | os.PathLike[str],
    out: str | os.PathLike[str],
    passages: str | os.PathLike[str] | None = None,
    vectors: str | os.PathLike[str] | None = None,
    row_group: int = ROW_GROUP,
    show_progress: bool = False,
) -> dict:
    """Write ``id``, ``title``, ``text`` and ``vector`` of every passage of a dense index as one parquet file.

    Args:
        index: an index directory (its ``passages.tsv`` gives the texts) or a dense index directory.
        out: the parquet file (written beside, then renamed into place).
        passages: the passages file, when ``index`` is a dense index directory alone.
        vectors: the embeddings directory the index was built from (default: the one it records).
        row_group: passages per row group (what is held at a time).

    Returns:
        ``{"count", "dim", "vectors": where they came from, "row_groups"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from densepr.data.passages import PASSAGES_FILE
    from densepr.data.store import open_passages
    from densepr.progress import progress_bar

    if row_group < 1:
        raise DenseprError("--row-group-size must be positive")
    src = dense_dir(index)
    manifest = read_manifest(src, DENSE_KIND)
    n, dim = int(manifest["count"]), int(manifest["dim"])
    tsv = Path(passages) if passages else next((p for p in (Path(index) / PASSAGES_FILE, src.parent / PASSAGES_FILE) if p.is_file()), None)
    if tsv is None or not tsv.is_file():
        raise DenseprError(f"{index}: no {PASSAGES_FILE} beside the dense index for the titles and texts; pass --passages FILE")
    corpus = open_passages(tsv)  # the index directory's store when there is one, else the file streamed
    ids = open_ids(src / "ids.txt")
    if corpus.fingerprint().get("ids_sha256") != ids.sha256():
        raise MismatchError(f"{tsv}: not the passages this index was built over (other ids, or another order); "
                            "give the passages file it was built from with --passages")  # fmt: skip
    parts, origin = _vector_parts(src, manifest, vectors)
    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string()), ("vector", pa.list_(pa.float32(), dim))],
                       metadata={"densepr": json.dumps({"metric": "inner_product", "dim": dim, "count": n, "index_type": manifest.get("type"),
                                                        **{k: manifest[k] for k in ("encoder", "question_encoder") if k in manifest}})})  # fmt: skip
    groups = 0
    with atomic_path(out) as tmp, progress_bar(n, "export passages (parquet)", show_progress, unit="psg") as advance:
        with pq.ParquetWriter(tmp, schema) as writer:
            vecs = _row_vectors(parts, row_group)
            for _, bids, titles, texts in corpus.blocks(row_group):
                v = next(vecs)
                if len(v) != len(bids):
                    raise MismatchError(f"{tsv}: holds more passages than the index's {n}")
                flat = pa.array(np.ascontiguousarray(v, dtype=np.float32).reshape(-1), type=pa.float32())
                writer.write_table(pa.table([pa.array(bids, pa.string()), pa.array(titles, pa.string()), pa.array(texts, pa.string()),
                                             pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema), row_group_size=row_group)  # fmt: skip
                groups += 1
                advance(len(bids))
    return {"count": n, "dim": dim, "vectors": origin, "row_groups": groups}
