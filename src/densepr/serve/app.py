"""HTTP search and question answering over a saved index: a FastAPI app (``densepr serve``).

Endpoints::

    POST /search   {"question": "..." | ["...", ...], "k": 10, "mode": "hybrid", "answers": [...]}
    POST /answer   {"question": "...", "k": 20, "mode": "hybrid"}
    GET  /health   model name, index type, passage count, modes, reader, limits, queue
    GET  /         a search page (plain HTML + JS, nothing loaded from outside the server)
    GET  /docs     the API reference, rendered from /openapi.json by the server's own page
    GET  /openapi.json

The index, encoder and reader load once. Concurrent requests are **micro-batched**: requests
that arrive while the model is busy are queued and served by one retrieval (one encoder
pass, one FAISS search) or one reader call, then split back per request.

What a hostile or broken client can and cannot do (each property has a test):

* **Isolation.** Questions and gold answers are checked before they enter a batch (length,
  not empty, encodable as UTF-8: a JSON-escaped lone surrogate is a 422). If a batched model
  call still raises, every request of the batch is re-run alone, so only the request whose
  input raises gets the error (422 for an input error, a 500 JSON otherwise); the others get
  their results.
* **Bounded work.** Every per-request cost has a limit (:class:`Limits`), and everything
  CPU-heavy (the model call, ``has_answer`` matching, building and serialising the response)
  runs in worker threads inside the request's ``timeout_s``, never on the event loop, so
  ``/health`` keeps answering. At most ``max_queue`` questions wait for each model; past that
  a request gets 503 with ``Retry-After`` (larger waiting requests are shed first to make room
  for a smaller one, so floods of many-question requests cannot starve single questions). A
  request whose client disconnected, or that timed out, is dropped before the model sees it.
* **Connections** (:func:`guarded_protocol`, used by :func:`serve`): a whole request,
  headers and body, must arrive within ``read_timeout_s`` (else 408 and close: slowloris), a
  client that stops reading its response for as long is cut off, idle keep-alive connections
  close after ``keep_alive_s``, and at most ``max_connections`` are open at once (more get a
  503 and are closed at once).
* **One error shape.** Every error, whatever raised it (limits, validation, malformed or
  too-deeply nested JSON, 404, 405, 500), is JSON ``{"error": message}``, plus ``"limit": name``
  when a limit was hit and ``"detail"`` for validation errors.
* ``/health`` names models by their directory name, never by a local path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import PurePath
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from densepr.errors import DenseprError
from densepr.ranking import SearchResult

log = logging.getLogger("densepr.serve.app")


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
    max_queue: int = 256  # questions waiting for one model, all requests together (more: 503 + Retry-After)
    max_answers: int = 32  # gold answers per question in /search "answers"
    max_answer_chars: int = 500  # characters in one gold answer
    max_answers_total_chars: int = 20_000  # characters in all the gold answers of one request
    read_timeout_s: float = 10.0  # a whole request (headers and body) must arrive within this; a stalled reader is cut off after it
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; more are answered 503 and closed


Mode = Literal["bm25", "dense", "hybrid", "rrf"]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: Union[str, list[str]] = Field(description="A question or a list of questions.")
    k: int = Field(10, ge=1, description="Passages per question (at most the server's max_k).")
    mode: Optional[Mode] = Field(None, description="Default: hybrid when both indexes exist.")
    answers: Optional[list[list[str]]] = Field(None, description="Gold answers per question: adds has_answer to each passage "
                                                                 "(limits: max_answers, max_answer_chars, max_answers_total_chars).")  # fmt: skip


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str
    k: Optional[int] = Field(None, ge=1, description="Passages read (default: the reader's tuned top-k).")
    mode: Optional[Mode] = None


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
    __slots__ = ("key", "item", "size", "fut", "waiting")

    def __init__(self, key: Any, item: Any, size: int, fut: asyncio.Future) -> None:
        self.key, self.item, self.size, self.fut, self.waiting = key, item, size, fut, True


class MicroBatcher:
    """Runs ``fn(key, items)`` on batches of items submitted concurrently under the same key.

    One worker thread runs the model (torch and FAISS already use every core); while it is
    busy, new requests queue, and the next call takes up to ``max_batch`` questions at once.

    * At most ``max_queue`` questions wait (a request larger than that is still taken when
      nothing waits). When a request does not fit, the largest waiting requests that are
      larger than it are shed to make room (so many-question requests cannot starve small
      ones); if it still does not fit, it is refused. Shed and refused requests get a 503
      :class:`LimitError` whose ``Retry-After`` is the estimated time to drain the queue.
    * A request whose future is already done when its batch forms (cancelled because its
      client disconnected, or timed out) is dropped: the model never sees it.
    * When a batch call raises, each request of the batch is re-run alone, so an exception
      belongs to the one request whose input raised it (``isolated`` counts such batches).
    """

    def __init__(self, fn: Callable[[Any, list], list], max_batch: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int | None = None, name: str = "model") -> None:  # fmt: skip
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max_wait_ms / 1000
        self.max_queue, self.name = max_queue, name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"densepr-{name}")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # model calls
        self.items = 0  # requests served by them
        self.queued = 0  # questions waiting (submitted, not started, not abandoned)
        self.waiting: set[_Entry] = set()  # the requests they belong to
        self.rejected = 0  # requests refused because the queue was full
        self.shed = 0  # waiting requests answered 503 to make room for a smaller one
        self.dropped = 0  # requests abandoned (disconnected or timed out) before their batch ran
        self.isolated = 0  # batches that raised and were re-run one request at a time
        self.s_per_question = 0.0  # moving average of model time per question

    def retry_after(self) -> int:
        """Seconds until the questions now waiting are likely served (1 to 60)."""
        return int(min(60, max(1, math.ceil(self.queued * self.s_per_question))))

    def _leave(self, e: _Entry) -> None:
        if e.waiting:
            e.waiting = False
            self.queued -= e.size
            self.waiting.discard(e)

    def _busy(self) -> LimitError:
        return LimitError(503, "max_queue", f"server busy: {self.queued} questions are waiting for the {self.name} "
                                            f"(limit {self.max_queue}); retry later",
                          headers={"Retry-After": str(self.retry_after())})  # fmt: skip

    def _admit(self, size: int) -> bool:
        """Make room for ``size`` questions, shedding larger waiting requests, largest first."""
        if self.max_queue is None or self.queued == 0 or self.queued + size <= self.max_queue:
            return True
        larger = sorted((e for e in self.waiting if e.size > size and not e.fut.done()), key=lambda e: e.size, reverse=True)
        if self.queued - sum(e.size for e in larger) + size > self.max_queue:
            return False  # shedding every larger request would not make room: refuse the newcomer instead
        for e in larger:
            if self.queued + size <= self.max_queue:
                break
            self._leave(e)
            self.shed += 1
            e.fut.set_exception(self._busy())
        return True

    async def submit(self, key: Any, item: Any, size: int = 1) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # first call, or a new event loop (test clients)
            self.loop, self.queue, self.queued, self.waiting = loop, asyncio.Queue(), 0, set()
            self.worker = loop.create_task(self._run())
        if not self._admit(size):
            self.rejected += 1
            raise self._busy()
        e = _Entry(key, item, size, loop.create_future())
        self.queued += size
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

    async def _call(self, key: Any, items: list) -> list:
        assert self.loop is not None
        results = await self.loop.run_in_executor(self.pool, self._guarded, key, items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results

    async def _run_batch(self, key: Any, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            results = await self._call(key, [e.item for e in batch])
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0].fut.done():
                    batch[0].fut.set_exception(exc)
                return
            self.isolated += 1
            for e in batch:  # one at a time: the exception belongs to the request that raised it
                if e.fut.done():
                    continue
                try:
                    r = (await self._call(key, [e.item]))[0]
                except Exception as one:
                    if not e.fut.done():
                        e.fut.set_exception(one)
                else:
                    if not e.fut.done():
                        e.fut.set_result(r)
            return
        per = (time.perf_counter() - t0) / max(1, sum(e.size for e in batch))
        self.s_per_question = per if self.s_per_question == 0 else 0.8 * self.s_per_question + 0.2 * per
        for e, r in zip(batch, results):
            if not e.fut.done():
                e.fut.set_result(r)

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
            key = live[0].key
            batch, pending, n = [], [], 0
            for e in live:  # same key, up to max_batch questions (always at least one request)
                if e.key == key and (not batch or n + e.size <= self.max_batch):
                    batch.append(e)
                    n += e.size
                else:
                    pending.append(e)
            for e in batch:
                self._leave(e)
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
        return {"batches": self.batches, "requests": self.items, "queued_questions": self.queued,
                "rejected_queue_full": self.rejected, "shed_for_smaller": self.shed, "dropped_abandoned": self.dropped, "isolated_batches": self.isolated}  # fmt: skip


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
        lim = self.limits
        self.default_mode = "hybrid" if "hybrid" in retriever.modes else retriever.modes[0]
        self.answer_k = default_k_answer or (reader.config.top_k if reader is not None else 20)
        self.search_batcher = MicroBatcher(self._search_batch, lim.max_batch, lim.max_wait_ms, lim.max_queue, "retriever")
        self.answer_batcher = MicroBatcher(self._answer_batch, lim.max_batch, lim.max_wait_ms, lim.max_queue, "reader")
        self.post_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="densepr-post")

    # -- model calls (worker thread) -------------------------------------------------------
    def _search_batch(self, mode: str, items: list[tuple[list[str], int]]) -> list:
        questions = [q for qs, _ in items for q in qs]
        res = self.retriever.retrieve(questions, max(k for _, k in items), mode)
        out, i = [], 0
        for qs, k in items:
            out.append((res.rows[i : i + len(qs), :k], res.scores[i : i + len(qs), :k]))
            i += len(qs)
        return out

    def _answer_batch(self, key: tuple[str, int], items: list[str]) -> list:
        from densepr.pipeline import Pipeline

        mode, k = key
        return Pipeline(self.retriever, self.reader, k, mode).answer_many(items)

    # -- post-processing (post pool) -------------------------------------------------------------
    def search_body(self, questions: list[str], rows, scores, answers: list[list[str]] | None, mode: str, k: int, t0: float) -> bytes:
        """The /search response, serialised: passages per question, ``has_answer`` when answers are given."""
        from densepr.evaluate.answers import AnswerMatcher

        c = self.retriever.corpus
        matcher = AnswerMatcher(c.texts) if answers is not None else None
        found, results = SearchResult(rows, scores), []
        for i, q in enumerate(questions):
            prepared = AnswerMatcher._prepare(answers[i], "string") if answers is not None else None
            hits = []
            for h in found.hits(i, c):
                d = {"rank": h.rank, "id": h.id, "title": h.title, "text": h.text, "score": round(h.score, 4)}
                if matcher is not None:
                    d["has_answer"] = matcher._check(int(rows[i, h.rank - 1]), prepared, "string")
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

    def check_k_mode(self, k: int, mode: str | None) -> str:
        if k > self.limits.max_k:
            raise LimitError(422, "max_k", f"k={k} is over the limit of {self.limits.max_k}")
        mode = mode or self.default_mode
        if mode not in self.retriever.modes:
            raise LimitError(422, "mode", f"mode {mode!r} is not available; this index has: {', '.join(self.retriever.modes)}")
        return mode

    def health(self) -> dict:
        r = self.retriever
        enc = r.question_encoder
        return {"status": "ok", "passages": len(r.corpus), "modes": r.modes,
                "model": model_name(enc.name) if enc is not None else None,
                "index_type": r.dense.index_type if r.dense is not None else None,
                "bm25": r.bm25 is not None, "hybrid_lambda": r.hybrid_lambda,
                "reader": model_name(self.reader.name) if self.reader is not None else None,
                "answer_k": self.answer_k, "limits": asdict(self.limits),
                "micro_batches": {"search": [self.search_batcher.batches, self.search_batcher.items],
                                  "answer": [self.answer_batcher.batches, self.answer_batcher.items]},
                "queues": {"search": self.search_batcher.stats(), "answer": self.answer_batcher.stats()}}  # fmt: skip


def dump_json(obj: Any) -> bytes:
    """JSON bytes as FastAPI's JSONResponse writes them."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def raw_json_response(status: int, reason: str, body: dict, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response, for answering below the ASGI layer."""
    data = dump_json(body)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n{extra}\r\n")  # fmt: skip
    return head.encode("ascii") + data


