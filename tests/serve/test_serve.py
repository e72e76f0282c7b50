"""The HTTP service: endpoints, limits, bad input (listed and fuzzed), micro-batching, isolation of bad
requests in a batch, the bounded queue, disconnects, read timeouts and the connection cap on a real
server, a bounded overload, error shapes, and the page in Chromium."""

from __future__ import annotations

import asyncio
import json
import random
import re
import select
import shutil
import socket
import threading
import time
from html.parser import HTMLParser

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'densepr[serve]')")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from densepr.models.reader import Reader, ReaderConfig  # noqa: E402
from densepr.retrieve.retriever import Retriever  # noqa: E402
from densepr.serve.app import create_app, server_config  # noqa: E402
from densepr.serve.limits import Limits  # noqa: E402
from densepr.serve.service import Service  # noqa: E402
from tests.support.answers import TUNED_K, answer_everywhere  # noqa: E402
from tests.support.tiny import make_tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def tiny_reader(tmp_path_factory) -> Reader:
    d = make_tiny_bert(tmp_path_factory.mktemp("serve-reader"), seed=4, dropout=0.0)
    return Reader.load(d, "cpu", ReaderConfig(max_length=96, top_k=3))


@pytest.fixture
def service(index_dir, tiny_reader) -> Service:
    return Service(Retriever.load(index_dir, device="cpu"), tiny_reader, Limits(max_k=20, max_questions=4, max_question_chars=200,
                                                                                max_body_bytes=4096))  # fmt: skip


@pytest.fixture
def client(service) -> TestClient:
    return TestClient(create_app(service))


def test_search_answer_health_schema_and_page(client):
    h = client.get("/health").json()
    assert h["passages"] == 12 and h["modes"] == ["bm25", "dense", "hybrid", "rrf"] and h["index_type"] == "flat"
    assert h["reader"] and h["limits"]["max_k"] == 20

    r = client.post("/search", json={"question": "who created python", "k": 3, "mode": "bm25", "answers": [["Guido van Rossum"]]})
    assert r.status_code == 200, r.text
    body = r.json()
    ps = body["results"][0]["passages"]
    assert body["mode"] == "bm25" and ps[0]["title"] == "Python" and ps[0]["has_answer"] is True and ps[0]["rank"] == 1
    many = client.post("/search", json={"question": ["who created python", "mozart salzburg"], "k": 5}).json()
    assert many["mode"] == "hybrid" and [len(x["passages"]) for x in many["results"]] == [5, 5]
    assert "has_answer" not in many["results"][0]["passages"][0]

    a = client.post("/answer", json={"question": "who created python", "mode": "bm25"}).json()
    assert a["found"] and a["k"] == 3 and a["passage"]["text"][a["start"] : a["end"]] == a["answer"]
    assert client.post("/answer", json={"question": "zzzz qqqq", "mode": "bm25"}).json()["found"] is False

    schema = client.get("/openapi.json").json()
    assert {"/search", "/answer", "/health"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "/search" in page.text


BAD = [
    ("malformed JSON", "/search", b'{"question": "x",', 422, None),
    ("not UTF-8", "/search", b'{"question": "caf\xe9"}', 400, None),
    ("question of the wrong type", "/search", {"question": 5}, 422, None),
    ("k of the wrong type", "/search", {"question": "x", "k": "5"}, 422, None),
    ("unknown field", "/search", {"question": "x", "kk": 5}, 422, None),
    ("empty question", "/search", {"question": "  "}, 422, "question"),
    ("empty list", "/search", {"question": []}, 422, "question"),
    ("huge question", "/search", {"question": "why " * 100}, 413, "max_question_chars"),
    ("unknown mode", "/search", {"question": "x", "mode": "sparse"}, 422, None),
    ("k = 0", "/search", {"question": "x", "k": 0}, 422, None),
    ("k < 0", "/search", {"question": "x", "k": -3}, 422, None),
    ("k over the limit", "/search", {"question": "x", "k": 21}, 422, "max_k"),
    ("too many questions", "/search", {"question": ["a", "b", "c", "d", "e"]}, 413, "max_questions"),
    ("answers of the wrong length", "/search", {"question": ["a", "b"], "answers": [["x"]]}, 422, "answers"),
    ("body over the limit", "/search", {"question": "x" * 5000}, 413, "max_body_bytes"),
    ("not an object", "/search", [1, 2], 422, None),
    ("answer: empty question", "/answer", {"question": ""}, 422, "question"),
    ("answer: k over the limit", "/answer", {"question": "x", "k": 99}, 422, "max_k"),
    ("answer: question over the reader's length", "/answer", {"question": "a " * 90}, 413, "max_question_tokens"),
    ("lone surrogate in the question", "/search", b'{"question": "who \\ud800 created python"}', 422, "question"),
    ("lone surrogate in a question list", "/search", b'{"question": ["ok", "\\udfff"]}', 422, "question"),
    ("answer: lone surrogate", "/answer", b'{"question": "who created \\ud83d python"}', 422, "question"),
    ("too many answers", "/search", {"question": "x", "answers": [["a"] * 33]}, 413, "max_answers"),
    ("an answer too long", "/search", {"question": "x", "answers": [["a" * 501]]}, 413, "max_answer_chars"),
    ("lone surrogate in an answer", "/search", b'{"question": "x", "answers": [["\\ud800"]]}', 422, "answers"),
    ("JSON nested too deeply", "/search", b"[" * 2000 + b"]" * 2000, 400, None),
    ("JSON nested too deeply in a field", "/search", b'{"question": ' + b"[" * 1900 + b"]" * 1900 + b"}", 400, None),
]


@pytest.mark.parametrize("name,path,body,status,limit", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(client, name, path, body, status, limit):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.text)
    data = r.json()
    assert isinstance(data["error"], str) and data["error"]
    if limit:
        assert data.get("limit") == limit
    assert client.post("/search", json={"question": "who created python"}).status_code == 200


def test_answer_without_a_reader_and_the_timeout(index_dir):
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(timeout_s=0.2))
    c = TestClient(create_app(svc))
    r = c.post("/answer", json={"question": "who created python"})
    assert r.status_code == 409 and r.json()["limit"] == "reader"
    slow = svc._search_batch
    svc.search_batcher.fn = lambda key, items: (time.sleep(0.5), slow(key, items))[1]
    r = c.post("/search", json={"question": "who created python"})
    assert r.status_code == 408 and r.json()["limit"] == "timeout_s"
    svc.search_batcher.fn = slow
    time.sleep(0.5)  # the model call that timed out still finishes in the worker thread
    assert c.post("/search", json={"question": "who created python"}).status_code == 200


