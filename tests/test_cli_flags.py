"""`densepr --version`, `--quiet` (before or after the command) and the BM25 progress bars."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from densepr import progress
from tests.support.cli import run


def test_version_prints_the_installed_package_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and out == f"densepr {version('densepr')}\n" and err == ""


@pytest.fixture
def bm25_index(tmp_path, passages_tsv):
    """An index directory holding passages.tsv and bm25/ (no dense part)."""
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "passages.tsv").write_bytes(passages_tsv.read_bytes())
    (tmp_path / "queries.tsv").write_text("q1\twho created python\nq2\tmozart birthplace\n")
    return idx


def test_quiet_drops_bars_and_logs_keeps_results_and_errors(tmp_path, capsys, bm25_index):
    code, out, err = run(capsys, "index", "bm25", str(bm25_index / "passages.tsv"), str(bm25_index / "bm25"), "--workers", "1")
    assert code == 0 and "BM25 analyse" in err and "BM25 merge" in err  # the bars, without --quiet
    for quiet in (("--quiet", "index", "bm25"), ("index", "bm25", "--quiet")):  # before or after the command
        code, out, err = run(capsys, *quiet, str(bm25_index / "passages.tsv"), str(tmp_path / "b2"), "--workers", "1")
        assert code == 0 and err == "" and "BM25 index over 12 passages" in out
    retrieve = ("retrieve", "--queries", str(tmp_path / "queries.tsv"), "--index", str(bm25_index), "--mode", "bm25", "--trec", str(tmp_path / "run.trec"))
    code, out, err = run(capsys, *retrieve)
    assert code == 0 and "BM25 search" in err
    code, out, err = run(capsys, *retrieve, "--quiet")
    assert code == 0 and err == "" and "results for 2 queries" in out
    code, out, err = run(capsys, "evaluate", str(tmp_path / "run.trec"), "--qrels", str(tmp_path / "missing.tsv"), "--quiet")
    assert code == 1 and "missing.tsv: file not found" in err  # errors still print
    code, out, err = run(capsys, *retrieve)  # --quiet does not outlive its command
    assert "BM25 search" in err


def test_bm25_search_bar_moves_within_a_batch(monkeypatch, corpus):
    """Was: one advance per 4,096 queries, so 1,000 queries showed 0/1000 until all were done."""
    from densepr.retrieve.bm25 import BM25Index

    steps = []

    class Recording(progress.Progress):
        def advance(self, task, advance=1):
            steps.append(advance)
            super().advance(task, advance)

    monkeypatch.setattr(progress, "Progress", Recording)
    index = BM25Index.build(corpus)
    res = index.search(["who created python"] * 200, 3, show_progress=True)
    assert len(steps) >= 4 and sum(steps) == 200 and max(steps) <= 64
    assert (res.rows == index.search(["who created python"] * 200, 3).rows).all()  # the same ranking without the bar


def test_tune_lambda_shows_its_searches(capsys, index_dir, qa_tsv):
    """Was: tune-hybrid's BM25 searches and question encoding ran with no bar."""
    from densepr.data import load_qa
    from densepr.evaluate.answers import AnswerMatcher
    from densepr.evaluate.tuning import tune_lambda
    from densepr.retrieve.retriever import Retriever

    r = Retriever.load(index_dir, device="cpu")
    tune_lambda(r, AnswerMatcher(r.corpus.texts), [load_qa(qa_tsv)], grid=(0.5, 1.1), k=1, show_progress=True)
    err = capsys.readouterr().err
    assert "BM25 search" in err and "encode questions" in err


def test_evaluate_qa_shows_its_retrieval(tmp_path, capsys, index_dir, qa_tsv):
    """Was: evaluate-qa (and tune-reader) encoded the questions and ran BM25's search with no bar; --quiet drops them."""
    from densepr.models.reader import Reader, ReaderConfig
    from tests.support.tiny import make_tiny_bert

    reader = tmp_path / "reader"
    Reader.load(make_tiny_bert(tmp_path / "init", seed=3, dropout=0.0), "cpu", ReaderConfig(max_length=96, stride=16, top_k=2)).save(reader)
    args = ("evaluate-qa", "--qa", str(qa_tsv), "--index", str(index_dir), "--reader", str(reader), "--modes", "bm25,dense",
            "--ks", "1,2", "--no-gold", "--device", "cpu")  # fmt: skip
    code, out, err = run(capsys, *args, "-o", str(tmp_path / "qa"))
    assert code == 0, err
    assert "encode questions" in err and "BM25 search" in err and "read qa.tsv" in err
    code, out, err = run(capsys, *args, "-o", str(tmp_path / "qa2"), "--quiet")
    assert code == 0 and err == "" and "qa.tsv" in out
    code, out, err = run(capsys, "tune-reader", "--qa", str(qa_tsv), "--index", str(index_dir), "--reader", str(reader), "--modes", "bm25",
                         "--ks", "1,2", "--device", "cpu")  # fmt: skip
    assert code == 0 and "BM25 search" in err and "read qa.tsv (bm25)" in err, err
