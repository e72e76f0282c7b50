"""Each long job, SIGKILLed at several points in turn (the first before its first checkpoint, part or piece),
resumes to exactly the uninterrupted result with nothing corrupt left (scenarios in tests/support/kill_resume.py;
they start real processes). The plain tests kill each job twice (before its first unit, then part-way); the slow
ones at four points, and the reader-cloze stage of `densepr reproduce` (its first kill is covered in-process by
tests/test_reproduce.py)."""

from __future__ import annotations

import pytest

from tests.support.kill_resume import (
    SLOW_POINTS,
    scenario_encode,
    scenario_evaluate_qa,
    scenario_index,
    scenario_reader_cloze,
    scenario_train,
    scenario_train_reader,
)
from tests.support.tiny import make_tiny_bert


def _check(row: dict) -> None:
    assert row["killed_mid_run"], f"{row['job']}: finished (or failed) before a kill; make the job longer: {row}"
    assert row["killed_before_first_unit"], f"{row['job']}: the first kill came after its first unit: {row}"
    assert row["nothing_corrupt"], row
    assert row["same_result"], row


def _encoder(tmp_path):
    return make_tiny_bert(tmp_path / "enc", pooling="cls", dropout=0.0)


def _reader(tmp_path):
    return make_tiny_bert(tmp_path / "rdr", seed=3, dropout=0.0)


def test_encode_killed_and_resumed(tmp_path, tiny_bert):
    _check(scenario_encode(tmp_path, tiny_bert))


def test_index_build_killed_and_resumed(tmp_path):
    _check(scenario_index(tmp_path))


def test_training_killed_and_resumed(tmp_path):
    _check(scenario_train(tmp_path, _encoder(tmp_path)))


def test_reader_training_killed_and_resumed(tmp_path):
    _check(scenario_train_reader(tmp_path, _reader(tmp_path)))


def test_evaluate_qa_killed_and_resumed(tmp_path):
    _check(scenario_evaluate_qa(tmp_path, _reader(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(SLOW_POINTS))
def test_each_job_killed_at_four_points_and_resumed(tmp_path, tiny_bert, job):
    run = {"encode": lambda p: scenario_encode(tmp_path, tiny_bert, p), "index": lambda p: scenario_index(tmp_path, p),
           "train": lambda p: scenario_train(tmp_path, _encoder(tmp_path), p), "reader": lambda p: scenario_train_reader(tmp_path, _reader(tmp_path), p),
           "evaluate-qa": lambda p: scenario_evaluate_qa(tmp_path, _reader(tmp_path), p), "reader-cloze": lambda p: scenario_reader_cloze(tmp_path, p)}  # fmt: skip
    _check(run[job](SLOW_POINTS[job]))


pytestmark = pytest.mark.filterwarnings("ignore")
