"""The dense index: passage vectors in FAISS, searched by inner product (DPR's sim = E_Q(q) . E_P(p)).

Index types (``densepr index dense --type``): one table, :data:`densepr.index.types.INDEX_TYPES`.

Layout of a dense index directory::

    index.faiss | index-00000.faiss ...  # FAISS's own files, one per shard (never pickle)
    ids.txt                              # passage id of each row, in shard order
    manifest.json                        # type, parameters, dim, count, shards, both encoders,
                                         # corpus, phi (hnsw); sizes and sha256

It is written beside the old version and swapped in whole (``fileio.atomic_dir``): a server
that has the old one loaded (or memory-mapped) keeps serving it until it reloads, and a failed
or disk-full save leaves it as it was. On load, file checksums (sampled above 32 MiB), each
shard's vector count and dimension, and the ids count are checked.

A sharded index (``--num-shards``) is searched shard by shard and the lists merged, which
gives exactly the ranking one index over all rows would give.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from densepr.data.passages import Corpus, check_corpus
from densepr.errors import DenseprError, MismatchError
from densepr.fileio import (
    MANIFEST,
    IdLines,
    atomic_dir,
    atomic_path,
    check_target,
    open_ids,
    read_json,
    read_manifest,
    remove_tree,
    writable_dir,
    write_ids,
    write_json,
    write_manifest,
)
from densepr.index.embeddings import Embeddings
from densepr.index.encoder_ref import with_relative_path
from densepr.index.types import INDEX_TYPES, IndexParams, IndexType, get
from densepr.progress import progress_bar
from densepr.ranking import SearchResult

KIND = "dense-index"
OWN_FILES = ("*.faiss", "ids.txt")  # what a save writes: an interrupted (pre-atomic) save left only these


# Batched exact search on a CPU: one torch GEMM + top-k per block beats FAISS's blocked BLAS + heaps on
# small indexes (10k x 384, batch 256: 1.7x) but not on large ones (100k x 768: 0.85x; 1M x 768: 0.65x),
# measured on the 2-core benchmark machine (docs/speed-and-scale.md, Scale).
TORCH_CPU_MAX = 16_000_000  # vectors x dims


def hnsw_augment(x: np.ndarray, phi: float) -> np.ndarray:
    """DPR's inner-product-to-L2 transform of passage vectors: append ``sqrt(phi - |x|^2)``."""
    norms = (x.astype(np.float64) ** 2).sum(1)
    extra = np.sqrt(np.maximum(phi - norms, 0.0)).astype(np.float32)
    return np.hstack([x, extra[:, None]])


def _take_rows(parts, rows: np.ndarray) -> np.ndarray:
    """float32 vectors of the sorted global ``rows``, from ``parts`` (arrays in row order, e.g.
    memory-mapped files): one forward pass, reading only those rows."""
    out, start = [], 0
    for vecs in parts:
        local = rows[(rows >= start) & (rows < start + len(vecs))] - start
        out.append(np.asarray(vecs[local], dtype=np.float32))
        start += len(vecs)
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


def _train_sample(emb: Embeddings, size: int, seed: int) -> np.ndarray:
    """A uniform sample of up to ``size`` vectors, read shard by shard (memory-mapped)."""
    n = len(emb)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))
    return _take_rows((vecs for _, vecs in emb.parts()), pick)


@dataclass
class _Shard:
    index: faiss.Index
    start: int  # first global row
    file: str = ""


class _BuildState:
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


