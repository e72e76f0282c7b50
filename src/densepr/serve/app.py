"""HTTP search and question answering over a saved index: a FastAPI app (``densepr serve``).

Endpoints::

    POST /search   {"question": "..." | ["...", ...], "k": 10, "mode": "hybrid", "answers": [...]}
    POST /answer   {"question": "...", "k": 20, "mode": "hybrid"}
    GET  /health   loaded model, index type, passage count, modes, reader, limits
    GET  /         a search page (plain HTML + JS)
    GET  /docs, /openapi.json

The index, encoder and reader load once. Concurrent requests are **micro-batched**: requests
that arrive while the model is busy are queued and served by one retrieval (one encoder
pass, one FAISS search) or one reader call, then split back per request.

Every limit is a setting with a safe default (:class:`Limits`); a request over one gets a
4xx with ``{"error": ..., "limit": name}``; malformed or wrongly typed bodies get 4xx with
``{"error": ..., "detail": [...]}``; never a 500 for bad input.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from densepr.errors import DenseprError


@dataclass
class Limits:
    """What one request may ask for."""

    max_question_chars: int = 1000
    max_k: int = 100
    max_questions: int = 64  # questions in one /search request
    max_body_bytes: int = 256 * 1024
    timeout_s: float = 30.0  # per request, queueing included
    max_batch: int = 64  # questions per micro-batch (1 = no micro-batching)
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company


Mode = Literal["bm25", "dense", "hybrid", "rrf"]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: Union[str, list[str]] = Field(description="A question or a list of questions.")
    k: int = Field(10, ge=1, description="Passages per question (at most the server's max_k).")
    mode: Optional[Mode] = Field(None, description="Default: hybrid when both indexes exist.")
    answers: Optional[list[list[str]]] = Field(None, description="Gold answers per question: adds has_answer to each passage.")

class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str
    k: Optional[int] = Field(None, ge=1, description="Passages read (default: the reader's tuned top-k).")
    mode: Optional[Mode] = None


class LimitError(Exception):
    def __init__(self, status: int, limit: str, message: str) -> None:
        super().__init__(message)
        self.status, self.limit, self.message = status, limit, message


class MicroBatcher:
    """Runs ``fn(key, items)`` on batches of items submitted concurrently under the same key.

    One worker thread runs the model (torch and FAISS already use every core); while it is
    busy, new requests queue, and the next call takes up to ``max_batch`` questions at once.
    """

    def __init__(self, fn: Callable[[Any, list], list], max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max_wait_ms / 1000
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="densepr-model")
        self.queue: asyncio.Queue | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, key: Any, item: Any, size: int = 1) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.loop is not loop:  # first call, or a new event loop (test clients)
            self.loop, self.queue = loop, asyncio.Queue()
            self.worker = loop.create_task(self._run())
        fut = loop.create_future()
        await self.queue.put((key, item, size, fut))
        return await fut

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        pending: list = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
                if self.max_batch > 1 and self.max_wait > 0:
                    await asyncio.sleep(self.max_wait)
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            key = pending[0][0]
            batch, rest, n = [], [], 0
            for entry in pending:  # same key, up to max_batch questions (always at least one request)
                if entry[0] == key and (not batch or n + entry[2] <= self.max_batch):
                    batch.append(entry)
                    n += entry[2]
                else:
                    rest.append(entry)
            pending = rest
            live = [e for e in batch if not e[3].done()]  # timed-out requests are dropped
            if not live:
                continue
            self.batches += 1
            self.items += len(live)
            try:
                results = await loop.run_in_executor(self.pool, self.fn, key, [e[1] for e in live])
                for e, r in zip(live, results):
                    if not e[3].done():
                        e[3].set_result(r)
            except Exception as exc:  # handed to each waiting request
                for e in live:
                    if not e[3].done():
                        e[3].set_exception(exc)


class Service:
    """What the app serves: a retriever, an optional reader, limits, and the two batchers."""

    def __init__(self, retriever, reader=None, limits: Limits | None = None, default_k_answer: int | None = None) -> None:
        self.retriever, self.reader, self.limits = retriever, reader, limits or Limits()
        self.default_mode = "hybrid" if "hybrid" in retriever.modes else retriever.modes[0]
        self.answer_k = default_k_answer or (reader.config.top_k if reader is not None else 20)
        self.search_batcher = MicroBatcher(self._search_batch, self.limits.max_batch, self.limits.max_wait_ms)
        self.answer_batcher = MicroBatcher(self._answer_batch, self.limits.max_batch, self.limits.max_wait_ms)

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

    # -- checks ------------------------------------------------------------------------------
    def check_question(self, q: str) -> None:
        lim = self.limits
        if not q.strip():
            raise LimitError(422, "question", "empty question")
        if len(q) > lim.max_question_chars:
            raise LimitError(413, "max_question_chars", f"question is {len(q)} characters; the limit is {lim.max_question_chars}")
        if self.reader is not None:
            try:
                self.reader.question_ids(q)
            except DenseprError as e:
                raise LimitError(413, "max_question_tokens", str(e)) from None

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
                "model": enc.name if enc is not None else None,
                "index_type": r.dense.index_type if r.dense is not None else None,
                "bm25": r.bm25 is not None, "hybrid_lambda": r.hybrid_lambda,
                "reader": self.reader.name if self.reader is not None else None,
                "answer_k": self.answer_k, "limits": asdict(self.limits),
                "micro_batches": {"search": [self.search_batcher.batches, self.search_batcher.items],
                                  "answer": [self.answer_batcher.batches, self.answer_batcher.items]}}  # fmt: skip


class BodyGuard:
    """ASGI middleware: refuse POST bodies over ``max_bytes`` (413) or not UTF-8 (400) before parsing."""

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
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._error(scope, receive, send, 413, too_big, limit="max_body_bytes")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            return await self._error(scope, receive, send, 400, f"request body is not valid UTF-8 (byte {e.start})")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(service: Service):
    """The FastAPI application over a :class:`Service`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    lim = service.limits
    app = FastAPI(title="densepr", summary="Dense Passage Retrieval: search and answer", version="1")

    def error(status: int, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(LimitError)
    async def _limit(_: Request, e: LimitError):
        return error(e.status, e.message, limit=e.limit)


    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        detail = [{"loc": [str(x) for x in d.get("loc", ())], "msg": str(d.get("msg", ""))} for d in e.errors()]
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        return error(422, f"invalid request: {'.'.join(first['loc'][1:]) or 'body'}: {first['msg']}", detail=detail)

    @app.exception_handler(DenseprError)
    async def _densepr(_: Request, e: DenseprError):
        return error(422, str(e))

    app.add_middleware(BodyGuard, max_bytes=lim.max_body_bytes)

    async def timed(coro):
        try:
            return await asyncio.wait_for(coro, timeout=lim.timeout_s)
        except asyncio.TimeoutError:
            raise LimitError(408, "timeout_s", f"request took longer than the {lim.timeout_s} s limit") from None

    def _hits(rows, scores, answers: Sequence[str] | None) -> list[dict]:
        from densepr.evaluate.answers import has_answer

        c = service.retriever.corpus
        out = []
        for j, (r, s) in enumerate(zip(rows, scores)):
            if r < 0:
                break
            h = {"rank": j + 1, "id": c.ids[r], "title": c.titles[r], "text": c.texts[r], "score": round(float(s), 4)}
            if answers is not None:
                h["has_answer"] = has_answer(answers, c.texts[r])
            out.append(h)
        return out

    @app.post("/search", summary="Top-k passages for one or more questions")
    async def search(req: SearchRequest) -> dict:
        t0 = time.perf_counter()
        questions = [req.question] if isinstance(req.question, str) else req.question
        if not questions:
            raise LimitError(422, "question", "no question given")
        if len(questions) > lim.max_questions:
            raise LimitError(413, "max_questions", f"{len(questions)} questions; the limit is {lim.max_questions} per request")
        for q in questions:
            service.check_question(q)
        mode = service.check_k_mode(req.k, req.mode)
        if req.answers is not None and len(req.answers) != len(questions):
            raise LimitError(422, "answers", f"{len(req.answers)} answer lists for {len(questions)} questions")
        rows, scores = await timed(service.search_batcher.submit(mode, (questions, req.k), len(questions)))
        results = [{"question": q, "passages": _hits(rows[i], scores[i], req.answers[i] if req.answers else None)}
                   for i, q in enumerate(questions)]  # fmt: skip
        return {"mode": mode, "k": req.k, "results": results, "took_ms": round(1000 * (time.perf_counter() - t0), 1)}

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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("densepr").joinpath("resources", "search.html").read_text(encoding="utf-8")

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
