"""Open-domain QA end to end: retrieve top-k passages, read them, return the answer span.

:class:`Pipeline` joins a :class:`~densepr.retrieve.retriever.Retriever` and a
:class:`~densepr.models.reader.Reader`. :func:`evaluate_qa` measures exact match (and F1) as in
the paper's Table 4 / Figure 3: for each retrieval mode it reads each question's top
``max(ks)`` passages once and derives the answer for every smaller k from the same readings
(DPR's answer for top-k depends only on the first k passages), sharing readings of passages
that several modes retrieved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from densepr.data.qa import QASet
from densepr.errors import DenseprError
from densepr.evaluate.answers import AnswerMatcher, answerable_subset
from densepr.evaluate.qa import exact_match, f1_score, normalize_answer
from densepr.fileio.atomic import read_json, write_json
from densepr.fileio.identity import file_identity
from densepr.fileio.manifest import MANIFEST
from densepr.models.reader import PAPER_SELECTION, Reader, Reading, Selection, best_reading
from densepr.progress import progress_bar
from densepr.ranking import Hit
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.modes import GOLD_ORDER, Mode
from densepr.retrieve.retriever import Retriever


@dataclass
class Answer:
    """The reader's answer to one question.

    ``found`` is False (and ``text`` empty) when nothing could be read: no passage was
    retrieved, or none had any text. ``start``/``end`` are character offsets into
    ``passage.text``.
    """

    question: str
    text: str
    found: bool
    score: float | None = None  # span score: start + end logit
    passage_score: float | None = None  # the passage's selection logit
    passage: Hit | None = None
    start: int = -1
    end: int = -1
    passages: list[Hit] = field(default_factory=list)  # everything that was read, in retrieval order
    mode: str = ""
    k: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def answer_from_readings(question: str, hits: list[Hit], readings: Sequence[Reading], mode: str, k: int,
            selection: Selection = PAPER_SELECTION) -> Answer:  # fmt: skip
    b = best_reading(readings, k, selection, [h.score for h in hits], _keys(readings, selection))
    if b is None:
        return Answer(question, "", False, passages=hits, mode=mode, k=k)
    r = readings[b]
    return Answer(question, r.text, True, r.span_score, r.relevance, hits[b], r.start, r.end, hits, mode, k)


def _keys(readings: Sequence[Reading], selection: Selection) -> list[str] | None:
    """Each reading's answer as exact match compares it: what answer aggregation groups by."""
    return [normalize_answer(r.text) for r in readings] if selection.aggregate else None


def find_reader(index: str | os.PathLike[str]) -> Path | None:
    """The reader stored beside an index (``<index>/reader/``), or None."""
    return IndexDir(index).reader()


def answer_k(reader: Reader, mode: str) -> int:
    """Passages read per question when no k is asked for (``densepr answer``, ``POST /answer``, Ray's
    ``/answer`` all use this rule): the k tuned with the reader's passage selection for ``mode``
    (``densepr tune-reader``), else the reader's validation-tuned ``top_k``."""
    return reader.config.selection_for(mode)[1] or reader.config.top_k


