"""What /answer may cost, and who waits for whom: the k limit of /answer, the reader's queue counted in
passages, a reader call that stops between chunks once its clients have gone, and fair queueing across
clients (batches filled round-robin, a full queue shedding a flooding client's requests for another's).
Every count here is of batches, chunks or statuses, never of seconds."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'densepr[serve]')")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import densepr.models.reader as reader_mod  # noqa: E402
from densepr.errors import DenseprError  # noqa: E402
from densepr.models.reader import Reader, ReaderConfig  # noqa: E402
from densepr.retrieve.retriever import Retriever  # noqa: E402
from densepr.serve.app import create_app  # noqa: E402
from densepr.serve.limits import Limits  # noqa: E402
from densepr.serve.service import Service  # noqa: E402
from tests.serve.test_serve import _post, _Server, _status_and_body  # noqa: E402
from tests.support.tiny import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny_reader(tmp_path_factory) -> Reader:
    d = make_tiny_bert(tmp_path_factory.mktemp("answer-cost-reader"), seed=4, dropout=0.0)
    return Reader.load(d, "cpu", ReaderConfig(max_length=96, top_k=3))


def _until(cond, what: str, limit: float = 20.0) -> None:
    """Wait for an event of the server (a generous limit: only a hung server reaches it)."""
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.01)


class _GatedChunks:
    """The reader's forward pass, one window per chunk, each chunk waiting until ``go`` is set:
    ``started`` counts chunks the reader began (the model never sees a chunk it did not begin)."""

    def __init__(self, reader: Reader, monkeypatch) -> None:
        self.started, self.go, real = 0, threading.Event(), reader.forward
        monkeypatch.setattr(reader_mod, "CPU_BATCH_TOKENS", 1)  # every window its own chunk

        def forward(*a, **kw):
            self.started += 1
            assert self.go.wait(20), "the test never let the chunk run"
            return real(*a, **kw)

        monkeypatch.setattr(reader, "forward", forward)


# -- the k limit -------------------------------------------------------------------------------------
def test_answer_k_is_limited_by_max_k_answer(index_dir, tiny_reader):
    svc = Service(Retriever.load(index_dir, device="cpu"), tiny_reader, Limits(max_k=20, max_k_answer=5))
    c = TestClient(create_app(svc))
    r = c.post("/answer", json={"question": "who created python", "k": 6, "mode": "bm25"})
    assert r.status_code == 422 and r.json()["limit"] == "max_k_answer" and "5" in r.json()["error"], r.text
    assert c.post("/answer", json={"question": "who created python", "k": 5, "mode": "bm25"}).status_code == 200
    assert c.post("/search", json={"question": "who created python", "k": 6, "mode": "bm25"}).status_code == 200  # /answer's alone
    assert c.post("/answer", json={"question": "x", "k": 21}).json()["limit"] == "max_k"  # the general limit still comes first
    assert c.get("/health").json()["limits"]["max_k_answer"] == 5
    with pytest.raises(DenseprError, match="max_k_answer"):  # a reader whose own k is over the limit: refused at start
        Service(svc.retriever, tiny_reader, Limits(max_k_answer=2))


# -- the reader's queue counts passages --------------------------------------------------------------
def test_the_reader_queue_counts_passages_and_sheds_larger_k_first(index_dir, tiny_reader):
    """A budget of 20 passages: one k=1 request reading, two k=10 waiting fill it; a third k=10 is
    refused (503, Retry-After), a k=2 newcomer sheds one of the waiting k=10s. Counting questions,
    as before, all six were admitted: 6 questions of a 256-question queue."""
    svc = Service(Retriever.load(index_dir, device="cpu"), tiny_reader,
                  Limits(max_batch=1, max_wait_ms=0, max_answer_passages_queued=20))  # fmt: skip
    real, running = svc.answer_batcher.fn, threading.Event()
    release = threading.Event()

    def slow(key, items):
        running.set()
        assert release.wait(20)
        return real(key, items)

    svc.answer_batcher.fn = slow
    app = create_app(svc)

    def ask(c, k: int, tag: str):
        return asyncio.ensure_future(c.post("/answer", json={"question": f"who created python {tag}", "k": k, "mode": "bm25"}))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = ask(c, 1, "first")
            while not running.is_set():  # the reader is busy with it
                await asyncio.sleep(0.01)
            big = [ask(c, 10, f"big{i}") for i in range(2)]
            while svc.answer_batcher.queued < 20:
                await asyncio.sleep(0.01)
            same = await c.post("/answer", json={"question": "who created python same", "k": 10, "mode": "bm25"})
            small = ask(c, 2, "small")
            while svc.answer_batcher.shed < 1:
                await asyncio.sleep(0.01)
            release.set()
            return await first, [await b for b in big], same, await small

    first, big, same, small = asyncio.run(go())
    assert first.status_code == 200 and small.status_code == 200 and small.json()["k"] == 2
    assert same.status_code == 503 and same.json()["limit"] == "max_answer_passages_queued", same.text
    assert "20 passages" in same.json()["error"] and 1 <= int(same.headers["Retry-After"]) <= 60
    assert sorted(b.status_code for b in big) == [200, 503]
    shed = next(b for b in big if b.status_code == 503)
    assert shed.json()["limit"] == "max_answer_passages_queued"
    q = svc.answer_batcher.stats()
    assert q["shed_for_smaller"] == 1 and q["rejected_queue_full"] == 1 and q["queued_passages"] == 0


# -- a reader call stops between chunks when nobody waits for it --------------------------------------
def test_a_reader_batch_stops_after_the_current_chunk_when_its_clients_disconnect(index_dir, tiny_reader, monkeypatch):
    """The case as reported: abandoned k=12 requests (here 3 x 12 passages, one chunk each) must not hold
    the reader; an innocent k=1 request sent after them is answered after one more chunk of theirs (the one
    running when they left) and its own, not after all 36."""
    gate = _GatedChunks(tiny_reader, monkeypatch)
    svc = Service(Retriever.load(index_dir, device="cpu"), tiny_reader, Limits(max_wait_ms=20))
    with _Server(svc) as srv:
        big = []
        for i in range(3):
            s = srv.connect()
            s.sendall(_post("/answer", json.dumps({"question": f"who created python {i}", "k": 12, "mode": "dense"}).encode()))
            big.append(s)
        _until(lambda: gate.started == 1, "the reader began its first chunk")
        for s in big:  # the clients give up
            s.close()
        _until(lambda: svc.answer_batcher.abandoned() and svc.answer_batcher.queued == 0, "the server saw them go")
        gate.go.set()  # the running chunk finishes; the reader then sees that nobody waits
        _until(lambda: svc.answer_batcher.stopped == 1, "the batch was given up")
        assert gate.started == 1  # before: 36 chunks, every passage of every abandoned request
        ok = srv.connect()
        ok.sendall(_post("/answer", b'{"question": "who created python", "k": 1, "mode": "bm25"}').replace(b"Host: localhost\r\n", b"Host: localhost\r\nConnection: close\r\n"))
        status, body = _status_and_body(srv.read_all(ok))
        assert status == 200 and body["k"] == 1 and len(body["passages"]) == 1
        assert gate.started == 2  # its own one chunk
        q = svc.answer_batcher.stats()
        assert q["stopped_abandoned"] == 1 and q["requests"] + q["dropped_abandoned"] == 4, q  # each computed or dropped once


def test_a_reader_batch_stops_when_its_requests_time_out(index_dir, tiny_reader, monkeypatch):
    """A request that timed out (408) is abandoned too: its reading stops at the next chunk."""
    gate = _GatedChunks(tiny_reader, monkeypatch)
    svc = Service(Retriever.load(index_dir, device="cpu"), tiny_reader, Limits(timeout_s=0.3))
    with TestClient(create_app(svc)) as c:  # one event loop throughout: the batcher's worker outlives the request
        r = c.post("/answer", json={"question": "who created python", "k": 12, "mode": "dense"})
        assert r.status_code == 408 and r.json()["limit"] == "timeout_s"
        assert gate.started == 1
        gate.go.set()
        _until(lambda: svc.answer_batcher.stopped == 1, "the batch was given up")
        assert gate.started == 1  # before: all 12 chunks, read for nobody


def test_reader_stop_is_asked_before_every_chunk(tiny_reader, monkeypatch):
    monkeypatch.setattr(reader_mod, "CPU_BATCH_TOKENS", 1)
    asked = []
    passages = [[("Python", "Python is a language."), ("Mozart", "Mozart was a composer.")]]
    full = tiny_reader.read(["who created python"], passages, stop=lambda: asked.append(1) and False)
    assert len(asked) == 2 and len(full[0]) == 2  # one window per chunk here: asked twice, read both
    with pytest.raises(reader_mod.ReadingStopped):
        tiny_reader.read(["who created python"], passages, stop=lambda: len(asked) > 2 or asked.append(1))


# -- fair queueing across clients ----------------------------------------------------------------------
def _flood_and_one(index_dir, limits: Limits, flood: int):
    """Client A sends one request, then ``flood`` more while the model is busy; then client B sends one.
    Returns the statuses of A's and B's requests and, per model call, the clients it served (in order)."""
    svc = Service(Retriever.load(index_dir, device="cpu"), None, limits)
    real, release, batches = svc.search_batcher.fn, threading.Event(), []

    def gated(key, items):
        batches.append([qs[0].split()[0] for qs, _ in items])  # "A..." or "B..."
        assert release.wait(20)
        return real(key, items)

    svc.search_batcher.fn = gated
    app = create_app(svc)

    async def go():
        a_t = httpx.ASGITransport(app=app, client=("10.0.0.1", 40001))
        b_t = httpx.ASGITransport(app=app, client=("10.0.0.2", 40002))
        async with httpx.AsyncClient(transport=a_t, base_url="http://t") as a, httpx.AsyncClient(transport=b_t, base_url="http://t") as b:
            body = lambda who, i: {"question": f"{who} who created python {i}", "mode": "bm25", "k": 2}  # noqa: E731
            first = asyncio.ensure_future(a.post("/search", json=body("A", 0)))
            while not batches:  # the model is busy with A's first
                await asyncio.sleep(0.01)
            rest = [asyncio.ensure_future(a.post("/search", json=body("A", i))) for i in range(1, flood + 1)]
            while svc.search_batcher.queued + svc.search_batcher.rejected < flood:
                await asyncio.sleep(0.01)
            innocent = asyncio.ensure_future(b.post("/search", json=body("B", 0)))
            while svc.search_batcher.queued + svc.search_batcher.rejected + svc.search_batcher.shed < flood + 1:
                await asyncio.sleep(0.01)
            release.set()
            return [await first, *[await r for r in rest]], await innocent

    a_rs, b_r = asyncio.run(go())
    return [r.status_code for r in a_rs], b_r.status_code, batches


def test_a_flooding_client_does_not_delay_another_clients_request(index_dir):
    """A's 16 single questions wait (4 per batch) when B's one arrives: B is served by the next model
    call, not after A's backlog (before: the fifth call, behind all of A's)."""
    a, b, batches = _flood_and_one(index_dir, Limits(max_batch=4, max_queue=64, max_wait_ms=0), flood=16)
    assert a == [200] * 17 and b == 200
    served_b = next(i for i, who in enumerate(batches) if "B" in who)
    assert served_b == 1, batches  # the call right after the one running when B arrived
    assert sum(len(x) for x in batches) == 18


def test_a_client_flooding_a_full_queue_cannot_lock_another_out(index_dir):
    """A fills the queue (8 questions) with single questions, more are refused; B's single question,
    no larger than any of A's, takes the place of A's newest (before: 503 for B)."""
    a, b, batches = _flood_and_one(index_dir, Limits(max_batch=4, max_queue=8, max_wait_ms=0), flood=12)
    assert b == 200
    assert a.count(503) == 4 + 1 and a.count(200) == 1 + 7  # 4 refused at once, 1 shed for B
    assert any("B" in who for who in batches[:2]), batches
