"""What the server serves, with no HTTP in it: limits, the micro-batcher, the service.

:class:`Service` holds the retriever, the optional reader and the :class:`Limits`; its two
:class:`MicroBatcher` queues run model calls in one worker thread, batching concurrent requests
(one encoder pass + one FAISS search, or one reader call), isolating each request's errors,
bounding the queue and dropping requests whose clients went away. A front end (the FastAPI app
in :mod:`densepr.serve.app`, or another engine) checks requests with the service, submits them
to its batchers, and maps :class:`ApiError` to its own error responses.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import PurePath
from typing import Any

from densepr.errors import ConfigError, DenseprError
from densepr.ranking import SearchResult

log = logging.getLogger("densepr.serve")


@dataclass
class Limits:
    """What one request, and all of them together, may ask for."""

    max_question_chars: int = 1000
    max_k: int = 100
    max_questions: int = 64  # questions in one /search request
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 30.0  # per request, queueing included
    max_batch: int = 64  # questions per micro-batch (1 = no micro-batching)
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    max_queue: int = 256  # questions waiting for the retriever, all requests together (more: 503 + Retry-After)
    # /answer reads k passages per question, and reading costs ~20 ms a passage on a 2-core CPU (docs/reader.md):
    # k up to 50, the largest k evaluate-qa measures and tune-reader chooses from (pipeline.QA_KS), so the
    # reader's tuned k always fits; and at most 1,000 passages waiting for the reader, ~20 s of reading there,
    # inside timeout_s (more: 503 + Retry-After; larger-k requests are shed first)
    max_k_answer: int = 50
    max_answer_passages_queued: int = 1000
    max_answers: int = 32  # gold answers per question in /search "answers"
    max_answer_chars: int = 500  # characters in one gold answer
    max_answers_total_chars: int = 20_000  # characters in all the gold answers of one request
    read_timeout_s: float = 10.0  # a whole request (headers and body) must arrive within this; a stalled reader is cut off after it
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; when full, the longest-idle one without a complete request is closed, else 503
    max_connections_per_client: int | None = 64  # open connections from one IP address (the same rule within them)
    first_byte_timeout_s: float = 3.0  # a new connection must send its first byte within this, else it is closed
    send_timeout_s: float = 60.0  # a response must be sent within this from its start, else the connection is closed
    allowed_hosts: tuple[str, ...] | None = None  # Host names answered (any port; "*.x" subdomains, "*" any); None: by the bind address

    def __post_init__(self) -> None:
        """Refuse a limit that would refuse every request, or time out at once: every number must be
        positive (``max_wait_ms`` may be 0: no waiting for company)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allowed_hosts" or value is None:
                continue
            if f.name == "max_wait_ms":
                if value < 0:
                    raise ConfigError(f.name, "must not be negative")
            elif value <= 0:
                raise ConfigError(f.name, "must be positive")


class ApiError(Exception):
    """An error answered as JSON ``{"error": message, **extra}`` with ``status`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers or {}, extra


class LimitError(ApiError):
    """A request over one of the :class:`Limits` (``{"error": ..., "limit": name}``)."""

    def __init__(self, status: int, limit: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers, limit=limit)
        self.limit = limit


# What tokenizers and densepr raise for text they cannot take (a fast tokenizer raises TypeError
# for a string it cannot encode, e.g. one holding a lone surrogate).
INPUT_ERRORS = (DenseprError, ValueError, UnicodeError, TypeError)


def as_api_error(exc: BaseException) -> ApiError:
    """What one request is answered when its own model call raised ``exc``.

    Input errors (what tokenizers and densepr raise for text they cannot take) are the
    request's fault: 422 with the message. Anything else is ours: a 500 that names the
    exception type only (messages of unexpected errors may hold local paths); the traceback
    goes to the log.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, INPUT_ERRORS):
        return ApiError(422, f"this request's input could not be processed: {type(exc).__name__}: {str(exc)[:300]}")
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error while serving this request ({type(exc).__name__})")


