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
  ``/health`` keeps answering. At most ``max_queue`` questions wait for the retriever, and
  ``max_answer_passages_queued`` passages (k per question, ``k <= max_k_answer``) for the
  reader; past that a request gets 503 with ``Retry-After`` (larger waiting requests are shed
  first to make room for a smaller one, then the newest of a client holding more of the queue,
  so floods of many-question or large-k requests cannot starve single questions). Batches are
  filled round-robin across clients (peer hosts), so one client's flood does not delay
  another's request by more than a batch. A request whose client disconnected, or that timed
  out, is dropped before the model sees it; a reader call whose requests have all gone stops
  between chunks.
* **Connections** (:func:`guarded_protocol`, used by :func:`serve`): a whole request,
  headers and body, must arrive within ``read_timeout_s`` (else 408 and close: slowloris), a
  new connection must send its first byte within ``first_byte_timeout_s``, a client that
  stops reading its response for ``read_timeout_s``, or has not taken it all within
  ``send_timeout_s``, is cut off, idle keep-alive connections close after ``keep_alive_s``.
  At most ``max_connections`` are open (``max_connections_per_client`` per IP address): when
  full, the connection idle longest without a complete request is closed to make room (so a
  flood of idle sockets cannot lock out ``/health``); only when every connection has a request
  in progress is a newcomer answered 503. Ambiguous framing (Content-Length with
  Transfer-Encoding) gets 400 and a close; a client that half-closes after its request still
  gets the answer.
* **Host check** (:class:`HostGuard`): a server bound to loopback answers only loopback
  ``Host`` names by default (DNS rebinding); ``allowed_hosts`` sets the list.
* **One error shape.** Every error, whatever raised it (limits, validation, malformed or
  too-deeply nested JSON, 404, 405, 500), is JSON ``{"error": message}``, plus ``"limit": name``
  when a limit was hit and ``"detail"`` for validation errors.
* ``/health`` names models by their directory name, never by a local path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import re
import socket
import time
from importlib import resources
from typing import Literal, Optional, Union

from fastapi import Request  # at module level: route signatures name it (annotations are strings here)
from pydantic import BaseModel, ConfigDict, Field

from densepr.errors import DenseprError
from densepr.retrieve.modes import Mode
from densepr.serve.service import (
    ApiError,
    LimitError,
    Limits,
    Service,
    as_api_error,
    dump_json,
)

log = logging.getLogger("densepr.serve.app")




ModeName = Literal[Mode.values()]  # the request schema lists the modes of the one enum


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: Union[str, list[str]] = Field(description="A question or a list of questions.")
    k: int = Field(10, ge=1, description="Passages per question (at most the server's max_k).")
    mode: Optional[ModeName] = Field(None, description="Default: hybrid when both indexes exist.")
    answers: Optional[list[list[str]]] = Field(None, description="Gold answers per question: adds has_answer to each passage "
                                                                 "(limits: max_answers, max_answer_chars, max_answers_total_chars).")  # fmt: skip


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: str
    k: Optional[int] = Field(None, ge=1, description="Passages read (default: the k tuned with the reader for the mode, else its top-k; at most the server's max_k_answer).")
    mode: Optional[ModeName] = None






















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

    async def _error(self, scope, receive, send, status: int, message: str, close: bool = False, **extra) -> None:
        from starlette.responses import JSONResponse

        # close: the rest of the body is not wanted; without it the connection would stay open to receive it all
        headers = {"Connection": "close"} if close else None
        await JSONResponse({"error": message, **extra}, status_code=status, headers=headers)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        too_big = f"request body over {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._error(scope, receive, send, 413, too_big, close=True, limit="max_body_bytes")
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
                return await self._error(scope, receive, send, 413, too_big, close=True, limit="max_body_bytes")
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
    from fastapi import FastAPI
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

    def client_of(request: Request):
        """Who sent a request, for fair queueing: the peer's host (all of one host's connections are one client)."""
        return request.client.host if request.client is not None else None

    @app.post("/search", summary="Top-k passages for one or more questions", response_class=JSONResponse)
    async def search(req: SearchRequest, request: Request):
        t0 = time.perf_counter()
        questions = [req.question] if isinstance(req.question, str) else req.question
        if not questions:
            raise LimitError(422, "question", "no question given")
        if len(questions) > lim.max_questions:
            raise LimitError(413, "max_questions", f"{len(questions)} questions; the limit is {lim.max_questions} per request")
        for q in questions:
            service.check_question(q)
        _, mode = service.check_k_mode(req.k, req.mode)
        service.check_answers(req.answers, len(questions))

        async def work() -> bytes:
            rows, scores = await service.search_batcher.submit(mode, (questions, req.k), len(questions), client=client_of(request))
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(service.post_pool, service.search_body, questions, rows, scores, req.answers, mode, req.k, t0)

        return Response(await timed(work()), media_type="application/json")

    @app.post("/answer", summary="Retrieve, read, and return the answer span")
    async def answer(req: AnswerRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        if service.reader is None:
            raise LimitError(409, "reader", "no reader loaded; start the server with --reader DIR")
        service.check_question(req.question)
        k, mode = service.check_k_mode(req.k or None, req.mode, answer=True)
        # one question, k passages: the reader's queue counts passages
        a = await timed(service.answer_batcher.submit((mode, k), req.question, cost=k, client=client_of(request)))
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
class _OneShot:
    """A timer that is armed at most once at a time: ``arm`` does nothing while it is pending."""

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop, delay: float, fn) -> None:
        if self.handle is None:
            self.handle = loop.call_later(delay, self._fire, fn)

    def _fire(self, fn) -> None:
        self.handle = None
        fn()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


