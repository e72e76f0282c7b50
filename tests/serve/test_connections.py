"""The connection layer of ``densepr serve`` on a real uvicorn server (:func:`server_config`): connection
floods (eviction of connections that have not sent a request, the first-byte timeout, the per-client cap),
request smuggling (Content-Length with Transfer-Encoding), a half-close after a request, a total send
deadline for slow readers, and the Host allow-list (DNS rebinding). No assertion depends on the machine's
speed: waits are for events, with generous upper bounds."""

from __future__ import annotations

import asyncio
import re
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'densepr[serve]')")

from densepr.retrieve.retriever import Retriever  # noqa: E402
from densepr.serve.app import create_app, server_config  # noqa: E402
from densepr.serve.limits import Limits  # noqa: E402
from densepr.serve.service import Service  # noqa: E402
from tests.serve.test_serve import _free_port, _post, _status_and_body  # noqa: E402

HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
SEARCH = _post("/search", b'{"question": "who created python", "mode": "bm25"}')


class _Running:
    """An ASGI app behind :func:`server_config` (the guarded protocol) in a thread, on a free loopback port."""

    def __init__(self, app, limits: Limits) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, limits))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Running:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self, source: str | None = None) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30, source_address=(source, 0) if source else None)

    def ask(self, request: bytes, source: str | None = None) -> tuple[int, dict, bytes]:
        """One request on a fresh connection that the client half-closes after it: (status, JSON body, raw)."""
        s = self.connect(source)
        s.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        raw = read_all(s)
        s.close()
        status, body = _status_and_body(raw)
        return status, body, raw


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (a reset after the answer counts as the end)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def status_of(s: socket.socket) -> int:
    """The status of the next response on a kept-alive connection, read to its end (headers and body
    may come in separate reads); 0 when the server closed it instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split()[1])


def closed_by_server(s: socket.socket, within: float = 30.0) -> bytes | None:
    """What the server sent on ``s`` before closing it, if it closes it within ``within`` seconds; else None."""
    s.settimeout(within)
    try:
        return read_all(s)
    except TimeoutError:
        return None


def responses(raw: bytes) -> int:
    """Final responses in ``raw`` (an interim 1xx is not one)."""
    return len(re.findall(rb"HTTP/1\.1 [2-5]\d\d ", raw))


def last_response(raw: bytes) -> bytes:
    return raw[raw.rindex(b"HTTP/1.1 ") :] if b"HTTP/1.1 " in raw else raw


@pytest.fixture
def service(index_dir) -> Service:
    return Service(Retriever.load(index_dir, device="cpu"), None, Limits())


def _with_limits(svc: Service, **kw) -> Service:
    svc.limits = Limits(**kw)
    return svc


class _Held:
    """A raw ASGI app whose requests to /hold are received in full, then held until ``release``; any other
    path answers at once. ``arrived`` counts the held requests that came in."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.arrived = 0
        self.cond = threading.Condition()

    def wait_arrived(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.arrived >= n, 30), f"{self.arrived} of {n} requests arrived"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            msg = await receive()
            more = msg.get("more_body", False)
        if scope["path"] == "/hold":
            with self.cond:
                self.arrived += 1
                self.cond.notify_all()
            while not self.released.is_set():
                await asyncio.sleep(0.01)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"12")]}
        )
        await send({"type": "http.response.body", "body": b'{"ok": true}'})


HOLD = b"GET /hold HTTP/1.1\r\nHost: localhost\r\n\r\n"


# -- item 4: connection floods ------------------------------------------------------------------------
def test_a_flood_of_idle_connections_evicts_the_oldest_and_health_and_search_still_answer(service):
    """max_connections sockets that send nothing (or part of a request) fill the server; a new client is
    not refused: the oldest connection that has not sent a complete request is closed to make room (a
    partial request gets a 503 JSON, a silent one a plain close), and /health and /search answer."""
    svc = _with_limits(service, max_connections=16, max_connections_per_client=None, first_byte_timeout_s=60,
                       read_timeout_s=60, keep_alive_s=60)  # fmt: skip
    with _Running(create_app(svc), svc.limits) as srv:
        partial = srv.connect()
        partial.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Le")
        assert srv.ask(HEALTH)[0] == 200  # (not full yet; once answered, the server has surely read what partial sent)
        idle = [srv.connect() for _ in range(15)]
        status, body, _ = srv.ask(HEALTH)  # before the fix: 503, limit max_connections
        assert status == 200 and body["status"] == "ok", body
        got, answer = _status_and_body(read_all(partial))  # the oldest went first
        assert got == 503 and answer["limit"] == "max_connections" and answer["error"], answer
        late = srv.connect()  # full again (a connection that answered and closed no longer counts)
        status, body, _ = srv.ask(SEARCH)
        assert status == 200 and body["results"][0]["passages"], body
        assert closed_by_server(idle[0]) == b""  # the next oldest, closed without a word
        for s in idle[1:] + [late]:  # the others are still open
            s.sendall(HEALTH)
            assert status_of(s) == 200
            s.close()
        partial.close()


