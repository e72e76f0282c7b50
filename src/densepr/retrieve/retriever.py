"""Retrieval: BM25, dense, and their fusions, behind one :class:`Retriever`.

Hybrid (DPR Section 5.1, Pyserini's ``HybridSearcher``): take each retriever's top ``depth``
passages, score every passage of the union as ``dense + lambda * bm25``, where a passage
missing from one list gets that list's lowest score for this question, and re-rank.
Reciprocal-rank fusion scores ``sum 1 / (60 + rank)`` over the lists that hold a passage.

An *index directory* (:class:`~densepr.retrieve.index_dir.IndexDir`: its layout) is what :meth:`Retriever.load` loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from densepr.data.passages import Corpus
from densepr.errors import DenseprError
from densepr.index.dense import DenseIndex
from densepr.index.encoder_ref import load_recorded
from densepr.models.encoder import Encoder, check_question_encoder
from densepr.ranking import Hit, SearchResult
from densepr.retrieve.bm25 import BM25Index
from densepr.retrieve.fusion import PAPER_LAMBDA, HybridCandidates, fuse_hybrid, fuse_rrf
from densepr.retrieve.index_dir import IndexDir, open_corpus  # noqa: F401  (open_corpus: imported from here too)
from densepr.retrieve.modes import Mode, available_modes, default_mode

FUSION_DEPTH = 1000  # passages each engine contributes to a fusion (hybrid, RRF)


def rank_modes(wanted: Sequence[Mode], dense: SearchResult | None, sparse: SearchResult | None, k: int, lam: float,
               also_lambdas: Sequence[float] = ()) -> dict[str, SearchResult]:  # fmt: skip
    """Each wanted mode's top-k from the engines' lists (at least ``FUSION_DEPTH`` deep for a fusion);
    ``also_lambdas``: hybrid rankings at these lambdas too, keyed ``"hybrid-<lambda>"``."""
    out: dict[str, SearchResult] = {}
    for m in wanted:
        if m is Mode.BM25:
            out[m.value] = sparse.top(k)
        elif m is Mode.DENSE:
            out[m.value] = dense.top(k)
        elif m is Mode.HYBRID:
            out[m.value] = fuse_hybrid(dense, sparse, lam, k)
        elif m is Mode.RRF:
            out[m.value] = fuse_rrf([dense, sparse], k)
    if also_lambdas:
        cands = HybridCandidates(dense, sparse)
        out.update({f"hybrid-{lam_}": cands.rank(lam_, k) for lam_ in also_lambdas})
    return out


class Retriever:
    """Question in, scored passages out: BM25, dense, hybrid or RRF over one corpus.

    Args:
        corpus: the passages.
        bm25: a BM25 index over ``corpus`` (needed for ``bm25``, ``hybrid``, ``rrf``).
        dense: a dense index bound to ``corpus`` (needed for ``dense``, ``hybrid``, ``rrf``).
        question_encoder: E_Q matching ``dense``.
        hybrid_lambda: weight of BM25 in ``dense + lambda * bm25``.
        depth: how many passages each retriever contributes to a fusion.
    """

    def __init__(
        self,
        corpus: Corpus,
        bm25: BM25Index | None = None,
        dense: DenseIndex | None = None,
        question_encoder: Encoder | None = None,
        hybrid_lambda: float = PAPER_LAMBDA,
        depth: int = FUSION_DEPTH,
    ) -> None:
        if dense is not None and question_encoder is not None and question_encoder.dim != dense.dim:
            raise DenseprError(
                f"question encoder {question_encoder.name} gives {question_encoder.dim}-d vectors, "
                f"the dense index holds {dense.dim}-d vectors: they were not built as a pair"
            )
        self.corpus, self.bm25, self.dense, self.question_encoder = corpus, bm25, dense, question_encoder
        self.hybrid_lambda, self.depth = hybrid_lambda, depth

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], question_encoder: str | os.PathLike[str] | None = None,
        device: str | None = None, hybrid_lambda: float | None = None, mmap: bool = False, with_encoder: bool = True,
    ) -> Retriever:  # fmt: skip
        """Load an index directory (see module docstring); the parts present decide the modes.
        ``with_encoder=False``: no question encoder (the caller passes query vectors, e.g. a searcher
        behind a separate encoder service)."""
        d = IndexDir(directory).check()
        engines = d.engines()
        corpus = open_corpus(d)
        bm25 = BM25Index.load(d.bm25, corpus=corpus) if "bm25" in engines else None
        dense = encoder = None
        if "dense" in engines:
            dense = DenseIndex.load(d.dense, corpus=corpus, mmap=mmap)
            if with_encoder:
                if question_encoder is not None:  # a torch encoder directory, or an ONNX export (`densepr export-onnx`)
                    from densepr.models.onnx import load_question_encoder

                    encoder = load_question_encoder(question_encoder, device)
                    check_question_encoder(encoder)
                else:  # the one it was built with: by its path relative to the index, then the recorded one
                    encoder = load_recorded(dense.manifest, d.dense, device)
                dense.to_device(str(encoder.device))  # exact search on the GPU when there is one
        if hybrid_lambda is None:
            hybrid_lambda = d.hybrid_lambda()
        return cls(corpus, bm25, dense, encoder, hybrid_lambda)

    @property
    def modes(self) -> list[str]:
        """The modes this retriever can run (those whose indexes it holds)."""
        return available_modes({n for n, i in (("bm25", self.bm25), ("dense", self.dense)) if i is not None})

    @property
    def default_mode(self) -> Mode:
        """Hybrid when both indexes exist, else the one there is (:func:`~densepr.retrieve.modes.default_mode`)."""
        return default_mode(self.modes)

    def describe(self) -> dict:
        """What ``/health`` says of it: passages, modes, the question encoder's name, the dense index type,
        BM25, lambda."""
        enc = self.question_encoder
        return {"passages": len(self.corpus), "modes": self.modes, "question_encoder": enc.name if enc is not None else None,
                "index_type": self.dense.index_type if self.dense is not None else None, "bm25": self.bm25 is not None,
                "hybrid_lambda": self.hybrid_lambda}  # fmt: skip

    def check_mode(self, mode: str | Mode) -> Mode:
        """``mode`` as a :class:`Mode`, or a clear error when unknown or this retriever lacks its indexes."""
        mode = Mode.parse(mode)
        if mode not in self.modes:
            need = " and ".join({"bm25": "a BM25", "dense": "a dense"}[n] for n in mode.needs)
            raise DenseprError(f"mode '{mode}' needs {'both ' if mode.fused else ''}{need} index; this retriever has: {', '.join(self.modes)}")
        return mode

    def encode(self, questions: Sequence[str], batch_size: int = 128, show_progress: bool = False) -> np.ndarray:
        from densepr.progress import progress_bar

        if self.question_encoder is None:
            raise DenseprError("this retriever has no question encoder: pass the questions' vectors")
        with progress_bar(len(questions), "encode questions", show_progress, unit="q") as advance:
            return self.question_encoder.encode_questions(questions, batch_size, progress=advance)

    def retrieve_all(
        self, questions: Sequence[str], k: int = 100, modes: Sequence[str | Mode] = tuple(Mode), show_progress: bool = False,
        also_lambdas: Sequence[float] = (), vectors: np.ndarray | None = None,
    ) -> dict[str, SearchResult]:
        """Top-k for several modes at once; BM25 and dense run once and feed the fusions.
        ``vectors``: the questions' E_Q vectors, when encoded elsewhere.

        ``also_lambdas``: hybrid rankings at these lambdas too, keyed ``"hybrid-<lambda>"``
        (reproduce reports the paper's 1.1 beside the tuned value from the same searches).
        """
        wanted = [self.check_mode(m) for m in modes]
        needed = {n for m in wanted for n in m.needs} | ({"bm25", "dense"} if also_lambdas else set())
        depth = max(k, self.depth) if also_lambdas or any(m.fused for m in wanted) else k
        if "dense" in needed and vectors is None:
            vectors = self.encode(questions, show_progress=show_progress)
        lists = self.lists(questions, depth, needed, vectors, show_progress)
        return rank_modes(wanted, lists.get("dense"), lists.get("bm25"), k, self.hybrid_lambda, also_lambdas)

    def lists(self, questions: Sequence[str], depth: int, engines: set[str] | Sequence[str], vectors: np.ndarray | None = None,
              show_progress: bool = False) -> dict[str, SearchResult]:  # fmt: skip
        """Each engine's own top ``depth`` (``{"bm25": ..., "dense": ...}``): what a fusion reads and
        what one searcher of a sharded deployment returns to be merged."""
        out = {}
        if "bm25" in engines:
            out["bm25"] = self.bm25.search(questions, depth, show_progress=show_progress)
        if "dense" in engines:
            out["dense"] = self.dense.search(vectors if vectors is not None else self.encode(questions), depth)
        return out

    def shard(self, i: int, n: int) -> Retriever:
        """What searcher ``i`` of ``n`` holds (``densepr serve --ray``): BM25's passages slice ``i``
        (scored with the whole corpus's statistics) and the dense index's shard ``i`` (the index must
        have been built with ``--num-shards n``), over the same corpus, without a question encoder."""
        if self.dense is not None and len(self.dense.shards) != n:
            raise DenseprError(f"{n} searcher shards need a dense index of {n} shards; it has {len(self.dense.shards)} "
                               f"(rebuild it with `densepr index dense --num-shards {n}`)")  # fmt: skip
        return Retriever(self.corpus, self.bm25.shard(i, n) if self.bm25 is not None else None,
                         self.dense.shard(i) if self.dense is not None else None, None, self.hybrid_lambda, self.depth)  # fmt: skip

    def retrieve(self, questions: Sequence[str], k: int = 100, mode: str | Mode = Mode.HYBRID, show_progress: bool = False) -> SearchResult:
        """Top-k corpus rows and scores for a batch of questions."""
        return self.retrieve_all(questions, k, [mode], show_progress)[Mode.parse(mode).value]

    def search(self, question: str, k: int = 10, mode: str | None = None) -> list[Hit]:
        """The top-k passages for one question (mode: hybrid when both indexes exist)."""
        if not question or not question.strip():
            raise DenseprError("empty question")
        mode = mode or self.default_mode
        return self.retrieve([question], k, mode).hits(0, self.corpus)


