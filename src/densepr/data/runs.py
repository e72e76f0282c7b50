"""Retrieval results in memory and on disk: DPR's result JSON and TREC run files.

* DPR result JSON (what DPR's ``dense_retriever.py`` writes and its reader trains on)::

    [{"question": "...", "answers": ["..."],
      "ctxs": [{"id": "...", "title": "...", "text": "...", "score": 81.2, "has_answer": true}, ...]}, ...]

* TREC run: ``qid Q0 docid rank score tag`` per line; for DPR's QA sets the qid is the
  question's 0-based line number (as in Pyserini's ``topics.dpr.*``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ijson
import numpy as np

from densepr.data.passages import Corpus, RecordReader, check_id, iter_lines
from densepr.errors import DenseprError, InputError
from densepr.fileio.atomic import atomic_write
from densepr.ranking import SearchResult, trec_order


def write_dpr_results(
    path: str | os.PathLike[str],
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    result: SearchResult,
    corpus: Corpus,
    has_answer: np.ndarray | None = None,
) -> None:
    """Write DPR's result JSON, streaming and atomically (``has_answer`` omitted when not given)."""
    with atomic_write(path) as fh:
        fh.write("[")
        for i, q in enumerate(questions):
            ctxs = []
            for h in result.hits(i, corpus):
                ctx = {"id": h.id, "title": h.title, "text": h.text, "score": h.score}
                if has_answer is not None:
                    ctx["has_answer"] = bool(has_answer[i, h.rank - 1])
                ctxs.append(ctx)
            fh.write(",\n" if i else "\n")
            fh.write(json.dumps({"question": q, "answers": list(answers[i]), "ctxs": ctxs}, ensure_ascii=False))
        fh.write("\n]\n")


@dataclass
class DprResult:
    """One question of a DPR result file."""

    question: str
    answers: list[str]
    ctxs: list[dict]


def iter_dpr_results(path: str | os.PathLike[str]) -> Iterator[DprResult]:
    """Stream a DPR result JSON file (any size), validating each record."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a file")
    n = 0
    with open(path, "rb") as fh:
        if fh.read(3) != b"\xef\xbb\xbf":  # tolerate a BOM
            fh.seek(0)
        source = RecordReader(fh, path)  # one record at a time, each at most MAX_RECORD_BYTES
        try:
            for n, obj in enumerate(ijson.items(source, "item", use_float=True), 1):
                source.next_record()
                if not isinstance(obj, dict):
                    raise InputError(path, "expected an object", line=n, unit="record")
                q, ans, ctxs = obj.get("question"), obj.get("answers"), obj.get("ctxs")
                if not isinstance(q, str):
                    raise InputError(path, "missing question", line=n, unit="record", field="question")
                if not isinstance(ans, list):
                    raise InputError(path, "answers must be a list", line=n, unit="record", field="answers")
                if not isinstance(ctxs, list):
                    raise InputError(path, "missing 'ctxs' (the retrieved passages)", line=n, unit="record", field="ctxs")
                for j, c in enumerate(ctxs):
                    if not isinstance(c, dict) or not isinstance(c.get("text"), str):
                        raise InputError(path, f"ctxs[{j}] has no text", line=n, unit="record", field="ctxs")
                yield DprResult(q, ans, ctxs)
        except ijson.JSONError as e:
            raise InputError(path, f"invalid JSON: {str(e).splitlines()[0]}", line=n + 1, unit="record") from None
    if n == 0:
        raise InputError(path, "no results (empty array?)")


def write_trec_run(
    path: str | os.PathLike[str], qids: Sequence[str], result: SearchResult, corpus_ids: Sequence[str], tag: str = "densepr"
) -> None:
    """Write a TREC run file (``qid Q0 docid rank score tag``), atomically."""
    with atomic_write(path) as fh:
        for i, qid in enumerate(qids):
            for j, row in enumerate(result.rows[i]):
                if row < 0:
                    break
                fh.write(f"{qid} Q0 {corpus_ids[row]} {j + 1} {result.scores[i, j]:.6f} {tag}\n")


def read_trec_run(path: str | os.PathLike[str]) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run: ``{qid: [(docid, score), ...]}`` in :func:`densepr.ranking.trec_order` (score
    descending, then docid descending, as trec_eval ranks them; the rank column is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "is not a file")
    run: dict[str, list[tuple[str, float]]] = {}
    for lineno, line in iter_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InputError(path, f"expected 6 columns (qid Q0 docid rank score tag), found {len(parts)}", line=lineno)
        try:
            score = float(parts[4])
        except ValueError:
            raise InputError(path, f"score {parts[4]!r} is not a number", line=lineno, field="score") from None
        check_id(parts[0], path, what="query id", line=lineno, field="qid")
        check_id(parts[2], path, what="passage id", line=lineno, field="docid")
        run.setdefault(parts[0], []).append((parts[2], score))
    if not run:
        raise InputError(path, "no results found (empty file?)")
    return {q: trec_order(hits) for q, hits in run.items()}


def trec_run_rows(path: str | os.PathLike[str], n_questions: int, corpus: Corpus, qa: str = "the QA set",
                  passages: str | os.PathLike[str] = "the corpus") -> np.ndarray:  # fmt: skip
    """The TREC run at ``path`` as corpus rows per question (``[n_questions, depth]``, -1 past a question's
    hits): its query ids must be question numbers (``0..n_questions - 1``, as :func:`write_trec_run` writes
    for a QA set) and its passage ids ``corpus``'s (``qa`` and ``passages`` name them in errors).

    Raises:
        DenseprError: a query id that is not a question number, or a passage id not in the corpus.
    """
    run = read_trec_run(path)
    width = max((len(v) for v in run.values()), default=1)
    rows = np.full((n_questions, width), -1, dtype=np.int64)
    for qid, docs in run.items():
        if not qid.isdigit() or int(qid) >= n_questions:
            raise DenseprError(f"{path}: query id {qid!r} is not a question number of {qa} (0..{n_questions - 1})")
        try:
            rows[int(qid), : len(docs)] = [corpus.row(d) for d, _ in docs]
        except KeyError as e:
            raise DenseprError(f"{path}: passage id {e.args[0]!r} is not in {passages}") from None
    return rows
