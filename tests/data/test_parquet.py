"""Parquet corpora and QA sets (pyarrow), and Hugging Face `datasets.Dataset` objects in the Python API."""

from __future__ import annotations

import pytest

from densepr.data import load_corpus, load_qa
from densepr.errors import InputError
from tests.support.cli import run
from tests.support.tiny import QUESTIONS

pa = pytest.importorskip("pyarrow", reason="parquet input needs pyarrow (pip install 'densepr[interop]')")
pq = pytest.importorskip("pyarrow.parquet")


def _write_corpus(path, corpus, **extra):
    cols = {"id": [int(i) for i in corpus.ids], "title": corpus.titles, "text": corpus.texts}
    cols.update(extra)
    pq.write_table(pa.table({k: v for k, v in cols.items() if v is not None}), path, row_group_size=5)  # 3 row groups


def _write_qa(path):
    pq.write_table(pa.table({"question": [q for q, _ in QUESTIONS], "answers": [a for _, a in QUESTIONS]}), path)


def test_parquet_corpus_and_qa_read_as_their_tsv_twins_streamed_by_batches(tmp_path, corpus, passages_tsv, qa_tsv, monkeypatch):
    from densepr.data import parquet

    monkeypatch.setattr(parquet, "BATCH_ROWS", 4)  # several batches, across row groups
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read whole"))  # streamed, never read whole
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read whole"))
    _write_corpus(tmp_path / "c.parquet", corpus, extra_column=list(range(len(corpus))))
    got, want = load_corpus(tmp_path / "c.parquet"), load_corpus(passages_tsv)
    assert (got.ids, got.titles, got.texts) == (want.ids, want.titles, want.texts)
    _write_qa(tmp_path / "qa.parquet")
    assert load_qa(tmp_path / "qa.parquet").items == load_qa(qa_tsv).items
    (tmp_path / "qa.bin").write_bytes((tmp_path / "qa.parquet").read_bytes())  # told by its magic bytes, not only its suffix
    assert load_qa(tmp_path / "qa.bin").items == load_qa(qa_tsv).items


def test_cli_indexes_and_retrieves_from_parquet_as_from_tsv(tmp_path, capsys, corpus, passages_tsv, qa_tsv):
    _write_corpus(tmp_path / "c.parquet", corpus)
    _write_qa(tmp_path / "qa.parquet")
    for name, source in (("tsv", passages_tsv), ("parquet", tmp_path / "c.parquet")):
        idx = tmp_path / name
        code, out, err = run(capsys, "data", "passages", str(idx / "passages.tsv"), "--source", str(source))
        assert code == 0, err
        code, out, err = run(capsys, "index", "bm25", str(source), str(idx / "bm25"), "--workers", "1")
        assert code == 0 and "12 passages" in out, err
    for name, qa in (("tsv", qa_tsv), ("parquet", tmp_path / "qa.parquet")):
        code, out, err = run(capsys, "retrieve", "--qa", str(qa), "--index", str(tmp_path / name), "--mode", "bm25", "-k", "3",
                             "--trec", str(tmp_path / f"{name}.trec"))  # fmt: skip
        assert code == 0, err
    assert (tmp_path / "tsv.trec").read_text() == (tmp_path / "parquet.trec").read_text()


@pytest.mark.parametrize("table,message", [
    ({"id": ["1"], "body": ["x"]}, "c.parquet: field 'text': missing column 'text' (columns: id, body)"),
    ({"pid": ["1"], "text": ["x"]}, "c.parquet: field 'id': missing column 'id' or '_id' (columns: pid, text)"),
    ({"id": ["1", "2", "3"], "text": ["x", "y", None]}, "c.parquet, row 3: field 'text': expected the passage text as a string, found null"),
    ({"id": [1.5], "text": ["x"]}, "c.parquet, row 1: field 'id': expected a string or integer id, found float '1.5'"),
])  # fmt: skip
def test_bad_parquet_corpus_is_refused_naming_file_row_and_column(tmp_path, capsys, table, message):
    pq.write_table(pa.table(table), tmp_path / "c.parquet")
    with pytest.raises(InputError) as e:
        load_corpus(tmp_path / "c.parquet")
    assert str(e.value).endswith(message)
    code, out, err = run(capsys, "index", "bm25", str(tmp_path / "c.parquet"), str(tmp_path / "bm25"))
    assert code == 1 and message in err and "Traceback" not in err and not (tmp_path / "bm25" / "manifest.json").exists()


def test_bad_parquet_qa_and_non_parquet_files_are_refused(tmp_path):
    pq.write_table(pa.table({"question": ["q"], "answer_text": ["a"]}), tmp_path / "qa.parquet")
    with pytest.raises(InputError, match=r"qa.parquet: field 'answers': missing column 'answers' or 'answer' \(columns: question, answer_text\)"):
        load_qa(tmp_path / "qa.parquet")
    pq.write_table(pa.table({"question": ["q"], "answers": [[]]}), tmp_path / "qa.parquet")
    with pytest.raises(InputError, match="qa.parquet, row 1: field 'answers': expected a non-empty list of answer strings, found an empty list"):
        load_qa(tmp_path / "qa.parquet")
    (tmp_path / "c.parquet").write_text("id\ttext\ttitle\n")
    with pytest.raises(InputError, match="c.parquet: not a readable parquet file"):
        load_corpus(tmp_path / "c.parquet")


def test_a_datasets_dataset_is_accepted_by_the_python_api(corpus, qa_tsv):
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets not installed (pip install 'densepr[interop]')")
    ds = datasets.Dataset.from_dict({"_id": corpus.ids, "title": corpus.titles, "text": corpus.texts, "other": [0] * len(corpus)})
    got = load_corpus(ds)
    assert (got.ids, got.titles, got.texts) == (corpus.ids, corpus.titles, corpus.texts)
    sub = load_corpus(ds.select([3, 1]))  # a selection (an indices mapping over the same table) is read as selected
    assert sub.ids == [corpus.ids[3], corpus.ids[1]]
    qa = datasets.Dataset.from_dict({"question": [q for q, _ in QUESTIONS], "answers": [a for _, a in QUESTIONS]})
    assert load_qa(qa).items == load_qa(qa_tsv).items and load_qa(qa, limit=2).items == load_qa(qa_tsv).items[:2]
    with pytest.raises(InputError, match="field 'text': missing column 'text'"):
        load_corpus(datasets.Dataset.from_dict({"id": ["1"], "body": ["x"]}))