def test_concurrent_requests_are_micro_batched_with_the_same_results(service):
    import httpx

    app = create_app(service)
    questions = [f"who created python {i}" if i % 2 else "great lakes ocean" for i in range(16)]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            one = [(await c.post("/search", json={"question": q, "k": 4, "mode": "dense"})).json() for q in questions[:2]]
            before = service.search_batcher.batches
            many = await asyncio.gather(*[c.post("/search", json={"question": q, "k": 4, "mode": "dense"}) for q in questions])
            return one, [m.json() for m in many], service.search_batcher.batches - before

    one, many, batches = asyncio.run(go())
    assert batches < len(questions)  # several requests shared an encoder pass
    for a, b in zip(one, many[:2]):
        assert [p["id"] for p in a["results"][0]["passages"]] == [p["id"] for p in b["results"][0]["passages"]]
        assert [p["score"] for p in a["results"][0]["passages"]] == pytest.approx([p["score"] for p in b["results"][0]["passages"]], abs=1e-3)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=10)  # fmt: skip
FIELDS = st.fixed_dictionaries({}, optional={"question": JSON | st.text(max_size=50), "k": JSON, "mode": JSON | st.sampled_from(["bm25", "dense", "hybrid", "x"]),
                                             "answers": JSON})  # fmt: skip


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/search", "/answer"]), body=FIELDS | JSON, raw=st.none() | st.binary(max_size=64))
def test_fuzzed_requests_never_get_a_500(client, path, body, raw):
    r = client.post(path, content=raw if raw is not None else json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


# -- isolation: one request's bad input fails that request alone ---------------------------------------
def _poison_retriever(retriever):
    """Make retrieval raise for marked questions, the way a tokenizer raises for text it cannot take:
    POISON-VALUE raises ValueError (an input error: 422), POISON-BUG a RuntimeError (ours: 500)."""
    real = retriever.retrieve

    def retrieve(questions, k, mode):
        for q in questions:
            if "POISON-VALUE" in q:
                raise ValueError(f"cannot tokenize {q!r}")
            if "POISON-BUG" in q:
                raise RuntimeError("model exploded")
        return real(questions, k, mode)

    retriever.retrieve = retrieve


def _same_ranking(a: list[dict], b: list[dict], tol: float = 2e-3) -> None:
    """Two passage lists for the same question: the same scores rank by rank (dense scores move by float
    noise between batch sizes), and the same passage at every rank not tied with a neighbour (or the cut-off)."""
    sa, sb = [p["score"] for p in a], [p["score"] for p in b]
    assert sa == pytest.approx(sb, abs=tol)
    for j in range(len(sa) - 1):  # the last rank may tie with the first passage left out
        if all(abs(sa[j] - sa[n]) > tol for n in (j - 1, j + 1) if 0 <= n < len(sa)):
            assert a[j]["id"] == b[j]["id"], (j, sa)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(["ok", "ok", "ok", "value", "bug", "surrogate", "mixed-list", "answer-ok", "answer-bad"]),
                      min_size=2, max_size=14), mode=st.sampled_from(["dense", "bm25", "hybrid"]))  # fmt: skip
