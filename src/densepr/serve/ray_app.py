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
  deployments above. Connection-level guards are uvicorn's in ``densepr serve``; behind Ray, its HTTP
  proxy owns the connections: ``--timeout-keep-alive`` becomes the proxy's keep-alive timeout, and
  ``--read-timeout`` and ``--max-connections``, which it has no equivalent of, are refused with ``--ray``.

A replica that dies is restarted by Ray Serve; a request whose call to it fails is retried once on
another replica (:meth:`RayService._call`), so a killed replica loses no request.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from ray import serve

from densepr.errors import DenseprError
from densepr.ranking import SearchResult, merge_shards
from densepr.retrieve.index_dir import IndexDir
from densepr.retrieve.modes import Mode, default_mode
from densepr.serve.limits import Limits
from densepr.serve.service import Service

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

    def __post_init__(self) -> None:
        for name in ("router", "encoder", "searcher", "reader", "shards"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        if not self.cpus > 0:
            raise ValueError(f"cpus must be positive, not {self.cpus!r}")

    @classmethod
    def parse(cls, spec: str | None) -> Replicas:
        """``router=2,encoder=1,searcher=4,reader=2,shards=2,cpus=0.5`` (``densepr serve --ray-replicas``);
        None or "": the defaults.

        Raises:
            DenseprError: not name=count pairs of these names, or a count out of range.
        """
        try:
            pairs = {k.strip(): v for k, v in (kv.split("=", 1) for kv in spec.split(","))} if spec else {}
            return cls(**{k: float(v) if k == "cpus" else int(v) for k, v in pairs.items()})
        except (ValueError, TypeError) as e:
            raise DenseprError(f"--ray-replicas {spec!r}: expected name=count pairs of router, encoder, searcher, reader, shards, cpus ({e})") from None


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
    dense_dim: int | None = None

    @classmethod
    def read(cls, index: str | Path, locate_encoder: bool = True) -> IndexInfo:
        """``locate_encoder``: find the recorded question encoder where the index directory says (relative
        path first: a moved index works, index.encoder_ref), its weights checked; off when another is given."""
        from densepr.index.encoder_ref import locate

        d = IndexDir(index).check()
        manifest = d.dense_manifest()
        encoder = manifest.get("question_encoder")
        if encoder and locate_encoder:
            encoder = str(locate(manifest, d.dense).resolve())  # absolute: replicas may run in another directory
        return cls(str(d.passages.resolve()), d.modes, encoder, manifest.get("type"), "bm25" in d.engines(),
                   d.hybrid_lambda(), len(manifest.get("shards") or [None]), manifest.get("dim"))  # fmt: skip

    def shards(self, wanted: int | None) -> int:
        """Searcher shards: ``wanted``, else the dense index's; a dense index fixes the number."""
        n = wanted or self.dense_shards
        if self.index_type is not None and n != self.dense_shards:
            raise DenseprError(f"{n} searcher shards, but the dense index has {self.dense_shards}: rebuild it with "
                               f"`densepr index dense --num-shards {n}` (BM25 is sliced to match at start)")  # fmt: skip
        return n


def _replica_grpc_on_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on ``[::]`` whatever the node's
    address (token-authenticated, but reachable from the network); on a node whose address is
    loopback (``--ray local``: :func:`densepr.index.ray_encode.start_local`) it is bound there too.
    Called first in each deployment's constructor, which Ray Serve runs before starting that server."""
    import ipaddress

    import ray
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "densepr_loopback", False) or not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return

    def on_loopback(server, address: str):
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.densepr_loopback = True
    replica.add_port_to_grpc_server = on_loopback


@serve.deployment
class QuestionEncoder:
    def __init__(self, name: str, device: str | None = None) -> None:
        from densepr.models.onnx import load_question_encoder

        _replica_grpc_on_loopback()
        self.encoder = load_question_encoder(name, device)  # a model directory, or an ONNX export (`NAME#int8`: its int8 model)

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

        _replica_grpc_on_loopback()
        whole = Retriever.load(index, with_encoder=False, mmap=True)
        self.retriever = whole.shard(shard, shards) if shards > 1 else whole

    def lists(self, questions: list[str], vectors: np.ndarray | None, depth: int, engines: list[str]) -> dict:
        """Each engine's top ``depth`` on this shard: ``{engine: (rows, scores)}``, rows are corpus rows."""
        return {e: (r.rows, r.scores) for e, r in self.retriever.lists(questions, depth, engines, vectors).items()}


@serve.deployment
class ReaderReplica:
    def __init__(self, path: str, device: str | None = None) -> None:
        from densepr.models.reader import Reader

        _replica_grpc_on_loopback()
        self.reader = Reader.load(path, device)

    def read(self, questions: list[str], passages: list[list[tuple[str, str]]]):
        return self.reader.read(questions, passages)


