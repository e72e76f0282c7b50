"""Passages: the retrieval unit, its on-disk formats, and DPR's 100-word splitter.

Formats (see README, "Formats"):

* DPR passages TSV, the ``psgs_w100.tsv`` layout: a header ``id<TAB>text<TAB>title`` then one
  passage per line, CSV-quoted as Python's ``csv`` module writes it (DPR reads it with
  ``csv.reader(delimiter="\\t")``; so do we).
* JSON lines: one ``{"id": ..., "title": ..., "text": ...}`` object per line (BEIR's
  ``corpus.jsonl`` with ``_id`` is accepted too).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from densepr.errors import InputError, MismatchError
from densepr.fileio import atomic_write

# psgs_w100.tsv lines are < 10 KB; anything near this is a broken quote swallowing the file.
MAX_FIELD_BYTES = 16 * 1024 * 1024
csv.field_size_limit(MAX_FIELD_BYTES)

TSV_HEADER = ["id", "text", "title"]


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: DPR encodes it as ``title [SEP] text`` and matches answers in ``text`` only."""

    id: str
    title: str
    text: str


@dataclass
class Corpus:
    """Passages held column-wise (ids, titles, texts), addressed by row number.

    Retrieval works on row numbers (what BM25 and FAISS return); ``ids`` maps them back to
    the passage ids of the source file.
    """

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    _row_of: dict[str, int] | None = field(default=None, repr=False)

    @classmethod
    def from_passages(cls, passages: Iterable[Passage], source: str | os.PathLike[str] = "<passages>") -> Corpus:
        """Collect passages; a repeated id is an error (it would make results ambiguous)."""
        corpus = cls()
        row_of: dict[str, int] = {}
        for p in passages:
            if p.id in row_of:
                raise InputError(source, f"duplicate passage id {p.id!r} (first seen as passage {row_of[p.id] + 1})", field="id")
            row_of[p.id] = len(corpus.ids)
            corpus.ids.append(p.id)
            corpus.titles.append(p.title)
            corpus.texts.append(p.text)
        corpus._row_of = row_of
        return corpus

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> Passage:
        return Passage(self.ids[row], self.titles[row], self.texts[row])

    def __iter__(self) -> Iterator[Passage]:
        return (self[i] for i in range(len(self)))

    def fingerprint(self) -> dict:
        """Count and sha256 of the ids: recorded by every index to detect a corpus mismatch."""
        h = hashlib.sha256()
        for pid in self.ids:
            h.update(pid.encode("utf-8") + b"\n")
        return {"count": len(self.ids), "ids_sha256": h.hexdigest()}

    def row(self, passage_id: str) -> int:
        """Row number of a passage id (KeyError if absent)."""
        if self._row_of is None:
            self._row_of = {pid: i for i, pid in enumerate(self.ids)}
        return self._row_of[passage_id]


def check_corpus(manifest: dict, corpus: Corpus, what: str) -> None:
    """Refuse an index whose manifest records another corpus than ``corpus``."""
    expected = manifest.get("corpus")
    if expected and expected != corpus.fingerprint():
        raise MismatchError(
            f"{what} was built over {expected['count']} passages with other ids than the "
            f"{len(corpus)} passages given; rebuild it for this corpus"
        )


