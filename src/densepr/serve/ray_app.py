"""``densepr serve --ray``: the HTTP API and web page of ``densepr serve`` as a Ray Serve application
(extra ``densepr[ray]``), each part a deployment with its own replicas, spread over a cluster.

* ``QuestionEncoder``: E_Q. Ray Serve's request batching (``@serve.batch``) gathers the questions of
  concurrent requests, from every router replica, into one forward pass.
* ``Searcher``: the index directory's BM25 and dense indexes without a question encoder: questions
  and their vectors in, BM25 / dense / hybrid / RRF top-k out (the single-process retrieval code).
* ``ReaderReplica``: the reader (the index's own ``reader/`` or ``--reader``) for ``/answer``.
* ``Router``: the ingress, the same FastAPI app as ``densepr serve`` (:func:`densepr.serve.app.create_app`:
  validation, limits, the bounded queue and its 503s, timeouts, the page), whose model calls go to the
  deployments above. Connection-level guards (``--max-connections``, read timeouts) are uvicorn's in
  ``densepr serve``; behind Ray, its HTTP proxy owns the connections.

A replica that dies is restarted by Ray Serve; a request whose call to it fails is retried once on
another replica (:meth:`RayService._call`), so a killed replica loses no request.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ray import serve

from densepr.data.passages import load_corpus
from densepr.errors import DenseprError
from densepr.fileio import read_json
from densepr.ranking import SearchResult
from densepr.retrieve.modes import Mode
from densepr.serve.service import Limits, Service

RETRIES = 1  # a call that fails because its replica died is sent once more (Ray Serve routes it to a live one)


@dataclass
class Replicas:
    """Replicas per deployment."""

    router: int = 1
    encoder: int = 1
    searcher: int = 1
    reader: int = 1
    cpus: float = 1.0  # CPUs each replica reserves (Ray Serve's default); fractions pack several on a node


@dataclass
class IndexInfo:
    """What the router needs to know of an index directory, read from its manifests (nothing loaded)."""

    corpus_path: str
    modes: list[str]
    question_encoder: str | None
    index_type: str | None
    bm25: bool
    hybrid_lambda: float | None

    @classmethod
    def read(cls, index: str | Path) -> IndexInfo:
        from densepr.retrieve.fusion import PAPER_LAMBDA

        d = Path(index)
        if not (d / "passages.tsv").is_file():
            raise DenseprError(f"{d}: not an index directory (no passages.tsv)")
        have = {"bm25": (d / "bm25").is_dir(), "dense": (d / "dense" / "manifest.json").is_file()}
        if not any(have.values()):
            raise DenseprError(f"{d}: holds neither bm25/ nor dense/; nothing to search")
        manifest = read_json(d / "dense" / "manifest.json") if have["dense"] else {}
        lam = read_json(d / "hybrid.json")["lambda"] if (d / "hybrid.json").is_file() else PAPER_LAMBDA
        return cls(str((d / "passages.tsv").resolve()), [m.value for m in Mode if all(have[n] for n in m.needs)],
                   manifest.get("question_encoder"), manifest.get("type"), have["bm25"], lam)  # fmt: skip


@serve.deployment
class QuestionEncoder:
    def __init__(self, name: str, device: str | None = None) -> None:
        from densepr.models.encoder import Encoder

        self.encoder = Encoder.load(name, device=device)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def __call__(self, questions: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_questions(questions))


@serve.deployment
class Searcher:
    def __init__(self, index: str) -> None:
        from densepr.retrieve.retriever import Retriever

        self.retriever = Retriever.load(index, with_encoder=False)

    def search(self, questions: list[str], vectors: np.ndarray | None, k: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        res = self.retriever.retrieve_all(questions, k, [mode], vectors=vectors)[Mode.parse(mode).value]
        return res.rows, res.scores


@serve.deployment
class ReaderReplica:
    def __init__(self, path: str, device: str | None = None) -> None:
        from densepr.models.reader import Reader

        self.reader = Reader.load(path, device)

    def read(self, questions: list[str], passages: list[list[tuple[str, str]]]):
        return self.reader.read(questions, passages)


class _View:
    """The router's stand-in for a Retriever: the corpus (to build responses) and what /health says."""

    def __init__(self, info: IndexInfo) -> None:
        self.corpus = load_corpus(info.corpus_path)
        self.modes, self.hybrid_lambda, self.info = info.modes, info.hybrid_lambda, info
        self.question_encoder = type("E", (), {"name": info.question_encoder})() if info.question_encoder else None
        self.dense = type("D", (), {"index_type": info.index_type})() if info.index_type else None
        self.bm25 = True if info.bm25 else None


