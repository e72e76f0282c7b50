"""Passages: the retrieval unit, its on-disk formats, and DPR's 100-word splitter.

Formats (see README, "Formats"):

* DPR passages TSV, the ``psgs_w100.tsv`` layout: a header ``id<TAB>text<TAB>title`` then one
  passage per line, CSV-quoted as Python's ``csv`` module writes it (DPR reads it with
  ``csv.reader(delimiter="\\t")``; so do we).
* JSON lines: one ``{"id": ..., "title": ..., "text": ...}`` object per line (BEIR's
  ``corpus.jsonl`` with ``_id`` is accepted too).
* Parquet (``id``/``_id``, ``text``, ``title`` columns) and, from Python, a ``datasets.Dataset``: :mod:`densepr.data.parquet`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from densepr.errors import InputError, MismatchError
from densepr.fileio.atomic import atomic_write
from densepr.fileio.ids import IdLines

# The one size limit of every loader: a line of a line-based file (TSV, JSON lines, TREC, qrels),
# a CSV record, or one element of a JSON-array file (training JSON, DPR result JSON). Files are
# read in pieces of at most this size, so a file with no line break (or a quote or bracket left
# open) is refused after reading this much, not read whole. psgs_w100.tsv lines are < 10 KB and a
# DPR result record with 100 passages ~100 KB; read at call time, so it can be changed.
MAX_RECORD_BYTES = 32 * 1024 * 1024
MAX_FIELD_BYTES = MAX_RECORD_BYTES  # kept for compatibility: a field cannot exceed its record
csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES))

TSV_HEADER = ["id", "text", "title"]
PASSAGES_FILE = "passages.tsv"  # an index directory's corpus (densepr.retrieve.index_dir.IndexDir)


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
    _fingerprint: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_passages(cls, passages: Iterable[Passage], source: str | os.PathLike[str] = "<passages>") -> Corpus:
        """Collect passages; a repeated id is an error (it would make results ambiguous)."""
        corpus = cls()
        row_of: dict[str, int] = {}
        for p in passages:
            check_id(p.id, source, line=len(corpus.ids) + 1, unit="passage")
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

    def blocks(self, size: int, which: Iterable[int] | None = None) -> Iterator[tuple[int, list[str], list[str], list[str]]]:
        """``(i, ids, titles, texts)`` of block ``i`` (rows ``[i size, (i + 1) size)``) for every block, or
        those in ``which``, in order: how the encode stage and the BM25 build read a corpus part by part
        (a :class:`~densepr.data.store.StreamedCorpus` streams the same blocks from a file)."""
        n = len(self)
        for i in range(-(-n // size)) if which is None else sorted(set(which)):
            lo, hi = i * size, min(n, (i + 1) * size)
            yield i, self.ids[lo:hi], self.titles[lo:hi], self.texts[lo:hi]

    def fingerprint(self) -> dict:
        """Count, sha256 of the ids, and sha256 of the content (every id, title and text, in row
        order): recorded by every index built over the corpus, so a corpus with other ids, other
        texts or the same texts in another order is refused. Computed once (a corpus is not
        changed once built)."""
        key = (len(self.ids), id(self.ids), id(self.titles), id(self.texts))
        if self._fingerprint is None or self._fingerprint[0] != key:
            self._fingerprint = (key, corpus_fingerprint(self.ids, self.titles, self.texts))
        return dict(self._fingerprint[1])

    def row(self, passage_id: str) -> int:
        """Row number of a passage id (KeyError if absent)."""
        if self._row_of is None:
            self._row_of = {pid: i for i, pid in enumerate(self.ids)}
        return self._row_of[passage_id]

    def rows(self, passage_ids: Sequence[str]) -> np.ndarray:
        """Row numbers (int64) of many passage ids, as :meth:`row` gives them (KeyError naming the first
        absent one). The common case, this corpus's own ids in row order, is found with one comparison."""
        if len(passage_ids) == len(self.ids) and list(passage_ids) == self.ids:
            return np.arange(len(self.ids), dtype=np.int64)
        return np.fromiter(map(self.row, passage_ids), dtype=np.int64, count=len(passage_ids))