class Pipeline:
    """Retriever + reader.

    Args:
        retriever: finds passages.
        reader: reads them.
        k: passages read per question, in every mode (default: :func:`answer_k` of the mode asked).
        mode: retrieval mode (default: hybrid when both indexes exist).

    The answer's passage is chosen by the selection tuned for the mode (``densepr tune-reader``,
    stored with the reader), else by DPR's rule (the reader's selection logit).
    """

    def __init__(self, retriever: Retriever, reader: Reader, k: int | None = None, mode: str | None = None) -> None:
        self.retriever, self.reader, self.fixed_k = retriever, reader, k
        self.mode = mode or retriever.default_mode
        self.k = self.k_for(self.mode)
        if self.k <= 0:
            raise DenseprError("k must be positive")

    def k_for(self, mode: str) -> int:
        """Passages read per question in ``mode``: the ``k`` this pipeline was given, else :func:`answer_k`."""
        return self.fixed_k or answer_k(self.reader, mode)

    @classmethod
    def load(cls, index: str | os.PathLike[str], reader: str | os.PathLike[str] | None = None, device: str | None = None,
             k: int | None = None, mode: str | None = None, precision: str = "fp32") -> Pipeline:  # fmt: skip
        """An index directory and a reader directory (default: the index's own ``reader/``, which
        ``densepr reproduce --profile dpr`` trains and tunes there); ``precision``: the reader's weights
        (:func:`~densepr.models.hf.inference_dtype`)."""
        if reader is None:
            reader = find_reader(index)
            if reader is None:
                raise DenseprError(f"{index}: no reader/ beside the index; give a reader directory")
        return cls(Retriever.load(index, device=device), Reader.load(reader, device, precision=precision), k, mode)

    def answer(self, question: str, k: int | None = None, mode: str | None = None) -> Answer:
        """Answer one question (see :class:`Answer`)."""
        return self.answer_many([question], k, mode)[0]

    def answer_many(self, questions: Sequence[str], k: int | None = None, mode: str | None = None,
                    batch_size: int = 64, stop: Callable[[], bool] | None = None) -> list[Answer]:  # fmt: skip
        """Answer a batch: one retrieval call, then all passages read in shared batches. ``stop``: asked
        between the reader's batches (:meth:`Reader.read`); True ends the call with
        :class:`~densepr.models.reader.ReadingStopped`."""
        mode = mode or self.mode
        k = k or self.k_for(mode)
        if k <= 0:
            raise DenseprError("k must be positive")
        for q in questions:
            self.reader.question_ids(q)  # empty / over-long questions fail before any work
        res = self.retriever.retrieve(list(questions), k, mode)
        hits = [res.hits(i, self.retriever.corpus) for i in range(len(questions))]
        readings = self.reader.read(questions, [[(h.title, h.text) for h in hs] for hs in hits], batch_size, stop=stop)
        selection = self.reader.config.selection_for(mode)[0]
        return [answer_from_readings(q, hs, rd, mode, k, selection) for q, hs, rd in zip(questions, hits, readings)]


# -- evaluation ------------------------------------------------------------------------------------
QA_KS = (1, 5, 10, 20, 50)


def _score(preds: Sequence[str], qas: QASet, idx: np.ndarray) -> tuple[float, float]:
    if len(idx) == 0:
        return 0.0, 0.0
    em = np.mean([exact_match(preds[i], qas.items[i].answers, qas.match) for i in idx])
    f1 = np.mean([f1_score(preds[i], qas.items[i].answers, qas.match) for i in idx])
    return round(100 * float(em), 2), round(100 * float(f1), 2)


PIECE_QUESTIONS = 250  # questions read per resumable piece (~3 min on 2 cores at top-20 of two modes)


def _encode_reading(r: Reading) -> list:
    # JSON has no infinities: a passage without any span keeps span_score -inf as null
    return [r.relevance, None if r.span_score == float("-inf") else r.span_score, r.start, r.end, r.text]


def piece_key(reader_fingerprint: str, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]]) -> str:
    """sha256 of what one piece of readings depends on: the reader (:meth:`Reader.fingerprint`), the
    piece's questions and each question's passages ``(title, text)``, in order."""
    return hashlib.sha256(json.dumps([reader_fingerprint, list(questions), [[list(p) for p in ps] for ps in passages]]).encode()).hexdigest()


def load_piece(path: Path, key: str, counts: list[int]) -> tuple[list[list[Reading]], float] | str:
    """A piece written by :func:`read_in_pieces` and the seconds its reading took, or why it is not used
    (then read again): unreadable, not of this shape, or made for another key (another reader, other
    questions or passages; a piece written before pieces held their key has none)."""
    try:
        data = read_json(path)
        if not isinstance(data, dict) or data.get("key") != key:
            return "made from other inputs (another reader, other questions or passages) or before pieces held their key"
        rows, seconds = data["readings"], float(data["seconds"])
        got = [[Reading(float(a), float("-inf") if b is None else float(b), int(c), int(d), str(e)) for a, b, c, d, e in rd] for rd in rows]
    except (DenseprError, KeyError, TypeError, ValueError) as e:
        return f"unreadable ({e})"
    return (got, seconds) if [len(rd) for rd in got] == counts else "not the shape of this piece's readings"


@dataclass
class PieceTimes:
    """What :func:`read_in_pieces` spent: seconds reading now, and seconds the pieces it kept once took."""

    read_s: float = 0.0
    kept_s: float = 0.0
    kept: int = 0