class RayService(Service):
    """:class:`Service` whose retrieval and reading are calls to the deployments."""

    def __init__(self, info: IndexInfo, reader_path: str | None, limits: Limits, encoder, searcher, reader, replicas: Replicas) -> None:
        local_reader = None
        if reader_path is not None:  # the router checks question lengths with the reader's tokenizer, and reads its tuned selection
            from densepr.models.reader import Reader

            local_reader = Reader.load(reader_path, "cpu")
        super().__init__(_View(info), local_reader, limits)
        self.encoder_h, self.searcher_h, self.reader_h, self.replicas = encoder, searcher, reader, replicas
        self.retries = 0

    def _call(self, fn, *args):
        """``fn.remote(*args).result()``, once more when the replica it went to died."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(RETRIES + 1):
            try:
                return fn.remote(*args).result()
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == RETRIES:
                    raise
                self.retries += 1
                time.sleep(0.2)

    def _retrieve(self, questions: list[str], k: int, mode: str) -> SearchResult:
        vectors = None
        if "dense" in Mode.parse(mode).needs:
            vectors = np.stack([self._call(self.encoder_h, q) for q in questions])
        rows, scores = self._call(self.searcher_h.search, questions, vectors, k, mode)
        return SearchResult(rows, scores)

    def _answer_batch(self, key: tuple[str, int], items: list[str]) -> list:
        from densepr.pipeline import _answer

        mode, k = key
        res = self._retrieve(list(items), k, mode)
        hits = [res.hits(i, self.retriever.corpus) for i in range(len(items))]
        readings = self._call(self.reader_h.read, list(items), [[(h.title, h.text) for h in hs] for hs in hits])
        selection = self.reader.config.selection_for(mode)[0]
        return [_answer(q, hs, rd, mode, k, selection) for q, hs, rd in zip(items, hits, readings)]

    def health(self) -> dict:
        return {**super().health(), "ray": {"replicas": asdict(self.replicas), "retries": self.retries}}


@serve.deployment
@serve.ingress()
class Router:
    def __init__(self, info: dict, reader_path: str | None, limits: dict, encoder, searcher, reader, replicas: dict) -> None:
        self.service = RayService(IndexInfo(**info), reader_path, Limits(**limits), encoder, searcher, reader, Replicas(**replicas))

    def __serve_build_asgi_app__(self):
        from densepr.serve.app import create_app

        return create_app(self.service)


def build_app(index: str | Path, reader: str | Path | None = None, limits: Limits | None = None, replicas: Replicas | None = None,
              device: str | None = None):  # fmt: skip
    """The bound Ray Serve application for an index directory (and a reader directory)."""
    info, replicas, limits = IndexInfo.read(index), replicas or Replicas(), limits or Limits()
    cpu = {"num_cpus": replicas.cpus}
    gpu = {**cpu, "num_gpus": 1} if device and device.startswith("cuda") else cpu
    encoder = QuestionEncoder.options(num_replicas=replicas.encoder, ray_actor_options=gpu).bind(info.question_encoder, device) if info.question_encoder else None  # fmt: skip
    searcher = Searcher.options(num_replicas=replicas.searcher, ray_actor_options=cpu).bind(str(Path(index).resolve()))
    rd = ReaderReplica.options(num_replicas=replicas.reader, ray_actor_options=gpu).bind(str(Path(reader).resolve()), device) if reader else None  # fmt: skip
    return Router.options(num_replicas=replicas.router, ray_actor_options=cpu).bind(asdict(info), str(Path(reader).resolve()) if reader else None, asdict(limits),
                                                             encoder, searcher, rd, asdict(replicas))  # fmt: skip


def run(index: str | Path, reader: str | Path | None = None, limits: Limits | None = None, replicas: Replicas | None = None,
        address: str | None = None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None, blocking: bool = True) -> None:  # fmt: skip
    """Start (or join) the cluster and serve the index on ``http://host:port/`` until interrupted."""
    from densepr.index.ray_encode import connect

    connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(index, reader, limits, replicas, device), name="densepr", route_prefix="/", blocking=blocking)
