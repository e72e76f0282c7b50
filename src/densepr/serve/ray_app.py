"""``densepr serve --ray``: the HTTP API and web page of ``densepr serve`` as a Ray Serve application
(extra ``densepr[ray]``), each part a deployment with its own replicas, spread over a cluster.

* ``QuestionEncoder``: E_Q. A router sends each micro-batch's questions in one call; Ray Serve's
  request batching (``@serve.batch``) gathers the calls of every router replica into one forward pass.
* ``Searcher``: one per index shard (``Searcher-0``, ``Searcher-1``, ...): its dense index shard (an
  index built with ``densepr index dense --num-shards N``) and its slice of BM25's passages, scored
  with the whole corpus's document frequencies and average length
  (:meth:`~densepr.retrieve.retriever.Retriever.shard`); questions and their vectors in, each engine's
  top-k out. The router fans out to every shard, merges each engine's lists
  (:func:`~densepr.ranking.merge_shards`: exact for flat shards and for BM25) and fuses hybrid / RRF
  with the single-process code (:func:`~densepr.retrieve.retriever.rank_modes`).
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
from densepr.ranking import SearchResult, merge_shards
from densepr.retrieve.modes import Mode
from densepr.serve.service import Limits, Service

ENCODER_BATCH = 16  # router calls (each one micro-batch of questions) the encoder runs in one forward pass
RETRIES = 1  # a call that fails because its replica died is sent once more (Ray Serve routes it to a live one)


@dataclass
class Replicas:
    """Replicas per deployment."""

    router: int = 1
    encoder: int = 1
    searcher: int = 1  # per shard
    reader: int = 1
    shards: int | None = None  # searcher shards; None: the dense index's shard count (1 without one)
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
    dense_shards: int = 1

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
                   manifest.get("question_encoder"), manifest.get("type"), have["bm25"], lam, len(manifest.get("shards") or [None]))  # fmt: skip

    def shards(self, wanted: int | None) -> int:
        """Searcher shards: ``wanted``, else the dense index's; a dense index fixes the number."""
        n = wanted or self.dense_shards
        if self.index_type is not None and n != self.dense_shards:
            raise DenseprError(f"{n} searcher shards, but the dense index has {self.dense_shards}: rebuild it with "
                               f"`densepr index dense --num-shards {n}` (BM25 is sliced to match at start)")  # fmt: skip
        return n


@serve.deployment
class QuestionEncoder:
    def __init__(self, name: str, device: str | None = None) -> None:
        from densepr.models.encoder import Encoder

        self.encoder = Encoder.load(name, device=device)

    @serve.batch(max_batch_size=ENCODER_BATCH, batch_wait_timeout_s=0.002)
    async def __call__(self, calls: list[list[str]]) -> list[np.ndarray]:
        """Each call is one router micro-batch's questions; one forward pass for all, split back per call.
        (One call per question cost a round trip each, one after another: 16 clients ran slower than 1.)"""
        vectors = self.encoder.encode_questions([q for qs in calls for q in qs])
        ends = np.cumsum([len(qs) for qs in calls])
        return list(np.split(vectors, ends[:-1]))


