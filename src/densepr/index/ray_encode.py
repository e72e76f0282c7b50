"""The encode stage on a Ray cluster (``densepr encode --ray``; extra ``densepr[ray]``).

The corpus is cut into the same parts as :func:`densepr.index.embeddings.encode_corpus`; Ray Data
maps the parts still missing over a pool of encoder actors (``map_batches``, one actor per GPU, or
per ``cpus_per_actor`` CPU slots), and this process, the driver, writes each part that comes back,
atomically, into the same embeddings directory (parts, ids, ``encoding.json``, manifest last). So:

* the output is the single-process format, float32 vectors identical to it (each part is encoded by
  the same call on the same rows);
* a killed driver reruns and skips the parts already written;
* a worker or node lost mid-run loses no work but its part in flight: Ray restarts its actor on a
  node that is left and re-runs that part (Ray Data's defaults for actor pools: ``max_restarts=-1``, ``max_task_retries=-1``).

Every node reads the passages file itself, at the same path (a shared file system, or the file
copied to each machine); the vectors and each part's ids travel back through Ray's object store, so
the output directory needs to exist on the driver's machine only. The driver never holds the corpus
(it streams the file once for its count and fingerprint, or opens an index directory's store); each
encoder actor still parses it whole (``load_corpus``), to read any part it is given.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from densepr.data.passages import load_corpus
from densepr.data.store import StoreCorpus, open_passages
from densepr.errors import DenseprError
from densepr.index.embeddings import complete, encoding_plan, missing_parts, prepare, write_part
from densepr.progress import progress_bar

MIN_RAY = (2, 52)  # the first Ray with token auth (RAY_AUTH_MODE=token); before it any client reaching a port could run code
LOOPBACK = "127.0.0.1"


def check_ray_version(version: str) -> None:
    """Refuse a Ray older than :data:`MIN_RAY` (``version``: the installed Ray's version string)."""
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m[1]), int(m[2])) < MIN_RAY:
        need = ".".join(map(str, MIN_RAY))
        raise DenseprError(f"Ray {version} is installed, but --ray needs Ray >= {need} (token authentication): "
                           f"pip install 'ray[data,serve]>={need}'")  # fmt: skip


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to; ``local`` or
    None: start one in this process, :func:`start_local`), once; usage reporting off."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        check_ray_version(version("ray"))
        import ray
    except (ImportError, PackageNotFoundError):
        raise DenseprError("--ray needs Ray: pip install 'densepr[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address in (None, "", "local"):
            start_local()
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise DenseprError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


def start_local() -> Path:
    """Start a one-machine Ray cluster in this process that only this machine can reach, for
    ``--ray local``: every Ray process (GCS, raylet, object manager, agents, workers, metrics)
    listens on 127.0.0.1 only, and token authentication is on, with a fresh random token in a file
    only this user can read (a private directory, removed at exit: Ctrl-C, or SIGTERM, which ``ray.init``
    turns into an exit). Returns the token file.

    Ray replaces 127.0.0.1 by the machine's address unless its "no cluster" switch is off (the
    default on macOS and Windows), so that switch is turned off here, and the node's address is
    checked after the start: a cluster that is not on loopback is shut down and refused."""
    import atexit
    import ipaddress
    import secrets
    import shutil
    import tempfile

    import ray

    try:  # Ray's own switches for these (no public API sets them in-process)
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError as e:
        raise DenseprError(f"Ray {ray.__version__}: cannot start a loopback-only local cluster with token authentication ({e}); "
                           "start one with `ray start` and pass its address to --ray") from None  # fmt: skip

    private = Path(tempfile.mkdtemp(prefix="densepr-ray-"))  # mode 0700
    token = private / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    # Set for this process and inherited by every Ray process it starts.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray was imported (maybe before this call)
    Config.initialize("")  # Ray's config read RAY_AUTH_MODE at import, too; Ray's own token set-up reloads it so
    AuthenticationTokenLoader.instance().reset_cache()

    def stop() -> None:
        # The token first: Ray's processes read it when they start and none starts now, while a shutdown that
        # hangs on a loaded machine (then killed, or a second Ctrl-C) must not leave the secret behind.
        shutil.rmtree(private, ignore_errors=True)
        ray.shutdown()

    atexit.register(stop)
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, dashboard_host=LOOPBACK,
             log_to_driver=False, configure_logging=False)  # fmt: skip
    node = ray.util.get_node_ip_address()
    if not ipaddress.ip_address(node).is_loopback:
        stop()
        raise DenseprError(f"the local Ray cluster came up on {node}, not loopback: refusing to run it (Ray {ray.__version__})")
    return token


