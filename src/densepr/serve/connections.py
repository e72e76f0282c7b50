"""The connection guard of ``densepr serve``: uvicorn's h11 protocol with read, first-byte and send
timeouts, connection caps, strict framing, half-close and lingering close (:func:`guarded_protocol`).

What the HTTP API (:mod:`densepr.serve.app`) cannot see happens here, below ASGI: a connection that
never completes its request, floods of idle sockets, clients that stop reading. Built on uvicorn's
``H11Protocol`` and its internals (the attributes and methods it overrides or calls), so pyproject
bounds uvicorn's version and tests/serve/test_connections.py checks those internals are still
there (``test_uvicorn_internals_the_guard_uses``).
"""

from __future__ import annotations

import asyncio
import itertools
import socket

from densepr.serve.limits import Limits, dump_json


def raw_json_response(status: int, reason: str, body: dict, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response, for answering below the ASGI layer."""
    data = dump_json(body)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n"
            f"connection: close\r\n{extra}\r\n")  # fmt: skip
    return head.encode("ascii") + data


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