def test_fuzzed_batches_of_valid_and_invalid_requests_fail_only_the_invalid_ones(index_dir, tiny_reader, kinds, mode):
    """Concurrent valid and invalid requests share micro-batches (on /search and /answer); each invalid one
    gets its own 4xx/5xx JSON error, every valid one its 200 with the results it gets when sent alone."""
    import httpx

    from tests.support.tiny import QUESTIONS

    svc = Service(Retriever.load(index_dir, device="cpu"), tiny_reader, Limits(max_k=20, max_wait_ms=30))
    _poison_retriever(svc.retriever)
    app = create_app(svc)
    qs = [q for q, _ in QUESTIONS]
    rng = random.Random(len(kinds) * 31 + len(mode))

    def request(kind: str, i: int) -> tuple[str, bytes, int]:
        q = qs[i % len(qs)]
        if kind == "ok":
            return ("/search" if i % 3 else "/answer"), json.dumps({"question": q, "k": 3, "mode": mode}).encode(), 200
        if kind == "value":
            return ("/search" if i % 2 else "/answer"), json.dumps({"question": q + " POISON-VALUE", "mode": mode}).encode(), 422
        if kind == "bug":
            return ("/search" if i % 2 else "/answer"), json.dumps({"question": "POISON-BUG " + q, "mode": mode}).encode(), 500
        if kind == "surrogate":  # a JSON-escaped lone surrogate: refused before it reaches a batch
            return "/search", b'{"question": "' + q.encode() + b' \\ud800", "mode": "' + mode.encode() + b'"}', 422
        if kind == "mixed-list":  # one poisoned question fails its whole request, and only that request
            return "/search", json.dumps({"question": [q, "POISON-VALUE"], "k": 3, "mode": mode}).encode(), 422
        answers = [["Guido van Rossum"]] if kind == "answer-ok" else [["x" * 600]]
        return "/search", json.dumps({"question": q, "k": 3, "mode": mode, "answers": answers}).encode(), 200 if kind == "answer-ok" else 413

    reqs = [request(kind, rng.randrange(60)) for kind in kinds]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            post = lambda path, body: c.post(path, content=body, headers={"Content-Type": "application/json"})  # noqa: E731
            alone = [await post(p, b) if status == 200 else None for p, b, status in reqs]
            together = await asyncio.gather(*[post(p, b) for p, b, _ in reqs])
            return alone, together

    alone, together = asyncio.run(go())
    for (path, body, status), a, r in zip(reqs, alone, together):
        assert r.status_code == status, (path, body[:80], r.text[:300])
        data = r.json()
        if status != 200:
            assert isinstance(data["error"], str) and data["error"] and set(data) <= {"error", "limit", "detail"}
            if status == 500:
                assert "model exploded" not in data["error"]  # names the exception type only
            continue
        if path == "/answer":
            _same_ranking(data["passages"], a.json()["passages"])
            if [p["id"] for p in data["passages"]] == [p["id"] for p in a.json()["passages"]]:
                assert data["answer"] == a.json()["answer"]
        else:
            assert len(data["results"]) == len(a.json()["results"])
            for x, y in zip(data["results"], a.json()["results"]):
                assert x["question"] == y["question"]
                _same_ranking(x["passages"], y["passages"])
            if b'"answers"' in body:
                assert all("has_answer" in p for p in data["results"][0]["passages"])


def test_a_tokenizer_exception_inside_a_batch_fails_only_its_request(index_dir, monkeypatch):
    """The case as reported: a lone surrogate makes the question tokenizer raise inside a batched dense
    retrieval. With the up-front check switched off, the batch isolation alone must contain it."""
    import httpx

    import densepr.serve.service as serve_mod

    monkeypatch.setattr(serve_mod, "check_text", lambda s, field: None)  # let the bad string reach the batch
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(max_wait_ms=50))
    app = create_app(svc)
    bad = b'{"question": "who created python \\ud800", "mode": "dense", "k": 3}'

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            good = [c.post("/search", json={"question": f"who created python {i}", "mode": "dense", "k": 3}) for i in range(29)]
            bads = [c.post("/search", content=bad, headers={"Content-Type": "application/json"})]
            return await asyncio.gather(*good[:15], *bads, *good[15:])

    rs = asyncio.run(go())
    statuses = [r.status_code for r in rs]
    assert statuses[15] == 422 and "error" in rs[15].json(), rs[15].text
    assert statuses[:15] + statuses[16:] == [200] * 29, statuses
    assert svc.search_batcher.isolated >= 1  # the bad request did share a batch, and was isolated


# -- bounded work ------------------------------------------------------------------------------------
def _slow(svc: Service, seconds: float) -> None:
    real = svc.search_batcher.fn
    svc.search_batcher.fn = lambda key, items: (time.sleep(seconds), real(key, items))[1]