class PartEncoder:
    """A Ray Data actor: loads the passage encoder and opens the corpus once, then encodes whole parts
    (returning each part's vectors and ids: the driver does not hold the corpus). The corpus is the
    passage store when the file has one (an index directory's ``passages.tsv``: memory-mapped, nothing
    held per passage, as on the driver); any other file is parsed whole (build a store for large ones)."""

    def __init__(self, encoder: str, passages: str, fingerprint: dict, part_size: int, batch_size: int, device: str | None,
                 throttle_s: float = 0.0) -> None:  # fmt: skip
        from densepr.models.encoder import load_biencoder

        corpus = open_passages(passages)  # the store beside an index directory's passages.tsv, if any
        self.corpus = corpus if isinstance(corpus, StoreCorpus) else load_corpus(passages)  # rows by number: in memory
        if self.corpus.fingerprint() != fingerprint:  # another file at that path on this node
            raise DenseprError(f"{passages} on node {os.uname().nodename} is not the driver's corpus")
        _, self.encoder = load_biencoder(encoder, device=device)
        self.part_size, self.batch_size, self.throttle_s = part_size, batch_size, throttle_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c, parts, vectors, ids = self.corpus, [], [], []
        for i in batch["part"].tolist():
            lo, hi = i * self.part_size, min(len(c), (i + 1) * self.part_size)
            parts.append(i)
            time.sleep(self.throttle_s)
            vectors.append(self.encoder.encode_passages(c.titles[lo:hi], c.texts[lo:hi], self.batch_size))
            ids.append("\n".join(c.ids[lo:hi]))  # ids hold no whitespace
        import ray

        node = ray.get_runtime_context().get_node_id()
        # batches of one part (the last is shorter)
        return {"part": np.asarray(parts), "vectors": np.stack(vectors), "ids": np.asarray(ids),
                "node": np.asarray([node] * len(parts))}  # fmt: skip


def encode_corpus_ray(
    encoder_path: str | os.PathLike[str],
    passages: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    part_size: int = 100_000,
    batch_size: int = 64,
    dtype: str = "float32",
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    device: str | None = None,
    show_progress: bool = False,
    on_part=None,
    throttle_s: float = 0.0,
) -> dict:
    """Encode ``passages`` with the passage encoder of ``encoder_path`` into ``out_dir`` on Ray.

    Args:
        encoder_path: a model directory or a bi-encoder checkpoint (as ``densepr encode --encoder``).
        passages: the passages file, readable at this path on every node.
        out_dir: the embeddings directory (resumed when it holds parts of the same settings).
        address: the cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); None: a local Ray.
        part_size, batch_size, dtype: as :func:`densepr.index.embeddings.encode_corpus`.
        actors: encoder actors (default: as many as the cluster's GPUs, or CPUs, allow).
        cpus_per_actor, gpus_per_actor: each actor's resources (a GPU actor encodes on ``cuda``).
        on_part: called with each part number and the Ray node id that encoded it, once it is written.
        throttle_s: each actor sleeps this long per part (tests: keeps parts in flight).

    Returns:
        The manifest of the complete directory.
    """
    import ray

    from densepr.models.encoder import load_biencoder

    q_enc, p_enc = load_biencoder(encoder_path, device="cpu")  # for the plan: name, dimension, weights id
    corpus = open_passages(passages)  # the driver reads the file once, for its count and fingerprint (or its store's)
    final = Path(out_dir)
    plan = encoding_plan(p_enc, corpus, q_enc, part_size, dtype)
    out = prepare(final, plan)
    if isinstance(out, dict):
        return out
    todo = missing_parts(out, corpus, part_size, p_enc.dim)
    if todo:
        connect(address)
        res = ray.cluster_resources()
        per = gpus_per_actor if gpus_per_actor > 0 else cpus_per_actor
        slots = int(res.get("GPU" if gpus_per_actor > 0 else "CPU", 0) // per) if per > 0 else 1
        if slots < 1:
            raise DenseprError(f"the Ray cluster has no room for one encoder actor ({'GPU' if gpus_per_actor else 'CPU'}: "
                               f"{res.get('GPU' if gpus_per_actor > 0 else 'CPU', 0)})")  # fmt: skip
        n_actors = max(1, min(actors or slots, len(todo)))
        ds = ray.data.from_items([{"part": i} for i in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(PartEncoder, batch_size=1, concurrency=n_actors, num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
                            fn_constructor_kwargs={"encoder": str(encoder_path), "passages": str(Path(passages).resolve()),
                                                   "fingerprint": corpus.fingerprint(), "part_size": part_size,
                                                   "batch_size": batch_size, "device": device or ("cuda" if gpus_per_actor > 0 else "cpu"),
                                                   "throttle_s": throttle_s})  # fmt: skip
        # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a lost actor restarts and its part reruns
        rows = sum(min(len(corpus), (i + 1) * part_size) - i * part_size for i in todo)
        with progress_bar(rows, f"encode passages on Ray ({n_actors} actors)", show_progress, unit="psg") as advance:
            for row in ds.iter_rows():
                i = int(row["part"])
                lo, hi = i * part_size, min(len(corpus), (i + 1) * part_size)
                vecs = np.asarray(row["vectors"], dtype=np.float32)
                if vecs.shape != (hi - lo, p_enc.dim):
                    raise DenseprError(f"part {i} came back with shape {vecs.shape}, not {(hi - lo, p_enc.dim)}")
                ids = str(row["ids"]).split("\n") if hi > lo else []
                if len(ids) != hi - lo:
                    raise DenseprError(f"part {i} came back with {len(ids)} ids, not {hi - lo}")
                write_part(out, i, ids, vecs, dtype)
                advance(hi - lo)
                if on_part is not None:
                    on_part(i, str(row["node"]))
    manifest = complete(out, final, plan, corpus, p_enc.dim)
    if manifest is None:
        raise DenseprError(f"{out}: parts are still missing after the Ray run: {missing_parts(out, corpus, part_size, p_enc.dim)}")
    return manifest