def read_in_pieces(reader: Reader, questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]],
                   directory: Path | None, batch_size: int = 64, progress=None, size: int | None = None,
                   log: Callable[[str], None] | None = None, times: PieceTimes | None = None) -> list[list[Reading]]:  # fmt: skip
    """:meth:`Reader.read`, ``size`` questions at a time (default :data:`PIECE_QUESTIONS`), each piece's
    readings, reading seconds and key (:func:`piece_key`: the reader's fingerprint, the piece's questions
    and passages) written to ``directory/readings-<first question>.json`` (atomically) and read back
    instead of read again, so a killed evaluation resumes where it stopped. A piece is used only when
    its key is this piece's: one of another reader or other inputs (or unreadable) is read again, and
    ``log`` is told. ``directory=None``: one read, nothing kept. ``log``: also told after each piece read
    how far the reading is and about how long is left (a run of hours in a log file shows no progress
    bar). ``times``: filled with the seconds spent, those of kept pieces included, so that a resumed
    evaluation reports its whole reading time.
    """
    times = times if times is not None else PieceTimes()
    if directory is None:
        t0 = time.perf_counter()
        out = reader.read(questions, passages, batch_size, progress)
        times.read_s += time.perf_counter() - t0
        return out
    out: list[list[Reading]] = []
    size = size or PIECE_QUESTIONS
    left = sum(len(ps) for ps in passages)  # passages still to read or load
    read_now = 0  # passages read by this call (not loaded from pieces)
    fp = reader.fingerprint()
    for lo in range(0, len(questions), size):
        path, part = Path(directory) / f"readings-{lo:07d}.json", passages[lo : lo + size]
        key = piece_key(fp, questions[lo : lo + size], part)
        kept = load_piece(path, key, [len(ps) for ps in part]) if path.is_file() else "missing"
        left -= sum(len(ps) for ps in part)
        if isinstance(kept, str):
            if kept != "missing" and log is not None:
                log(f"{path}: {kept}; reading its questions again")
            t0 = time.perf_counter()
            got = reader.read(questions[lo : lo + size], part, batch_size, progress)
            took = time.perf_counter() - t0
            write_json(path, {"key": key, "seconds": round(took, 3), "readings": [[_encode_reading(r) for r in rd] for rd in got]}, indent=None)
            times.read_s, read_now = times.read_s + took, read_now + sum(len(ps) for ps in part)
            if log is not None:
                rate = read_now / max(times.read_s, 1e-9)
                log(f"read {min(lo + size, len(questions)):,} of {len(questions):,} questions "
                    f"({rate:.0f} passages/s, ~{left / rate / 60:.0f} min left)")  # fmt: skip
        else:
            got, seconds = kept
            times.kept, times.kept_s = times.kept + 1, times.kept_s + seconds
        out += got
    return out


def reading_key(reader_dir: str | os.PathLike[str], index: str | os.PathLike[str], qas: QASet, modes: Sequence[str],
                ks: Sequence[int], gold: bool, precision: str) -> str:  # fmt: skip
    """sha256 of what one :func:`evaluate_qa` of ``qas`` depends on, so that kept pieces of its readings
    (and a finished result) are reused only for the same inputs: the reader's files (and which model of
    an ONNX export, ``DIR#int8``), the index's (passages, BM25 and dense manifests, hybrid weight, the
    question encoder), the questions and answers, the modes, ks, ``gold`` and the reader's precision."""
    base, _, variant = str(reader_dir).partition("#")
    reader_dir, index = Path(base), Path(index)
    d = IndexDir(index)
    parts = [d.passages, d.hybrid, d.bm25 / MANIFEST, d.dense_manifest_path]
    if d.dense_manifest_path.is_file():
        parts.append(Path(d.dense_manifest().get("question_encoder", d.dense)))
    # each file's identity by the "quick" rule (content when small, else size and time): hashing a 21M-passage
    # corpus or a model's weights at every call would take long
    key = {"reader": file_identity(reader_dir, [reader_dir], "quick"), "index": file_identity(index, parts, "quick"), "questions": qas.fingerprint(),
           "modes": list(modes), "ks": sorted(set(ks)), "gold": gold, "precision": precision}  # fmt: skip
    if variant:  # only then: keys of plain reader directories stay as they were written
        key["variant"] = variant
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _reading_bar(progress, show: bool, label: str):
    """The reading's ``advance``: the caller's, else a bar of its own once retrieval's bars are done (one live bar
    at a time), else none."""
    if progress is not None or not show:
        yield progress
        return
    with progress_bar(None, label, True, unit="window") as advance:
        yield advance


