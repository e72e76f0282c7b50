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

Modules: this one holds :class:`DenseIndex` (save, load, search, shard views); building is in
:mod:`~densepr.index.dense_build`, torch top-k in :mod:`~densepr.index.dense_search`, sizing and
cluster plans in :mod:`~densepr.index.dense_plan`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from densepr.data.passages import Corpus, check_corpus
from densepr.errors import DenseprError, MismatchError
from densepr.fileio.dirs import atomic_dir, check_target
from densepr.fileio.ids import IdLines, open_ids, write_ids
from densepr.fileio.manifest import MANIFEST, read_manifest, write_manifest
from densepr.index.dense_build import Shard, build_shards
from densepr.index.dense_search import TORCH_CPU_MAX, torch_topk
from densepr.index.embeddings import Embeddings
from densepr.index.encoder_ref import with_relative_path
from densepr.index.rows import RowReader
from densepr.index.types import IndexParams, IndexType, get
from densepr.ranking import SearchResult

KIND = "dense-index"
OWN_FILES = ("*.faiss", "ids.txt")  # what a save writes: an interrupted (pre-atomic) save left only these


@dataclass
class DenseIndex:
    """Passage vectors in one or more FAISS shards, with the ids of their rows.

    Args:
        shards: the FAISS indexes, each holding a contiguous range of rows.
        ids: passage id of each row (all shards): an :class:`~densepr.fileio.IdLines` (a list is
            converted), so no Python object is held per passage.
        manifest: metadata (type, parameters, encoders, corpus, phi for hnsw).
    """

    shards: list[Shard]
    ids: IdLines
    manifest: dict
    # index row -> corpus row once bound; None: the same row (unbound, or bound to a corpus with these ids in this order)
    _rows: np.ndarray | None = field(default=None, repr=False)
    _torch: object | None = field(default=None, repr=False)  # torch tensor of vectors (GPU path)
    _gpu_res: object | None = field(default=None, repr=False)  # FAISS GPU resources, kept alive
    _exact: RowReader | None = field(default=None, repr=False)  # the embedding parts, for re-ranking
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
        return cls([Shard(index, 0)], ids, {"type": index_type, "dim": index.d, "count": len(ids), **manifest})

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
            shards += [Shard(s.index, offset + s.start, s.file) for s in part.shards]
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
        return cls(*build_shards(embeddings, index_type, params, num_shards, show_progress, work_dir, checkpoint_seconds))

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
            shards.append(Shard(_read_faiss(d / e["file"], manifest, mmap, int(e["count"])), int(e["start"]), e["file"]))
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
        self._exact = RowReader([vecs for _, vecs in emb.parts()])

    def _rescore(self, q: np.ndarray, ix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of each query with its candidate rows, top ``k`` of them."""
        valid = ix >= 0
        flat = np.unique(ix[valid])
        vecs = self._exact.take(flat + self._offset)
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
        view = DenseIndex([Shard(s.index, 0, s.file)], self.ids[lo:hi], self.manifest, _exact=self._exact, _offset=lo + self._offset)
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