def _check_text(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")


def iter_tsv_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """``(line_number, fields)`` of each non-blank row of a tab-separated, CSV-quoted file.

    Read as DPR reads its files (``csv.reader(delimiter="\\t")``); a BOM and CRLF line ends are
    tolerated. Undecodable bytes and broken quoting raise :class:`InputError` with the line.
    """
    path = Path(path)
    _check_text(path)
    # utf-8-sig: tolerate a BOM; newline="": let csv handle quoted newlines and CRLF.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text ({e.reason})", line=reader.line_num + 1) from None
            except csv.Error as e:
                raise InputError(path, f"unreadable row ({e}); is a quote left open?", line=reader.line_num) from None
            if row and row != [""]:
                yield reader.line_num, row


def iter_passages_tsv(path: str | os.PathLike[str]) -> Iterator[Passage]:
    """Stream passages from a DPR passages TSV (``id, text, title``; header optional).

    Raises:
        InputError: naming the line and column of a malformed row.
    """
    for n, (lineno, row) in enumerate(iter_tsv_rows(path)):
        if n == 0 and [c.strip().lower() for c in row] == TSV_HEADER:
            continue
        if len(row) != 3:
            raise InputError(path, f"expected 3 tab-separated columns (id, text, title), found {len(row)}", line=lineno)
        pid, text, title = row
        if not pid.strip():
            raise InputError(path, "empty passage id", line=lineno, field="id")
        yield Passage(pid, title, text)


def write_passages_tsv(passages: Iterable[Passage], path: str | os.PathLike[str]) -> int:
    """Write passages in the DPR TSV layout (with header), atomically. Returns the count."""
    n = 0
    with atomic_write(path) as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_HEADER)
        for p in passages:
            writer.writerow([p.id, p.text, p.title])
            n += 1
    return n


def iter_passages_jsonl(path: str | os.PathLike[str]) -> Iterator[Passage]:
    """Stream passages from JSON lines with ``id`` (or BEIR's ``_id``), ``title`` (optional) and ``text``."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path):
        pid = obj.get("id", obj.get("_id"))
        if pid is None or (isinstance(pid, str) and not pid.strip()):
            raise InputError(path, "missing passage id (expected 'id' or '_id')", line=lineno, field="id")
        if not isinstance(pid, (str, int)):
            raise InputError(path, f"expected a string or integer, found {type(pid).__name__}", line=lineno, field="id")
        text, title = obj.get("text"), obj.get("title", "")
        if not isinstance(text, str):
            raise InputError(path, "missing or non-string passage text", line=lineno, field="text")
        if not isinstance(title, str):
            raise InputError(path, "title must be a string", line=lineno, field="title")
        yield Passage(str(pid), title, text)


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of a UTF-8 file (a BOM tolerated); bad bytes raise a located error."""
    path = Path(path)
    _check_text(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})", line=lineno) from None


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file."""
    path = Path(path)
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, found {type(obj).__name__}", line=lineno)
        yield lineno, obj


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Load passages from a DPR TSV (``.tsv``) or JSON-lines (``.jsonl``/``.json``) file."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json"):
        corpus = Corpus.from_passages(iter_passages_jsonl(path), path)
    elif suffix in (".tsv", ".csv", ".txt"):
        corpus = Corpus.from_passages(iter_passages_tsv(path), path)
    else:
        raise InputError(path, f"unknown passage file type {suffix!r}: expected .tsv (DPR layout) or .jsonl")
    if len(corpus) == 0:
        raise InputError(path, "no passages found (empty file?)")
    return corpus


def split_article(title: str, text: str, words: int = 100) -> list[tuple[str, str]]:
    """Split one article into disjoint passages of ``words`` whitespace-separated words.

    This is DPR's corpus rule (Section 4.1 of the paper): every passage keeps the article's
    title, the last passage holds the remainder, and no word is dropped or repeated.

    Returns:
        ``(title, passage_text)`` pairs, in article order; empty for an empty article.
    """
    if words <= 0:
        raise ValueError("words must be positive")
    tokens = text.split()
    return [(title, " ".join(tokens[i : i + words])) for i in range(0, len(tokens), words)]


def split_articles(
    articles: Iterable[tuple[str, str]], words: int = 100, first_id: int = 1
) -> Iterator[Passage]:
    """Split ``(title, text)`` articles into passages numbered from ``first_id`` (psgs_w100 numbering)."""
    next_id = first_id
    for title, text in articles:
        for t, chunk in split_article(title, text, words):
            yield Passage(str(next_id), t, chunk)
            next_id += 1