def evaluate_qa(retriever: Retriever, reader: Reader, qas: QASet, modes: Sequence[str] = (Mode.BM25, Mode.DENSE, Mode.HYBRID),
                ks: Sequence[int] = QA_KS, matcher: AnswerMatcher | None = None, gold: bool = True,
                batch_size: int = 64, progress=None, pieces: Path | None = None, log: Callable[[str], None] | None = None,
                answerable_cache: Path | None = None, show_progress: bool = False) -> dict:  # fmt: skip
    """End-to-end EM/F1 of one QA set for several retrieval modes and k.

    Returns ``{"n_all", "n_answerable", "modes": {mode: {"k": {k: {"em", "f1", "em_answerable",
    "f1_answerable", "retrieval_topk"}}}}, "gold": {...}, "seconds", "reading_seconds", "passages_read"}``,
    and ``"resumed"`` (pieces kept, the seconds they took) when kept pieces were used: ``seconds`` then
    includes their reading time, so a resumed set reports its whole cost. ``gold`` is the reader's
    upper bound: EM when it reads only the best-ranked answer-bearing passage (the first in the top-100
    of hybrid, else dense, else BM25), over the questions that have one. ``pieces``: a directory where
    the readings are kept piece by piece so that a killed evaluation resumes (:func:`read_in_pieces`;
    ``log`` is told the progress after each piece). ``answerable_cache``: a directory (the index's) where
    the answerable subset, a scan of every passage, is kept for the next evaluation (:func:`answerable_subset`).
    ``show_progress``: bars for the retrieval (encoding the questions, BM25's search) and, unless ``progress``
    (an ``advance(windows)``) is given, the reading.
    """
    t0 = time.perf_counter()
    ks = sorted(set(ks))
    kmax = max(ks)
    matcher = matcher or AnswerMatcher(retriever.corpus.texts)
    questions = qas.questions
    depth = max(kmax, 100) if gold else kmax
    runs = retriever.retrieve_all(questions, depth, list(modes), show_progress)
    hits = {m: matcher.hits(runs[m].rows, qas) for m in modes}
    answerable = np.flatnonzero(answerable_subset(retriever.corpus, qas, answerable_cache, True, matcher))
    # Read each question's union of passages once.
    rows_per_q: list[list[int]] = []
    gold_row = np.full(len(qas), -1)
    for i in range(len(qas)):
        seen: dict[int, None] = {}
        for m in modes:
            for r in runs[m].rows[i, :kmax]:
                if r >= 0:
                    seen.setdefault(int(r))
        if gold:  # the best-ranked answer-bearing passage, looked for in the strongest lists first
            for m in sorted(modes, key=lambda m: GOLD_ORDER.index(m) if m in GOLD_ORDER else len(GOLD_ORDER)):
                h = np.flatnonzero(hits[m][i])
                if len(h):
                    gold_row[i] = int(runs[m].rows[i, h[0]])
                    seen.setdefault(int(gold_row[i]))
                    break
        rows_per_q.append(list(seen))
    c = retriever.corpus
    times = PieceTimes()
    with _reading_bar(progress, show_progress, f"read {qas.name}") as progress:
        readings = read_in_pieces(reader, questions, [[(c.titles[r], c.texts[r]) for r in rows] for rows in rows_per_q], pieces, batch_size,
                                  progress, log=log, times=times)  # fmt: skip
    lookup = [dict(zip(rows, rd)) for rows, rd in zip(rows_per_q, readings)]
    # answer aggregation compares normalised answers: normalise each passage's once, not once per k
    keys = [{r: normalize_answer(x.text) for r, x in lk.items()} for lk in lookup] if any(reader.config.selection_for(m)[0].aggregate for m in modes) else None
    everyone = np.arange(len(qas))
    out: dict = {"n_all": len(qas), "n_answerable": int(len(answerable)), "modes": {}}
    for m in modes:
        tuned = reader.config.selection_for(m)[0]
        for key, selection in (("k", PAPER_SELECTION), ("fused", tuned)):
            if key == "fused" and tuned.is_paper:
                continue  # no selection tuned for this mode: DPR's rule only
            per_k = {}
            for k in ks:
                preds = []
                for i in range(len(qas)):
                    rows = [int(r) for r in runs[m].rows[i, :k] if r >= 0]
                    rd = [lookup[i][r] for r in rows]
                    b = best_reading(rd, None, selection, runs[m].scores[i, : len(rd)], [keys[i][r] for r in rows] if selection.aggregate else None)
                    preds.append(rd[b].text if b is not None else "")
                em, f1 = _score(preds, qas, everyone)
                em_a, f1_a = _score(preds, qas, answerable)
                top = hits[m][:, :k].any(1)
                per_k[str(k)] = {"em": em, "f1": f1, "em_answerable": em_a, "f1_answerable": f1_a,
                                 "retrieval_topk": round(100 * float(top.mean()), 2),
                                 "retrieval_topk_answerable": round(100 * float(top[answerable].mean()), 2) if len(answerable) else 0.0}  # fmt: skip
            if key == "k":
                out["modes"][m] = {"k": per_k}
            else:
                out["modes"][m]["fused"] = {"selection": asdict(selection), "k": per_k}
    if gold:
        with_gold = np.flatnonzero(gold_row >= 0)
        preds = [lookup[i][int(gold_row[i])].text if gold_row[i] >= 0 else "" for i in range(len(qas))]
        em, f1 = _score(preds, qas, with_gold)
        out["gold"] = {"questions": int(len(with_gold)), "em": em, "f1": f1}
    # a resumed evaluation's time: this call's plus what its kept pieces took to read
    out["seconds"] = round(time.perf_counter() - t0 + times.kept_s, 1)
    out["reading_seconds"] = round(times.read_s + times.kept_s, 1)
    out["passages_read"] = int(sum(len(r) for r in rows_per_q))
    if times.kept:
        out["resumed"] = {"pieces_kept": times.kept, "their_seconds": round(times.kept_s, 1)}
    return out


