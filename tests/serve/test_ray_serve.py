"""`densepr serve --ray` on a real three-node Ray cluster: the same answers as the single-process code
on the same index, the same page, and a replica killed under a bounded loopback load loses no request."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest

from densepr.models.reader import Reader, ReaderConfig
from densepr.pipeline import Pipeline
from densepr.retrieve.retriever import Retriever
from tests.support.answers import TUNED_K, answer_everywhere
from tests.support.ray_cluster import cluster  # noqa: F401  (the shared cluster fixture)
from tests.support.tiny import make_tiny_bert

pytestmark = pytest.mark.ray
QUESTIONS = ["who created python", "when did apollo 11 land on the moon", "where do the great lakes meet the ocean"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory, tiny_bert):  # noqa: F811
    """The index_dir layout (passages, BM25, a flat dense index of two shards from tiny_bert) plus a
    reader, served by Ray: two searcher shards (BM25 sliced in two), two replicas each."""
    from ray import serve

    from densepr.data import Corpus, Passage, write_passages_tsv
    from densepr.index.dense import DenseIndex
    from densepr.index.embeddings import encode_corpus
    from densepr.models.encoder import Encoder
    from densepr.retrieve.bm25 import BM25Index
    from densepr.serve.ray_app import Replicas, build_app
    from tests.support.tiny import PASSAGES

    d = tmp_path_factory.mktemp("ray-serve")
    corpus = Corpus.from_passages(Passage(str(i), t, x) for i, (t, x) in enumerate(PASSAGES, 1))
    write_passages_tsv(corpus, d / "index/passages.tsv")
    BM25Index.build(corpus).save(d / "index/bm25")
    encode_corpus(Encoder.load(tiny_bert, device="cpu"), corpus, d / "emb")
    DenseIndex.build(d / "emb", num_shards=2).save(d / "index/dense")
    reader = d / "reader"  # a reader directory (its config sized for the tiny model)
    cfg = ReaderConfig(max_length=96, stride=16, top_k=3, selection=TUNED_K)  # DPR's rule; a tuned k for hybrid and bm25
    Reader.load(make_tiny_bert(d / "reader-init", seed=3, dropout=0.0), "cpu", cfg).save(reader)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(d / "index", reader, replicas=Replicas(searcher=2, cpus=0.25)), name="densepr", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # the proxy answers once the app is up
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    try:
        yield url, d / "index", reader
    finally:
        serve.shutdown()


def test_ray_serve_equals_single_process(served):
    url, index, reader = served
    local = Retriever.load(index, device="cpu")
    health = httpx.get(url + "/health").json()
    assert health["modes"] == local.modes and health["passages"] == 12 and health["ray"]["replicas"]["searcher"] == 2
    assert health["ray"]["shards"] == 2  # each searcher holds half the passages; the lists are merged, then fused
    for mode in ("bm25", "dense", "hybrid", "rrf"):
        r = httpx.post(url + "/search", json={"question": QUESTIONS, "k": 5, "mode": mode}, timeout=60)
        assert r.status_code == 200, r.text
        want = local.retrieve(QUESTIONS, 5, mode)
        for i, res in enumerate(r.json()["results"]):
            hits = want.hits(i, local.corpus)
            assert [p["id"] for p in res["passages"]] == [h.id for h in hits], (mode, i)
            np.testing.assert_allclose([p["score"] for p in res["passages"]], [h.score for h in hits], atol=1e-3)
    pipe = Pipeline(local, Reader.load(reader, "cpu"))
    for q in QUESTIONS:
        r = httpx.post(url + "/answer", json={"question": q, "k": 4, "mode": "hybrid"}, timeout=60)
        assert r.status_code == 200, r.text
        a, want = r.json(), pipe.answer(q, 4, "hybrid")
        assert (a["answer"], a["found"], a["passage"]["id"] if a["passage"] else None) == (want.text, want.found, want.passage.id if want.passage else None)
    # the same validation and page as `densepr serve`
    assert httpx.post(url + "/search", json={"question": "", "k": 5}).status_code == 422
    bad = httpx.post(url + "/search", json={"question": "x", "k": 5, "mode": "nope"})
    assert bad.status_code == 422 and "mode" in bad.text
    assert httpx.post(url + "/search", json={"question": "x", "k": 10**6}).json()["limit"] == "max_k"
    evil = httpx.get(url + "/health", headers={"Host": "rebound.example"})  # DNS rebinding: the same Host check as `densepr serve`
    assert evil.status_code == 400 and evil.json()["limit"] == "allowed_hosts", evil.text
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="answer"' in page.text


@pytest.mark.parametrize("mode,want", [(None, ("hybrid", 2)), ("bm25", ("bm25", 4)), ("dense", ("dense", 3))])
def test_cli_http_and_ray_answer_a_question_the_same_way(served, capsys, mode, want):
    """No k asked: `densepr answer`, `densepr serve` and `densepr serve --ray` read the same k (tuned with
    the reader for the mode, else its top_k) in the same default mode, and give the same answer."""
    url, index, reader = served
    got = answer_everywhere(capsys, index, reader, mode, ray_url=url)
    assert got["cli"][:2] == want and got["http"] == got["cli"] and got["ray"] == got["cli"], got


def test_a_killed_replica_loses_no_request(served):
    """8 loopback clients for 6 s; after 2 s one of the two searcher replicas is killed. Every request
    gets a 200 (the router retries a call that hit the dead replica; Ray Serve restarts it). Four searcher
    replicas run: two shards x two replicas."""
    import ray

    url, _, _ = served
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + 6.0
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=30) as http:
            i = 0
            while time.perf_counter() < stop:
                try:
                    code = http.post(url + "/search", json={"question": f"{QUESTIONS[i % 3]} {c}", "k": 3, "mode": "hybrid"}).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victims = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Searcher" in a["name"]]
    assert len(victims) == 4, victims
    ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=False)
    for t in threads:
        t.join()
    assert statuses.get(200, 0) > 20 and set(statuses) == {200}, statuses
    print(f"statuses {statuses}, router retries {httpx.get(url + '/health').json()['ray']['retries']}")
