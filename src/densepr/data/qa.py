"""Question/answer sets: DPR's ``*.qa.csv`` TSV files and the JSON-lines sets (with CuratedTREC's regexes).

* DPR TSV: ``question<TAB>answers`` per line, where ``answers`` is a Python list literal
  (``['a', "b's"]``) or a JSON list; CSV-quoted, as DPR reads it with
  ``csv.reader(delimiter="\\t")``. The literal is parsed with ``ast.literal_eval``, never ``eval``.
* JSON lines: ``{"question": ..., "answer": [...]}`` (Pyserini's ``topics.dpr.*``; the key
  ``answers`` is accepted too). For CuratedTREC the answers are regular expressions.
* Parquet (``question`` and ``answers`` columns) and, from Python, a ``datasets.Dataset``: :mod:`densepr.data.parquet`.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from densepr.data.passages import flat_field, iter_jsonl, iter_tsv_rows
from densepr.errors import InputError
from densepr.fileio.atomic import atomic_write


@dataclass(frozen=True)
class QA:
    """A question and its gold answers (strings, or regexes for CuratedTREC)."""

    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class QASet:
    """A named list of questions and how their answers are matched (``string`` or ``regex``)."""

    name: str
    items: list[QA]
    match: str = "string"

    def __len__(self) -> int:
        return len(self.items)

    @property
    def questions(self) -> list[str]:
        return [q.question for q in self.items]

    def head(self, n: int | None) -> QASet:
        """The first ``n`` questions (all when ``n`` is None): DPR's files are in a fixed order."""
        return self if n is None or n >= len(self.items) else QASet(self.name, self.items[:n], self.match)

    def fingerprint(self) -> str:
        """sha256 of the questions, answers and matching: what an evaluation of this set depends on."""
        items = [[q.question, list(q.answers)] for q in self.items]
        return hashlib.sha256(json.dumps([self.match, items], ensure_ascii=False).encode()).hexdigest()


def _answers(value: object, path: Path, lineno: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        kind = "an empty list" if value == [] else type(value).__name__
        raise InputError(path, f"expected a non-empty list of answer strings, found {kind}", line=lineno, field="answers")
    for a in value:
        if not isinstance(a, str):
            raise InputError(path, f"answer {a!r} is not a string", line=lineno, field="answers")
    return tuple(value)


def _parse_answer_list(raw: str, path: Path, lineno: int) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise InputError(
                path, f"cannot parse {raw[:80]!r} as a list of answers (expected ['a', 'b'])", line=lineno, field="answers"
            ) from None
    return _answers(value, path, lineno)


def iter_qa_tsv(path: str | os.PathLike[str]) -> Iterator[QA]:
    """Stream a DPR QA TSV/CSV file (see module docstring)."""
    path = Path(path)
    for lineno, row in iter_tsv_rows(path, ("question", "answers", "id")):
        if len(row) < 2:
            raise InputError(path, "expected question<TAB>answers, found one column", line=lineno)
        if len(row) > 3:  # DPR files may carry a third id column; more is a broken line.
            raise InputError(path, f"expected 2 tab-separated columns, found {len(row)}", line=lineno)
        if not row[0].strip():
            raise InputError(path, "empty question", line=lineno, field="question")
        yield QA(row[0], _parse_answer_list(row[1], path, lineno))


def iter_qa_jsonl(path: str | os.PathLike[str]) -> Iterator[QA]:
    """Stream a JSON-lines QA file (``question`` and ``answer`` or ``answers``)."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        q = obj.get("question")
        if not isinstance(q, str) or not q.strip():
            raise InputError(path, "missing or empty question", line=lineno, field="question")
        key = "answer" if "answer" in obj else "answers"
        if key not in obj:
            raise InputError(path, "missing answers (expected 'answer' or 'answers')", line=lineno, field="answer")
        yield QA(q, _answers(obj[key], path, lineno))


def default_match(name: str) -> str:
    """How a QA file's answers are matched when not said: ``regex`` for CuratedTREC (its file name holds
    "curated"), else ``string``."""
    return "regex" if "curated" in name.lower() else "string"


def load_qa(
    path: str | os.PathLike[str], name: str | None = None, match: str | None = None, limit: int | None = None
) -> QASet:
    """Load a QA file, detecting its format: parquet (by suffix or magic bytes), else by its first
    non-blank character (``{`` = JSON lines, else DPR TSV).

    Args:
        path: DPR TSV/CSV, JSON-lines or parquet file (``question`` and ``answers`` columns); from
            Python also a ``datasets.Dataset`` with those columns.
        name: a label for reports (default: the file name).
        match: ``string`` (DPR's token match) or ``regex`` (CuratedTREC); default ``regex``
            when the file name contains "curated", else ``string``.
        limit: keep only the first ``limit`` questions.
    """
    from densepr.data.parquet import dataset_name, is_dataset, is_parquet, iter_qa_table

    if is_dataset(path):
        it = (QA(q, a) for q, a in iter_qa_table(path))
        path = Path(dataset_name(path, "dataset"))  # its label in reports
    else:
        path = Path(path)
        if not path.exists():
            raise InputError(path, "file not found")
        if path.is_dir():
            raise InputError(path, "is a directory, expected a QA file")
        with open(path, "rb") as fh:
            head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if is_parquet(path):
            it = (QA(q, a) for q, a in iter_qa_table(path))
        else:
            it = iter_qa_jsonl(path) if head.startswith(b"{") else iter_qa_tsv(path)
    items = []
    for qa in it:
        items.append(qa)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(path, "no questions found (empty file?)")
    if match is None:
        match = default_match(path.name)
    if match not in ("string", "regex"):
        raise ValueError(f"match must be 'string' or 'regex', not {match!r}")
    return QASet(name or path.name, items, match)


def write_qa_tsv(qas: QASet, path: str | os.PathLike[str]) -> None:
    """Write a QA set in DPR's TSV layout (answers as a JSON list, which DPR's reader also accepts)."""
    with atomic_write(path) as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        for qa in qas.items:
            writer.writerow([flat_field(qa.question), json.dumps(list(qa.answers), ensure_ascii=False)])  # one question per line
