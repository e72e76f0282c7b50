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
* **Connections** (:func:`densepr.serve.connections.guarded_protocol`, used by :func:`serve`): a whole request,
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
import logging
import re
import time
from importlib import resources
from typing import Literal, Optional, Union

from fastapi import Request  # at module level: route signatures name it (annotations are strings here)
from pydantic import BaseModel, ConfigDict, Field

from densepr.errors import DenseprError
from densepr.retrieve.modes import Mode
from densepr.serve.limits import ApiError, LimitError, Limits, as_api_error, dump_json
from densepr.serve.service import Service

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
    # The endpoints find the service on the app (request.app.state), never in a closure: FastAPI keeps the
    # endpoint functions of every app ever routed in module-level caches (4,096 entries), so a closure over
    # the service would keep its index (memory maps, one open file each) alive after the app is dropped.
    # FastAPI's own /docs and /redoc load their scripts from a CDN: replaced by a page served here.
    app = FastAPI(title="densepr", summary="Dense Passage Retrieval: search and answer", version="1",
                  docs_url=None, redoc_url=None)  # fmt: skip
    app.state.service = service
    del service

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
        service: Service = request.app.state.service
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
        service: Service = request.app.state.service
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
    async def health(request: Request) -> dict:
        return request.app.state.service.health()

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
    from densepr.serve.connections import guarded_protocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, ws="none", lifespan="off",
                          http=guarded_protocol(lim), timeout_keep_alive=lim.keep_alive_s)  # fmt: skip


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", limits: Limits | None = None) -> None:
    import uvicorn

    uvicorn.Server(server_config(app, host, port, limits, log_level)).run()
