"""What the server serves, with no HTTP in it: the service (limits in :mod:`~densepr.serve.limits`, the micro-batcher in :mod:`~densepr.serve.batcher`).

:class:`Service` holds the retriever, the optional reader and the :class:`Limits`; its two
:class:`MicroBatcher` queues run model calls in one worker thread, batching concurrent requests
(one encoder pass + one FAISS search, or one reader call), isolating each request's errors,
bounding the queue and dropping requests whose clients went away. A front end (the FastAPI app
in :mod:`densepr.serve.app`, or another engine) checks requests with the service, submits them
to its batchers, and maps :class:`ApiError` to its own error responses.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import PurePath

from densepr.errors import DenseprError
from densepr.ranking import SearchResult
from densepr.serve.batcher import MicroBatcher
from densepr.serve.limits import INPUT_ERRORS, LimitError, Limits, check_text, dump_json


def model_name(name: str | None) -> str | None:
    """A model's name for display: its directory's name, never the local path it was loaded from."""
    if not name:
        return None
    return PurePath(name.rstrip("/\\")).name or None


class Service:
    """What the app serves: a retriever, an optional reader, limits, the two batchers and a pool
    for per-request post-processing (``has_answer``, building and serialising responses)."""

    def __init__(self, retriever, reader=None, limits: Limits | None = None, default_k_answer: int | None = None) -> None:
        self.retriever, self.reader, self.limits = retriever, reader, limits or Limits()
        if hasattr(getattr(retriever, "bm25", None), "warm"):  # (the Ray router's stand-in searches elsewhere)
            retriever.bm25.warm()  # one question at a time still gets the compiled scorers (numpy's cost grows with the corpus)
        lim = self.limits
        self.default_k_answer = default_k_answer
        if reader is not None:
            over = {m: k for m in retriever.modes if (k := self.answer_k_for(m)) > lim.max_k_answer}
            if over:
                m, k = max(over.items(), key=lambda mk: mk[1])
                raise DenseprError(f"the reader's default k for {m} ({k}) is over max_k_answer ({lim.max_k_answer}): raise the limit")
        self.search_batcher = MicroBatcher(self._search_batch, lim.max_batch, lim.max_wait_ms, lim.max_queue, "retriever")
        # the reader's queue counts passages (k per question): its cost, unlike the retriever's, grows with k
        self.answer_batcher = MicroBatcher(self._answer_batch, lim.max_batch, lim.max_wait_ms, lim.max_answer_passages_queued,
                                           "reader", unit="passage", limit="max_answer_passages_queued")  # fmt: skip
        self.post_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="densepr-post")

    @property
    def default_mode(self) -> str:
        """The mode of a request that names none: the retriever's rule (hybrid when it can)."""
        return str(self.retriever.default_mode)

    def answer_k_for(self, mode: str) -> int:
        """Passages /answer reads when the request names no k: the pipeline's rule
        (:func:`densepr.pipeline.answer_k`), so ``densepr answer`` and ``/answer`` read as many."""
        from densepr.pipeline import answer_k

        return self.default_k_answer or answer_k(self.reader, mode)

    @property
    def answer_k(self) -> int | None:
        """The default k of /answer in the default mode (None without a reader)."""
        return self.answer_k_for(self.default_mode) if self.reader is not None else None

    # -- model calls (worker thread) -------------------------------------------------------
    def _retrieve(self, questions: list[str], k: int, mode: str) -> SearchResult:
        """The one retrieval call (a front end on other machines overrides this, e.g. ``ray_app``)."""
        return self.retriever.retrieve(questions, k, mode)

    def _search_batch(self, mode: str, items: list[tuple[list[str], int]]) -> list:
        questions = [q for qs, _ in items for q in qs]
        res = self._retrieve(questions, max(k for _, k in items), mode)
        out, i = [], 0
        for qs, k in items:
            out.append((res.rows[i : i + len(qs), :k], res.scores[i : i + len(qs), :k]))
            i += len(qs)
        return out

    def _answer_batch(self, key: tuple[str, int], items: list[str]) -> list:
        from densepr.pipeline import Pipeline

        mode, k = key
        # stops between reader chunks once every request of the batch has gone (disconnected or timed out)
        return Pipeline(self.retriever, self.reader, k, mode).answer_many(items, stop=self.answer_batcher.abandoned)

    # -- post-processing (post pool) -------------------------------------------------------------
    def search_body(self, questions: list[str], rows, scores, answers: list[list[str]] | None, mode: str, k: int, t0: float) -> bytes:
        """The /search response, serialised: passages per question, ``has_answer`` when answers are given."""
        from densepr.evaluate.answers import AnswerMatcher

        c = self.retriever.corpus
        matcher = AnswerMatcher(c.texts) if answers is not None else None
        found, results = SearchResult(rows, scores), []
        for i, q in enumerate(questions):
            prepared = AnswerMatcher.prepare(answers[i], "string") if answers is not None else None
            hits = []
            for h in found.hits(i, c):
                d = {"rank": h.rank, "id": h.id, "title": h.title, "text": h.text, "score": round(h.score, 4)}
                if matcher is not None:
                    d["has_answer"] = matcher.check_prepared(int(rows[i, h.rank - 1]), prepared, "string")
                hits.append(d)
            results.append({"question": q, "passages": hits})
        body = {"mode": mode, "k": k, "results": results, "took_ms": round(1000 * (time.perf_counter() - t0), 1)}
        return dump_json(body)

    # -- checks (event loop; each bounded by the limits it enforces) ------------------------------
    def check_question(self, q: str) -> None:
        lim = self.limits
        if not q.strip():
            raise LimitError(422, "question", "empty question")
        if len(q) > lim.max_question_chars:
            raise LimitError(413, "max_question_chars", f"question is {len(q)} characters; the limit is {lim.max_question_chars}")
        check_text(q, "question")
        if self.reader is not None:
            try:
                self.reader.question_ids(q)
            except DenseprError as e:
                raise LimitError(413, "max_question_tokens", str(e)) from None
            except INPUT_ERRORS as e:
                raise LimitError(422, "question", f"the reader's tokenizer cannot take this question: {type(e).__name__}") from None

    def check_answers(self, answers: list[list[str]] | None, n_questions: int) -> None:
        if answers is None:
            return
        lim = self.limits
        if len(answers) != n_questions:
            raise LimitError(422, "answers", f"{len(answers)} answer lists for {n_questions} questions")
        for a in answers:
            if len(a) > lim.max_answers:
                raise LimitError(413, "max_answers", f"{len(a)} answers for one question; the limit is {lim.max_answers}")
        total = 0
        for a in answers:
            for s in a:
                if len(s) > lim.max_answer_chars:
                    raise LimitError(413, "max_answer_chars", f"an answer of {len(s)} characters; the limit is {lim.max_answer_chars}")
                total += len(s)
                check_text(s, "answers")
        if total > lim.max_answers_total_chars:
            raise LimitError(413, "max_answers_total_chars", f"answers hold {total} characters; the limit is {lim.max_answers_total_chars} per request")

    def check_mode(self, mode: str | None) -> str:
        """The mode to use: ``mode``, else the default; one this index has."""
        mode = mode or self.default_mode
        if mode not in self.retriever.modes:
            raise LimitError(422, "mode", f"mode {mode!r} is not available; this index has: {', '.join(self.retriever.modes)}")
        return mode

    def check_k_mode(self, k: int | None, mode: str | None, answer: bool = False) -> tuple[int, str]:
        """The ``(k, mode)`` to use: ``mode`` or the default, ``k`` or (for ``answer``) the reader's k for that
        mode (:meth:`answer_k_for`); ``k`` within ``max_k`` (and ``max_k_answer`` for ``answer``)."""
        if k is None:  # the reader's k depends on the mode
            k = self.answer_k_for(self.check_mode(mode))
        if k > self.limits.max_k:
            raise LimitError(422, "max_k", f"k={k} is over the limit of {self.limits.max_k}")
        if answer and k > self.limits.max_k_answer:
            raise LimitError(422, "max_k_answer", f"k={k} passages to read is over the /answer limit of {self.limits.max_k_answer}")
        return k, self.check_mode(mode)

    def health(self) -> dict:
        r = self.retriever.describe()
        return {"status": "ok", "passages": r["passages"], "modes": r["modes"], "model": model_name(r["question_encoder"]),
                "index_type": r["index_type"], "bm25": r["bm25"], "hybrid_lambda": r["hybrid_lambda"],
                "reader": model_name(self.reader.name) if self.reader is not None else None,
                "answer_k": self.answer_k, "limits": asdict(self.limits),
                "micro_batches": {"search": [self.search_batcher.batches, self.search_batcher.items],
                                  "answer": [self.answer_batcher.batches, self.answer_batcher.items]},
                "queues": {"search": self.search_batcher.stats(), "answer": self.answer_batcher.stats()}}  # fmt: skip
