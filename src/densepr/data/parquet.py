"""Corpora and QA sets as Arrow tables: parquet files, and Hugging Face ``datasets.Dataset`` objects (Python API).

* Passages: columns ``id`` (or BEIR's ``_id``; string or integer), ``text`` and, optionally, ``title``
  (as the JSON-lines corpus). Other columns are ignored and never read.
* QA sets: ``question`` and ``answers`` (or ``answer``), a list of strings per row.

Read in batches of :data:`BATCH_ROWS` rows (pyarrow's ``iter_batches``: one row group's pages of the
wanted columns at a time), so a corpus of any size is never held whole; :func:`~densepr.data.passages.iter_passages`
and :func:`~densepr.data.qa.load_qa` dispatch here for ``.parquet`` files (by suffix, or parquet's ``PAR1``
magic for QA files). A missing column or a bad value is an :class:`InputError` naming the file, the
row (1-based) and the column. Needs pyarrow (``pip install 'densepr[interop]'``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from densepr.errors import DenseprError, InputError

BATCH_ROWS = 16_384  # rows decoded at a time (a few MB of passages)
PARQUET_MAGIC = b"PAR1"


def is_parquet(path: str | os.PathLike[str]) -> bool:
    """A ``.parquet`` file, or any file starting with parquet's magic bytes."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def is_dataset(obj: object) -> bool:
    """A Hugging Face ``datasets.Dataset`` (never imports ``datasets``: an object can only be one once it is imported)."""
    ds = sys.modules.get("datasets")
    return ds is not None and isinstance(obj, ds.Dataset)


def dataset_name(ds: Any, default: str) -> str:
    """A label for reports: the dataset's name (and split) when it has one."""
    name = getattr(getattr(ds, "info", None), "dataset_name", None) or default
    split = getattr(ds, "split", None)
    return f"{name}-{split}" if split and name != default else name


def _open(source: Any) -> tuple[str, list[str], Any]:
    """``(name, column names, reader)`` of a parquet file (a ``pyarrow.parquet.ParquetFile``) or a Dataset."""
    if is_dataset(source):
        return dataset_name(source, "dataset"), list(source.column_names), source
    path = Path(source)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a file")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DenseprError(f"{path}: reading parquet needs pyarrow (pip install 'densepr[interop]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for a file that is not parquet, or truncated
        raise InputError(path, f"not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
    return str(path), list(pf.schema_arrow.names), pf


def _batches(name: str, reader: Any, columns: Sequence[str]) -> Iterator[Any]:
    """Batches (pyarrow tables or record batches) of ``columns``, :data:`BATCH_ROWS` rows at a time."""
    if is_dataset(reader):
        yield from reader.select_columns(list(columns)).with_format("arrow").iter(batch_size=BATCH_ROWS)
        return
    try:
        yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=list(columns))
    except OSError as e:
        raise InputError(name, f"unreadable parquet data ({' '.join(str(e).split())[:200]})") from None


def _need(name: str, have: list[str], *options: str) -> str:
    """The first of ``options`` among the columns, else an error naming the source and the column."""
    for o in options:
        if o in have:
            return o
    alts = " or ".join(repr(o) for o in options)
    raise InputError(name, f"missing column {alts} (columns: {', '.join(have) or 'none'})", field=options[0])


def iter_passage_rows(source: Any, check_id: Callable[..., str]) -> Iterator[tuple[str, str, str]]:
    """Stream ``(id, title, text)`` from a parquet file or a ``datasets.Dataset`` (see the module docstring);
    ``check_id`` is :func:`densepr.data.passages.check_id` (passed in: passages.py dispatches here, so no import
    back)."""
    name, have, reader = _open(source)  # the columns first: a missing one is refused before any row is read
    id_col, text_col = _need(name, have, "id", "_id"), _need(name, have, "text")
    title_col = "title" if "title" in have else None
    row = 0
    for batch in _batches(name, reader, [c for c in (id_col, title_col, text_col) if c]):
        ids, texts = batch.column(id_col).to_pylist(), batch.column(text_col).to_pylist()
        titles = batch.column(title_col).to_pylist() if title_col else [""] * len(ids)
        for pid, title, text in zip(ids, titles, texts):
            row += 1
            if isinstance(pid, int) and not isinstance(pid, bool):
                pid = str(pid)
            if not isinstance(pid, str):
                raise InputError(name, f"expected a string or integer id, found {_kind(pid)}", line=row, unit="row", field=id_col)
            if not isinstance(text, str):
                raise InputError(name, f"expected the passage text as a string, found {_kind(text)}", line=row, unit="row", field=text_col)
            if title is None:
                title = ""
            if not isinstance(title, str):
                raise InputError(name, f"expected a string, found {_kind(title)}", line=row, unit="row", field="title")
            yield check_id(pid, name, line=row, unit="row"), title, text


def iter_qa_table(source: Any) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Stream ``(question, answers)`` from a parquet file or a ``datasets.Dataset`` (see the module docstring)."""
    name, have, reader = _open(source)
    q_col, a_col = _need(name, have, "question"), _need(name, have, "answers", "answer")
    row = 0
    for batch in _batches(name, reader, [q_col, a_col]):
        for q, answers in zip(batch.column(q_col).to_pylist(), batch.column(a_col).to_pylist()):
            row += 1
            if not isinstance(q, str) or not q.strip():
                raise InputError(name, f"expected a non-empty question, found {_kind(q)}", line=row, unit="row", field=q_col)
            if isinstance(answers, str):  # a single answer as a plain string
                answers = [answers]
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise InputError(name, f"expected a non-empty list of answer strings, found {_kind(answers)}", line=row, unit="row", field=a_col)
            yield q, tuple(answers)


def _kind(value: object) -> str:
    return "null" if value is None else ("an empty list" if value == [] else f"{type(value).__name__} {str(value)[:40]!r}")