# -- tuning the passage selection --------------------------------------------------------------------
# Weights of (selection logit, span score, retrieval score); retrieval scores range from ~1 (cosine)
# to ~30 (BM25), hence the wide retriever grid.
# Aggregation temperatures: 0 (off, first in the grid so that it wins ties), then from near-max to near-voting.
SELECTION_GRID = tuple(Selection(rel, span, ret, agg) for agg in (0.0, 1.0, 3.0) for rel in (1.0, 0.0) for span in (0.0, 0.5, 1.0)
                       for ret in (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0) if (rel, span, ret) != (0.0, 0.0, 0.0))  # fmt: skip


def choose_selection(readings: Sequence[Sequence[Reading]], scores: Sequence[Sequence[float]], qas: QASet,
                     ks: Sequence[int] = QA_KS, grid: Sequence[Selection] = SELECTION_GRID) -> dict:  # fmt: skip
    """The (selection, k) with the best exact match over already-read passages (each question's
    readings and retrieval scores in retrieval order). Ties keep the earlier grid point and the smaller k,
    so DPR's rule (the grid's first point) wins unless another does strictly better.

    Returns ``{"relevance", "span", "retriever", "k", "em", "paper_em", "paper_k", "questions"}``.
    """
    n = max(1, len(qas))
    best: dict | None = None
    paper = {"em": -1.0, "k": None}
    keys = [[normalize_answer(r.text) for r in rd] for rd in readings]
    for sel in grid:
        for k in sorted(ks):
            em = 0
            for i, qa in enumerate(qas.items):
                rd = list(readings[i][:k])
                b = best_reading(rd, None, sel, scores[i], keys[i])
                em += exact_match(rd[b].text if b is not None else "", qa.answers, qas.match)
            em = round(100 * em / n, 2)
            if sel == PAPER_SELECTION and em > paper["em"]:
                paper = {"em": em, "k": k}
            if best is None or em > best["em"]:
                best = {**asdict(sel), "k": k, "em": em}
    return {**best, "paper_em": paper["em"], "paper_k": paper["k"], "questions": len(qas)}


def tune_selection(retriever: Retriever, reader: Reader, qas: QASet, mode: str, ks: Sequence[int] = QA_KS,
                   grid: Sequence[Selection] = SELECTION_GRID, batch_size: int = 64, progress=None, show_progress: bool = False) -> dict:  # fmt: skip
    """Retrieve and read held-out questions once, then :func:`choose_selection` for ``mode`` (``show_progress``:
    as :func:`evaluate_qa`'s)."""
    mode = retriever.check_mode(mode).value
    res = retriever.retrieve(qas.questions, max(ks), mode, show_progress)
    c = retriever.corpus
    rows = [[int(r) for r in res.rows[i] if r >= 0] for i in range(len(qas))]
    with _reading_bar(progress, show_progress, f"read {qas.name} ({mode})") as progress:
        readings = reader.read(qas.questions, [[(c.titles[r], c.texts[r]) for r in rs] for rs in rows], batch_size, progress)
    return choose_selection(readings, [res.scores[i, : len(rs)] for i, rs in enumerate(rows)], qas, ks, grid)