# How long a closed connection keeps reading (and discarding) what its client still sends.
LINGER_S = 2.0


class _LingeringTransport:
    """The connection's transport, with a *lingering* ``close()`` (Apache's lingering close).

    Closing a socket that holds unread bytes, or that bytes reach afterwards, makes the kernel
    send a reset; the client then gets the server's last answer (a 408, 413, 503 or 400 sent
    while it was still sending) followed by ECONNRESET, or loses it if the reset arrives
    before it reads. So ``close()`` sends what is buffered, then a FIN (``write_eof``), and
    keeps reading and discarding until the client closes too, or ``LINGER_S`` passes with
    nothing left to send (then ``abort``; a large answer to a slow reader is not cut off). Everything else is the wrapped transport's; ``is_closing()`` is true from
    ``close()`` on, so uvicorn and the timers below treat the connection as closed.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self.lingering = False
        self.peer_eof = False  # the client has half-closed: it sends nothing more, so there is nothing to linger for
        self._timer = _OneShot()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.lingering:  # nothing more goes out after the FIN, as after a plain close
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        if self.peer_eof or not self._transport.can_write_eof():  # TLS: no half-close
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()  # reading may be paused (a body nobody reads): drain it
        self._timer.arm(self._loop, LINGER_S, self._linger_over)

    def _linger_over(self) -> None:
        if self._transport.get_write_buffer_size():  # the answer is still going out (a stalled reader: the write timeout)
            self._timer.arm(self._loop, LINGER_S, self._linger_over)
        else:
            self._transport.abort()

    def end(self) -> None:
        """Stop lingering: the client closed its side, the connection is lost, or the server stops."""
        self._timer.cancel()
        if not self._transport.is_closing():
            self._transport.close()


def guarded_protocol(limits: Limits):
    """uvicorn's h11 protocol with read, first-byte and send timeouts, connection caps and strict framing.

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
    * **First-byte timeout.** A new connection that sends nothing for ``first_byte_timeout_s``
      is closed without a word (idle sockets are the cheapest flood).
    * **Write timeout and send deadline.** A client that stops reading its response (the send
      buffer stays full) for ``read_timeout_s``, or that has not taken a whole response
      ``send_timeout_s`` after it started (one that reads, but slowly), has its connection
      aborted, freeing the buffered response and the task waiting to send more.
    * **Connection caps.** When a connection opens while ``max_connections`` are open (or its
      client, by IP address, has ``max_connections_per_client``), the connection that has
      waited longest for a request it has not completely sent (idle since it opened or since
      its last response, or sending a partial request) is closed to make room: silently when
      it had sent nothing, else with a 503 ``{"error": ..., "limit": ...}``. Connections whose
      request is complete (being computed or answered) are never closed for this; when all
      are, the new connection is answered 503 with ``Retry-After: 1`` and closed, before
      anything is read from it. So a flood of silent or partial connections cannot lock
      others out, ``/health`` included. Closing connections do not count.
    * **Framing.** A request with both ``Content-Length`` and ``Transfer-Encoding`` (request
      smuggling, RFC 9112 section 6.1) is answered 400 and the connection closed; so is any
      request h11 cannot parse, with a JSON body (uvicorn's is plain text).
    * **Half-close.** A client that shuts down its sending side after a complete request
      (``shutdown(SHUT_WR)``) still gets its answers. A FIN alone cannot tell a half-close from
      a client that has gone, whose request should be dropped: so an HTTP/1.1 request still
      being computed is sent an interim ``100 Continue`` (every HTTP/1.1 client must accept
      one); a client that has gone answers it with a reset, and its request is dropped.
    * **Lingering close** (:class:`_LingeringTransport`): every close the server initiates
      (these answers, 400s, a 413 whose body is still arriving, ``Connection: close``,
      keep-alive expiry) half-closes and discards what still arrives, so the answer is not
      lost to a reset.
    """
    import h11
    from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
    from uvicorn.protocols.http.h11_impl import H11Protocol

    read_timeout_s, max_connections, per_client = limits.read_timeout_s, limits.max_connections, limits.max_connections_per_client
    first_byte_s, send_s = min(limits.first_byte_timeout_s, limits.read_timeout_s), limits.send_timeout_s
    reading_states = (h11.IDLE, h11.SEND_BODY)
    turns = itertools.count()  # the order in which connections began to wait (uvloop's clock has 1 ms steps)

    class StrictConnection(h11.Connection):
        """h11's server side, refusing ambiguous framing, and telling its protocol when a response starts and ends."""

        def __init__(self, protocol: GuardedH11Protocol, max_incomplete_event_size: int) -> None:
            super().__init__(h11.SERVER, max_incomplete_event_size)
            self.protocol, self.refusal = protocol, None

        def next_event(self):
            event = super().next_event()
            if isinstance(event, h11.Request):
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    self.refusal = ("a request with both Content-Length and Transfer-Encoding is refused (RFC 9112 section 6.1): "
                                    "its length is ambiguous")  # fmt: skip
                    raise h11.RemoteProtocolError(self.refusal, 400)
            return event

        def send(self, event):
            data = super().send(event)
            if isinstance(event, h11.Response):
                self.protocol.response_started()
            elif isinstance(event, h11.EndOfMessage):
                self.protocol.response_ended()
            return data

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            size = self.config.h11_max_incomplete_event_size
            self.conn = StrictConnection(self, size if size is not None else DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)
            self._read_timer, self._write_timer, self._first_byte_timer = _OneShot(), _OneShot(), _OneShot()
            self._send_timer, self._probe_timer = _OneShot(), _OneShot()
            self._idle_turn = 0  # when it began waiting for a request (opened, or its last response done), in turns
            self._responding = False
            self._peer_eof = False

        # -- caps and eviction
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _LingeringTransport(transport, self.loop)
            self._idle_turn = next(turns)
            full = self._make_room()
            if full is not None:
                self.transport.write(raw_json_response(503, "Service Unavailable", {
                    "error": f"server busy: too many connections are open ({full}); retry later", "limit": full}, {"Retry-After": "1"}))  # fmt: skip
                self.transport.close()
                return
            self._first_byte_timer.arm(self.loop, first_byte_s, self._first_byte_timed_out)
            self._update_read_timer()

        def _make_room(self) -> str | None:
            """Close the longest-idle connection without a complete request when a cap is exceeded;
            the name of the cap when there is none to close."""
            live = [c for c in self.connections if c.transport is not None and not c.transport.is_closing()]
            if per_client is not None and self.client:
                mine = [c for c in live if c.client and c.client[0] == self.client[0]]
                if len(mine) > per_client:
                    evicted = self._evict(mine, "max_connections_per_client")
                    if evicted is None:
                        return "max_connections_per_client"
                    live.remove(evicted)
            if max_connections is not None and len(live) > max_connections and self._evict(live, "max_connections") is None:
                return "max_connections"
            return None

        def _evict(self, candidates: list, limit: str):
            idle = [c for c in candidates if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting_for_request()]
            if not idle:
                return None
            victim = min(idle, key=lambda c: c._idle_turn)
            victim.cut_off(raw_json_response(503, "Service Unavailable", {
                "error": "server busy: this connection had not sent a complete request and was closed to make room; retry",
                "limit": limit}, {"Retry-After": "1"}))  # fmt: skip
            return victim

        def waiting_for_request(self) -> bool:
            return not self.transport.is_closing() and self.conn.their_state in reading_states

        def cut_off(self, answer: bytes) -> None:
            """Close a connection waiting for (the rest of) a request: with ``answer`` when part of one
            had arrived, else without a word (as keep-alive expiry does)."""
            if self.conn.their_state is h11.SEND_BODY and self.cycle is not None:  # headers in, body incomplete
                partial = not self.cycle.response_started
                self.cycle.disconnected = True  # the app waiting for the body sees http.disconnect
                self.cycle.message_event.set()
            else:  # part of the headers, or nothing at all
                partial = bool(self.conn.trailing_data[0])
            if partial:
                self.transport.write(answer)
                self.transport.close()
            else:
                self.transport.end()  # nothing was said, so no answer to protect: no linger

        def connection_lost(self, exc) -> None:
            for t in (self._read_timer, self._write_timer, self._first_byte_timer, self._send_timer, self._probe_timer):
                t.cancel()
            self.transport.end()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._first_byte_timer.cancel()
            if not self.transport.lingering:  # after our close, what arrives is read only to be dropped
                super().data_received(data)

        def _first_byte_timed_out(self) -> None:
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                self.transport.end()

        # -- framing
        def send_400_response(self, msg: str) -> None:  # h11 could not parse the request, or StrictConnection refused it
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # (never in the middle of another response)
                self.transport.write(raw_json_response(400, "Bad Request", {
                    "error": self.conn.refusal or "invalid HTTP request (request line, headers or framing)"}))  # fmt: skip
            self.transport.close()

        # -- half-close
        def eof_received(self):
            if self.transport.lingering:  # the client has read our last word and closed: done
                self.transport.end()
                return None
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE):  # no complete request to answer: close
                return None
            self._peer_eof = True
            self.transport.peer_eof = True
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and cycle.scope["http_version"] == "1.1" and self.conn.our_state is h11.SEND_RESPONSE:
                # A half-close, or a client that has gone? Only the second answers this with a reset.
                cycle.waiting_for_100_continue = False
                self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
                self._probe(0.0)
            return True  # keep the connection open to send the answer

        def _probe(self, delay: float) -> None:
            self._probe_timer.cancel()
            self._probe_timer.arm(self.loop, delay, self._probe_reset)

        def _probe_reset(self) -> None:
            """While the answer is not started: has the client answered the 100 with a reset? (With the
            peer's FIN in, the transport no longer reads, so a reset would be seen only by the answer.)"""
            if self.transport.is_closing() or self.cycle is None or self.cycle.response_started:
                return
            sock = self.transport.get_extra_info("socket")
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self.transport.abort()  # connection_lost: the request is dropped like any abandoned one
                return
            self._probe(0.05)  # (a getsockopt per 50 ms, for half-closed connections whose answer is being computed)

        # -- timers
        def shutdown(self) -> None:  # the server is stopping: idle connections close at once, no linger
            super().shutdown()
            if self.transport.lingering:
                self.transport.end()

        def pause_writing(self) -> None:  # the client stopped reading: our send buffer is full
            super().pause_writing()
            self._write_timer.arm(self.loop, read_timeout_s, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._write_timer.cancel()

        def _write_timed_out(self) -> None:
            self.transport.abort()  # close() would wait for the unread buffer to drain: for ever

        def response_started(self) -> None:
            # A response queued behind bytes of the last one not yet sent shares its deadline.
            if self.transport.get_write_buffer_size() == 0:
                self._send_timer.cancel()
            self._send_timer.arm(self.loop, send_s, self._send_timed_out)
            self._responding = True

        def response_ended(self) -> None:
            self._responding = False
            self.loop.call_soon(self._sent_in_time)  # (after uvicorn writes the response's last bytes)

        def _sent_in_time(self) -> None:
            if not self._responding and self.transport.get_write_buffer_size() == 0:
                self._send_timer.cancel()

        def _send_timed_out(self) -> None:
            if self._responding or self.transport.get_write_buffer_size():
                self.transport.abort()

        def handle_events(self) -> None:
            super().handle_events()
            self._update_read_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_turn = next(turns)
            if self._peer_eof and not self.transport.is_closing() and self.conn.their_state in reading_states:
                self.transport.end()  # the client has sent all it will send, and has all its answers
            self._update_read_timer()

        def _update_read_timer(self) -> None:
            if self.transport is None or self.transport.is_closing():
                self._read_timer.cancel()
            elif self.conn.their_state in reading_states:  # waiting for (the rest of) a request
                self._read_timer.arm(self.loop, read_timeout_s, self._read_timed_out)
            else:  # the request is in: the app's timeout_s bounds what follows
                self._read_timer.cancel()

        def _read_timed_out(self) -> None:
            if self.waiting_for_request():
                self.cut_off(raw_json_response(408, "Request Timeout", {
                    "error": f"the request was not received within {read_timeout_s} s", "limit": "read_timeout_s"}))  # fmt: skip

    return GuardedH11Protocol


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def default_allowed_hosts(host: str) -> tuple[str, ...] | None:
    """The ``Host`` names a server bound to ``host`` answers unless told otherwise: on a loopback
    address (``localhost``, 127.0.0.0/8, ``::1``) the loopback names and that address, so a web
    page whose own name an attacker has pointed at 127.0.0.1 (DNS rebinding) cannot read from it;
    on any other address any name (None: no check), since its clients' names for it are unknown."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return LOOPBACK_NAMES
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None
    if not ip.is_loopback:
        return None
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, f"[{ip}]" if ip.version == 6 else str(ip))))


_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]]+)(:[0-9]*)?")


class HostGuard:
    """ASGI middleware: a request whose ``Host`` is not one of ``allowed`` (names, any port;
    ``*.example.com`` for its subdomains; ``*`` for any) is answered 400 ``{"error": ...,
    "limit": "allowed_hosts"}`` and the connection closed."""

    def __init__(self, app, allowed) -> None:
        self.app = app
        names = [h.strip().lower() for h in allowed if h.strip()]
        self.any = "*" in names
        self.names = {f"[{h}]" if ":" in h and not h.startswith("[") else h for h in names if not h.startswith("*")}
        self.suffixes = tuple(h[1:] for h in names if h.startswith("*."))
        self.shown = ", ".join(names)

    def allows(self, host: str) -> bool:
        m = _HOST.fullmatch(host.strip().lower())
        if m is None:
            return False
        name = m.group(1).removesuffix(".")
        return self.any or name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
            if len(hosts) != 1 or not self.allows(hosts[0]):
                shown = repr(hosts[0][:100]) if len(hosts) == 1 else f"{len(hosts)} Host headers"
                body = dump_json({"error": f"Host {shown} is not served here (allowed: {self.shown}; see --allowed-hosts)",
                                  "limit": "allowed_hosts"})  # fmt: skip
                await send({"type": "http.response.start", "status": 400, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None, log_level: str = "warning"):
    """The uvicorn configuration :func:`serve` runs: the guarded h11 protocol (timeouts,
    connection caps, framing), the ``Host`` check (``limits.allowed_hosts``, else
    :func:`default_allowed_hosts` of ``host``), ``timeout_keep_alive`` from ``limits``, no
    WebSockets, no lifespan."""
    import uvicorn

    lim = limits or app.state.service.limits
    allowed = lim.allowed_hosts if lim.allowed_hosts is not None else default_allowed_hosts(host)
    if allowed is not None:
        app = HostGuard(app, allowed)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", lifespan="off",
                          http=guarded_protocol(lim), timeout_keep_alive=lim.keep_alive_s)  # fmt: skip


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", limits: Limits | None = None) -> None:
    import uvicorn

    uvicorn.Server(server_config(app, host, port, limits, log_level)).run()