def test_a_full_server_of_requests_in_flight_refuses_with_503_and_evicts_none():
    """Connections whose request is complete (being computed) are never evicted: when every connection
    holds one, a new connection is answered 503 (limit max_connections, Retry-After) and closed."""
    app = _Held()
    lim = Limits(max_connections=4, max_connections_per_client=None, read_timeout_s=60, keep_alive_s=60)
    with _Running(app, lim) as srv:
        busy = [srv.connect() for _ in range(4)]
        for s in busy:
            s.sendall(HOLD)
        app.wait_arrived(4)
        status, body, raw = srv.ask(b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 503 and body["limit"] == "max_connections" and b"retry-after: 1" in raw.lower(), raw
        app.released.set()
        for s in busy:
            assert status_of(s) == 200  # all four served
            s.close()


def test_a_new_connection_must_send_its_first_byte_within_first_byte_timeout(service):
    """A silent connection is closed after first_byte_timeout_s (well before read_timeout_s); one that
    has started a request within it has the whole read timeout to finish it."""
    svc = _with_limits(service, first_byte_timeout_s=0.5, read_timeout_s=60, keep_alive_s=60)
    with _Running(create_app(svc), svc.limits) as srv:
        t0 = time.monotonic()
        silent = srv.connect()
        started = srv.connect()
        started.sendall(HEALTH[:1])
        assert closed_by_server(silent, within=30) == b""  # before the fix: held for the 60 s read timeout
        assert time.monotonic() - t0 >= 0.4
        started.sendall(HEALTH[1:])  # sent after the first-byte timeout has passed
        assert status_of(started) == 200
        started.close()


def test_one_client_cannot_hold_more_than_max_connections_per_client():
    """The per-client cap (by IP address): a client over it first loses its own oldest idle connection;
    when all of its connections are busy it is refused with 503; another address is not affected."""
    app = _Held()
    lim = Limits(max_connections=50, max_connections_per_client=3, read_timeout_s=60, keep_alive_s=60, first_byte_timeout_s=60)
    with _Running(app, lim) as srv:
        try:
            other = srv.connect(source="127.0.0.2")
        except OSError:
            pytest.skip("cannot bind 127.0.0.2 here")
        other.sendall(HEALTH)
        assert status_of(other) == 200
        busy = [srv.connect() for _ in range(3)]
        for s in busy:
            s.sendall(HOLD)
        app.wait_arrived(3)
        status, body, _ = srv.ask(HEALTH)  # a fourth from 127.0.0.1: over its cap, nothing of its own to evict
        assert status == 503 and body["limit"] == "max_connections_per_client", body
        other.sendall(HEALTH)  # 127.0.0.2's kept-alive connection was not evicted for it, and is served
        assert status_of(other) == 200
        assert srv.ask(HEALTH, source="127.0.0.2")[0] == 200
        app.released.set()
        for s in busy:
            assert status_of(s) == 200  # now idle, kept alive
        status, _, _ = srv.ask(HEALTH)  # over the cap again: its own longest-idle connection makes room
        assert status == 200
        poller = select.poll()  # not select.select, which refuses fds past 1024 in a long test run
        for s in busy:
            poller.register(s, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(30_000)}
        evicted = [s for s in busy if s.fileno() in ready]
        assert len(evicted) == 1 and closed_by_server(evicted[0]) == b""
        for s in busy:
            if s is not evicted[0]:
                s.sendall(HEALTH)
                assert status_of(s) == 200
            s.close()
        other.close()


# -- item 6: request smuggling ------------------------------------------------------------------------
SMUGGLED = b'{"question": "SMUGGLED", "mode": "bm25"}'


@pytest.mark.parametrize("order", ["cl-te", "te-cl"])
def test_content_length_with_transfer_encoding_is_refused_and_closed(service, order):
    """RFC 9112 section 6.1: a request with both headers is answered 400 (JSON) and the connection closed, so
    a request hidden in its body (here after the empty chunked body) is never read as the next request."""
    seen: list[str] = []
    real = service.retriever.retrieve

    def retrieve(questions, k, mode):
        seen.extend(questions)
        return real(questions, k, mode)

    service.retriever.retrieve = retrieve
    body = b"0\r\n\r\n" + _post("/search", SMUGGLED) + HEALTH
    framing = [f"Content-Length: {len(body)}\r\n".encode(), b"Transfer-Encoding: chunked\r\n"]
    if order == "te-cl":
        framing.reverse()
    head = b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n" + b"".join(framing) + b"\r\n"
    with _Running(create_app(service), service.limits) as srv:
        s = srv.connect()
        s.sendall(head + body)
        raw = read_all(s)  # returns when the server closes
        s.close()
        assert responses(raw) == 1, raw  # before the fix: the hidden requests were answered as well
        status, answer = _status_and_body(last_response(raw))
        assert status == 400 and "Transfer-Encoding" in answer["error"], raw
        assert b"connection: close" in raw.lower()
        assert srv.ask(SEARCH)[0] == 200  # the server goes on serving
    assert "SMUGGLED" not in seen, seen


# -- item 10: a half-close after the request ----------------------------------------------------------
def test_a_request_followed_by_a_half_close_gets_its_response(service):
    """A client that sends its request and then shuts down its sending side (shutdown(SHUT_WR), `nc -N`)
    still reads the answer: a POST, an HTTP/1.0 request, pipelined requests, and a request still being
    computed when the FIN arrives. (A client that closes fully is still dropped before the model: see
    test_requests_of_disconnected_clients_are_dropped_before_the_model in test_serve.py.)"""
    gate = threading.Event()
    entered = threading.Event()
    real = service.search_batcher.fn

    def gated(key, items):
        entered.set()
        assert gate.wait(30)
        return real(key, items)

    service.search_batcher.fn = gated
    gate.set()
    with _Running(create_app(service), service.limits) as srv:

        def half_closed(request: bytes) -> bytes:
            s = srv.connect()
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
            raw = read_all(s)
            s.close()
            return raw

        raw = half_closed(SEARCH)  # before the fix: b"" (no answer)
        status, body = _status_and_body(last_response(raw))
        assert status == 200 and body["results"][0]["passages"], raw
        raw = half_closed(SEARCH.replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        assert _status_and_body(last_response(raw))[0] == 200 and b'"results"' in raw, raw
        assert responses(half_closed(HEALTH + SEARCH + HEALTH)) == 3

        gate.clear()
        entered.clear()
        s = srv.connect()
        s.sendall(SEARCH)
        assert entered.wait(30)  # the request is in the model
        s.shutdown(socket.SHUT_WR)  # the FIN arrives while it is computed
        time.sleep(0.2)  # (lets the server see the FIN first; the answer must come whatever the order)
        gate.set()
        raw = read_all(s)
        s.close()
        status, body = _status_and_body(last_response(raw))
        assert status == 200 and body["results"][0]["passages"], raw


# -- item 11: a total send deadline ---------------------------------------------------------------------
def test_a_slow_reader_is_cut_off_by_the_send_deadline():
    """A client that reads, but slowly (2 KiB every 10 ms through a 4 KiB receive buffer), a response far
    larger than it could read in send_timeout_s: the connection is closed at the deadline, which frees the
    task that was sending; before the fix it was held for as long as the client kept reading."""
    import uvicorn

    done = threading.Event()
    total = 2000 * 65536  # 128 MiB

    async def big(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
        for _ in range(2000):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        done.set()

    port = _free_port()
    server = uvicorn.Server(server_config(big, "127.0.0.1", port, Limits(send_timeout_s=1.0, read_timeout_s=60)))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    stop = threading.Event()
    received = 0

    def slow_reader(s: socket.socket) -> None:
        nonlocal received
        try:
            while not stop.is_set() and (chunk := s.recv(2048)):
                received += len(chunk)
                time.sleep(0.01)
        except OSError:
            pass
        stop.set()

    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reader = threading.Thread(target=slow_reader, args=(s,), daemon=True)
        reader.start()
        assert done.wait(60), "the response is still being sent to the slow reader"  # before the fix: 10+ minutes
        reader.join(60)
        assert not reader.is_alive() and 0 < received < total  # the client saw the end of the connection
        s.close()
    finally:
        stop.set()
        server.should_exit = True
        t.join(10)


# -- item 15: the Host allow-list ---------------------------------------------------------------------
def _host(name: str | None) -> bytes:
    return b"GET /health HTTP/1.1\r\n" + (f"Host: {name}\r\n".encode() if name is not None else b"") + b"\r\n"


def test_a_server_on_loopback_answers_only_loopback_host_names(service):
    """DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1 reaches the server with
    Host: evil.example; it gets a 400 JSON (limit allowed_hosts). Loopback names, with any port, are served."""
    with _Running(create_app(service), service.limits) as srv:
        for name in ("localhost", f"localhost:{srv.port}", "127.0.0.1", f"127.0.0.1:{srv.port}", "[::1]", f"[::1]:{srv.port}", "LocalHost"):
            status, body, _ = srv.ask(_host(name))
            assert status == 200 and body["status"] == "ok", (name, body)
        for name in ("evil.example", f"evil.example:{srv.port}", "localhost.evil.example", "127.0.0.1.evil.example", "0.0.0.0"):
            status, body, raw = srv.ask(_host(name))  # before the fix: 200
            assert status == 400 and body["limit"] == "allowed_hosts" and body["error"], (name, raw)
        status, body, _ = srv.ask(_post("/search", b'{"question": "x"}').replace(b"Host: localhost", b"Host: evil.example"))
        assert status == 400 and body["limit"] == "allowed_hosts"


def test_allowed_hosts_given_explicitly(service):
    lim = Limits(allowed_hosts=("search.example", "*.corp.example"))
    with _Running(create_app(service), lim) as srv:
        assert srv.ask(_host("search.example:8000"))[0] == 200
        assert srv.ask(_host("a.corp.example"))[0] == 200
        assert srv.ask(_host("corp.example.evil"))[0] == 400
        assert srv.ask(_host("localhost"))[0] == 400  # the list replaces the default
    with _Running(create_app(service), Limits(allowed_hosts=("*",))) as srv:
        assert srv.ask(_host("anything.example"))[0] == 200


def test_the_default_allow_list_follows_the_bind_address():
    from densepr.serve.app import default_allowed_hosts

    loop = ("localhost", "127.0.0.1", "[::1]")
    assert set(loop) <= set(default_allowed_hosts("127.0.0.1")) and set(loop) <= set(default_allowed_hosts("localhost"))
    assert "127.0.0.2" in default_allowed_hosts("127.0.0.2") and set(loop) <= set(default_allowed_hosts("::1"))
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("192.0.2.7") is None  # no check
    assert default_allowed_hosts("::") is None


@pytest.mark.parametrize(
    "option,value",
    [("--allowed-hosts", " , "), ("--first-byte-timeout", "0"), ("--send-timeout", "-1"), ("--max-connections-per-client", "0")],
)
def test_serve_refuses_bad_connection_options(capsys, tmp_path, option, value):
    from tests.support.cli import run

    code, _, err = run(capsys, "serve", "--index", str(tmp_path), option, value)
    assert code != 0 and f"error: {option}" in err and "Traceback" not in err, err


def test_uvicorn_internals_the_guard_uses():
    """densepr.serve.connections subclasses uvicorn's H11Protocol: the methods it overrides or calls,
    with these parameters, the attributes it reads, and h11's; fails when an upgrade changes them
    (pyproject bounds uvicorn and h11: check here before raising a bound)."""
    import inspect

    import h11
    import uvicorn
    from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
    from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
    from uvicorn.server import ServerState

    assert isinstance(DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, int)
    overridden = {"__init__": ["config", "server_state", "app_state", "_loop"], "connection_made": ["transport"],
                  "connection_lost": ["exc"], "data_received": ["data"], "eof_received": [], "shutdown": [],
                  "pause_writing": [], "resume_writing": [], "handle_events": [], "on_response_complete": [],
                  "send_400_response": ["msg"]}  # fmt: skip
    for name, params in overridden.items():
        assert list(inspect.signature(getattr(H11Protocol, name)).parameters)[1:] == params, name
    config = uvicorn.Config(lambda scope, receive, send: None, ws="none", lifespan="off", http=H11Protocol)
    config.load()
    assert hasattr(config, "h11_max_incomplete_event_size")
    loop = asyncio.new_event_loop()
    try:
        protocol = H11Protocol(config, ServerState(), {}, loop)
    finally:
        loop.close()
    assert {"config", "conn", "connections", "loop", "transport", "client", "cycle"} <= set(vars(protocol))
    assert isinstance(protocol.conn, h11.Connection) and isinstance(protocol.connections, set)
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    assert all(f"self.{a} =" in cycle for a in ("scope", "disconnected", "message_event", "response_started"))
    assert list(inspect.signature(h11.Connection.__init__).parameters)[1:3] == ["our_role", "max_incomplete_event_size"]
    conn = h11.Connection(h11.SERVER)
    assert {"their_state", "our_state", "trailing_data"} <= {a for a in dir(conn)} and conn.trailing_data == (b"", False)
    assert all(hasattr(h11, s) for s in ("IDLE", "SEND_BODY", "SEND_RESPONSE", "DONE", "MUST_CLOSE", "Request", "InformationalResponse"))
