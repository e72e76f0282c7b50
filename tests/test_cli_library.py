"""Logic the CLI used to hold, now in the library (the commands only parse and call): TREC run rows for
``evaluate``, ``evaluate-qa``'s pieces directory, ``export-onnx``'s reader check, ``--ray-replicas``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densepr.data.passages import Corpus, Passage
from densepr.data.runs import trec_run_rows
from densepr.errors import DenseprError
from densepr.evaluate.pieces import SetPieces
from densepr.models.kind import is_reader_dir


def _corpus() -> Corpus:
    return Corpus.from_passages([Passage(f"p{i}", f"title {i}", f"text {i}") for i in range(4)])


def test_a_trec_run_becomes_corpus_rows_per_question(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("1 Q0 p3 1 2.0 t\n1 Q0 p0 2 1.0 t\n0 Q0 p2 1 5.0 t\n")
    rows = trec_run_rows(run, 3, _corpus(), "nq-dev", "idx/passages.tsv")
    np.testing.assert_array_equal(rows, [[2, -1], [3, 0], [-1, -1]])
    run.write_text("7 Q0 p3 1 2.0 t\n")
    with pytest.raises(DenseprError, match=r"query id '7' is not a question number of nq-dev \(0..2\)"):
        trec_run_rows(run, 3, _corpus(), "nq-dev")
    run.write_text("0 Q0 p9 1 2.0 t\n")
    with pytest.raises(DenseprError, match="passage id 'p9' is not in idx/passages.tsv"):
        trec_run_rows(run, 3, _corpus(), "nq-dev", "idx/passages.tsv")


def test_set_pieces_keep_only_these_inputs_and_go_once_the_set_is_written(tmp_path):
    key, other = "ab" * 32, "cd" * 32
    old = SetPieces(tmp_path, "nq/test", other)
    old.open()
    pieces = SetPieces(tmp_path, "nq/test", key)
    assert pieces.directory == tmp_path / "pieces" / "nq_test" / key[:16]
    assert pieces.open() == 0 and not old.directory.exists()  # another reader's pieces: removed
    (pieces.directory / "readings-00000.json").write_text("{}")
    assert SetPieces(tmp_path, "nq/test", key).open(resume=True) == 1
    assert SetPieces(tmp_path, "nq/test", key).open(resume=False) == 0  # --no-resume: read again
    SetPieces(tmp_path, "other", key).open()
    pieces.close()
    assert not pieces.set_dir.exists() and (tmp_path / "pieces").is_dir()  # another set's pieces stay
    SetPieces(tmp_path, "other", key).close()
    assert not (tmp_path / "pieces").exists()
    with pytest.raises(ValueError, match="reading key"):
        SetPieces(tmp_path, "nq", "../x")


@pytest.mark.parametrize("config,reader", [({"architectures": ["DPRReader"]}, True), ({"architectures": ["BertModel"]}, False),
                                           ({"architectures": None}, False), ([1, 2], False), (None, False)])  # fmt: skip
def test_export_onnx_tells_a_reader_from_its_config(tmp_path, config, reader):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    assert is_reader_dir(tmp_path) is reader
    (tmp_path / "densepr_reader.json").write_text("{}")  # densepr's reader settings: a reader on any encoder
    assert is_reader_dir(tmp_path) is (config is not None)


def test_ray_replicas_are_parsed_and_checked():
    pytest.importorskip("ray")
    from densepr.serve.ray_app import Replicas

    assert Replicas.parse("router=2, searcher=4,cpus=0.5") == Replicas(router=2, searcher=4, cpus=0.5)
    assert Replicas.parse(None) == Replicas() == Replicas.parse("")
    for bad in ("bogus", "router=x", "gpus=1", "searcher=0", "cpus=0", "shards=-1"):
        with pytest.raises(DenseprError, match=f"--ray-replicas '{bad}'"):
            Replicas.parse(bad)