def check_text(s: str, field: str) -> None:
    """Refuse strings that are not Unicode text (lone surrogates from JSON ``\\ud800`` escapes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LimitError(422, field, f"{field} is not valid Unicode text (lone surrogate at character {e.start})") from None


class _Entry:
    __slots__ = ("key", "item", "size", "cost", "client", "seq", "fut", "waiting")

    def __init__(self, key: Any, item: Any, size: int, cost: int, client: Any, seq: int, fut: asyncio.Future) -> None:
        self.key, self.item, self.size, self.cost, self.client, self.seq, self.fut = key, item, size, cost, client, seq, fut
        self.waiting = True


class MicroBatcher:
    """Runs ``fn(key, items)`` on batches of items submitted concurrently under the same key.

    One worker thread runs the model (torch and FAISS already use every core); while it is
    busy, new requests queue, and the next call takes up to ``max_batch`` questions at once.

    * Each request has a ``size`` (questions: what ``max_batch`` counts) and a ``cost`` (what the
      queue counts, in ``unit``: questions for retrieval, passages for the reader, whose work
      grows with k). At most ``max_queue`` units wait (a request costing more is still taken
      when nothing waits). When a request does not fit, waiting requests are shed to make room:
      first those costing more than it, largest first (so many-question or large-k requests
      cannot starve small ones), then the newest of any client holding more of the queue than
      the newcomer's client would (so one client's flood cannot lock others out); if it still
      does not fit, it is refused. Shed and refused requests get a 503 :class:`LimitError`
      (``limit``) whose ``Retry-After`` is the estimated time to drain the queue.
    * **Fair batches.** Requests carry a ``client`` (the peer's address): a batch is filled
      round-robin across the clients that have requests waiting, the least recently served
      first, so a client sending one request while another floods is served in the next batch,
      not after the flood's backlog. Within a client, requests keep their order.
    * A request whose future is already done when its batch forms (cancelled because its
      client disconnected, or timed out) is dropped: the model never sees it. While a batch
      runs, :meth:`abandoned` (callable from ``fn``, in the worker thread) says whether every
      request of it is gone, so a long model call can stop between chunks (the reader does).
    * When a batch call raises, each request of the batch is re-run alone, so an exception
      belongs to the one request whose input raised it (``isolated`` counts such batches).
    """

    def __init__(self, fn: Callable[[Any, list], list], max_batch: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int | None = None, name: str = "model", unit: str = "question", limit: str = "max_queue") -> None:  # fmt: skip
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max_wait_ms / 1000
        self.max_queue, self.name, self.unit, self.limit = max_queue, name, unit, limit
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"densepr-{name}")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # model calls
        self.items = 0  # requests served by them
        self.queued = 0  # units waiting (submitted, not started, not abandoned)
        self.waiting: set[_Entry] = set()  # the requests they belong to
        self.rejected = 0  # requests refused because the queue was full
        self.shed = 0  # waiting requests answered 503 to make room for a smaller one, or another client's
        self.dropped = 0  # requests abandoned (disconnected or timed out) before their batch ran
        self.stopped = 0  # batches given up while running because every request of theirs was gone
        self.isolated = 0  # batches that raised and were re-run one request at a time
        self.s_per_unit = 0.0  # moving average of model time per unit
        self.seq = 0  # submissions so far (orders a client's requests)
        self.served: dict[Any, int] = {}  # client -> the batch that last served it (clients waiting or in the last batch)
        self._gone: threading.Event | None = None  # set when every request of the running call is gone

    def retry_after(self) -> int:
        """Seconds until the units now waiting are likely served (1 to 60)."""
        return int(min(60, max(1, math.ceil(self.queued * self.s_per_unit))))

    def abandoned(self) -> bool:
        """True when every request of the model call now running has gone (client disconnected or
        timed out): its results would be thrown away. Safe to call from the worker thread."""
        gone = self._gone
        return gone is not None and gone.is_set()

    def _leave(self, e: _Entry) -> None:
        if e.waiting:
            e.waiting = False
            self.queued -= e.cost
            self.waiting.discard(e)

    def _busy(self) -> LimitError:
        return LimitError(503, self.limit, f"server busy: {self.queued} {self.unit}s are waiting for the {self.name} "
                                           f"(limit {self.max_queue}); retry later",
                          headers={"Retry-After": str(self.retry_after())})  # fmt: skip

    def _admit(self, cost: int, client: Any) -> bool:
        """Make room for ``cost`` units from ``client`` by shedding waiting requests: those costing more,
        largest first, then the newest of the client holding the most, while it holds more than ``client``
        would. Nothing is shed unless that makes room."""
        if self.max_queue is None or self.queued == 0 or self.queued + cost <= self.max_queue:
            return True
        live = [e for e in self.waiting if not e.fut.done()]
        held: dict[Any, int] = {}
        for e in live:
            held[e.client] = held.get(e.client, 0) + e.cost
        plan: list[_Entry] = []
        over = self.queued + cost - self.max_queue  # units to free
        for e in sorted((e for e in live if e.cost > cost), key=lambda e: e.cost, reverse=True):
            if over <= 0:
                break
            plan.append(e)
            over -= e.cost
            held[e.client] -= e.cost
        newest = sorted((e for e in live if e not in plan and e.client != client), key=lambda e: e.seq, reverse=True)
        while over > 0:
            top = max((c for c in held if c != client), key=lambda c: held[c], default=None)
            if top is None or held[top] <= held.get(client, 0) + cost:
                return False  # shedding more would take from clients holding no more than the newcomer's: refuse it instead
            e = next(e for e in newest if e.client == top and e not in plan)
            plan.append(e)
            over -= e.cost
            held[top] -= e.cost
        for e in plan:
            self._leave(e)
            self.shed += 1
            e.fut.set_exception(self._busy())
        return True

    async def submit(self, key: Any, item: Any, size: int = 1, cost: int | None = None, client: Any = None) -> Any:
        """``fn``'s result for ``item``, computed in a batch of items under ``key``. ``size``: questions
        (what ``max_batch`` counts); ``cost``: units the queue counts (default ``size``); ``client``: who
        sent it (fair batches and shedding)."""
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # first call, or a new event loop (test clients)
            self.loop, self.queue, self.queued, self.waiting, self.served = loop, asyncio.Queue(), 0, set(), {}
            self.worker = loop.create_task(self._run())
        cost = size if cost is None else cost
        if not self._admit(cost, client):
            self.rejected += 1
            raise self._busy()
        self.seq += 1
        e = _Entry(key, item, size, cost, client, self.seq, loop.create_future())
        self.queued += cost
        self.waiting.add(e)
        e.fut.add_done_callback(lambda _, e=e: self._leave(e))
        self.queue.put_nowait(e)
        return await e.fut  # cancelling the awaiting task cancels e.fut: the entry is dropped

    def _guarded(self, key: Any, items: list) -> list:
        """``fn`` in the worker thread; a BaseException that is not an Exception (a Rust
        extension's panic) becomes a RuntimeError, so it fails one request, not the worker."""
        try:
            return self.fn(key, items)
        except (Exception, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            raise RuntimeError(f"{type(e).__name__}: {e}") from e

    async def _call(self, key: Any, entries: list[_Entry]) -> list:
        assert self.loop is not None
        gone, left = threading.Event(), [len(entries)]

        def one_gone(_: asyncio.Future) -> None:
            left[0] -= 1
            if left[0] == 0:
                gone.set()

        for e in entries:
            e.fut.add_done_callback(one_gone)
        self._gone = gone  # read by abandoned() in the worker thread, which runs one call at a time
        try:
            results = await self.loop.run_in_executor(self.pool, self._guarded, key, [e.item for e in entries])
        finally:
            self._gone = None
            for e in entries:
                e.fut.remove_done_callback(one_gone)
        if len(results) != len(entries):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(entries)} items")
        return results

    async def _run_batch(self, key: Any, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            results = await self._call(key, batch)
        except Exception as exc:
            if all(e.fut.done() for e in batch):  # everyone left (the model stopped early, or failed): nobody to tell
                self.stopped += 1
                return
            if len(batch) == 1:
                batch[0].fut.set_exception(exc)
                return
            self.isolated += 1
            for e in batch:  # one at a time: the exception belongs to the request that raised it
                if e.fut.done():
                    continue
                try:
                    r = (await self._call(key, [e]))[0]
                except Exception as one:
                    if not e.fut.done():
                        e.fut.set_exception(one)
                else:
                    if not e.fut.done():
                        e.fut.set_result(r)
            return
        per = (time.perf_counter() - t0) / max(1, sum(e.cost for e in batch))
        self.s_per_unit = per if self.s_per_unit == 0 else 0.8 * self.s_per_unit + 0.2 * per
        for e, r in zip(batch, results):
            if not e.fut.done():
                e.fut.set_result(r)

    def _fair(self, live: list[_Entry]) -> list[_Entry]:
        """``live`` (in arrival order) round-robin across clients, the least recently served first."""
        by_client: dict[Any, list[_Entry]] = {}
        for e in live:
            by_client.setdefault(e.client, []).append(e)
        turns = sorted(by_client.values(), key=lambda es: (self.served.get(es[0].client, -1), es[0].seq))
        return [es[i] for i in range(max(map(len, turns))) for es in turns if i < len(es)]

    async def _run(self) -> None:
        assert self.queue is not None
        pending: list[_Entry] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
                if self.max_batch > 1 and self.max_wait > 0:
                    await asyncio.sleep(self.max_wait)
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            live = [e for e in pending if not e.fut.done()]
            self.dropped += sum(e.fut.cancelled() for e in pending)  # client gone or timed out: never computed
            if not live:
                pending = []
                continue
            turns = self._fair(live)
            key = turns[0].key
            batch, n = [], 0
            for e in turns:  # same key, up to max_batch questions (always at least one request)
                if e.key == key and (not batch or n + e.size <= self.max_batch):
                    batch.append(e)
                    n += e.size
            chosen = set(batch)
            pending = [e for e in live if e not in chosen]
            for e in batch:
                self._leave(e)
                self.served[e.client] = self.batches
            keep = {e.client for e in pending} | {e.client for e in batch}  # bounded by the queue and one batch
            self.served = {c: b for c, b in self.served.items() if c in keep}
            self.batches += 1
            self.items += len(batch)
            try:
                await self._run_batch(key, batch)
            except Exception as exc:  # a bug here must not stop the worker: fail this batch only
                log.error("micro-batch worker error", exc_info=exc)
                for e in batch:
                    if not e.fut.done():
                        e.fut.set_exception(exc)

    def stats(self) -> dict:
        return {"batches": self.batches, "requests": self.items, f"queued_{self.unit}s": self.queued,
                "rejected_queue_full": self.rejected, "shed_for_smaller": self.shed, "dropped_abandoned": self.dropped,
                "stopped_abandoned": self.stopped, "isolated_batches": self.isolated}  # fmt: skip


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


def dump_json(obj: Any) -> bytes:
    """JSON bytes as FastAPI's JSONResponse writes them."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
