"""Every loader and every CLI command against bad input: one clear, located message; never a traceback."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from densepr.evaluate.answers import answer_tokens, has_answer, simple_tokenize
from tests.support.bad_inputs import LOADERS, Case, cases, needle, run_case
from tests.support.cli import run

LOCATED = {"malformed line", "missing field", "wrong type", "answers not a list", "unparsable answers", "empty answer list",
           "unclosed quote", "not an object", "quoted line break"}  # fmt: skip
LOCATED_PREFIXES = ("unbalanced quote", "id with", "empty id", "over-long")


@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c.component}: {c.kind}")
def test_catalogue(tmp_path, case: Case):
    outcome, message = run_case(case, tmp_path)
    assert outcome == case.expect, message
    if outcome == "error":
        name = LOADERS[case.component][0]
        assert message.startswith(str(tmp_path / name)), message  # the file comes first
        if case.kind in LOCATED or case.kind.startswith(LOCATED_PREFIXES):
            assert ", line " in message or ", record " in message, message
        if needle(case.kind):
            assert needle(case.kind) in message, message  # says what is wrong, not just where


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(component=st.sampled_from(sorted(LOADERS)), data=st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8")))
def test_fuzzed_files_give_a_result_or_a_located_error(tmp_path_factory, component, data):
    outcome, message = run_case(Case(component, "fuzz", data, "?"), tmp_path_factory.mktemp("fuzz"))
    assert outcome in ("accepted", "error", "read again"), message  # never another exception


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), start=st.integers(0, 50), length=st.integers(1, 5))
def test_has_answer_finds_any_token_span_of_the_text(text, start, length):
    toks = simple_tokenize(text)
    answer = " ".join(toks[start : start + length])
    assert isinstance(has_answer(["zzz"], text), bool)
    if answer_tokens(answer):
        assert has_answer([answer], text)
        if answer.isascii():  # lower-cased match (Unicode case mappings such as ß -> SS are not symmetric)
            assert has_answer([answer.upper()], text)


# -- the command line ------------------------------------------------------------------------------
def _commands(tmp):
    return [
        ("data", "passages", str(tmp / "out.tsv"), "--source", "{path}"),
        ("data", "split", "{path}", str(tmp / "out.tsv")),
        ("data", "build-train", "--qa", "{path}", "-o", str(tmp / "t.json"), "--index", str(tmp)),
        ("index", "bm25", "{path}", str(tmp / "bm25")),
        ("index", "dense", "{path}", str(tmp / "dense")),
        ("encode", "{path}", str(tmp / "emb"), "--encoder", str(tmp)),
        ("retrieve", "--qa", "{path}", "-o", str(tmp / "o.json"), "--index", str(tmp)),
        ("tune-hybrid", "--qa", "{path}", "--index", str(tmp)),
        ("evaluate", "{path}"),
        ("train", "--train", "{path}", "-o", str(tmp / "run"), "--init", str(tmp)),
        ("search", "who", "--index", "{path}"),
        ("train-reader", "--train", "{path}", "-o", str(tmp / "rrun"), "--init", str(tmp)),
        ("answer", "who", "--index", "{path}", "--reader", str(tmp)),
        ("evaluate-qa", "--qa", "{path}", "-o", str(tmp / "qa"), "--index", str(tmp), "--reader", str(tmp)),
        ("verify", "{path}"),
    ]


@pytest.mark.parametrize("which", ["missing", "directory", "garbage"])
def test_every_command_reports_bad_paths_in_one_line(tmp_path, capsys, which):
    commands = _commands(tmp_path)
    target = {"missing": tmp_path / "missing.tsv", "directory": tmp_path / "adir", "garbage": tmp_path / "garbage.tsv"}[which]
    (tmp_path / "adir").mkdir()
    (tmp_path / "garbage.tsv").write_bytes(b"\xff\xfe\x00garbage\x00\n{[\n")
    for cmd in commands:
        args = [a.replace("{path}", str(target)) for a in cmd]
        code, out, err = run(capsys, *args)
        assert code in (1, 2), (args, code, out, err)
        assert "Traceback" not in err and "Traceback" not in out, (args, err)
        text = err.strip()
        assert text and len(text.splitlines()) <= 3, (args, err)  # one message (typer may wrap a usage error)


def test_debug_shows_the_traceback_for_any_command(tmp_path, capsys):
    from densepr.cli import main
    from densepr.errors import DenseprError

    with pytest.raises(DenseprError):
        main(["--debug", "verify", str(tmp_path / "missing")])