FP_ROWS = 1 << 14  # rows per block of the content hash (part of its definition)


def ids_text(ids: Sequence[str]) -> bytes:
    """What the fingerprint's ``ids_sha256`` hashes for ``ids``: each id and a line break, UTF-8
    (lone surrogates passed); blocks of it concatenate to the whole corpus's."""
    return ("\n".join(ids) + "\n").encode("utf-8", "surrogatepass")


def ids_sha256(ids: Sequence[str]) -> str:
    """The fingerprint's ``ids_sha256`` of ``ids`` (hex), hashed block by block: no text of them all
    is built (an :class:`~densepr.fileio.IdLines` hashes its bytes, which are that text)."""
    if isinstance(ids, IdLines):
        return ids.sha256()
    h = hashlib.sha256()
    for lo in range(0, len(ids), FP_ROWS):
        h.update(ids_text(ids[lo : lo + FP_ROWS]))
    return h.hexdigest()


class Fingerprinter:
    """:meth:`Corpus.fingerprint`, fed block by block (``FP_ROWS`` rows a block, the last may be
    shorter), so a store built while streaming a file gets the same fingerprint as the corpus in memory."""

    def __init__(self) -> None:
        self.count, self.h_ids, self.h_all = 0, hashlib.sha256(), hashlib.sha256()

    def add(self, ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]) -> None:
        for part in (ids, titles, texts):
            self.h_all.update(np.fromiter(map(len, part), dtype="<i8", count=len(part)).tobytes())
            self.h_all.update("".join(part).encode("utf-8", "surrogatepass"))
        self.h_ids.update(ids_text(ids))
        self.count += len(ids)

    def result(self) -> dict:
        return {"count": self.count, "ids_sha256": self.h_ids.hexdigest(), "content_sha256": self.h_all.hexdigest()}


def corpus_fingerprint(ids: Sequence[str], titles: Sequence[str], texts: Sequence[str]) -> dict:
    """See :meth:`Corpus.fingerprint`. Per block of ``FP_ROWS`` rows and per column (ids, titles,
    texts), the content hash takes every value's length (int64) then the values concatenated
    (UTF-8): so no choice of texts hashes alike by moving characters between fields or rows.
    About 0.9 s per million 270-character passages."""
    fp = Fingerprinter()
    for lo in range(0, len(ids), FP_ROWS):
        fp.add(ids[lo : lo + FP_ROWS], titles[lo : lo + FP_ROWS], texts[lo : lo + FP_ROWS])
    return fp.result()


def check_corpus(manifest: dict, corpus: Corpus, what: str) -> None:
    """Refuse an index whose manifest records another corpus than ``corpus`` (other ids, or the
    same ids with other titles or texts); one built by an older densepr, whose fingerprint covered
    the ids only, is refused too: it cannot show that its texts are these."""
    expected = manifest.get("corpus")
    if not expected:
        return
    mine = corpus.fingerprint()
    if expected.get("count") != mine["count"] or expected.get("ids_sha256") != mine["ids_sha256"]:
        raise MismatchError(
            f"{what} was built over {expected.get('count')} passages with other ids than the "
            f"{len(corpus)} passages given; rebuild it for this corpus"
        )
    if "content_sha256" not in expected:
        raise MismatchError(
            f"{what} was built by an older densepr that fingerprinted passage ids only, so it cannot "
            "show that it was built over these passage texts; rebuild it"
        )
    if expected["content_sha256"] != mine["content_sha256"]:
        raise MismatchError(
            f"{what} was built over passages with the same {len(corpus)} ids but other titles or texts "
            "(edited, or shifted between rows); rebuild it for this corpus"
        )


