"""BEIR datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` in one directory.

* ``corpus.jsonl``: ``{"_id", "title", "text"}`` per line.
* ``queries.jsonl``: ``{"_id", "text"}`` per line.
* ``qrels/<split>.tsv``: header ``query-id<TAB>corpus-id<TAB>score``, then one judgement per line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from densepr.data.passages import Corpus, check_id, iter_jsonl, iter_lines, iter_passages_jsonl, iter_tsv_rows
from densepr.errors import InputError


@dataclass
class BeirDataset:
    """A BEIR split: the corpus, the judged queries (id -> text) and graded qrels."""

    corpus: Corpus
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def read_queries_jsonl(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"_id", "text"}`` lines to ``{query_id: text}``."""
    out: dict[str, str] = {}
    for lineno, obj in iter_jsonl(path):
        qid, text = obj.get("_id", obj.get("id")), obj.get("text")
        if qid is None:
            raise InputError(path, "missing query id", line=lineno, field="_id")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise InputError(path, f"expected a string or integer, found {type(qid).__name__}", line=lineno, field="_id")
        qid = check_id(str(qid), path, what="query id", line=lineno, field="_id")
        if not isinstance(text, str) or not text.strip():
            raise InputError(path, "missing or empty query text", line=lineno, field="text")
        out[qid] = text
    if not out:
        raise InputError(path, "no queries found (empty file?)")
    return out


def read_queries(path: str | os.PathLike[str]) -> dict[str, str]:
    """Queries from BEIR's ``queries.jsonl`` or a TSV of ``qid<TAB>text`` (Anserini's topics layout)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return read_queries_jsonl(path)
    out: dict[str, str] = {}
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2 or not parts[1].strip():
            raise InputError(path, "expected qid<TAB>query text", line=lineno)
        check_id(parts[0], path, what="query id", line=lineno, field="qid")
        out[parts[0]] = parts[1]
    if not out:
        raise InputError(path, "no queries found (empty file?)")
    return out


def read_qrels_tsv(path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Qrels to ``{qid: {docid: grade}}``: BEIR's TSV (``query-id, corpus-id, score``, header
    optional) or TREC's whitespace-separated ``qid iteration docid grade``."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for lineno, row in iter_tsv_rows(path, ("query-id", "corpus-id", "score")):
        if lineno == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue
        if len(row) == 1 and len(row[0].split()) == 4:  # TREC: qid 0 docid grade
            row = [row[0].split()[i] for i in (0, 2, 3)]
        if len(row) != 3:
            raise InputError(path, f"expected 3 columns (query-id, corpus-id, score), found {len(row)}", line=lineno)
        try:
            grade = int(float(row[2]))
        except (ValueError, OverflowError):
            raise InputError(path, f"score {row[2]!r} is not a number", line=lineno, field="score") from None
        check_id(row[0], path, what="query id", line=lineno, field="query-id")
        check_id(row[1], path, what="passage id", line=lineno, field="corpus-id")
        qrels.setdefault(row[0], {})[row[1]] = grade
    if not qrels:
        raise InputError(path, "no judgements found (empty file?)")
    return qrels


def load_beir(directory: str | os.PathLike[str], split: str = "test") -> BeirDataset:
    """Load a BEIR dataset directory; only queries with judgements in ``split`` are kept."""
    d = Path(directory)
    if not d.is_dir():
        raise InputError(d, "not a directory (expected a BEIR dataset with corpus.jsonl)")
    corpus = Corpus.from_passages(iter_passages_jsonl(d / "corpus.jsonl"), d / "corpus.jsonl")
    queries = read_queries_jsonl(d / "queries.jsonl")
    qrels = read_qrels_tsv(d / "qrels" / f"{split}.tsv")
    missing = sorted(set(qrels) - set(queries))
    if missing:
        raise InputError(d / "qrels" / f"{split}.tsv", f"query ids {missing[:5]} not in queries.jsonl", field="query-id")
    return BeirDataset(corpus, {q: queries[q] for q in qrels}, qrels)
