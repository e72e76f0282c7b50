"""The index directory: the one home of its layout (what ``densepr reproduce`` and the stage commands write)::

    passages.tsv      # the corpus, DPR TSV layout (may be removed once store/ is built: it is then read alone)
    store/            # passages.tsv as a memory-mapped store (densepr.data.store), made on load
    bm25/             # BM25 index (densepr.retrieve.bm25)
    dense/            # FAISS index (densepr.index.dense); its manifest names the question encoder
    hybrid.json       # optional: the lambda tuned on a dev set (`densepr tune-hybrid`)
    reader/           # optional: a reader trained for it (`densepr reproduce --profile dpr`)

:class:`IndexDir` names these paths and reads what can be known without loading an index (the
modes, lambda, the question encoder, the reader); :meth:`densepr.retrieve.retriever.Retriever.load`
loads it, the Ray router reads it, the CLI, reproduce and the QA pipeline write and read it.
"""

from __future__ import annotations

import os
from pathlib import Path

from densepr.data.passages import PASSAGES_FILE, Corpus, load_corpus
from densepr.data.store import STORE_DIR, store_beside
from densepr.errors import DenseprError
from densepr.fileio.atomic import read_json, write_json
from densepr.fileio.manifest import MANIFEST
from densepr.retrieve.fusion import PAPER_LAMBDA
from densepr.retrieve.modes import Mode, available_modes, default_mode

READER_DIR = "reader"


class _Path:
    """An entry of the layout: ``IndexDir(d).bm25`` is ``d/bm25`` (read-only)."""

    def __init__(self, *parts: str, doc: str | None = None) -> None:
        self.parts, self.__doc__ = parts, doc or f"``<index>/{'/'.join(parts)}``."

    def __get__(self, obj: IndexDir | None, owner: type) -> Path:
        if obj is None:
            return self  # type: ignore[return-value]  # the descriptor itself, on the class
        return obj.path.joinpath(*self.parts)


class IndexDir:
    """Paths and light facts of one index directory (see module docstring); nothing is loaded."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"IndexDir({str(self.path)!r})"

    # -- the layout: one line a path ------------------------------------------------------------
    passages = _Path(PASSAGES_FILE)
    store = _Path(STORE_DIR)
    bm25 = _Path("bm25")
    dense = _Path("dense")
    dense_manifest_path = _Path("dense", MANIFEST)
    hybrid = _Path("hybrid.json", doc="The tuned hybrid weight (``{\"lambda\": ..., ...}``).")
    reader_dir = _Path(READER_DIR)

    # -- what it holds -------------------------------------------------------------------------
    def engines(self) -> set[str]:
        """The indexes present: ``"bm25"``, ``"dense"``."""
        return {n for n, p in (("bm25", self.bm25), ("dense", self.dense)) if p.is_dir()}

    def holds_passages(self) -> bool:
        """Whether the passages are here: ``passages.tsv``, or a built ``store/`` alone (the file removed since)."""
        return self.passages.is_file() or (not self.passages.exists() and (self.store / MANIFEST).is_file())

    def check(self) -> IndexDir:
        """This directory, or a clear error when it is not a searchable index directory."""
        if not self.holds_passages():
            raise DenseprError(f"{self.path}: not an index directory (no {PASSAGES_FILE}, no {STORE_DIR}/); build one with `densepr reproduce` or the stage commands")
        if not self.engines():
            raise DenseprError(f"{self.path}: holds neither bm25/ nor dense/; nothing to search")
        return self

    @property
    def modes(self) -> list[str]:
        """The modes its indexes can run."""
        return available_modes(self.engines())

    @property
    def default_mode(self) -> Mode:
        return default_mode(self.modes)

    def hybrid_lambda(self) -> float:
        """The tuned weight of BM25 in hybrid, else the paper's."""
        return float(read_json(self.hybrid)["lambda"]) if self.hybrid.is_file() else PAPER_LAMBDA

    def write_hybrid(self, lam: float, grid: dict[str, float], tuned_on: list[str], questions_per_set: int | None, metric: str) -> None:
        """Store the tuned weight (what :meth:`hybrid_lambda` reads) with how it was chosen: the sets,
        questions per set, the metric and its value at each lambda tried."""
        write_json(self.hybrid, {"lambda": lam, "tuned_on": tuned_on, "questions_per_set": questions_per_set, "metric": metric, "grid": grid})

    def dense_manifest(self) -> dict:
        """The dense index's manifest (``{}`` without a dense index): its type, shards, question encoder."""
        return read_json(self.dense_manifest_path) if self.dense_manifest_path.is_file() else {}

    def reader(self) -> Path | None:
        """The reader stored beside the index, or None."""
        from densepr.models.reader import CONFIG_NAME  # here: the reader module imports torch

        return self.reader_dir if (self.reader_dir / CONFIG_NAME).is_file() else None


def open_corpus(d: str | os.PathLike[str] | IndexDir) -> Corpus:
    """An index directory's passages: its ``store/`` when it can be used (:func:`~densepr.data.store.store_beside`:
    built there first when missing or stale and the directory is writable, read alone when ``passages.tsv`` was
    removed after it was built: 13 GB saved at DPR's 21M passages); else ``passages.tsv`` parsed into memory."""
    tsv = (d if isinstance(d, IndexDir) else IndexDir(d)).passages
    return store_beside(tsv) or load_corpus(tsv)


def verify_artefacts(directory: str | os.PathLike[str], quick: bool = False) -> list[tuple[Path, str, str | None]]:
    """Check every artefact under ``directory`` (``densepr verify``): ``[(directory, kind, None or the problem), ...]``.

    Files against their manifest (every byte's sha256, or with ``quick`` the checks done on load: sizes
    and sampled sha256), BM25 arrays' ranges, dense index shards, passage stores, and each index's corpus
    against the ``passages.tsv`` of the index directory it is in.
    """
    from densepr.data.passages import check_corpus
    from densepr.data.store import KIND as STORE_KIND
    from densepr.data.store import check_store
    from densepr.fileio.manifest import verify_tree
    from densepr.index.dense import KIND as DENSE_KIND  # here: the dense index module imports torch
    from densepr.index.dense import check_index
    from densepr.retrieve.bm25_files import KIND as BM25_KIND
    from densepr.retrieve.bm25_files import check_arrays

    corpora: dict[Path, object] = {}

    def corpus_beside(d: Path, manifest: dict) -> None:  # an index directory: passages.tsv, bm25/, dense/
        index = IndexDir(d.parent)
        if manifest.get("corpus") and index.holds_passages():
            if index.path not in corpora:
                corpora[index.path] = open_corpus(index)  # its store (passages.tsv alone if none can be made)
            check_corpus(manifest, corpora[index.path], f"{manifest['kind']} {d}")  # type: ignore[arg-type]

    def structure(d: Path, manifest: dict) -> None:
        if manifest["kind"] == BM25_KIND:
            check_arrays(d, manifest, full=not quick)
        elif manifest["kind"] == DENSE_KIND:
            check_index(d, manifest)
        elif manifest["kind"] == STORE_KIND:
            check_store(d, manifest, full=not quick)
        corpus_beside(d, manifest)

    kinds = (BM25_KIND, DENSE_KIND, "embeddings", STORE_KIND)
    return verify_tree(directory, "sample" if quick else "sha256", dict.fromkeys(kinds, structure))
