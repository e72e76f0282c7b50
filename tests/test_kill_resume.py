"""Each long job, SIGKILLed part-way, resumes to exactly the uninterrupted result with nothing corrupt left
(scenarios in tests/support/kill_resume.py; they start real processes)."""

from __future__ import annotations

import pytest

from tests.support.kill_resume import scenario_encode, scenario_index, scenario_train, scenario_train_reader
from tests.support.tiny import make_tiny_bert


def _check(row: dict) -> None:
    assert row["killed_mid_run"], f"{row['job']}: finished before the kill; make the job longer"
    assert row["nothing_corrupt"], row
    assert row["same_result"], row


def test_encode_killed_and_resumed(tmp_path, tiny_bert):
    _check(scenario_encode(tmp_path, tiny_bert))


def test_index_build_killed_and_resumed(tmp_path):
    _check(scenario_index(tmp_path))


def test_training_killed_and_resumed(tmp_path):
    _check(scenario_train(tmp_path, make_tiny_bert(tmp_path / "enc", pooling="cls", dropout=0.0)))


def test_reader_training_killed_and_resumed(tmp_path):
    _check(scenario_train_reader(tmp_path, make_tiny_bert(tmp_path / "rdr", seed=3, dropout=0.0)))


pytestmark = pytest.mark.filterwarnings("ignore")