def test_a_full_queue_answers_503_with_retry_after(index_dir):
    import httpx

    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(max_batch=1, max_queue=2, max_wait_ms=0))
    _slow(svc, 0.15)
    app = create_app(svc)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/search", json={"question": "who created python", "mode": "bm25"}))
            await asyncio.sleep(0.05)  # the model is busy with it
            rs = await asyncio.gather(*[c.post("/search", json={"question": f"who created python {i}", "mode": "bm25"}) for i in range(8)])
            return [await first, *rs], await c.post("/search", json={"question": "who created python", "mode": "bm25"})

    rs, after = asyncio.run(go())
    statuses = sorted(r.status_code for r in rs)
    assert statuses == [200, 200, 200] + [503] * 6, statuses  # one running, two waiting, the rest refused at once
    for r in rs:
        if r.status_code == 503:
            assert r.json()["limit"] == "max_queue" and r.json()["error"]
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert after.status_code == 200  # the queue drained; the server serves again
    q = TestClient(app).get("/health").json()["queues"]["search"]
    assert q["rejected_queue_full"] == 6 and q["queued_questions"] == 0


def test_a_full_queue_sheds_larger_requests_for_smaller_ones(index_dir):
    import httpx

    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(max_batch=2, max_queue=4, max_wait_ms=0))
    _slow(svc, 0.2)
    app = create_app(svc)

    def body(n: int, tag: str) -> dict:
        return {"question": [f"who created python {tag} {j}" for j in range(n)], "mode": "bm25"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.ensure_future(c.post("/search", json=body(1, "first")))
            await asyncio.sleep(0.05)  # the model is busy with it
            big = [asyncio.ensure_future(c.post("/search", json=body(2, f"big{i}"))) for i in range(2)]  # the queue is full
            await asyncio.sleep(0.02)
            same = await c.post("/search", json=body(2, "same"))  # no smaller: refused
            small = await c.post("/search", json=body(1, "small"))  # sheds one of the larger waiting requests
            return await first, [await b for b in big], same, small

    first, big, same, small = asyncio.run(go())
    assert first.status_code == 200 and same.status_code == 503 and small.status_code == 200
    assert sorted(b.status_code for b in big) == [200, 503]
    shed = next(b for b in big if b.status_code == 503)
    assert shed.json()["limit"] == "max_queue" and int(shed.headers["Retry-After"]) >= 1
    q = svc.search_batcher.stats()
    assert q["shed_for_smaller"] == 1 and q["rejected_queue_full"] == 1 and q["queued_questions"] == 0


def test_answers_are_matched_off_the_event_loop_within_the_timeout(index_dir):
    """has_answer and building the response run in a worker thread, inside timeout_s: /health answers
    meanwhile, and a request at every answers limit costs little."""
    import httpx

    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(timeout_s=0.5))
    app = create_app(svc)
    worst = {"question": ["who created python"] * 40, "k": 12, "mode": "bm25",  # at max_answers_total_chars: 40 x 500
             "answers": [[("guido van rossum " * 30)[:500]] for _ in range(40)]}  # fmt: skip
    t0 = time.perf_counter()
    r = TestClient(app).post("/search", json=worst)
    assert r.status_code == 200 and r.json()["results"][0]["passages"][0]["has_answer"] is False
    assert time.perf_counter() - t0 < 2.0

    real = svc.search_body
    svc.search_body = lambda *a: (time.sleep(1.0), real(*a))[1]  # a slow post-processing step

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            slow = asyncio.ensure_future(c.post("/search", json={"question": "who created python", "mode": "bm25", "answers": [["Guido"]]}))
            await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            h = await c.get("/health")
            return h, time.perf_counter() - t0, await slow

    h, health_s, slow = asyncio.run(go())
    assert h.status_code == 200 and health_s < 0.3  # the event loop was free while matching ran
    assert slow.status_code == 408 and slow.json()["limit"] == "timeout_s"  # the matching is inside the timeout


# -- error shapes, health, pages ---------------------------------------------------------------------
def test_every_error_has_the_documented_shape(service):
    c = TestClient(create_app(service), raise_server_exceptions=False)
    cases = [c.get("/nope"), c.get("/search"), c.put("/health"), c.delete("/"), c.get("/redoc"),
             c.post("/search", content=b"[" * 3000 + b"]" * 3000, headers={"Content-Type": "application/json"}),
             c.post("/search", content=b"{}", headers={"Content-Type": "text/plain"})]  # fmt: skip
    assert [r.status_code for r in cases][:5] == [404, 405, 405, 405, 404]
    for r in cases:
        assert r.status_code >= 400 and r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:200])
        assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert cases[1].headers.get("allow")  # 405 still says what is allowed

    service.health = lambda: 1 / 0  # an unexpected exception: a 500 in the same shape, no traceback
    r = c.get("/health")
    assert r.status_code == 500 and r.json() == {"error": "internal server error (ZeroDivisionError)"}


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_health_shows_no_local_paths(client, service, tiny_bert):
    h = client.get("/health").json()
    assert h["model"] == tiny_bert.name and h["reader"] == service.reader.name.rsplit("/", 1)[-1]
    for s in _strings(h):
        assert "/" not in s and "\\" not in s, s