class RequestGuard:
    """ASGI middleware for POST requests.

    * Refuses bodies over ``max_bytes`` (413) or not UTF-8 (400) before anything parses them.
    * Runs the app in a child task and watches the connection: when the client disconnects
      before the response is complete, the app's task is cancelled, which cancels whatever it
      awaits (a micro-batch slot: the request is dropped before the model sees it; a post-
      processing job not yet started).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _error(self, scope, receive, send, status: int, message: str, **extra) -> None:
        from starlette.responses import JSONResponse

        await JSONResponse({"error": message, **extra}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._error(scope, receive, send, 413, too_big, limit="max_body_bytes")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await self._error(scope, receive, send, 413, too_big, limit="max_body_bytes")
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await self._error(scope, receive, send, 400, f"request body is not valid UTF-8 (byte {e.start})")

        gone = asyncio.Event()
        replayed = False
        complete = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send_(message):
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, replay, send_))
        watcher = asyncio.ensure_future(receive())  # returns http.disconnect: client gone, or response complete
        try:
            await asyncio.wait({app_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app_task.done():
                if not complete:  # the client went away first: stop working for it
                    gone.set()
                    app_task.cancel()
                try:
                    await app_task
                except asyncio.CancelledError:
                    if not gone.is_set():
                        raise
            else:
                app_task.result()  # re-raise the app's exception, if any
        finally:
            for t in (app_task, watcher):
                if not t.done():
                    t.cancel()


PAGE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip


def create_app(service: Service):
    """The FastAPI application over a :class:`Service`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    lim = service.limits
    # FastAPI's own /docs and /redoc load their scripts from a CDN: replaced by a page served here.
    app = FastAPI(title="densepr", summary="Dense Passage Retrieval: search and answer", version="1",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.service = service

    def error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError):
        return error(e.status, e.message, e.headers, **e.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        detail = [{"loc": [str(x) for x in d.get("loc", ())], "msg": str(d.get("msg", ""))} for d in e.errors()]
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        return error(422, f"invalid request: {'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):  # 404, 405, unparsable bodies (e.g. JSON nested too deep)
        message = e.detail if isinstance(e.detail, str) else "request error"
        if message == "There was an error parsing the body":
            message = "the body could not be parsed as JSON (malformed, or nested too deeply)"
        return error(e.status_code, message, dict(e.headers) if e.headers else None)

    @app.exception_handler(DenseprError)
    async def _densepr(_: Request, e: DenseprError):
        return error(422, str(e))

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):  # the traceback is logged by the server
        return error(500, f"internal server error ({type(e).__name__})")

    app.add_middleware(RequestGuard, max_bytes=lim.max_body_bytes)

    async def timed(coro):
        """Run ``coro`` (queueing, model call, post-processing) within the request's timeout.
        On timeout the work is cancelled: a request still queued is dropped; an exception that
        belongs to this request becomes its own error (:func:`as_api_error`)."""
        try:
            return await asyncio.wait_for(coro, timeout=lim.timeout_s)
        except asyncio.TimeoutError:
            raise LimitError(408, "timeout_s", f"request took longer than the {lim.timeout_s} s limit") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise as_api_error(e) from None

    @app.post("/search", summary="Top-k passages for one or more questions", response_class=JSONResponse)
    async def search(req: SearchRequest):
        t0 = time.perf_counter()
        questions = [req.question] if isinstance(req.question, str) else req.question
        if not questions:
            raise LimitError(422, "question", "no question given")
        if len(questions) > lim.max_questions:
            raise LimitError(413, "max_questions", f"{len(questions)} questions; the limit is {lim.max_questions} per request")
        for q in questions:
            service.check_question(q)
        mode = service.check_k_mode(req.k, req.mode)
        service.check_answers(req.answers, len(questions))

        async def work() -> bytes:
            rows, scores = await service.search_batcher.submit(mode, (questions, req.k), len(questions))
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(service.post_pool, service.search_body, questions, rows, scores, req.answers, mode, req.k, t0)

        return Response(await timed(work()), media_type="application/json")

    @app.post("/answer", summary="Retrieve, read, and return the answer span")
    async def answer(req: AnswerRequest) -> dict:
        t0 = time.perf_counter()
        if service.reader is None:
            raise LimitError(409, "reader", "no reader loaded; start the server with --reader DIR")
        service.check_question(req.question)
        k = req.k or service.answer_k
        mode = service.check_k_mode(k, req.mode)
        a = await timed(service.answer_batcher.submit((mode, k), req.question))
        return {"question": a.question, "answer": a.text, "found": a.found, "score": a.score, "passage_score": a.passage_score,
                "start": a.start, "end": a.end, "passage": a.passage.__dict__ if a.passage else None,
                "passages": [h.__dict__ for h in a.passages], "mode": mode, "k": k,
                "took_ms": round(1000 * (time.perf_counter() - t0), 1)}  # fmt: skip

    @app.get("/health", summary="What is loaded")
    async def health() -> dict:
        return service.health()

    def page(name: str) -> HTMLResponse:
        html = resources.files("densepr").joinpath("resources", name).read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page():
        return page("search.html")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs_page():
        return page("docs.html")

    return app


# -- the HTTP server ---------------------------------------------------------------------------------
def guarded_protocol(read_timeout_s: float, max_connections: int | None):
    """uvicorn's h11 protocol with a request read timeout and a connection cap.

    uvicorn alone bounds neither: ``timeout_keep_alive`` only runs between requests on a
    connection that has already completed one (a fresh connection that sends part of its
    headers, or part of its body, is held for ever), and ``limit_concurrency`` is checked only
    once a request's headers are complete (so connections that never finish their headers are
    not refused, and the refusal is plain text).

    * **Read timeout.** From the moment a connection opens, or its previous response is
      complete, the next request (headers and body) must be fully received within
      ``read_timeout_s``; otherwise the server answers 408 ``{"error": ...,
      "limit": "read_timeout_s"}`` (when part of a request had arrived) and closes the
      connection. While a request is being computed no timer runs (``timeout_s`` bounds it).
    * **Write timeout.** A client that stops reading its response (the send buffer stays full)
      for ``read_timeout_s`` has its connection aborted, freeing the buffered response and
      the task waiting to send more; otherwise such a connection, and its memory, is held for ever.
    * **Connection cap.** A connection opened while ``max_connections`` are open is answered
      503 ``{"error": ..., "limit": "max_connections"}`` with ``Retry-After: 1`` and closed
      at once, before anything is read from it.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    reading_states = (h11.IDLE, h11.SEND_BODY)

    class GuardedH11Protocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if max_connections is not None and len(self.connections) > max_connections:
                transport.write(raw_json_response(503, "Service Unavailable", {
                    "error": f"server busy: {max_connections} connections are open; retry later",
                    "limit": "max_connections"}, {"Retry-After": "1"}))  # fmt: skip
                transport.close()
                return
            self._update_read_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_read_timer()
            self._cancel_write_timer()
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # the client stopped reading: our send buffer is full
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(read_timeout_s, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel_write_timer()

        def _cancel_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_timed_out(self) -> None:
            self._write_timer = None
            self.transport.abort()  # close() would wait for the unread buffer to drain: for ever

        def handle_events(self) -> None:
            super().handle_events()
            self._update_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update_read_timer()

        def _cancel_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _update_read_timer(self) -> None:
            if self.transport is None or self.transport.is_closing():
                self._cancel_read_timer()
            elif self.conn.their_state in reading_states:  # waiting for (the rest of) a request
                if self._read_timer is None:
                    self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)
            else:  # the request is in: the app's timeout_s bounds what follows
                self._cancel_read_timer()

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing() or self.conn.their_state not in reading_states:
                return
            if self.conn.their_state is h11.SEND_BODY and self.cycle is not None:  # headers in, body incomplete
                partial = not self.cycle.response_started
                self.cycle.disconnected = True  # the app waiting for the body sees http.disconnect
                self.cycle.message_event.set()
            else:  # part of the headers, or nothing at all (then: closed without a word, like keep-alive)
                partial = bool(self.conn.trailing_data[0])
            if partial:
                self.transport.write(raw_json_response(408, "Request Timeout", {
                    "error": f"the request was not received within {read_timeout_s} s", "limit": "read_timeout_s"}))  # fmt: skip
            self.transport.close()

    return GuardedH11Protocol


def server_config(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, log_level: str = "warning"):
    """The uvicorn configuration :func:`serve` runs: the guarded h11 protocol (read timeout,
    connection cap), ``timeout_keep_alive`` from ``limits``, no WebSockets, no lifespan."""
    import uvicorn

    lim = limits or app.state.service.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", lifespan="off",
                          http=guarded_protocol(lim.read_timeout_s, lim.max_connections),
                          timeout_keep_alive=lim.keep_alive_s)  # fmt: skip


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", limits: Limits | None = None) -> None:
    import uvicorn

    uvicorn.Server(server_config(app, host, port, limits, log_level)).run()
