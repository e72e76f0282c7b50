"""The bad-input catalogue: every loader x every kind of bad (or merely awkward) file.

Each case writes a small file, runs one loader on it, and records the outcome: ``accepted``
(with a check that the content was read right: a BOM or CRLF line ends are not errors) or
``error`` (an :class:`~densepr.errors.InputError` whose message names the file and, where
there is one, the line and field), or, for a file that only keeps finished work (an evaluate-qa
piece), ``read again`` (not used: its work is redone, with the reason logged). ``tests/data/test_bad_input.py`` asserts every outcome;
``python -m tests.support.bad_inputs`` writes the table to ``benchmarks/results/bad-inputs.md``.

The ``over-long line`` / ``over-long record`` cases run with the loaders' size limit
(``MAX_RECORD_BYTES``, 32 MiB) lowered to :data:`SMALL_LIMIT` so the files stay small; the real
limit is tested on a 2 GB file without a line break in ``tests/test_data.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import densepr.data.passages as passages_module
from densepr.data import load_corpus, load_qa
from densepr.data.beir import read_qrels_tsv, read_queries
from densepr.data.runs import iter_dpr_results, read_trec_run
from densepr.data.training import iter_train_records
from densepr.errors import InputError
from densepr.fileio.atomic import read_json
from densepr.pipeline import load_piece

HUGE = "x" * 200_000  # one 200 kB field on one line: accepted (well under the limit)
SMALL_LIMIT = 64 * 1024  # the size limit while an over-long case runs
OVERLONG = b"x" * (4 * SMALL_LIMIT)  # no line break, no closing quote or bracket


def _ctx(**kw) -> dict:
    return {"title": "T", "text": "some text", **kw}


def _train(**kw) -> dict:
    return {"question": "q?", "answers": ["a"], "positive_ctxs": [_ctx()], "negative_ctxs": [], "hard_negative_ctxs": [], **kw}


def _res(**kw) -> dict:
    return {"question": "q?", "answers": ["a"], "ctxs": [_ctx(id="1", score=1.0)], **kw}


PIECE_KEY = "a" * 64  # the key the piece loader is asked for (pipeline.piece_key of this piece's inputs)
PIECE_READING = [1.5, 2.0, 0, 3, "x"]  # span score, passage score, start, end, text


def _piece(**kw) -> bytes:
    return json.dumps({"key": PIECE_KEY, "seconds": 1.5, "readings": [[PIECE_READING]], **kw}).encode()


class ReadAgain(Exception):
    """A kept evaluate-qa piece that is not used: its questions are read again (the outcome for a bad piece)."""


def _load_piece(path: Path) -> list:
    got = load_piece(path, PIECE_KEY, [1])  # one question, one passage
    if isinstance(got, str):
        raise ReadAgain(got)
    return got[0]


# component: (file name, loader returning something countable, good content)
LOADERS: dict[str, tuple[str, Callable[[Path], object], bytes]] = {
    "passages TSV": ("p.tsv", lambda p: load_corpus(p), b"id\ttext\ttitle\n1\tfirst text\tA\n2\tsecond text\tB\n"),
    "passages JSONL": ("p.jsonl", lambda p: load_corpus(p), b'{"id": "1", "title": "A", "text": "first text"}\n{"id": "2", "title": "B", "text": "second text"}\n'),
    "QA TSV (DPR)": ("qa.tsv", lambda p: load_qa(p), b"who is a?\t['x', 'y']\nwho is b?\t[\"z\"]\n"),
    "QA JSONL": ("qa.jsonl", lambda p: load_qa(p), b'{"question": "who is a?", "answer": ["x"]}\n{"question": "who is b?", "answer": ["z"]}\n'),
    "training JSON": ("train.json", lambda p: list(iter_train_records(p)), json.dumps([_train(), _train(question="r?")]).encode()),
    "retrieval JSON": ("res.json", lambda p: list(iter_dpr_results(p)), json.dumps([_res(), _res(question="r?")]).encode()),
    "TREC run": ("run.trec", lambda p: read_trec_run(p), b"0 Q0 1 1 2.5 t\n1 Q0 2 1 1.5 t\n"),
    "queries TSV": ("q.tsv", lambda p: read_queries(p), b"q1\tfirst query\nq2\tsecond query\n"),
    "queries JSONL": ("q.jsonl", lambda p: read_queries(p), b'{"_id": "q1", "text": "first query"}\n{"_id": "q2", "text": "second query"}\n'),
    "qrels TSV": ("qrels.tsv", lambda p: read_qrels_tsv(p), b"query-id\tcorpus-id\tscore\nq1\t1\t1\nq2\t2\t1\n"),
    "JSON config": ("config.json", lambda p: read_json(p), b'{"a": 1, "b": [1, 2]}'),
    "evaluate-qa piece": ("readings-0.json", _load_piece, _piece()),
}
# Components whose bad files are not errors: the work they hold is redone (expected outcome "read again").
REDONE = {"evaluate-qa piece"}

# 20 passages; passage 5's text opens a quote that passage 15's text closes: csv joins lines 6..16
# into one row that still has 3 columns, so this read as 10 passages without an error.
_ROWS = [f"{i}\ttext {i}\tT{i}\n" for i in range(1, 21)]
_ROWS[4], _ROWS[14] = '5\t"text 5 opens a quote\tT5\n', '15\ttext 15 closes it"\tT15\n'
SWALLOW = ("id\ttext\ttitle\n" + "".join(_ROWS)).encode()

# component -> {kind: content}; kinds every loader gets are added below
SPECIFIC: dict[str, dict[str, bytes]] = {
    "passages TSV": {"malformed line": b"1\tonly two\n", "missing field": b"\ttext\ttitle\n", "duplicate passage ids": b"1\ta\tA\n1\tb\tB\n",
                     "huge single line": f"1\t{HUGE}\tT\n".encode(), "unclosed quote": b'1\t"open quote\tT\n2\tb\tB\n',
                     "unbalanced quote swallowing 10 lines": SWALLOW, "unbalanced quote in the title": b'1\ta\t"A\n2\tb\tB\n3\tc\tC\n',
                     "unbalanced quote on the last line": b'1\ta\tA\n2\t"b\tB\n', "quoted line break": b'1\t"two\nlines"\tA\n',
                     "id with a space": b"a b\ttext\tT\n", "id with a tab": b'"a\tb"\ttext\tT\n', "id with a line break": b'"a\nb"\ttext\tT\n',
                     "id with a control character": b"a\x01b\ttext\tT\n", "over-long line": b"1\t" + OVERLONG},  # fmt: skip
    "passages JSONL": {"malformed line": b'{"id": "1", "text": \n', "missing field": b'{"id": "1", "title": "A"}\n', "wrong type": b'{"id": "1", "text": 5}\n',
                       "duplicate passage ids": b'{"id": "1", "text": "a"}\n{"id": "1", "text": "b"}\n', "not an object": b"[1, 2]\n",
                       "huge single line": json.dumps({"id": "1", "text": HUGE}).encode() + b"\n",
                       "id with a space": b'{"id": "a b", "text": "t"}\n', "id with a tab": b'{"id": "a\\tb", "text": "t"}\n',
                       "id with a line break": b'{"_id": "a\\nb", "text": "t"}\n', "empty id": b'{"id": "", "text": "t"}\n',
                       "over-long line": b'{"id": "1", "text": "' + OVERLONG},  # fmt: skip
    "QA TSV (DPR)": {"malformed line": b"who?\n", "answers not a list": b"who?\t'x'\n", "wrong type": b"who?\t[1, 2]\n", "empty answer list": b"who?\t[]\n",
                     "unparsable answers": b"who?\t['x'\n", "huge single line": f"who?\t['{HUGE}']\n".encode(),
                     "unbalanced quote in the question": b"\"who is a?\t['x']\nwho is b?\t['z']\n",
                     "unbalanced quote in the answers": b"who is a?\t\"['x']\nwho is b?\t['z']\n",
                     "unbalanced quote on the last line": b"who is a?\t['x']\nwho is b?\t\"['z']\n", "over-long line": b"who?\t['" + OVERLONG},  # fmt: skip
    "QA JSONL": {"malformed line": b'{"question": "q", \n', "missing field": b'{"question": "who?"}\n', "answers not a list": b'{"question": "who?", "answer": "x"}\n',
                 "wrong type": b'{"question": 5, "answer": ["x"]}\n', "huge single line": json.dumps({"question": "q?", "answer": [HUGE]}).encode() + b"\n",
                 "over-long line": b'{"question": "' + OVERLONG},  # fmt: skip
    "training JSON": {"malformed line": b'[{"question": "q", ', "missing field": json.dumps([{"question": "q"}]).encode(),
                      "answers not a list": json.dumps([_train(answers="a")]).encode(), "wrong type": json.dumps([_train(positive_ctxs=[{"text": 5}])]).encode(),
                      "not an array": b'{"question": "q"}', "huge single line": json.dumps([_train(question=HUGE)]).encode(),
                      "id with a space": json.dumps([_train(positive_ctxs=[_ctx(passage_id="a b")])]).encode(),
                      "over-long record": json.dumps([_train()]).encode()[:-1] + b', {"question": "' + OVERLONG},  # fmt: skip
    "retrieval JSON": {"malformed line": b'[{"question": "q", ', "missing field": json.dumps([{"question": "q", "answers": ["a"]}]).encode(),
                       "answers not a list": json.dumps([_res(answers="a")]).encode(), "wrong type": json.dumps([_res(ctxs=[{"text": 1}])]).encode(),
                       "huge single line": json.dumps([_res(question=HUGE)]).encode(), "over-long record": b'[{"question": "' + OVERLONG},  # fmt: skip
    "TREC run": {"malformed line": b"0 Q0 1\n", "wrong type": b"0 Q0 1 1 high t\n", "huge single line": f"0 Q0 {HUGE} 1 1.0 t\n".encode(),
                 "id with a control character": b"0 Q0 a\x01b 1 1.0 t\n", "over-long line": b"0 Q0 " + OVERLONG},  # fmt: skip
    "queries TSV": {"malformed line": b"q1 no tab\n", "missing field": b"q1\t\n", "huge single line": f"q1\t{HUGE}\n".encode(),
                    "id with a space": b"q 1\tfirst query\n", "empty id": b"\tfirst query\n", "id with a control character": b"q\x7f1\tfirst query\n",
                    "over-long line": b"q1\t" + OVERLONG},  # fmt: skip
    "queries JSONL": {"malformed line": b'{"_id": "q1", \n', "missing field": b'{"_id": "q1"}\n', "wrong type": b'{"_id": ["q1"], "text": "t"}\n',
                      "huge single line": json.dumps({"_id": "q1", "text": HUGE}).encode() + b"\n", "id with a space": b'{"_id": "q 1", "text": "t"}\n',
                      "id with a tab": b'{"_id": "q\\t1", "text": "t"}\n', "id with a line break": b'{"_id": "q\\n1", "text": "t"}\n',
                      "empty id": b'{"_id": "", "text": "t"}\n', "over-long line": b'{"_id": "q1", "text": "' + OVERLONG},  # fmt: skip
    "qrels TSV": {"malformed line": b"q1\t1\n", "wrong type": b"q1\t1\thigh\n", "huge single line": f"q1\t{HUGE}\t1\n".encode(),
                  "id with a space": b"q1\td 1\t1\n", "empty id": b"\t1\t1\n", "unbalanced quote": b'q1\t"1\t1\nq2\t2\t1\n',
                  "over-long line": b"q1\t" + OVERLONG},  # fmt: skip
    "JSON config": {"malformed line": b'{"a": 1,', "huge single line": json.dumps({"a": HUGE}).encode()},
    "evaluate-qa piece": {"malformed line": _piece()[:-9], "another reader's key": _piece(key="b" * 64),
                          "no key (a piece written before 2026-12-06)": json.dumps({"seconds": 1.5, "readings": [[PIECE_READING]]}).encode(),
                          "a bare list (before 2026-12-05)": json.dumps([[PIECE_READING]]).encode(),
                          "wrong shape": _piece(readings=[[PIECE_READING, PIECE_READING]]), "wrong type": _piece(readings=[[[1.5, 2.0, "a", 3, "x"]]]),
                          "missing field": json.dumps({"key": PIECE_KEY, "readings": [[PIECE_READING]]}).encode()},  # fmt: skip
}

# What the message of each kind of error must say (besides the file, line and field).
NEEDLES = {"unbalanced quote": "unbalanced quote", "unclosed quote": "unbalanced quote", "quoted line break": "unbalanced quote",
           "id with a line break": "line break", "id with": "an id must be", "empty id": "is empty", "over-long": "longer than"}  # fmt: skip


def needle(kind: str) -> str | None:
    """The phrase an error of this kind must contain (the longest matching prefix of NEEDLES)."""
    keys = [k for k in NEEDLES if kind.startswith(k)]
    return NEEDLES[max(keys, key=len)] if keys else None


# Kinds whose correct outcome is acceptance (the content is fine, only the bytes are awkward).
ACCEPTED = {"BOM", "CRLF line ends", "huge single line"}


@dataclass
class Case:
    component: str
    kind: str
    content: bytes | None  # None: the special paths
    expect: str  # "accepted", "error", or "read again" (REDONE components)


def cases() -> list[Case]:
    out = []
    for comp, (_, _, good) in LOADERS.items():
        bad = "read again" if comp in REDONE else "error"
        generic = {"empty file": b"", "non-UTF-8 bytes": good[:-1] + b"\xff" + good[-1:], "BOM": b"\xef\xbb\xbf" + good,
                   "CRLF line ends": good.replace(b"\n", b"\r\n")}  # fmt: skip
        for kind, content in {**generic, **SPECIFIC.get(comp, {})}.items():
            out.append(Case(comp, kind, content, "accepted" if kind in ACCEPTED else bad))
        out.append(Case(comp, "path does not exist", None, bad))
        out.append(Case(comp, "path is a directory", None, bad))
    return out


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """Run one case in directory ``tmp``; returns (outcome, message or what was read)."""
    name, loader, good = LOADERS[case.component]
    path = tmp / name
    if case.kind == "path is a directory":
        path.mkdir()
    elif case.content is not None:
        path.write_bytes(case.content)
    try:
        if case.kind.startswith("over-long"):
            with mock.patch.object(passages_module, "MAX_RECORD_BYTES", SMALL_LIMIT):
                result = loader(path)
        else:
            result = loader(path)
    except InputError as e:
        return "error", str(e)
    except ReadAgain as e:
        return "read again", str(e)
    except Exception as e:  # anything else is a bug: the catalogue reports it as such
        return "crash", f"{type(e).__name__}: {e}"
    n = len(result) if hasattr(result, "__len__") else 1
    return "accepted", f"read {n} item(s)"


def table(rows: list[tuple[Case, str, str]]) -> str:
    lines = ["| component | bad input | expected | outcome | message |", "|---|---|---|---|---|"]
    for c, outcome, msg in rows:
        msg = msg.replace("|", "\\|")
        if len(msg) > 160:
            msg = msg[:157] + "..."
        lines.append(f"| {c.component} | {c.kind} | {c.expect} | {outcome} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import re
    import tempfile

    rows = []
    for c in cases():
        with tempfile.TemporaryDirectory() as d:
            outcome, msg = run_case(c, Path(d))
            rows.append((c, outcome, re.sub(r"/tmp/[^/ ]+/", "", msg)))  # messages without the temp dir
    ok = sum(outcome == c.expect for c, outcome, _ in rows)
    out = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bad-inputs.md"
    head = (f"# Bad-input catalogue\n\n`python -m tests.support.bad_inputs` (the same cases as `tests/data/test_bad_input.py`): "
            f"{len(rows)} cases, {ok} with the expected outcome.\n\n"
            f"The over-long cases run with the size limit of one line or record lowered from "
            f"{passages_module.MAX_RECORD_BYTES // 2**20} MiB to {SMALL_LIMIT // 1024} KiB, so the files stay small.\n\n")  # fmt: skip
    out.write_text(head + table(rows), encoding="utf-8")
    print(f"{ok}/{len(rows)} as expected; written to {out}")


if __name__ == "__main__":
    main()