def test_a_dropped_app_releases_its_service_and_the_index_files(index_dir):
    """An app that has answered and is then dropped frees its service, and with it the index's memory maps
    (one open file each). FastAPI caches the endpoint functions of every app it routes, module-wide; before
    the fix they closed over the service, so each app created in a process (tests, a notebook reloading an
    index) kept ~17 files open until the process ran out of descriptors (CI saw fd 1334)."""
    import gc
    import os
    import weakref

    def open_files() -> int:  # this test's index files open in this process (other tests' garbage aside)
        def target(fd: str) -> str:
            try:
                return os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        return sum(target(fd).startswith(str(index_dir)) for fd in os.listdir("/proc/self/fd"))

    before = open_files()
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits())
    ref, app = weakref.ref(svc), create_app(svc)
    with TestClient(app) as c:
        assert c.post("/search", json={"question": "who created python", "mode": "bm25"}).status_code == 200
        assert c.get("/health").status_code == 200
    assert open_files() > before  # the index is open while the app lives
    del svc, app, c
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert open_files() == before == 0


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href", "action", "srcset", "data", "poster", "integrity") and v]


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_page_and_the_docs_need_nothing_from_outside_the_server(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    parser = _Refs()
    parser.feed(r.text)
    for ref in parser.refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", r.text, re.I), "an external URL in the page"
    assert "@import" not in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp  # the browser itself refuses anything else
    if path == "/docs":
        assert "/openapi.json" in r.text
        assert {"/search", "/answer", "/health"} <= set(client.get("/openapi.json").json()["paths"])


# -- a real server: disconnects, read timeouts, connection cap, overload ------------------------------
class _Server:
    """A real uvicorn server with :func:`server_config` (guarded protocol) in a thread, on a free port."""

    def __init__(self, svc: Service) -> None:
        import uvicorn

        self.svc, self.port = svc, _free_port()
        self.server = uvicorn.Server(server_config(create_app(svc), "127.0.0.1", self.port, svc.limits))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def read_all(self, s: socket.socket) -> bytes:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def _post(path: str, body: bytes) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def _status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def test_requests_of_disconnected_clients_are_dropped_before_the_model(index_dir):
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(max_batch=1, max_wait_ms=0))
    _slow(svc, 0.4)
    with _Server(svc) as srv:
        busy = srv.connect()
        busy.sendall(_post("/search", b'{"question": "who created python", "mode": "bm25"}'))
        time.sleep(0.1)  # the model is busy with it
        for i in range(12):  # ask, then hang up at once
            s = srv.connect()
            s.sendall(_post("/search", json.dumps({"question": f"mozart {i}", "mode": "bm25"}).encode()))
            s.close()
        status, _ = _status_and_body(busy.recv(65536))
        assert status == 200
        time.sleep(0.5)
        stats = svc.search_batcher.stats()
        assert stats["dropped_abandoned"] == 12 and stats["requests"] == 1, stats  # none of them was computed
        ok = srv.connect()
        ok.sendall(_post("/search", b'{"question": "who created python", "mode": "bm25"}'))
        assert _status_and_body(ok.recv(65536))[0] == 200


def test_slow_and_partial_requests_are_cut_off_by_the_read_timeout(index_dir):
    """Slowloris: partial headers, a partial body, headers trickled byte by byte, and a silent connection
    are all closed within read_timeout_s (408 JSON when part of a request had arrived); meanwhile the
    server answers others."""
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(read_timeout_s=1.0, keep_alive_s=1.0, max_connections=50))
    with _Server(svc) as srv:
        t0 = time.perf_counter()
        partial_head = srv.connect()
        partial_head.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Le")
        partial_body = srv.connect()
        partial_body.sendall(_post("/search", b'{"question": "who created python"}')[:-10])
        silent = srv.connect()
        trickle = srv.connect()
        stop = threading.Event()

        def drip():  # goes on after the 408 too: the server lingers, so those bytes cannot reset the answer away
            for b in _post("/search", b'{"question": "x"}'):
                if stop.wait(0.2):
                    return
                try:
                    trickle.send(bytes([b]))
                except OSError:
                    return

        threading.Thread(target=drip, daemon=True).start()
        h = srv.connect()  # an innocent client meanwhile
        h.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert _status_and_body(srv.read_all(h))[0] == 200 and time.perf_counter() - t0 < 0.9

        for s, expect in ((partial_head, 408), (partial_body, 408), (trickle, 408), (silent, None)):
            raw = srv.read_all(s)  # returns when the server closes the connection
            took = time.perf_counter() - t0
            assert 0.9 < took < 3.0, took
            if expect is None:
                assert raw == b""
            else:
                status, body = _status_and_body(raw)
                assert status == expect and body["limit"] == "read_timeout_s" and body["error"]
        stop.set()

        keep = srv.connect()  # keep-alive: a second request's partial headers are cut off too
        keep.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert keep.recv(65536).startswith(b"HTTP/1.1 200")
        keep.sendall(b"GET /health HTTP/1.1\r\nHo")
        t1 = time.perf_counter()
        status, body = _status_and_body(srv.read_all(keep))
        assert status == 408 and time.perf_counter() - t1 < 3.0


