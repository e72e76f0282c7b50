"""Shared fixtures: every test makes its own small data; real data and the real model are opt-in markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from densepr.data import Corpus, EmbeddedData, Passage
from tests.support.tiny import PASSAGES, QUESTIONS, make_tiny_bert


@pytest.fixture
def corpus() -> Corpus:
    return Corpus.from_passages(Passage(str(i), t, x) for i, (t, x) in enumerate(PASSAGES, 1))


@pytest.fixture
def passages_tsv(tmp_path: Path, corpus: Corpus) -> Path:
    from densepr.data import write_passages_tsv

    path = tmp_path / "passages.tsv"
    write_passages_tsv(corpus, path)
    return path


@pytest.fixture
def qa_tsv(tmp_path: Path) -> Path:
    path = tmp_path / "qa.tsv"
    path.write_text("".join(f"{q}\t{a!r}\n" for q, a in QUESTIONS), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), pooling="cls")


@pytest.fixture(scope="session")
def embedded() -> EmbeddedData:
    data = EmbeddedData()
    if not data.available:
        pytest.skip(f"embedded benchmark not fetched in {data.root}: run `densepr data fetch`")
    return data


@pytest.fixture
def index_dir(tmp_path: Path, corpus: Corpus, tiny_bert: Path) -> Path:
    """An index directory over the test corpus: passages.tsv, bm25/ and a flat dense/ from tiny_bert."""
    from densepr.data import write_passages_tsv
    from densepr.index.dense import DenseIndex
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder
    from densepr.retrieve.bm25 import BM25Index

    d = tmp_path / "index"
    write_passages_tsv(corpus, d / "passages.tsv")
    BM25Index.build(corpus).save(d / "bm25")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, tmp_path / "emb")
    DenseIndex.build(tmp_path / "emb").save(d / "dense")
    return d
