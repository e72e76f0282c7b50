"""FAISS index types: each is one entry of :data:`INDEX_TYPES`, and nothing else names it.

Everything :class:`densepr.index.dense.DenseIndex`, the CLI (``index dense --type``, ``index
plan``) and the benchmarks need to know about a type is a field of its :class:`IndexType`:
how to make the empty FAISS index, which search parameters apply, whether it is exact (exact
shard merge, the torch/GPU exact path), needs training, is an inverted file, stores product-
quantised codes (so re-ranking from disk helps), or uses DPR's inner-product-to-L2 transform.
Adding a type = one entry here + its case in ``tests/index/test_index.py``.

All types score by inner product (DPR's sim = E_Q(q) . E_P(p)). faiss is imported only when
an index is made, so listing the types (CLI help) stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from densepr.errors import DenseprError


@dataclass
class IndexParams:
    """Build and search parameters (recorded in the manifest; search ones can be changed at load)."""

    hnsw_m: int = 32  # graph neighbours per node
    ef_construction: int = 200
    ef_search: int = 256
    nlist: int | None = None  # IVF cells; default ~ 4 sqrt(N)
    nprobe: int = 64
    pq_m: int | None = None  # PQ bytes per vector; default dim / 4
    rerank: int = 0  # >1: fetch k x rerank candidates, re-score them exactly from the on-disk vectors
    train_size: int = 100_000  # vectors sampled for k-means / quantiser training
    seed: int = 1234

    def resolved(self, n: int, dim: int) -> IndexParams:
        out = IndexParams(**asdict(self))
        if out.nlist is None:
            out.nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))), n // 39 or 1))
        if out.pq_m is None:
            out.pq_m = max(1, dim // 4)
        if dim % out.pq_m:
            raise DenseprError(f"pq_m={out.pq_m} must divide the dimension {dim}")
        return out


def _faiss():
    import faiss

    return faiss


@dataclass(frozen=True)
class IndexType:
    """One FAISS index type and everything that differs between types."""

    name: str
    description: str
    make: Callable[[int, IndexParams], object]  # (dim, resolved params) -> an empty FAISS index
    bytes_per_vector: Callable[[int, IndexParams], float]  # vectors, codes, graph links, ids
    exact: bool = False  # exact search: shards merge exactly; the torch / GPU exact path applies
    float32_storage: bool = False  # IndexFlatIP: FAISS's own float32 array can be viewed without a copy
    trained: bool = False  # a quantiser is trained on a sample before adding
    ivf: bool = False  # inverted file: nlist cells, nprobe visited
    pq: bool = False  # product-quantised codes: --rerank re-scores from the float32 vectors on disk
    rotation: bool = False  # an OPQ rotation matrix (dim x dim floats) is stored too
    l2_transform: bool = False  # DPR's transform: an extra coordinate, L2 metric, no mmap, no FAISS GPU

    def stored_dim(self, dim: int) -> int:
        return dim + 1 if self.l2_transform else dim

    @property
    def metric(self) -> int:
        faiss = _faiss()
        return faiss.METRIC_L2 if self.l2_transform else faiss.METRIC_INNER_PRODUCT

    @property
    def mmap(self) -> bool:
        """Whether FAISS can memory-map the file (HNSW graphs cannot)."""
        return not self.l2_transform

    def train_size(self, p: IndexParams) -> int:
        """Vectors sampled to train: k-means wants ~39 per cell."""
        return max(p.train_size, 39 * (p.nlist or 1)) if self.ivf else p.train_size

    def set_search(self, index, p: IndexParams, k: int) -> None:
        """Apply the search-time parameters to a loaded index (HNSW's efSearch, IVF's nprobe)."""
        faiss = _faiss()
        if self.l2_transform:
            faiss.downcast_index(index).hnsw.efSearch = max(p.ef_search, k)
        elif self.ivf:
            faiss.extract_index_ivf(index).nprobe = p.nprobe

    def fixed_bytes(self, dim: int, p: IndexParams) -> float:
        """Memory not per passage: IVF centroids, the OPQ rotation."""
        return (4 * dim * (p.nlist or 1) if self.ivf else 0.0) + (4 * dim * dim if self.rotation else 0.0)


def _hnsw(dim: int, p: IndexParams):
    index = _faiss().IndexHNSWFlat(dim + 1, p.hnsw_m)  # L2 over transformed vectors (DPR's)
    index.hnsw.efConstruction = p.ef_construction
    return index


def _sq(qtype: str) -> Callable[[int, IndexParams], object]:
    """A scalar-quantised flat index scored by inner product."""
    return lambda dim, p: _faiss().IndexScalarQuantizer(dim, getattr(_faiss().ScalarQuantizer, qtype), _faiss().METRIC_INNER_PRODUCT)


def _ip(spec: Callable[[IndexParams], str]) -> Callable[[int, IndexParams], object]:
    """A factory-string type scored by inner product."""
    return lambda dim, p: _faiss().index_factory(dim, spec(p), _faiss().METRIC_INNER_PRODUCT)


def _pq(spec: Callable[[IndexParams], str]) -> Callable[[int, IndexParams], object]:
    """A product-quantised IVF type scored by inner product, without FAISS's polysemous training: a
    codebook permutation for Hamming-distance filtering, which densepr never searches with, that took
    76 of a 20k-vector PQ96 build's 80 s of training (the codes' distances, so rankings, are the same)."""

    def make(dim: int, p: IndexParams) -> object:
        index = _ip(spec)(dim, p)
        _faiss().downcast_index(_faiss().extract_index_ivf(index)).do_polysemous_training = False
        return index

    return make


INDEX_TYPES: dict[str, IndexType] = {t.name: t for t in (
    IndexType("flat", "exact, float32 vectors (IndexFlatIP)", lambda dim, p: _faiss().IndexFlatIP(dim),
              lambda dim, p: 4 * dim, exact=True, float32_storage=True),
    IndexType("flat-fp16", "exact search over float16-stored vectors (IndexScalarQuantizer fp16)", _sq("QT_fp16"),
              lambda dim, p: 2 * dim, exact=True),
    IndexType("flat-sq8", "8-bit scalar-quantised vectors (trained on a sample for each dimension's range)", _sq("QT_8bit"),
              lambda dim, p: dim, trained=True),
    # float32 vector (+1 coordinate for the transform), 2M level-0 links of 4 bytes, upper levels ~1/M of that
    IndexType("hnsw", "HNSW graph over vectors made L2-searchable by DPR's transform: each passage gets an extra "
              "coordinate sqrt(phi - |p|^2) (phi = the largest squared norm) and each question a 0, so the L2 order "
              "equals the inner-product order", _hnsw, lambda dim, p: 4 * (dim + 1) + 8 * p.hnsw_m * (1 + 1 / p.hnsw_m) + 4,
              l2_transform=True),
    IndexType("ivf-flat", "inverted file (k-means cells, nprobe visited), float32 vectors", _ip(lambda p: f"IVF{p.nlist},Flat"),
              lambda dim, p: 4 * dim + 8, trained=True, ivf=True),  # + the 64-bit id stored in its inverted list
    IndexType("ivf-pq", "inverted file + product quantisation (pq_m bytes per vector)", _pq(lambda p: f"IVF{p.nlist},PQ{p.pq_m}"),
              lambda dim, p: p.pq_m + 8, trained=True, ivf=True, pq=True),
    IndexType("opq-pq", "the same after an OPQ rotation", _pq(lambda p: f"OPQ{p.pq_m},IVF{p.nlist},PQ{p.pq_m}"),
              lambda dim, p: p.pq_m + 8, trained=True, ivf=True, pq=True, rotation=True),
)}  # fmt: skip


def get(name: str) -> IndexType:
    """The type called ``name``, or a :class:`DenseprError` listing the types."""
    try:
        return INDEX_TYPES[name]
    except KeyError:
        raise DenseprError(f"unknown index type {name!r}; available: {', '.join(INDEX_TYPES)}") from None
