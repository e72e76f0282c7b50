"""The "BM25 analyse" bar: a total known before the corpus is read, and moves within a chunk."""

from __future__ import annotations

import pytest

from densepr import progress
from densepr.data import Corpus, Passage, write_passages_tsv
from densepr.data.store import StreamedCorpus, open_passages
from densepr.retrieve.bm25 import BM25Index


@pytest.fixture
def bars(monkeypatch):
    """Every bar drawn: ``{description: {"total": ..., "steps": [advances]}}``."""
    got: dict = {}

    class Recording(progress.Progress):
        def add_task(self, description, *args, total=None, **kw):
            got[description] = {"total": total, "steps": []}
            self._desc = description
            return super().add_task(description, *args, total=total, **kw)

        def advance(self, task, advance=1):
            got[self._desc]["steps"].append(advance)
            super().advance(task, advance)

    monkeypatch.setattr(progress, "Progress", Recording)
    return got


def _rows(n: int) -> list[Passage]:
    return [Passage(str(i), f"title {i % 7}", f"passage {i} about cats and dogs number {i * 31 % 97}") for i in range(n)]


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_file_bar_counts_its_bytes_and_moves_within_chunks(tmp_path, bars, workers):
    """Was: no total (`60000/?`) and one advance per 50,000-passage chunk."""
    path = tmp_path / "corpus.tsv"
    write_passages_tsv(_rows(5_000), path)
    index = BM25Index.build(StreamedCorpus(path), workers=workers, chunk_passages=3_000, progress=True)
    bar = bars["BM25 analyse"]
    size = path.stat().st_size
    assert bar["total"] == size and sum(bar["steps"]) == size  # bytes of the file, the header line included
    assert sum(1 for s in bar["steps"] if s) >= 3  # 2 chunks: a move after 2,000 passages of each besides its end
    assert max(bar["steps"]) < size * 0.7
    assert index.model.scores["num_docs"] == 5_000


def test_jsonl_bar_counts_bytes_store_and_parquet_bars_count_passages(tmp_path, bars):
    rows = _rows(300)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(f'{{"id": "{p.id}", "title": "{p.title}", "text": "{p.text}"}}\n\n' for p in rows), encoding="utf-8")
    BM25Index.build(StreamedCorpus(jsonl), chunk_passages=100, progress=True)
    assert bars["BM25 analyse"]["total"] == sum(bars["BM25 analyse"]["steps"]) == jsonl.stat().st_size

    idx = tmp_path / "idx"
    idx.mkdir()
    write_passages_tsv(rows, idx / "passages.tsv")
    store = open_passages(idx / "passages.tsv", idx / "bm25")  # an index directory's: through its store
    assert not isinstance(store, StreamedCorpus)
    BM25Index.build(store, chunk_passages=100, progress=True)
    assert bars["BM25 analyse"]["total"] == sum(bars["BM25 analyse"]["steps"]) == 300

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": [p.id for p in rows], "title": [p.title for p in rows], "text": [p.text for p in rows]}),
                   tmp_path / "c.parquet", row_group_size=64)  # fmt: skip
    BM25Index.build(StreamedCorpus(tmp_path / "c.parquet"), chunk_passages=100, progress=True)
    assert bars["BM25 analyse"]["total"] == sum(bars["BM25 analyse"]["steps"]) == 300
    assert Corpus.from_passages(rows)  # (the rows were valid passages)