def test_a_client_that_stops_reading_its_response_is_cut_off():
    """Slow read: the server's send buffer fills and stays full; after read_timeout_s the connection is
    aborted, which frees the buffer and unblocks the task that was sending (any ASGI app, here a big one)."""
    import uvicorn

    done = threading.Event()

    async def big(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/octet-stream")]})
        for _ in range(2000):  # 128 MiB, far beyond any socket buffer
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        done.set()

    port = _free_port()
    server = uvicorn.Server(server_config(big, "127.0.0.1", port, Limits(read_timeout_s=1.0)))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        t0 = time.perf_counter()
        assert done.wait(8), "the sending task is still blocked on a client that reads nothing"
        assert 0.9 < time.perf_counter() - t0 < 6
        s.settimeout(10)
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 2000 * 65536  # cut off, not served in full
        s.close()
    finally:
        server.should_exit = True
        t.join(10)


def _get_health(s: socket.socket) -> int:
    """``GET /health`` on a keep-alive socket; the status, once the whole response is in."""
    s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b"<closed>\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += s.recv(65536) or b"<closed>"
    return int(head.split()[1])


def test_overload_is_bounded_and_health_stays_responsive(index_dir):
    """A bounded overload on loopback: 48 clients each sending 4-question requests as fast as they can at a
    slowed model, until at least 50 were served, some refused and /health probed 10 times. The time a
    request spends in the server (queue + model + response, its took_ms) stays bounded by the queue, not by
    the offered load; there is no 5xx but the queue's 503s, no request times out, and every /health probe
    during the overload is answered within 0.5 s.

    The probes measure the server, not these clients: they run in their own thread over their own
    keep-alive connection (opened before the flood), from when the queue first refuses a request (the
    overload has begun) on. Timed on the clients' event loop, as before, a probe also waited for the 48
    clients' own work in this process (opening connections, parsing answers), which is not the server's:
    the first probe, sent at a fixed 0.2 s, landed in the clients' start-up burst (48 first answers took
    0.22-0.28 s here alone, up to 0.85 s beside two CPU hogs) and took 0.62 s once in CI; beside the hogs
    loop-timed probes took up to 0.33 s while the same server answered a thread's probes within 0.07 s.
    The run ends on counts, not after a fixed 3 s (which gave 16 answers and 3 probes beside the hogs,
    failing the count checks), so a slow machine runs it longer; a hung server still fails it at 60 s."""
    import httpx

    svc = Service(Retriever.load(index_dir, device="cpu"), None,
                  Limits(max_batch=16, max_queue=32, max_questions=4, max_wait_ms=2, timeout_s=10))  # fmt: skip
    _slow(svc, 0.05)  # 16 questions per 50 ms at most: 48 clients offer far more
    with _Server(svc) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        statuses: dict[int, int] = {}
        latencies: list[float] = []
        health: list[tuple[int, float]] = []
        cap = time.perf_counter() + 60.0  # only a hung server gets here
        flood_over = threading.Event()

        def enough() -> bool:
            return statuses.get(200, 0) >= 50 and statuses.get(503, 0) >= 1 and len(health) >= 10

        probe = srv.connect()
        assert _get_health(probe) == 200  # the probe's connection, opened and used before the flood

        def poll() -> None:
            while svc.search_batcher.rejected == 0 and not flood_over.is_set():  # until the queue is full
                time.sleep(0.01)
            while not flood_over.is_set():
                t0 = time.perf_counter()
                status = _get_health(probe)
                health.append((status, time.perf_counter() - t0))
                flood_over.wait(0.1)

        async def client(c: int, http) -> None:
            i = 0
            while not enough() and time.perf_counter() < cap:
                try:
                    r = await http.post(url + "/search", json={"question": [f"who created python {c} {i} {j}" for j in range(4)], "mode": "bm25"})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    latencies.append(r.json()["took_ms"] / 1000)
                i += 1

        async def go():
            async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=48)) as http:
                await asyncio.gather(*[client(c, http) for c in range(48)])

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            asyncio.run(go())
        finally:
            flood_over.set()
            poller.join(10)
        probe.close()
    assert enough(), (statuses, len(health))  # else the 60 s cap ended it: the server hung
    assert set(statuses) <= {200, 503}, statuses  # no innocent 5xx, no 408, no connection error
    assert max(latencies) < 1.5, sorted(latencies)[-5:]  # ~ (max_queue / max_batch + 1) model calls, not the offered load
    assert all(status == 200 for status, _ in health), health
    assert max(t for _, t in health) < 0.5, health  # the server answered every probe quickly, throughout