class RouterIndex:
    """What the router holds of the index (retrieval is the searchers'): the passages, to build responses,
    and what :class:`IndexInfo` says, for the mode rules and ``/health``. The part of
    :class:`~densepr.retrieve.retriever.Retriever`'s interface that :class:`Service` uses outside retrieval."""

    def __init__(self, info: IndexInfo) -> None:
        from densepr.retrieve.retriever import open_corpus  # here: it imports the dense side

        self.info, self.modes, self.hybrid_lambda = info, info.modes, info.hybrid_lambda
        self.corpus = open_corpus(Path(info.corpus_path).parent)  # the index directory's passage store

    @property
    def default_mode(self) -> Mode:
        return default_mode(self.modes)

    def describe(self) -> dict:
        """As :meth:`Retriever.describe`."""
        i = self.info
        return {"passages": len(self.corpus), "modes": self.modes, "question_encoder": i.question_encoder,
                "index_type": i.index_type, "bm25": i.bm25, "hybrid_lambda": self.hybrid_lambda}  # fmt: skip


class RayService(Service):
    """:class:`Service` whose retrieval and reading are calls to the deployments."""

    def __init__(self, info: IndexInfo, reader_path: str | None, limits: Limits, encoder, searcher, reader, replicas: Replicas) -> None:
        local_reader = None
        if reader_path is not None:  # the router checks question lengths with the reader's tokenizer, and reads its tuned selection
            from densepr.models.reader import Reader

            local_reader = Reader.load(reader_path, "cpu")
        super().__init__(RouterIndex(info), local_reader, limits)
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
        from densepr.pipeline import answer_from_readings

        mode, k = key
        res = self._retrieve(list(items), k, mode)
        if self.answer_batcher.abandoned():  # every client has gone: no reading on the replica (it reads in one call)
            raise ReadingStopped("every request of this batch has gone")
        hits = [res.hits(i, self.retriever.corpus) for i in range(len(items))]
        readings = self._call(self.reader_h.read, list(items), [[(h.title, h.text) for h in hs] for hs in hits])
        selection = self.reader.config.selection_for(mode)[0]
        return [answer_from_readings(q, hs, rd, mode, k, selection) for q, hs, rd in zip(items, hits, readings)]

    def health(self) -> dict:
        return {**super().health(), "ray": {"replicas": asdict(self.replicas), "shards": len(self.searcher_hs), "retries": self.retries}}


@serve.deployment
@serve.ingress()
class Router:
    def __init__(self, info: dict, reader_path: str | None, limits: dict, encoder, searcher, reader, replicas: dict) -> None:
        _replica_grpc_on_loopback()
        self.service = RayService(IndexInfo(**info), reader_path, Limits(**limits), encoder, searcher, reader, Replicas(**replicas))

    def __serve_build_asgi_app__(self):
        from densepr.serve.app import HostGuard, create_app

        app, allowed = create_app(self.service), self.service.limits.allowed_hosts
        return HostGuard(app, allowed) if allowed is not None else app  # as `densepr serve` (server_config)


def build_app(index: str | Path, reader: str | Path | None = None, limits: Limits | None = None, replicas: Replicas | None = None,
              device: str | None = None, question_encoder: str | None = None, host: str = "127.0.0.1"):  # fmt: skip
    """The bound Ray Serve application for an index directory (and a reader directory); ``question_encoder``:
    another question encoder than the index's (as ``densepr serve --question-encoder``); ``host``: the
    address the proxy binds, which gives the default ``Host`` allow-list (:func:`default_allowed_hosts`)."""
    from densepr.serve.app import default_allowed_hosts

    info, replicas, limits = IndexInfo.read(index, not question_encoder), replicas or Replicas(), limits or Limits()
    if limits.allowed_hosts is None:
        limits = replace(limits, allowed_hosts=default_allowed_hosts(host))
    if question_encoder and info.question_encoder:  # absolute: replicas may run elsewhere; an ONNX export's #int8 kept
        base, sep, tag = str(question_encoder).partition("#")
        info.question_encoder = str(Path(base).resolve()) + sep + tag if Path(base).exists() else str(question_encoder)
        from densepr.models.onnx import question_encoder_dim

        dim = question_encoder_dim(info.question_encoder)  # before any replica starts, as Retriever refuses it
        if info.dense_dim is not None and dim != info.dense_dim:
            raise DenseprError(f"question encoder {question_encoder} gives {dim}-d vectors, the dense index holds "
                               f"{info.dense_dim}-d vectors: they were not built as a pair")  # fmt: skip
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


def http_options(host: str, port: int, keep_alive_s: float | None = None) -> dict:
    """Ray Serve's HTTP proxy options: the address, and ``--timeout-keep-alive`` when given (whole
    seconds, rounded up; else Ray's default)."""
    return {"host": host, "port": port, **({"keep_alive_timeout_s": math.ceil(keep_alive_s)} if keep_alive_s is not None else {})}


def run(index: str | Path, reader: str | Path | None = None, limits: Limits | None = None, replicas: Replicas | None = None,
        address: str | None = None, host: str = "127.0.0.1", port: int = 8000, device: str | None = None, blocking: bool = True,
        keep_alive_s: float | None = None, question_encoder: str | None = None) -> None:  # fmt: skip
    """Start (or join) the cluster and serve the index on ``http://host:port/`` until interrupted."""
    from densepr.index.ray_encode import connect

    connect(address)
    serve.start(http_options=http_options(host, port, keep_alive_s))
    serve.run(build_app(index, reader, limits, replicas, device, question_encoder, host), name="densepr", route_prefix="/", blocking=blocking)
