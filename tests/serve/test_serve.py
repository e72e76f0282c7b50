"""The HTTP service: endpoints, limits, bad input (listed and fuzzed), micro-batching, and the page in Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'densepr[serve]')")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from densepr.models.reader import Reader, ReaderConfig  # noqa: E402
from densepr.retrieve.retriever import Retriever  # noqa: E402
from densepr.serve.app import Limits, Service, create_app  # noqa: E402
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


# -- the page in a real browser --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_server(service):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
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