# -- the page in a real browser --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_server(service):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(server_config(create_app(service), "127.0.0.1", port, service.limits))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(5)


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("e2e: Chromium not installed (Debian: apt install chromium); the browser test did not run")
    sync_api = pytest.importorskip("playwright.sync_api", reason="e2e: playwright not installed (pip install 'densepr[e2e]')")
    return path, sync_api


@pytest.mark.e2e
def test_page_in_headless_chromium(running_server, tmp_path, request):
    from tests.support.tiny import QUESTIONS

    exe, sync_api = _chromium()
    question, answers = QUESTIONS[4]  # "who created python"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])  # fmt: skip
        page = browser.new_page()
        page.goto(running_server + "/")
        page.wait_for_selector("text=passages")  # /health answered
        page.check("input[value=bm25]")
        page.fill("#k", "3")
        page.fill("#q", question)
        page.click("#go")
        page.wait_for_selector("li.passage")
        titles = page.locator("li.passage .title").all_inner_texts()
        assert titles[0] == "Python" and 1 <= len(titles) <= 3
        assert page.locator("#answer").is_visible() and page.locator("li.passage mark").count() == 1
        assert "ms" in page.inner_text("#status")
        shot = tmp_path / "search-page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 5000
    print(f"screenshot: {shot}")


@pytest.mark.e2e
def test_page_and_docs_in_headless_chromium_request_nothing_outside_the_server(running_server):
    exe, sync_api = _chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(running_server + "/")
        page.wait_for_selector("text=passages")
        page.goto(running_server + "/docs")
        page.wait_for_selector("text=/search")
        assert page.locator("section").count() >= 3  # /search, /answer, /health rendered from /openapi.json
        section = page.locator("section", has_text="What is loaded")
        section.locator("summary").click()
        section.locator("button").click()
        page.wait_for_selector("pre:has-text('200')")
        browser.close()
    assert requested and all(u.startswith(running_server + "/") for u in requested), requested