@dataclass
class DenseIndex:
    """Passage vectors in one or more FAISS shards, with the ids of their rows.

    Args:
        shards: the FAISS indexes, each holding a contiguous range of rows.
        ids: passage id of each row (all shards): an :class:`~densepr.fileio.IdLines` (a list is
            converted), so no Python object is held per passage.
        manifest: metadata (type, parameters, encoders, corpus, phi for hnsw).
    """

    shards: list[_Shard]
    ids: IdLines
    manifest: dict
    # index row -> corpus row once bound; None: the same row (unbound, or bound to a corpus with these ids in this order)
    _rows: np.ndarray | None = field(default=None, repr=False)
    _torch: object | None = field(default=None, repr=False)  # torch tensor of vectors (GPU path)
    _gpu_res: object | None = field(default=None, repr=False)  # FAISS GPU resources, kept alive
    _exact: list | None = field(default=None, repr=False)  # memory-mapped embedding parts, for re-ranking
    _offset: int = field(default=0, repr=False)  # a shard view's first row in the whole index (rows of _exact)

    def __post_init__(self) -> None:
        if not isinstance(self.ids, IdLines):
            self.ids = IdLines.from_strings(self.ids)
        total = sum(s.index.ntotal for s in self.shards)
        if total != len(self.ids):
            raise MismatchError(f"index holds {total} vectors but {len(self.ids)} ids")

    @property
    def index_type(self) -> str:
        return self.manifest.get("type", "flat")

    @property
    def spec(self) -> IndexType:
        """This index's entry in the type table."""
        return get(self.index_type)

    @property
    def params(self) -> IndexParams:
        return IndexParams(**self.manifest.get("params", {}))

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_faiss(cls, index: faiss.Index, ids: Sequence[str], index_type: str = "flat", **manifest) -> DenseIndex:
        """Wrap an existing FAISS index (one shard)."""
        return cls([_Shard(index, 0)], ids, {"type": index_type, "dim": index.d, "count": len(ids), **manifest})

    @classmethod
    def combine(cls, parts: list[DenseIndex]) -> DenseIndex:
        """Search several index directories (e.g. built on different machines) as one index.

        Raises:
            MismatchError: they were built by different encoders, with other types or dimensions.
        """
        first = parts[0].manifest
        for other in parts[1:]:
            m = other.manifest
            for key in ("dim", "type"):
                if m.get(key) != first.get(key):
                    raise MismatchError(f"index shards differ in {key}: {first.get(key)!r} vs {m.get(key)!r}")
            if m.get("encoder", {}).get("weights_id") != first.get("encoder", {}).get("weights_id"):
                raise MismatchError(
                    f"index shards were built by different passage encoders ({first.get('encoder', {}).get('path')} vs "
                    f"{m.get('encoder', {}).get('path')}); their scores are not comparable"
                )
            if get(first.get("type", "flat")).l2_transform and m.get("phi") != first.get("phi"):
                raise MismatchError("hnsw shards were built with different norm bounds (phi); build them together")
        shards, offset = [], 0
        for part in parts:
            shards += [_Shard(s.index, offset + s.start, s.file) for s in part.shards]
            offset += len(part)
        ids = IdLines.concat(part.ids for part in parts)
        manifest = {**first, "count": len(ids)}
        manifest.pop("corpus", None)  # each part covers a slice of the corpus
        return cls(shards, ids, manifest)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: Embeddings | str | os.PathLike[str],
        index_type: str = "flat",
        params: IndexParams | None = None,
        num_shards: int = 1,
        show_progress: bool = False,
        work_dir: str | os.PathLike[str] | None = None,
        checkpoint_seconds: float = 300.0,
    ) -> DenseIndex:
        """Build an index from an embeddings directory, adding one embeddings part at a time.

        Trained types learn their quantiser on a sample (``params.train_size`` vectors); with
        several index shards, every shard starts from the same trained, empty index.

        With ``work_dir``, the build is resumable: the trained quantiser and then, at most every
        ``checkpoint_seconds``, the shards filled so far are saved there (FAISS files + a JSON
        progress record, each atomically); a rerun with the same inputs continues after the
        last saved embeddings part and gives the same index.
        """
        spec = get(index_type)
        emb = embeddings if isinstance(embeddings, Embeddings) else Embeddings.open(embeddings)
        n, dim = len(emb), emb.dim
        if num_shards < 1 or num_shards > max(n, 1):
            raise DenseprError(f"--num-shards must be between 1 and the {n} vectors")
        p = (params or IndexParams()).resolved(n, dim)
        phi = None
        if spec.l2_transform:  # first pass: the largest squared norm, for DPR's transform
            phi = max(float((np.asarray(v, dtype=np.float64) ** 2).sum(1).max()) for _, v in emb.parts())
        work = _BuildState(Path(work_dir), {"type": index_type, "params": asdict(p), "shards": num_shards, "count": n, "dim": dim,
                           "embeddings": emb.manifest.get("files", {})}) if work_dir is not None else None  # fmt: skip
        empty = work.load_trained() if work is not None else None
        if empty is None:
            empty = spec.make(dim, p)
            if spec.trained:
                sample = _train_sample(emb, spec.train_size(p), p.seed)
                if spec.ivf and len(sample) < (p.nlist or 1):
                    raise DenseprError(f"{len(sample)} vectors cannot train {p.nlist} IVF cells; lower --nlist")
                empty.train(sample)
            if work is not None:
                work.save_trained(empty)
        bounds = np.linspace(0, n, num_shards + 1).astype(np.int64)
        shards = [_Shard(faiss.clone_index(empty) if num_shards > 1 else empty, int(bounds[i])) for i in range(num_shards)]
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
        return cls(shards, IdLines(b"".join(id_bytes)), manifest)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write each shard, ``ids.txt`` and, last, the manifest beside ``directory``, then swap
        them in (``fileio.atomic_dir``: a failed or disk-full save leaves the previous index as
        it was; a directory holding anything else than a dense index is refused)."""
        with atomic_dir(directory, KIND, OWN_FILES) as d:
            entries = []
            for i, s in enumerate(self.shards):
                s.file = "index.faiss" if len(self.shards) == 1 else f"index-{i:05d}.faiss"
                faiss.write_index(s.index, str(d / s.file))
                entries.append({"file": s.file, "start": s.start, "count": int(s.index.ntotal)})
            write_ids(d / "ids.txt", self.ids)
            meta = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "files", "shards")}
            meta = with_relative_path(meta, directory)  # the index finds its encoder after both are moved (index.encoder_ref)
            self.manifest = write_manifest(d, KIND, [e["file"] for e in entries] + ["ids.txt"], **meta, shards=entries)

    @staticmethod
    def check_output(directory: str | os.PathLike[str]) -> None:
        """Refuse, before building, an output directory :meth:`save` would refuse."""
        check_target(directory, KIND, OWN_FILES)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        corpus: Corpus | None = None,
        mmap: bool = False,
        vectors: str | os.PathLike[str] | None = None,
        **search: int,
    ) -> DenseIndex:
        """Load an index (all shards); checks the files (sizes, checksums: ``fileio.read_manifest``),
        each shard's vector count and dimension and the ids count, and binds rows to ``corpus`` when given.

        Args:
            mmap: map shard files instead of reading them (flat, sq and IVF types).
            vectors: embeddings directory for re-ranking (default: the one recorded at build).
            search: override search parameters (``ef_search``, ``nprobe``, ``rerank``).
        """
        d = Path(directory)
        manifest = read_manifest(d, KIND)
        entries = manifest.get("shards") or [{"file": "index.faiss", "start": 0, "count": manifest["count"]}]
        if search:
            manifest["params"] = {**manifest.get("params", {}), **search}
        shards = []
        for e in entries:
            shards.append(_Shard(_read_faiss(d / e["file"], manifest, mmap, int(e["count"])), int(e["start"]), e["file"]))
        ids = open_ids(d / "ids.txt")
        if len(ids) != int(manifest["count"]):
            raise MismatchError(f"{d / 'ids.txt'}: {len(ids)} ids, the manifest says {manifest['count']}; rebuild the index")
        out = cls(shards, ids, manifest)
        if corpus is not None:
            out.bind(corpus)
        if out.params.rerank > 1:
            out.attach_vectors(vectors or manifest.get("embeddings") or "")
        return out

    def set_search(self, **search: int) -> None:
        """Change search parameters (``ef_search``, ``nprobe``, ``rerank``) of a loaded index."""
        unknown = set(search) - {"ef_search", "nprobe", "rerank"}
        if unknown:
            raise DenseprError(f"not search parameters: {', '.join(sorted(unknown))}")
        self.manifest["params"] = {**self.manifest.get("params", {}), **search}
        if self.params.rerank > 1 and self._exact is None:
            self.attach_vectors(self.manifest.get("embeddings") or "")

    def attach_vectors(self, embeddings: str | os.PathLike[str]) -> None:
        """Memory-map the exact passage vectors this index was built from, for re-ranking.

        Compressed indexes (``ivf-pq``, ``opq-pq``) keep only codes in RAM; with ``rerank`` R > 1,
        a search takes the k x R best by the codes and re-scores them with the exact vectors read
        from disk (k x R rows per query), so RAM stays at the codes' size.

        Raises:
            MismatchError: the directory holds other vectors (count, dimension or encoder differ).
        """
        from densepr.index.embeddings import Embeddings

        if not embeddings or not (Path(embeddings) / MANIFEST).is_file():
            raise DenseprError(f"re-ranking needs the embeddings directory this index was built from; {str(embeddings)!r} "
                               "is not one (pass vectors=... / --vectors, or rebuild with rerank 0)")  # fmt: skip
        emb = Embeddings.open(embeddings)
        mine, theirs = self.manifest.get("encoder", {}).get("weights_id"), emb.manifest.get("encoder", {}).get("weights_id")
        if len(emb) != len(self) or emb.dim != self.dim or mine != theirs:
            raise MismatchError(f"{embeddings}: {len(emb)} x {emb.dim} vectors (encoder {theirs}) do not match the index's "
                                f"{len(self)} x {self.dim} (encoder {mine})")  # fmt: skip
        self._exact = [vecs for _, vecs in emb.parts()]

    def _rescore(self, q: np.ndarray, ix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidate rows, top ``k`` of them."""
        valid = ix >= 0
        flat = np.unique(ix[valid])
        vecs = _take_rows(self._exact, flat + self._offset)
        pos = np.searchsorted(flat, np.where(valid, ix, flat[0] if len(flat) else 0))
        sc = np.empty(ix.shape, dtype=np.float32)
        for a in range(0, len(q), 32):  # [32, candidates, dim] at a time
            sc[a : a + 32] = np.einsum("qd,qcd->qc", q[a : a + 32], vecs[pos[a : a + 32]])
        sc[~valid] = -np.inf
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sc, order, 1), np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(ix, order, 1), -1)

    def shard(self, i: int) -> DenseIndex:
        """Shard ``i`` alone (``--num-shards``), sharing its FAISS index: what one searcher of a
        sharded deployment searches (``densepr serve --ray``). Its searches return corpus rows once
        the whole index was bound (else the whole index's rows); merging the shards' top-k lists
        (:func:`densepr.ranking.merge_shards`) is exact for exact types, approximate per shard
        for the others (as searching the shards in one process is)."""
        if not 0 <= i < len(self.shards):
            raise DenseprError(f"dense shard {i}: this index has {len(self.shards)} shard(s) (build more with `densepr index dense --num-shards N`)")
        s = self.shards[i]
        lo, hi = s.start, s.start + s.index.ntotal
        view = DenseIndex([_Shard(s.index, 0, s.file)], self.ids[lo:hi], self.manifest, _exact=self._exact, _offset=lo + self._offset)
        view._rows = self._rows[lo:hi] if self._rows is not None else np.arange(lo, hi, dtype=np.int64)
        return view

    def bind(self, corpus: Corpus) -> None:
        """Map index rows to rows of ``corpus`` so searches return corpus rows."""
        check_corpus(self.manifest, corpus, "dense index")
        fp = self.manifest.get("corpus") or {}
        if fp.get("count") == len(self) and fp.get("ids_sha256") == self.ids.sha256():
            # check_corpus showed ``corpus`` has the ids the index was built over; these are they, in its row order:
            # index row i is corpus row i, with no mapping held and no id decoded (one pass over the ids' bytes)
            self._rows = None
            return
        try:
            self._rows = corpus.rows(self.ids)
        except KeyError as e:
            raise MismatchError(f"dense index passage id {e.args[0]!r} is not in the corpus") from None

    # -- searching -----------------------------------------------------------------------------
    def use_torch(self, device: str = "cuda", dtype: str = "float16") -> None:
        """Search the exact index with a torch matrix product + top-k on ``device`` (the GPU path
        when FAISS has no GPU build); vectors are copied there in ``dtype``."""
        import torch

        if not self.spec.exact:
            raise DenseprError(f"the torch search path is exact search; index type {self.index_type} is not")
        vecs = np.concatenate([s.index.reconstruct_n(0, s.index.ntotal) for s in self.shards])
        self._torch = torch.as_tensor(vecs).to(device=device, dtype=getattr(torch, dtype))

    def to_device(self, device: str) -> str:
        """Search on a GPU: FAISS's GPU index when this FAISS has one, else (exact types) the torch
        matmul + top-k path in float16. Returns which path was taken ("cpu" when none applies)."""
        if not str(device).startswith("cuda"):
            return "cpu"
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and not self.spec.l2_transform:
            gpu = int(str(device).split(":")[1]) if ":" in str(device) else 0
            self._gpu_res = faiss.StandardGpuResources()
            for s in self.shards:
                s.index = faiss.index_cpu_to_gpu(self._gpu_res, gpu, s.index)
            return "faiss-gpu"
        if self.spec.exact:
            self.use_torch(device, "float16")
            return "torch"
        return "cpu"

    def search(self, queries: np.ndarray, k: int = 100, batch_size: int = 1024) -> SearchResult:
        """Top-k by inner product for ``[n, dim]`` query vectors; rows are corpus rows once bound.

        Raises:
            MismatchError: the queries' dimension differs from the index's (wrong encoder).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise MismatchError(
                f"query vectors have dimension {queries.shape[-1]}, the index {self.dim}: "
                "the question encoder does not match the passage encoder this index was built with"
            )
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        k_eff = min(k, len(self))
        for start in range(0, len(queries), batch_size):
            q = queries[start : start + batch_size]
            if self._torch is not None:
                sc, ix = self._search_torch(q, k_eff)
            elif self.spec.float32_storage and len(q) >= 16 and len(self) * self.dim <= TORCH_CPU_MAX:
                sc, ix = self._search_torch(q, k_eff, self._flat_views())
            elif self._exact is not None and self.params.rerank > 1:
                sc, ix = self._rescore(q, self._search_shards(q, min(k_eff * self.params.rerank, len(self)))[1], k_eff)
            else:
                sc, ix = self._search_shards(q, k_eff)
            rows[start : start + len(q), :k_eff] = ix
            scores[start : start + len(q), :k_eff] = sc
        if self._rows is not None:
            valid = rows >= 0
            rows[valid] = self._rows[rows[valid]]
        return SearchResult(rows, scores)

    def _search_shards(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        spec = self.spec
        qq = np.hstack([q, np.zeros((len(q), 1), dtype=np.float32)]) if spec.l2_transform else q
        all_sc, all_ix = [], []
        for s in self.shards:
            spec.set_search(s.index, p, k)
            sc, ix = s.index.search(qq, min(k, s.index.ntotal))
            if spec.l2_transform:  # |q - x'|^2 = |q|^2 + phi - 2 q.x  =>  q.x back from L2
                sc = np.where(ix >= 0, ((q.astype(np.float64) ** 2).sum(1, keepdims=True) + self.manifest["phi"] - sc) / 2, -np.inf)
            all_sc.append(np.where(ix >= 0, sc, -np.inf))
            all_ix.append(np.where(ix >= 0, ix + s.start, -1))
        if len(self.shards) == 1:
            return all_sc[0], all_ix[0]
        # Merge the shards' lists: the k best overall, as one index over all rows would rank them.
        sc, ix = np.hstack(all_sc), np.hstack(all_ix)
        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sc, order, 1), np.take_along_axis(ix, order, 1)

    def _flat_views(self) -> list:
        """The vectors of each flat shard as torch tensors sharing FAISS's memory (no copy)."""
        import torch

        views = []
        for s in self.shards:
            n = s.index.ntotal
            arr = faiss.rev_swig_ptr(faiss.downcast_index(s.index).get_xb(), n * self.dim).reshape(n, self.dim)
            views.append(torch.from_numpy(arr))
        return views

    def _search_torch(self, q: np.ndarray, k: int, views: list | None = None, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k on torch tensors (:func:`torch_topk`): the GPU copy, or on a CPU ``views`` of
        FAISS's own storage (the batched path for small flat indexes, see ``TORCH_CPU_MAX``)."""
        return torch_topk(q, k, views if views is not None else [self._torch], block)


def torch_topk(q: np.ndarray, k: int, parts: list, block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over ``parts`` (torch ``[n_i, dim]`` tensors, in row order) as one matrix
    product per block of passages, keeping a running top-k, so the [queries x passages] score matrix
    never exists whole. Returns ``(scores, rows)`` as numpy arrays."""
    import torch

    dev, dtype = parts[0].device, parts[0].dtype
    qt = torch.as_tensor(q).to(device=dev, dtype=dtype)
    best_sc = torch.full((len(q), 0), -torch.inf, device=dev)
    best_ix = torch.zeros((len(q), 0), dtype=torch.long, device=dev)
    offset = 0
    for vecs in parts:  # shards in row order
        for start in range(0, len(vecs), block):
            sc = (qt @ vecs[start : start + block].T).float()
            sc, ix = torch.topk(sc, min(k, sc.shape[1]), dim=1)
            best_sc, order = torch.topk(torch.cat([best_sc, sc], 1), min(k, best_sc.shape[1] + sc.shape[1]), dim=1)
            best_ix = torch.gather(torch.cat([best_ix, ix + offset + start], 1), 1, order)
        offset += len(vecs)
    return best_sc.cpu().numpy(), best_ix.cpu().numpy()


def _read_faiss(path: Path, manifest: dict, mmap: bool, count: int | None = None) -> faiss.Index:
    spec, flags = get(manifest.get("type", "flat")), 0
    if mmap and spec.mmap:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise DenseprError(f"{path}: FAISS cannot read it ({str(e).splitlines()[-1]}); rebuild the index") from None
    expected = spec.stored_dim(manifest["dim"])
    if index.d != expected:
        raise MismatchError(f"{path}: index dimension {index.d} differs from the manifest's {manifest['dim']}")
    if count is not None and index.ntotal != count:
        raise MismatchError(f"{path}: holds {index.ntotal} vectors, the manifest says {count}; file altered or corrupt; rebuild the index")
    if index.metric_type != spec.metric:
        raise MismatchError(f"{path}: FAISS metric {index.metric_type}, expected {spec.metric} for a {spec.name} index; rebuild the index")
    return index


def check_index(directory: str | os.PathLike[str], manifest: dict) -> None:
    """What :meth:`DenseIndex.load` checks beyond the files, without keeping the index
    (``densepr verify``): each shard's count, dimension and metric, the ids count."""
    DenseIndex.load(directory, mmap=True, rerank=0)


# -- planning ----------------------------------------------------------------------------------
COSTS_RESOURCE = "index-costs.json"


def bytes_per_vector(index_type: str, dim: int, hnsw_m: int = 32, pq_m: int | None = None) -> float:
    """Bytes each passage costs in an index of ``index_type`` (vectors, codes, graph links, ids)."""
    return get(index_type).bytes_per_vector(dim, IndexParams(hnsw_m=hnsw_m, pq_m=pq_m or max(1, dim // 4)))


def plan(num_passages: int, dim: int, hnsw_m: int = 32, pq_m: int | None = None) -> list[dict]:
    """Per index type: bytes per passage, total RAM and disk, and the accuracy cost measured by
    ``benchmarks/retrieval/index_bench.py`` (packaged as ``resources/index-costs.json``)."""
    import json
    from importlib import resources

    try:
        costs = json.loads(resources.files("densepr").joinpath("resources", COSTS_RESOURCE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        costs = {}
    p = IndexParams(hnsw_m=hnsw_m, pq_m=pq_m).resolved(num_passages, dim)
    rows = []
    for t, spec in INDEX_TYPES.items():
        per = spec.bytes_per_vector(dim, p)
        total = per * num_passages + spec.fixed_bytes(dim, p)
        rows.append({"type": t, "bytes_per_passage": per, "ram_bytes": total, "disk_bytes": total, "measured": costs.get(t)})
        if spec.pq:  # codes in RAM; float32 vectors on disk, read k x R rows per query
            rows.append({"type": f"{t}+rerank", "bytes_per_passage": per, "ram_bytes": total,
                         "disk_bytes": total + 4 * dim * num_passages, "measured": costs.get(f"{t}+rerank")})  # fmt: skip
    return rows


# DPR's own figure (Section 4.2 / Appendix): 21M passages encoded in 8.8 hours on 8 GPUs, BERT-base.
PAPER_ENCODE_RATE = 21_015_324 / (8.8 * 3600 * 8)  # passages per second per GPU (~83)


def cluster_plan(rows: list[dict], num_passages: int, nodes: int, node_ram_gib: float, gpus: int,
                 rate: float = PAPER_ENCODE_RATE, headroom: float = 0.7) -> list[dict]:  # fmt: skip
    """Spread each index type of :func:`plan` over ``nodes`` machines of ``node_ram_gib``: the shards it
    needs (each within ``headroom`` of a node's RAM; the rest is for the process, the corpus text, the
    OS), the replicas of the whole index the nodes then hold, RAM per shard, and the encoding hours at
    ``rate`` passages/s per GPU on ``gpus`` GPUs. Merged top-k over shards is exact for flat shards
    only: per-shard HNSW/IVF/PQ results differ from one big index's (approximate either way)."""
    budget = node_ram_gib * 2**30 * headroom
    out = []
    for r in rows:
        shards = max(1, -(-int(r["ram_bytes"]) // int(budget)))
        fits = shards <= nodes
        out.append({**r, "shards": shards, "replicas": nodes // shards if fits else 0, "ram_per_shard": r["ram_bytes"] / shards,
                    "fits": fits, "exact_merge": shards == 1 or get(r["type"].partition("+")[0]).exact, "encode_hours": num_passages / (rate * max(gpus, 1)) / 3600})  # fmt: skip
    return out