@serve.deployment
class Searcher:
    """Shard ``shard`` of ``shards`` of the index directory (memory-mapped: the other shards' data is
    never read into memory)."""

    def __init__(self, index: str, shard: int = 0, shards: int = 1) -> None:
        from densepr.retrieve.retriever import Retriever

        whole = Retriever.load(index, with_encoder=False, mmap=True)
        self.retriever = whole.shard(shard, shards) if shards > 1 else whole

    def lists(self, questions: list[str], vectors: np.ndarray | None, depth: int, engines: list[str]) -> dict:
        """Each engine's top ``depth`` on this shard: ``{engine: (rows, scores)}``, rows are corpus rows."""
        return {e: (r.rows, r.scores) for e, r in self.retriever.lists(questions, depth, engines, vectors).items()}


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
        self.encoder_h, self.searcher_hs, self.reader_h, self.replicas = encoder, list(searcher), reader, replicas
        self.retries = 0

    def _call(self, fn, *args, sent=None):
        """``fn.remote(*args).result()`` (``sent``: that call, already made), once more when the replica it
        went to died."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        for attempt in range(RETRIES + 1):
            try:
                return (sent if attempt == 0 and sent is not None else fn.remote(*args)).result()
            except (ActorDiedError, ActorUnavailableError, RayActorError):
                if attempt == RETRIES:
                    raise
                self.retries += 1
                time.sleep(0.2)

    def _fan_out(self, method: str, *args) -> list:
        """``method(*args)`` on every shard's searcher at once, each with :meth:`_call`'s retry."""
        calls = [getattr(h, method) for h in self.searcher_hs]
        sent = [fn.remote(*args) for fn in calls]
        return [self._call(fn, *args, sent=r) for fn, r in zip(calls, sent)]

    def _retrieve(self, questions: list[str], k: int, mode: str) -> SearchResult:
        from densepr.retrieve.retriever import FUSION_DEPTH, rank_modes

        m = Mode.parse(mode)
        vectors = None
        if "dense" in m.needs:
            vectors = self._call(self.encoder_h, list(questions))
        depth = max(k, FUSION_DEPTH) if m.fused else k
        parts = self._fan_out("lists", questions, vectors, depth, list(m.needs))
        merged = {e: merge_shards([SearchResult(*p[e]) for p in parts], depth) for e in m.needs}
        return rank_modes([m], merged.get("dense"), merged.get("bm25"), k, self.retriever.hybrid_lambda)[m.value]

    def _answer_batch(self, key: tuple[str, int], items: list[str]) -> list:
        from densepr.models.reader import ReadingStopped
        from densepr.pipeline import _answer

        mode, k = key
        res = self._retrieve(list(items), k, mode)
        if self.answer_batcher.abandoned():  # every client has gone: no reading on the replica (it reads in one call)
            raise ReadingStopped("every request of this batch has gone")
        hits = [res.hits(i, self.retriever.corpus) for i in range(len(items))]
        readings = self._call(self.reader_h.read, list(items), [[(h.title, h.text) for h in hs] for hs in hits])
        selection = self.reader.config.selection_for(mode)[0]
        return [_answer(q, hs, rd, mode, k, selection) for q, hs, rd in zip(items, hits, readings)]

    def health(self) -> dict:
        return {**super().health(), "ray": {"replicas": asdict(self.replicas), "shards": len(self.searcher_hs), "retries": self.retries}}


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
    encoder = QuestionEncoder.options(num_replicas=replicas.encoder, ray_actor_options=gpu, max_ongoing_requests=ENCODER_BATCH * 2).bind(info.question_encoder, device) if info.question_encoder else None  # fmt: skip
    shards = info.shards(replicas.shards)
    searchers = [Searcher.options(name=f"Searcher-{i}", num_replicas=replicas.searcher, ray_actor_options=cpu).bind(str(Path(index).resolve()), i, shards)
                 for i in range(shards)]  # fmt: skip
    rd = ReaderReplica.options(num_replicas=replicas.reader, ray_actor_options=gpu).bind(str(Path(reader).resolve()), device) if reader else None  # fmt: skip
    # Ray Serve admits 5 requests per replica by default and queues the rest in its proxy: the router
    # then micro-batches at most 5 and its own bounded queue (503 + Retry-After) never sees the rest.
    return Router.options(num_replicas=replicas.router, ray_actor_options=cpu, max_ongoing_requests=limits.max_queue).bind(asdict(info), str(Path(reader).resolve()) if reader else None, asdict(limits),
                                                             encoder, searchers, rd, asdict(replicas))  # fmt: skip


def run(index: str | Path, reader: str | Path | None = None, limits: Limits | None = None, replicas: Replicas | None = None,
        address: str | None = None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None, blocking: bool = True) -> None:  # fmt: skip
    """Start (or join) the cluster and serve the index on ``http://host:port/`` until interrupted."""
    from densepr.index.ray_encode import connect

    connect(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(index, reader, limits, replicas, device), name="densepr", route_prefix="/", blocking=blocking)
