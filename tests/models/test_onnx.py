"""The ONNX Runtime question encoder: same vectors as PyTorch, int8 close, usable by a Retriever and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from densepr.errors import DenseprError
from densepr.models.encoder import Encoder
from tests.support.tiny import QUESTIONS

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'densepr[onnx]')")


def test_export_matches_pytorch_and_serves_a_retriever(tmp_path, tiny_bert, index_dir, capsys):
    from densepr.models.onnx import OnnxQuestionEncoder, export_question_encoder
    from densepr.retrieve.retriever import Retriever
    from tests.support.cli import run

    cfg = export_question_encoder(tiny_bert, tmp_path / "onnx", int8=True)
    assert cfg["files"] == ["model.onnx", "model.int8.onnx"] and cfg["dim"] == Encoder.load(tiny_bert, device="cpu").dim
    questions = [q for q, _ in QUESTIONS] + ["a much longer question " * 5]
    want = Encoder.load(tiny_bert, device="cpu").encode_questions(questions, 4)
    got = OnnxQuestionEncoder(tmp_path / "onnx").encode_questions(questions, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)  # same graph: padding, pooling, normalisation
    q8 = OnnxQuestionEncoder(tmp_path / "onnx", int8=True).encode_questions(questions, 4)
    cos = (q8 * want).sum(1) / np.linalg.norm(q8, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.95 and not np.allclose(q8, want, atol=1e-5)  # quantised: close, not equal

    torch_r, onnx_r = Retriever.load(index_dir, device="cpu"), Retriever.load(index_dir, question_encoder=str(tmp_path / "onnx"))
    a, b = torch_r.retrieve(questions, 5, "dense"), onnx_r.retrieve(questions, 5, "dense")
    assert np.allclose(a.scores, b.scores, atol=1e-4)
    # the same rankings, except where two passages' scores are within float noise of each other (a swap there is noise)
    for ra, rb, sa in zip(a.rows, b.rows, a.scores):
        swapped = ra != rb
        assert set(ra) == set(rb) or swapped[-1], (ra, rb)
        for j in np.flatnonzero(swapped):
            near = np.abs(sa - sa[j]) < 1e-4
            assert rb[j] in ra[near] or j == len(ra) - 1, (ra, rb, sa)
    assert Retriever.load(index_dir, question_encoder=str(tmp_path / "onnx") + "#int8").question_encoder.int8

    code, out, err = run(capsys, "export-onnx", str(tiny_bert), str(tmp_path / "cli"))
    assert code == 0 and "exported" in out, err
    code, _, err = run(capsys, "retrieve", "--queries", str(_queries(tmp_path)), "--index", str(index_dir), "--mode", "dense",
                       "--question-encoder", str(tmp_path / "cli"), "--trec", str(tmp_path / "run.trec"), "-k", "3")  # fmt: skip
    assert code == 0 and len((tmp_path / "run.trec").read_text().splitlines()) == 3 * len(QUESTIONS), err
    code, _, err = run(capsys, "retrieve", "--queries", str(_queries(tmp_path)), "--index", str(index_dir), "--mode", "dense",
                       "--question-encoder", str(tmp_path / "cli") + "#int8", "--trec", str(tmp_path / "r2.trec"))  # fmt: skip
    assert code == 1 and "has no int8 model" in err and "Traceback" not in err


def test_damaged_or_foreign_directories_are_refused(tmp_path, tiny_bert):
    from densepr.models.onnx import OnnxQuestionEncoder, export_question_encoder

    with pytest.raises(DenseprError, match="not an ONNX question encoder"):
        OnnxQuestionEncoder(tiny_bert)
    export_question_encoder(tiny_bert, tmp_path / "onnx")
    with open(tmp_path / "onnx" / "model.onnx", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    with pytest.raises(DenseprError, match="model.onnx"):
        OnnxQuestionEncoder(tmp_path / "onnx")


def _queries(tmp_path):
    path = tmp_path / "queries.tsv"
    path.write_text("".join(f"q{i}\t{q}\n" for i, (q, _) in enumerate(QUESTIONS)), encoding="utf-8")
    return path


def test_reader_export_reads_as_pytorch_and_is_inference_only(tmp_path, capsys, index_dir, qa_tsv):
    """An exported reader gives the same readings (selection logits, spans) as the PyTorch reader it came from."""
    from densepr.models.reader import Reader, ReaderConfig, export_reader
    from tests.support.cli import run
    from tests.support.tiny import PASSAGES, make_tiny_bert

    src = tmp_path / "reader"
    Reader.load(make_tiny_bert(tmp_path / "init", seed=3, dropout=0.0), "cpu", ReaderConfig(max_length=48, top_k=5)).save(src)
    cfg = export_reader(src, tmp_path / "onnx", int8=True)
    assert cfg["files"] == ["model.onnx", "model.int8.onnx"]
    torch_r, onnx_r = Reader.load(src, "cpu"), Reader.load(tmp_path / "onnx")
    assert onnx_r.config.max_length == 48 and onnx_r.config.top_k == 5 and str(onnx_r.device) == "cpu"
    questions = [q for q, _ in QUESTIONS[:4]]
    passages = [[(t, x) for t, x in PASSAGES[i : i + 5]] for i in range(4)]  # some longer than one 48-token window
    want, got = torch_r.read(questions, passages, batch_size=3), onnx_r.read(questions, passages, batch_size=7)
    for w, g in zip(want, got):
        np.testing.assert_allclose([r.relevance for r in g], [r.relevance for r in w], atol=1e-4)
        assert [r.text for r in g] == [r.text for r in w]
    q8 = Reader.load(str(tmp_path / "onnx") + "#int8").read(questions, passages)
    assert len(q8) == 4 and all(len(r) == 5 for r in q8)
    with pytest.raises(DenseprError, match="ONNX reader is not saved"):
        onnx_r.save(tmp_path / "again")

    code, out, err = run(capsys, "export-onnx", str(src), str(tmp_path / "cli"))
    assert code == 0 and "reader exported" in out, err
    for spec in (str(tmp_path / "cli"), str(tmp_path / "onnx") + "#int8"):  # answer with it, as serve would
        code, out, err = run(capsys, "answer", QUESTIONS[0][0], "--index", str(index_dir), "--reader", spec, "-k", "3")
        assert code == 0 and out.strip(), err
    code, _, err = run(capsys, "train-reader", "--train", str(tmp_path / "none.json"), "-o", str(tmp_path / "run"), "--init", str(tmp_path / "cli"))
    assert code == 1 and "error" in err
    before = (tmp_path / "cli" / "densepr_reader.json").read_bytes()
    code, _, err = run(capsys, "tune-reader", "--qa", str(qa_tsv), "--index", str(index_dir), "--reader", str(tmp_path / "cli"), "--modes", "bm25")
    assert code == 1 and "tune the reader it was exported from" in err and "Traceback" not in err, err
    assert (tmp_path / "cli" / "densepr_reader.json").read_bytes() == before