@pytest.mark.e2e
@pytest.mark.data
def test_page_with_an_embedded_benchmark_question(embedded, tmp_path):
    """The real corpus (BM25 over the ~10k Wikipedia summaries) and a real NQ test question, typed into the page."""
    import uvicorn

    from densepr.data import load_wiki_summaries
    from densepr.evaluate.answers import has_answer
    from densepr.retrieve.bm25 import BM25Index

    exe, sync_api = _chromium()
    corpus = load_wiki_summaries(embedded.summaries)
    svc = Service(Retriever(corpus, bm25=BM25Index.build(corpus)))
    client = TestClient(create_app(svc))
    qa = next(q for q in embedded.load_qa("nq-test", limit=50).items
              if any(has_answer(q.answers, p["text"]) for p in client.post("/search", json={"question": q.question, "k": 5}).json()["results"][0]["passages"]))  # fmt: skip
    expected = [p["title"] for p in client.post("/search", json={"question": qa.question, "k": 5}).json()["results"][0]["passages"]]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("text=no reader")
            page.fill("#k", "5")
            page.fill("#q", qa.question)
            page.press("#q", "Enter")
            page.wait_for_selector("li.passage")
            assert page.locator("li.passage .title").all_inner_texts() == expected
            texts = page.locator("li.passage div").all_inner_texts()
            assert any(has_answer(qa.answers, x) for x in texts)  # the answer is on the page
            page.screenshot(path=str(tmp_path / "embedded-question.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        t.join(5)
    print(f"question: {qa.question!r}; screenshot: {tmp_path / 'embedded-question.png'}")


def _pour(s: socket.socket) -> threading.Thread:
    """Send bytes on ``s`` as fast as the kernel takes them, from a thread, until the server's answer
    (or its end of the connection) is readable."""

    def pour() -> None:
        # poll, not select.select: a long pytest run holds fds past select's FD_SETSIZE (1024), where
        # select raises ValueError (CI saw fd 1334); the socket goes back to blocking whatever happens.
        readable, writable = select.POLLIN | select.POLLERR | select.POLLHUP, select.POLLOUT
        poller = select.poll()
        poller.register(s, readable | writable)
        s.setblocking(False)
        try:
            while not any(ev & readable for _, ev in poller.poll(0)):
                try:
                    s.send(b"x" * 65536)
                except BlockingIOError:
                    poller.poll(50)
        except OSError:
            pass
        finally:
            s.setblocking(True)

    t = threading.Thread(target=pour, daemon=True)
    t.start()
    return t


def test_an_answer_sent_before_closing_survives_a_client_still_sending(index_dir):
    """The server's last word reaches a client that is still sending when it goes out (lingering close).
    Closing a socket with unread bytes in it, or one that bytes reach afterwards, makes the kernel send a
    reset: the client then gets the answer followed by ECONNRESET, or loses it. Made certain here for a 413
    (a too-big upload, still pouring: answered with Connection: close, not after the whole body) and a 503 (the connection cap; the request was in before the accept);
    the 408 of the slowloris test above is the same close, hit there by a race."""
    svc = Service(Retriever.load(index_dir, device="cpu"), None, Limits(max_connections=1, read_timeout_s=30.0))
    entered, gate, real = threading.Event(), threading.Event(), svc.search_batcher.fn
    svc.search_batcher.fn = lambda key, items: (entered.set(), gate.wait(30), real(key, items))[2]
    with _Server(svc) as srv:
        holder = srv.connect()  # its request in the model, it holds the one slot (such a connection is never evicted)
        holder.sendall(_post("/search", b'{"question": "who created python", "mode": "bm25"}'))
        assert entered.wait(30)
        refused = srv.connect()  # over the cap, its request in before the accept
        refused.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got, body = _status_and_body(srv.read_all(refused))  # before the fix: ECONNRESET after the answer
        assert (got, body.get("limit")) == (503, "max_connections"), (got, body)
        refused.close()
        gate.set()
        assert holder.recv(65536).startswith(b"HTTP/1.1 200")
        holder.close()
    with _Server(svc) as srv:  # a fresh server: its one slot is surely free
        t0 = time.perf_counter()
        upload = srv.connect()  # a body over max_body_bytes, sent flat out
        upload.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000\r\n\r\n")
        _pour(upload).join(5)  # (reading while the pourer thread sends on the socket would race it)
        got, body = _status_and_body(srv.read_all(upload))  # before the fix: ECONNRESET after the answer
        assert (got, body.get("limit")) == (413, "max_body_bytes"), (got, body)
        upload.close()
        assert time.perf_counter() - t0 < 10.0  # the 413 closes: the server does not wait for the 1 GB
        closed = time.perf_counter()  # the client closed: the server stops lingering and frees the slot at once
        while True:  # (well before LINGER_S = 2 s; a slot still held answers 503)
            ok = srv.connect()
            ok.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            if ok.recv(65536).startswith(b"HTTP/1.1 200"):
                break
            ok.close()
            assert time.perf_counter() - closed < 1.5, "the slot was still held after the client closed"
            time.sleep(0.05)


def test_a_lingering_close_waits_for_the_answer_to_go_out_then_gives_up(monkeypatch):
    """The linger ends LINGER_S after the last byte of the answer left, never while it is still being sent
    (a large answer to a slow reader); a client that closes ends it at once."""
    import densepr.serve.connections as app_mod

    monkeypatch.setattr(app_mod, "LINGER_S", 0.05)

    class FakeTransport:
        def __init__(self) -> None:
            self.buffered, self.events = 1000, []

        def can_write_eof(self):
            return True

        def is_closing(self):
            return "abort" in self.events or "close" in self.events

        def get_write_buffer_size(self):
            return self.buffered

        def __getattr__(self, name):
            return lambda *a: self.events.append(name)

    async def scenario():
        loop = asyncio.get_running_loop()
        t = FakeTransport()
        lt = app_mod._LingeringTransport(t, loop)
        lt.close()
        assert lt.lingering and lt.is_closing() and t.events == ["write_eof", "resume_reading"]
        lt.write(b"late")  # nothing goes out after the FIN
        await asyncio.sleep(0.2)  # four lingers' worth, the answer still going out: not cut off
        assert "abort" not in t.events and "write" not in t.events
        t.buffered = 0
        await asyncio.sleep(0.15)
        assert t.events[-1] == "abort"
        t2 = FakeTransport()
        lt2 = app_mod._LingeringTransport(t2, loop)
        lt2.close()
        lt2.end()  # the client closed
        await asyncio.sleep(0.1)
        assert t2.events[-1] == "close" and "abort" not in t2.events

    asyncio.run(scenario())


@pytest.mark.parametrize("mode,want", [(None, ("hybrid", 2)), ("bm25", ("bm25", 4)), ("dense", ("dense", 3))])
def test_cli_and_http_answer_a_question_the_same_way(index_dir, tmp_path, capsys, mode, want):
    """No k asked: both read the k tuned with the reader for the mode, else its top_k (3), in the same
    default mode, and give the same answer (the server once read top_k whatever the mode's tuned k)."""
    reader = tmp_path / "reader"
    cfg = ReaderConfig(max_length=96, top_k=3, selection=TUNED_K)
    Reader.load(make_tiny_bert(tmp_path / "reader-init", seed=4, dropout=0.0), "cpu", cfg).save(reader)
    got = answer_everywhere(capsys, index_dir, reader, mode)
    assert got["cli"][:2] == want and got["http"] == got["cli"], got
