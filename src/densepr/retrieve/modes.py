"""Retrieval modes: the one list of them, used by the retriever, the CLI, the server, the QA pipeline and reproduce.

Adding a mode = a member here (with the indexes it needs and its label) + its branch in
:meth:`densepr.retrieve.retriever.Retriever.retrieve_all` + a test.
"""

from __future__ import annotations

from enum import Enum

from densepr.errors import DenseprError


class Mode(str, Enum):
    """How passages are retrieved. A ``str``: ``Mode.HYBRID == "hybrid"``, and it keys dicts as the string does."""

    BM25 = "bm25"  # Lucene's BM25 (k1 0.9, b 0.4)
    DENSE = "dense"  # E_Q(q) . E_P(p) over the FAISS index
    HYBRID = "hybrid"  # union of both lists re-ranked by dense + lambda * BM25 (DPR Section 5.1)
    RRF = "rrf"  # reciprocal-rank fusion of both lists

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__  # f"{mode}" prints "hybrid", as the string would

    @property
    def needs(self) -> tuple[str, ...]:
        """The indexes this mode searches (``"bm25"``, ``"dense"``)."""
        return {Mode.BM25: ("bm25",), Mode.DENSE: ("dense",)}.get(self, ("bm25", "dense"))

    @property
    def fused(self) -> bool:
        return len(self.needs) > 1

    @property
    def label(self) -> str:
        """The name in tables and plots."""
        return {Mode.BM25: "BM25", Mode.RRF: "RRF"}.get(self, self.value)

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        """``value`` as a Mode, or a :class:`DenseprError` listing the modes."""
        try:
            return cls(value)
        except ValueError:
            raise DenseprError(f"unknown mode {value!r}; choose from {', '.join(m.value for m in cls)}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def available_modes(engines: set[str] | frozenset[str]) -> list[str]:
    """The modes that indexes ``engines`` (``{"bm25", "dense"}`` or a part) can run, in :class:`Mode` order."""
    return [m.value for m in Mode if all(n in engines for n in m.needs)]


def default_mode(modes: list[str]) -> Mode:
    """The mode used when none is asked for: hybrid when both indexes exist, else the one there is."""
    return Mode.HYBRID if Mode.HYBRID in modes else Mode(modes[0])


# What evaluate-qa reads when it looks for the passage holding the gold answer: best lists first.
GOLD_ORDER = (Mode.HYBRID, Mode.DENSE, Mode.RRF, Mode.BM25)
