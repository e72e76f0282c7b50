"""DPR's retriever training JSON (``biencoder-nq-train.json`` and what ``densepr data build-train`` writes).

The file is one JSON array of records::

    {"dataset": "...", "question": "...", "answers": ["..."],
     "positive_ctxs":      [{"title": "...", "text": "...", "passage_id": "...", "score": ...}],
     "negative_ctxs":      [...],   # random passages
     "hard_negative_ctxs": [...]}   # BM25 passages without an answer

The official files are several GB, so records are streamed with ijson (C backend) and
never held all at once.

Tevatron's JSON-lines training data is read too (one object per line; the first character ``{``)::

    {"query_id": "...", "query": "...", "answers": [...],          # answers: optional
     "positive_passages": [{"docid": "...", "title": "...", "text": "..."}],
     "negative_passages": [...]}                                    # its (BM25) hard negatives

``negative_passages`` become ``hard_negative_ctxs``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import ijson

from densepr.data.passages import Passage, RecordReader, check_id, iter_jsonl
from densepr.errors import InputError
from densepr.fileio.atomic import atomic_write

RECORD_FIELDS = {"dataset", "question", "answers", "positive_ctxs", "negative_ctxs", "hard_negative_ctxs", "id", "qid"}
CTX_FIELDS = {"title", "text", "passage_id", "id", "psg_id", "score", "title_score", "has_answer"}
CTX_LISTS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")
TEVATRON_FIELDS = {"query_id", "query", "answers", "positive_passages", "negative_passages"}
TEVATRON_PASSAGE_FIELDS = {"docid", "title", "text"}


@dataclass
class TrainRecord:
    """One training question with its positive, random-negative and hard-negative passages."""

    question: str
    answers: list[str]
    positive_ctxs: list[Passage]
    negative_ctxs: list[Passage] = field(default_factory=list)
    hard_negative_ctxs: list[Passage] = field(default_factory=list)
    dataset: str = ""

    def to_json(self) -> dict:
        def ctx(p: Passage) -> dict:
            return {"title": p.title, "text": p.text, "passage_id": p.id}

        return {
            "dataset": self.dataset,
            "question": self.question,
            "answers": self.answers,
            **{name: [ctx(p) for p in getattr(self, name)] for name in CTX_LISTS},
        }


def _ctx(obj: object, path: Path, rec: int, where: str) -> Passage:
    if not isinstance(obj, dict):
        raise InputError(path, f"{where}: expected an object, found {type(obj).__name__}", line=rec, unit="record")
    unknown = set(obj) - CTX_FIELDS
    if unknown:
        raise InputError(path, f"{where}: unknown field(s) {sorted(unknown)}", line=rec, unit="record")
    text, title = obj.get("text"), obj.get("title", "")
    if not isinstance(text, str) or not text.strip():
        raise InputError(path, f"{where}: missing or empty 'text'", line=rec, unit="record", field="text")
    if not isinstance(title, str):
        raise InputError(path, f"{where}: 'title' must be a string", line=rec, unit="record", field="title")
    pid = obj.get("passage_id", obj.get("id", obj.get("psg_id", "")))
    if pid not in ("", None):  # optional here; when given, the same rule as every id
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InputError(path, f"{where}: passage id must be a string or integer", line=rec, unit="record", field="passage_id")
        check_id(str(pid), path, what=f"{where}: passage id", line=rec, unit="record", field="passage_id")
    return Passage("" if pid is None else str(pid), title, text)


def parse_record(obj: object, path: Path, rec: int) -> TrainRecord:
    """Validate one raw record; raises :class:`InputError` naming the record number and field."""
    if not isinstance(obj, dict):
        raise InputError(path, f"expected an object, found {type(obj).__name__}", line=rec, unit="record")
    unknown = set(obj) - RECORD_FIELDS
    if unknown:
        raise InputError(path, f"unknown field(s) {sorted(unknown)}", line=rec, unit="record")
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise InputError(path, "missing or empty question", line=rec, unit="record", field="question")
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(path, "answers must be a list of strings", line=rec, unit="record", field="answers")
    lists = {}
    for name in CTX_LISTS:
        value = obj.get(name, [])
        if not isinstance(value, list):
            raise InputError(path, f"expected a list, found {type(value).__name__}", line=rec, unit="record", field=name)
        lists[name] = [_ctx(c, path, rec, f"{name}[{i}]") for i, c in enumerate(value)]
    if not lists["positive_ctxs"]:
        raise InputError(path, "no positive passage", line=rec, unit="record", field="positive_ctxs")
    return TrainRecord(q, list(answers), dataset=str(obj.get("dataset", "")), **lists)


def parse_tevatron(obj: dict, path: Path, line: int) -> TrainRecord:
    """One Tevatron JSON-lines record (see module docstring); raises :class:`InputError` naming line and field."""
    if not {"query", "positive_passages"} & set(obj):
        raise InputError(path, "expected a JSON array of DPR records (first character '['), or JSON lines of Tevatron "
                         "records (query, positive_passages, negative_passages)", line=line)  # fmt: skip
    unknown = set(obj) - TEVATRON_FIELDS
    if unknown:
        raise InputError(path, f"unknown field(s) {sorted(unknown)} in a Tevatron record (expected {sorted(TEVATRON_FIELDS)})", line=line)
    q = obj.get("query")
    if not isinstance(q, str) or not q.strip():
        raise InputError(path, "missing or empty query", line=line, field="query")
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise InputError(path, "answers must be a list of strings", line=line, field="answers")
    lists = []
    for name in ("positive_passages", "negative_passages"):
        value = obj.get(name, [])
        if not isinstance(value, list):
            raise InputError(path, f"expected a list, found {type(value).__name__}", line=line, field=name)
        psgs = []
        for i, c in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(c, dict) or set(c) - TEVATRON_PASSAGE_FIELDS:
                raise InputError(path, f"{where}: expected an object with {sorted(TEVATRON_PASSAGE_FIELDS)}", line=line, field=name)
            text, title, pid = c.get("text"), c.get("title", ""), c.get("docid", "")
            if not isinstance(text, str) or not text.strip():
                raise InputError(path, f"{where}: missing or empty 'text'", line=line, field="text")
            if not isinstance(title, str) or not isinstance(pid, (str, int)) or isinstance(pid, bool):
                raise InputError(path, f"{where}: 'title' must be a string, 'docid' a string or integer", line=line, field=name)
            if pid != "":
                check_id(str(pid), path, what=f"{where}: docid", line=line, field="docid")
            psgs.append(Passage(str(pid), title, text))
        lists.append(psgs)
    if not lists[0]:
        raise InputError(path, "no positive passage", line=line, field="positive_passages")
    return TrainRecord(q, list(answers), lists[0], hard_negative_ctxs=lists[1], dataset="tevatron")


def _kept(items: Iterable[tuple[object, int]], parse, path: Path, skip_bad: bool, stats: dict) -> Iterator[TrainRecord]:
    """``parse(obj, path, n)`` of each ``(obj, n)``; an invalid one raises, or with ``skip_bad`` is counted and skipped."""
    for obj, n in items:
        try:
            record = parse(obj, path, n)
        except InputError:
            if not skip_bad:
                raise
            stats["skipped"] += 1
            continue
        stats["read"] += 1
        yield record


def iter_train_records(
    path: str | os.PathLike[str], skip_bad: bool = False, stats: dict | None = None
) -> Iterator[TrainRecord]:
    """Stream and validate the records of a DPR retriever JSON file, or of a JSON-lines file (Tevatron's).

    Args:
        path: the JSON array file, or the JSON-lines file.
        skip_bad: skip (and count) invalid records instead of raising on the first one.
        stats: if given, filled with ``{"read": n, "skipped": m}`` as the stream advances.

    Raises:
        InputError: a malformed file, or an invalid record when ``skip_bad`` is false.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a file")
    stats = stats if stats is not None else {}
    stats.update(read=0, skipped=0)
    rec = 0
    with open(path, "rb") as fh:
        bom = fh.read(3) == b"\xef\xbb\xbf"
        fh.seek(3 if bom else 0)
        head = fh.read(64).lstrip()
        if not head:
            raise InputError(path, "empty file, expected a JSON array of records")
        if head.startswith(b"{"):  # JSON lines (Tevatron's layout)
            yield from _kept(((obj, line) for line, obj in iter_jsonl(path)), parse_tevatron, path, skip_bad, stats)
            return
        if not head.startswith(b"["):
            raise InputError(path, "expected a JSON array of records (first character '[') or JSON lines (first character '{')")
        fh.seek(3 if bom else 0)
        source = RecordReader(fh, path)  # one record at a time, each at most MAX_RECORD_BYTES
        def numbered():
            nonlocal rec
            for obj in ijson.items(source, "item", use_float=True):
                rec += 1
                source.next_record()
                yield obj, rec

        try:
            yield from _kept(numbered(), parse_record, path, skip_bad, stats)
        except ijson.JSONError as e:
            raise InputError(path, f"invalid JSON after record {rec}: {str(e).splitlines()[0]}", line=rec + 1, unit="record") from None
        except UnicodeDecodeError as e:
            raise InputError(path, f"not UTF-8 text ({e.reason})", line=rec + 1, unit="record") from None


def write_train_records(records: Iterable[TrainRecord], path: str | os.PathLike[str]) -> int:
    """Write records as a DPR retriever JSON array, streaming and atomically. Returns the count."""
    n = 0
    with atomic_write(path) as fh:
        fh.write("[")
        for r in records:
            fh.write(",\n" if n else "\n")
            fh.write(json.dumps(r.to_json(), ensure_ascii=False))
            n += 1
        fh.write("\n]\n")
    return n
