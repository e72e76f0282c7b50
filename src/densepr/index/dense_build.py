"""Building a dense index: vectors added one embeddings part at a time into one or more FAISS shards,
resumable from a work directory (:class:`BuildState`); :meth:`densepr.index.dense.DenseIndex.build` calls it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from densepr.errors import DenseprError
from densepr.fileio.atomic import atomic_path, read_json, write_json
from densepr.fileio.dirs import remove_tree, writable_dir
from densepr.fileio.ids import IdLines, open_ids, write_ids
from densepr.index.embeddings import Embeddings
from densepr.index.rows import RowReader
from densepr.index.types import IndexParams, get
from densepr.progress import progress_bar


def hnsw_augment(x: np.ndarray, phi: float) -> np.ndarray:
    """DPR's inner-product-to-L2 transform of passage vectors: append ``sqrt(phi - |x|^2)``."""
    norms = (x.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(phi - norms, 0.0)).astype(np.float32)
    return np.hstack([x, extra[:, None]])


def train_sample(emb: Embeddings, size: int, seed: int) -> np.ndarray:
    """A uniform sample of up to ``size`` vectors, read in one forward pass through the parts' memory maps."""
    n = len(emb)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    return RowReader([vecs for _, vecs in emb.parts()], pread=False).take(pick)


@dataclass
class Shard:
    """One FAISS index holding a contiguous range of a dense index's rows."""

    index: faiss.Index
    start: int  # first global row
    file: str = ""


class BuildState:
    """A resumable build's work directory: ``trained.faiss``, ``shard-*.faiss``, ``ids.txt``, ``progress.json``.

    ``progress.json`` is written last, so the files it names are complete; ``key`` (type,
    parameters, embeddings files) must match, else the directory is from another build and
    is cleared.
    """

    OWN = ("build.json", "progress.json", "trained.faiss", "shard-*.faiss", "ids-*.txt")

    def __init__(self, directory: Path, key: dict) -> None:
        # a folder densepr did not write (or another artefact) at the work path is refused, never cleared
        self.dir, self.key = writable_dir(directory, "dense index build", self.OWN), json.loads(json.dumps(key))
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "build.json"
        if not meta.is_file() or read_json(meta) != self.key:
            remove_tree(self.dir)
            self.dir.mkdir(parents=True)
            write_json(meta, self.key)

    def load_trained(self) -> faiss.Index | None:
        f = self.dir / "trained.faiss"
        return faiss.read_index(str(f)) if f.is_file() else None

    def save_trained(self, index: faiss.Index) -> None:
        with atomic_path(self.dir / "trained.faiss") as tmp:
            faiss.write_index(index, tmp)

    def save_progress(self, indexes: list[faiss.Index], parts: int, rows: int, ids: IdLines) -> None:
        files = []
        for i, ix in enumerate(indexes):
            files.append(f"shard-{i:05d}-{parts}.faiss")  # a new name per save: the last complete one stays valid
            with atomic_path(self.dir / files[-1]) as tmp:
                faiss.write_index(ix, tmp)
        write_ids(self.dir / f"ids-{parts}.txt", ids)
        old = read_json(self.dir / "progress.json") if (self.dir / "progress.json").is_file() else None
        write_json(self.dir / "progress.json", {"parts": parts, "rows": rows, "files": files, "ids": f"ids-{parts}.txt"})
        if old:  # the previous save is no longer needed
            for name in [*old["files"], old["ids"]]:
                (self.dir / name).unlink(missing_ok=True)

    def load_progress(self, num_shards: int) -> tuple[list[faiss.Index], int, int, IdLines] | None:
        f = self.dir / "progress.json"
        if not f.is_file():
            return None
        st = read_json(f)
        if len(st["files"]) != num_shards:
            return None
        return [faiss.read_index(str(self.dir / x)) for x in st["files"]], st["parts"], st["rows"], open_ids(self.dir / st["ids"])


def build_shards(
    embeddings: Embeddings | str | os.PathLike[str],
    index_type: str,
    params: IndexParams | None,
    num_shards: int,
    show_progress: bool,
    work_dir: str | os.PathLike[str] | None,
    checkpoint_seconds: float,
) -> tuple[list[Shard], IdLines, dict]:
    """The shards, ids and manifest of a new index: see :meth:`densepr.index.dense.DenseIndex.build`."""
    spec = get(index_type)
    emb = embeddings if isinstance(embeddings, Embeddings) else Embeddings.open(embeddings)
    n, dim = len(emb), emb.dim
    if num_shards < 1 or num_shards > max(n, 1):
        raise DenseprError(f"--num-shards must be between 1 and the {n} vectors")
    p = (params or IndexParams()).resolved(n, dim)
    phi = None
    if spec.l2_transform:  # first pass: the largest squared norm, for DPR's transform
        phi = max(float((np.asarray(v, dtype=np.float64) ** 2).sum(1).max()) for _, v in emb.parts())
    work = BuildState(Path(work_dir), {"type": index_type, "params": asdict(p), "shards": num_shards, "count": n, "dim": dim,
                       "embeddings": emb.manifest.get("files", {})}) if work_dir is not None else None  # fmt: skip
    empty = work.load_trained() if work is not None else None
    if empty is None:
        empty = spec.make(dim, p)
        if spec.trained:
            sample = train_sample(emb, spec.train_size(p), p.seed)
            if spec.ivf and len(sample) < (p.nlist or 1):
                raise DenseprError(f"{len(sample)} vectors cannot train {p.nlist} IVF cells; lower --nlist")
            empty.train(sample)
        if work is not None:
            work.save_trained(empty)
    bounds = np.linspace(0, n, num_shards + 1).astype(np.int64)
    shards = [Shard(faiss.clone_index(empty) if num_shards > 1 else empty, int(bounds[i])) for i in range(num_shards)]
    id_bytes: list[bytes] = []  # each part's ids file as it is (no object per passage)
    row = done = 0
    if work is not None and (resumed := work.load_progress(num_shards)) is not None:
        indexes, done, row, ids = resumed
        id_bytes.append(ids.tobytes())
        for s, ix in zip(shards, indexes):
            s.index = ix
    last_save = time.monotonic()
    with progress_bar(n, f"index passages ({index_type})", show_progress, unit="vec") as advance:
        advance(row)
        for part_no, (shard_ids, vecs) in enumerate(emb.parts()):
            if part_no < done:
                continue
            vecs = np.asarray(vecs, dtype=np.float32)
            for s in range(num_shards):  # an embeddings shard may straddle index shards
                lo, hi = max(bounds[s], row), min(bounds[s + 1], row + len(vecs))
                if lo < hi:
                    part = np.ascontiguousarray(vecs[lo - row : hi - row])
                    shards[s].index.add(hnsw_augment(part, phi) if phi is not None else part)
            id_bytes.append(shard_ids.tobytes() if isinstance(shard_ids, IdLines) else IdLines.from_strings(shard_ids).tobytes())
            row += len(vecs)
            advance(len(vecs))
            if work is not None and time.monotonic() - last_save >= checkpoint_seconds:
                work.save_progress([s.index for s in shards], part_no + 1, row, IdLines(b"".join(id_bytes)))
                last_save = time.monotonic()
    meta = {k: emb.manifest[k] for k in ("encoder", "question_encoder", "question_encoder_info", "corpus") if k in emb.manifest}
    manifest = {"type": index_type, "metric": "inner_product", "dim": dim, "count": n, "params": asdict(p), **meta,
                "embeddings": str(emb.directory.resolve())}  # fmt: skip
    if phi is not None:
        manifest["phi"] = phi
    return shards, IdLines(b"".join(id_bytes)), manifest