def _check_text(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, expected a file")


# -- ids ---------------------------------------------------------------------------------------
_CHAR_NAMES = {" ": "a space", "\t": "a tab", "\n": "a line break", "\r": "a carriage return", "\x00": "a NUL byte"}


def id_problem(value: object) -> str | None:
    """What is wrong with a passage or query id, or None: the one rule for every id densepr reads.

    An id must be a non-empty string without whitespace or control characters: TREC runs and qrels
    separate their columns by whitespace, and ids files hold one id per line.
    """
    if not isinstance(value, str):
        return f"must be a string, found {type(value).__name__}"
    if not value:
        return "is empty"
    if value.isprintable() and " " not in value:  # the fast path: no separator, control or format character
        return None
    for i, c in enumerate(value):
        if c.isspace() or unicodedata.category(c) in ("Cc", "Cf"):
            what = _CHAR_NAMES.get(c) or f"the character U+{ord(c):04X} ({unicodedata.name(c, 'a control character').lower()})"
            return f"contains {what} at position {i + 1}"
    return None  # unassigned or private-use code points: odd, but harmless in a TREC column


def check_id(
    value: object, path: str | os.PathLike[str], *, what: str = "passage id", line: int | None = None,
    field: str = "id", unit: str = "line",
) -> str:
    """Return ``value`` if it is a valid id (see :func:`id_problem`), else raise a located :class:`InputError`."""
    problem = id_problem(value)
    if problem is not None:
        raise InputError(
            path, f"{what} {value!r} {problem} (an id must be non-empty, with no whitespace or control "
            "characters: TREC runs are whitespace-separated)", line=line, field=field, unit=unit,
        )  # fmt: skip
    return value  # type: ignore[return-value]


# -- lines and records, read with bounded memory --------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}..{last}"


class BytesRead:
    """The bytes of a file a streaming reader has consumed so far (``n``): what a bar over its size advances by."""

    n = 0


def iter_lines(path: str | os.PathLike[str], read: BytesRead | None = None) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of a UTF-8 file (a BOM tolerated; the line end kept).
    ``read``, when given, counts the bytes consumed (up to the end of the line last yielded).

    Reads at most :data:`MAX_RECORD_BYTES` per line: a longer line (a file without line breaks,
    a binary file) is refused with its line number once that much has been read, never read whole.
    Undecodable bytes raise a located :class:`InputError`.
    """
    path = Path(path)
    _check_text(path)
    limit = MAX_RECORD_BYTES
    piece = min(1 << 20, limit + 1)
    with open(path, "rb") as fh:
        lineno = 0
        while raw := fh.readline(piece):
            lineno += 1
            if len(raw) == piece and not raw.endswith(b"\n"):  # a long line: gathered in pieces, up to the limit
                buf = bytearray(raw)
                while len(buf) <= limit and not buf.endswith(b"\n") and (more := fh.readline(min(piece, limit + 1 - len(buf)))):
                    buf += more
                raw = buf
            if len(raw) > limit + raw.endswith(b"\n"):
                raise InputError(path, f"line longer than {_mib(limit)}, the limit for one line; a file without line breaks, "
                                 "or not a text file of this kind?", line=lineno)  # fmt: skip
            if read is not None:
                read.n += len(raw)
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})", line=lineno) from None


class RecordReader:
    """A binary file for a streaming JSON parser (ijson) that refuses an array element over the limit.

    The parser reads through :meth:`read`; the caller calls :meth:`next_record` after each element
    it gets, and a record that has taken more than :data:`MAX_RECORD_BYTES` of input so far raises
    a located :class:`InputError`, so one huge (or unterminated) record is never held whole.
    """

    def __init__(self, fh: BinaryIO, path: str | os.PathLike[str]) -> None:
        self.fh, self.path, self.limit = fh, path, MAX_RECORD_BYTES
        self.pos = self.mark = fh.tell()
        self.record = 1

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n if n is not None and n >= 0 else 1 << 16)  # never the whole file at once
        self.pos += len(data)
        if self.pos - self.mark > self.limit:
            raise InputError(self.path, f"record longer than {_mib(self.limit)}, the limit for one record; "
                             "a bracket or quote left open?", line=self.record, unit="record")  # fmt: skip
        return data

    def next_record(self) -> None:
        self.mark, self.record = self.pos, self.record + 1


def iter_tsv_rows(path: str | os.PathLike[str], columns: tuple[str, ...] = (), read: BytesRead | None = None) -> Iterator[tuple[int, list[str]]]:
    """``(line_number, fields)`` of each non-blank row of a tab-separated, CSV-quoted file.

    Read as DPR reads its files (``csv.reader(delimiter="\\t")``); a BOM and CRLF line ends are
    tolerated. One row is one line: a field holding a line break is an unbalanced quote that
    swallowed the lines after it (what ``csv`` does silently), refused with the line where the quote
    opened. Undecodable bytes and over-long lines raise :class:`InputError` with the line;
    ``columns`` names the fields in messages; ``read`` counts the bytes consumed (:func:`iter_lines`).
    """
    path = Path(path)
    limit = MAX_RECORD_BYTES
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)
    state = {"start": 1, "chars": 0}

    def feed() -> Iterator[str]:
        for lineno, text in iter_lines(path, read):
            state["chars"] += len(text)
            if state["chars"] > limit:  # a quote left open, swallowing line after line
                raise InputError(path, f"unbalanced quote: the field opened at line {state['start']} runs past line {lineno} "
                                 f"(over {_mib(limit)}); close it or double it (\"\")", line=state["start"])  # fmt: skip
            yield text

    reader = csv.reader(feed(), delimiter="\t")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputError(path, f"unreadable row ({e}); is a quote left open?", line=state["start"]) from None
        start, end = state["start"], reader.line_num
        state["start"], state["chars"] = end + 1, 0
        broken = next((i for i, f in enumerate(row) if "\n" in f or "\r" in f), None)
        if broken is not None:
            name = columns[broken] if broken < len(columns) else None
            if row[-1].endswith(("\n", "\r")):  # the quote never closed: the field ran to the end of the file
                what = "it runs to the end of the file" + (f", swallowing {_lines(start + 1, end)}" if end > start else "")
            else:
                what = f"it swallowed {_lines(start + 1, end)}"
            raise InputError(path, f"unbalanced quote: the field opened at line {start} holds a line break, {what}; "
                             "close the quote or double it (\"\")", line=start, field=name)  # fmt: skip
        if row and row != [""]:
            yield start, row


def iter_passages_tsv(path: str | os.PathLike[str], read: BytesRead | None = None) -> Iterator[Passage]:
    """Stream passages from a DPR passages TSV (``id, text, title``; header optional).

    Raises:
        InputError: naming the line and column of a malformed row (wrong column count, a bad id,
            an unbalanced quote).
    """
    for n, (lineno, row) in enumerate(iter_tsv_rows(path, TSV_HEADER, read)):
        if n == 0 and [c.strip().lower() for c in row] == TSV_HEADER:
            continue
        if len(row) != 3:
            raise InputError(path, f"expected 3 tab-separated columns (id, text, title), found {len(row)}", line=lineno)
        pid, text, title = row
        check_id(pid, path, line=lineno)
        yield Passage(pid, title, text)


def flat_field(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def write_passages_tsv(passages: Iterable[Passage], path: str | os.PathLike[str]) -> int:
    """Write passages in the DPR TSV layout (with header), atomically. Returns the count.

    One passage per line, as in ``psgs_w100.tsv``: a line break inside a text or title becomes a
    space (the tokenizers treat both alike), which is what lets the reader refuse a stray quote.
    """
    n = 0
    with atomic_write(path) as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_HEADER)
        for p in passages:
            writer.writerow([check_id(p.id, path, line=n + 1, unit="passage"), flat_field(p.text), flat_field(p.title)])
            n += 1
    return n


def iter_passages_jsonl(path: str | os.PathLike[str], read: BytesRead | None = None) -> Iterator[Passage]:
    """Stream passages from JSON lines with ``id`` (or BEIR's ``_id``), ``title`` (optional) and ``text``."""
    path = Path(path)
    for lineno, obj in iter_jsonl(path, read):
        pid = obj.get("id", obj.get("_id"))
        if pid is None:
            raise InputError(path, "missing passage id (expected 'id' or '_id')", line=lineno, field="id")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InputError(path, f"expected a string or integer, found {type(pid).__name__}", line=lineno, field="id")
        pid = check_id(str(pid), path, line=lineno)
        text, title = obj.get("text"), obj.get("title", "")
        if not isinstance(text, str):
            raise InputError(path, "missing or non-string passage text", line=lineno, field="text")
        if not isinstance(title, str):
            raise InputError(path, "title must be a string", line=lineno, field="title")
        yield Passage(pid, title, text)


def iter_jsonl(path: str | os.PathLike[str], read: BytesRead | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON-lines file (lines bounded as :func:`iter_lines`)."""
    path = Path(path)
    for lineno, line in iter_lines(path, read):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"invalid JSON: {e.msg} (column {e.colno})", line=lineno) from None
        except RecursionError:
            raise InputError(path, "invalid JSON: nested too deeply", line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, found {type(obj).__name__}", line=lineno)
        yield lineno, obj


def iter_passages(path: str | os.PathLike[str], read: BytesRead | None = None) -> Iterator[Passage]:
    """Stream the passages of a DPR TSV (``.tsv``), JSON-lines (``.jsonl``/``.json``) or parquet (``.parquet``)
    file, by its suffix; or, from Python, of a ``datasets.Dataset`` (:mod:`densepr.data.parquet`).
    ``read`` counts the bytes of a TSV or JSON-lines file consumed so far (parquet's are not counted)."""
    from densepr.data.parquet import is_dataset, iter_passage_rows

    if is_dataset(path) or Path(path).suffix == ".parquet":
        return (Passage(*r) for r in iter_passage_rows(path, check_id))
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json"):
        return iter_passages_jsonl(path, read)
    if suffix in (".tsv", ".csv", ".txt"):
        return iter_passages_tsv(path, read)
    raise InputError(path, f"unknown passage file type {suffix!r}: expected .tsv (DPR layout), .jsonl or .parquet")


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Load passages from a DPR TSV (``.tsv``), JSON-lines (``.jsonl``/``.json``) or parquet file, or a ``datasets.Dataset``."""
    from densepr.data.parquet import dataset_name, is_dataset

    source = dataset_name(path, "dataset") if is_dataset(path) else Path(path)
    corpus = Corpus.from_passages(iter_passages(path), source)
    if len(corpus) == 0:
        raise InputError(source, "no passages found (empty file?)")
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


def read_articles(path: str | os.PathLike[str]) -> Iterator[tuple[str, str]]:
    """``(title, text)`` of each article of a JSON-lines file (``{"title": ..., "text": ...}``, the title
    optional), streamed, for :func:`split_articles`; a bad record is an :class:`InputError` naming its line and field."""
    for lineno, obj in iter_jsonl(path):
        title, text = obj.get("title", ""), obj.get("text")
        if not isinstance(text, str):
            raise InputError(path, "missing or non-string text", line=lineno, field="text")
        if not isinstance(title, str):
            raise InputError(path, "title must be a string", line=lineno, field="title")
        yield title, text


def split_articles(
    articles: Iterable[tuple[str, str]], words: int = 100, first_id: int = 1
) -> Iterator[Passage]:
    """Split ``(title, text)`` articles into passages numbered from ``first_id`` (psgs_w100 numbering)."""
    next_id = first_id
    for title, text in articles:
        for t, chunk in split_article(title, text, words):
            yield Passage(str(next_id), t, chunk)
            next_id += 1
