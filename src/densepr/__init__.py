"""densepr: Dense Passage Retrieval (Karpukhin et al., EMNLP 2020) end to end.

The Python API mirrors the pipeline stages; heavy modules (torch, faiss) load on first use::

    from densepr import Retriever
    r = Retriever.load("runs/embedded")          # passages.tsv + bm25/ + dense/
    for hit in r.search("who got the first nobel prize in physics", k=5):
        print(hit.score, hit.title)
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Retriever": "retrieve.retriever", "Hit": "ranking", "Mode": "retrieve.modes",
    "fuse_hybrid": "retrieve.fusion", "fuse_rrf": "retrieve.fusion",
    "BM25Index": "retrieve.bm25", "DenseIndex": "index.dense", "SearchResult": "ranking",
    "Encoder": "models.encoder", "BiEncoder": "models.encoder", "EncoderConfig": "models.encoder",
    "encode_corpus": "index.embeddings", "has_answer": "evaluate.answers", "AnswerMatcher": "evaluate.answers",
    "accuracy_report": "evaluate.topk", "exact_match": "evaluate.qa", "f1_score": "evaluate.qa",
    "DenseprError": "errors", "Reader": "models.reader",
    "Pipeline": "pipeline", "Answer": "pipeline", "evaluate_qa": "pipeline",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'densepr' has no attribute {name!r}")


__all__ = sorted(_EXPORTS) + ["__version__"]
