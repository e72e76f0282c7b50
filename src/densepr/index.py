"""The dense index: passage vectors in FAISS, searched by inner product (DPR's sim = E_Q(q) . E_P(p)).

Layout of a dense index directory::

    index.faiss      # FAISS's own file format (never pickle)
    ids.txt          # passage id of each index row, one per line
    manifest.json    # index type, metric, dim, count, both encoders, corpus; sizes and sha256

``flat`` is exact search (``IndexFlatIP``); approximate and compressed types come with the
scale-out work and share this layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from .data.passages import Corpus, check_corpus
from .embeddings import Embeddings
from .errors import DenseprError, MismatchError
from .fileio import atomic_path, read_ids, read_manifest, write_ids, write_manifest
from .progress import progress_bar
from .results import SearchResult

KIND = "dense-index"
INDEX_TYPES = ("flat",)


class DenseIndex:
    """A FAISS inner-product index over passage vectors, with the ids of its rows.

    Args:
        index: the FAISS index.
        ids: passage id of each row.
        manifest: metadata (encoders, corpus, type).
    """

    def __init__(self, index: faiss.Index, ids: list[str], manifest: dict) -> None:
        if index.ntotal != len(ids):
            raise MismatchError(f"index holds {index.ntotal} vectors but {len(ids)} ids")
        self.index, self.ids, self.manifest = index, ids, manifest
        self._rows: np.ndarray | None = None  # index row -> corpus row, once bound to a corpus

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, embeddings: Embeddings | str | os.PathLike[str], index_type: str = "flat", show_progress: bool = False) -> DenseIndex:
        """Build an exact inner-product index from an embeddings directory, shard by shard."""
        if index_type not in INDEX_TYPES:
            raise DenseprError(f"unknown index type {index_type!r}; available: {', '.join(INDEX_TYPES)}")
        emb = embeddings if isinstance(embeddings, Embeddings) else Embeddings.open(embeddings)
        index = faiss.IndexFlatIP(emb.dim)
        ids: list[str] = []
        with progress_bar(len(emb), "index passages", show_progress, unit="vec") as advance:
            for shard_ids, vecs in emb.shards():
                index.add(np.ascontiguousarray(vecs, dtype=np.float32))
                ids += shard_ids
                advance(len(shard_ids))
        meta = {k: emb.manifest[k] for k in ("encoder", "question_encoder", "corpus") if k in emb.manifest}
        return cls(index, ids, {"type": index_type, "metric": "inner_product", "dim": emb.dim, "count": len(ids), **meta})

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``index.faiss``, ``ids.txt`` and the manifest, each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "manifest.json").unlink(missing_ok=True)
        with atomic_path(d / "index.faiss") as tmp:
            faiss.write_index(self.index, tmp)
        write_ids(d / "ids.txt", self.ids)
        meta = {k: v for k, v in self.manifest.items() if k not in ("kind", "format_version", "files")}
        self.manifest = write_manifest(d, KIND, ["index.faiss", "ids.txt"], **meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], corpus: Corpus | None = None) -> DenseIndex:
        """Load an index; checks file sizes, and binds row numbers to ``corpus`` when given."""
        d = Path(directory)
        manifest = read_manifest(d, KIND)
        try:
            index = faiss.read_index(str(d / "index.faiss"))
        except RuntimeError as e:
            raise DenseprError(f"{d / 'index.faiss'}: FAISS cannot read it ({str(e).splitlines()[-1]}); rebuild the index") from None
        if index.d != manifest["dim"]:
            raise MismatchError(f"{d}: index dimension {index.d} differs from the manifest's {manifest['dim']}")
        out = cls(index, read_ids(d / "ids.txt"), manifest)
        if corpus is not None:
            out.bind(corpus)
        return out

    def bind(self, corpus: Corpus) -> None:
        """Map index rows to rows of ``corpus`` so searches return corpus rows."""
        check_corpus(self.manifest, corpus, "dense index")
        try:
            self._rows = np.fromiter((corpus.row(i) for i in self.ids), dtype=np.int64, count=len(self.ids))
        except KeyError as e:
            raise MismatchError(f"dense index passage id {e.args[0]!r} is not in the corpus") from None

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
            sc, ix = self.index.search(queries[start : start + batch_size], k_eff)
            rows[start : start + len(ix), :k_eff] = ix
            scores[start : start + len(ix), :k_eff] = sc
        if self._rows is not None:
            valid = rows >= 0
            rows[valid] = self._rows[rows[valid]]
        return SearchResult(rows, scores)
