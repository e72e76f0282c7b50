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
copied to each machine); the vectors travel back through Ray's object store, so the output
directory needs to exist on the driver's machine only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from densepr.data.passages import load_corpus
from densepr.errors import DenseprError
from densepr.index.embeddings import complete, encoding_plan, missing_parts, prepare, write_part
from densepr.progress import progress_bar


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine belongs to; ``local`` or
    None: start one in this process), once; usage reporting off."""
    try:
        import ray
    except ImportError:
        raise DenseprError("--ray needs Ray: pip install 'densepr[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as e:
        raise DenseprError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


class PartEncoder:
    """A Ray Data actor: loads the passage encoder and the corpus once, then encodes whole parts."""

    def __init__(self, encoder: str, passages: str, fingerprint: dict, part_size: int, batch_size: int, device: str | None,
                 throttle_s: float = 0.0) -> None:  # fmt: skip
        from densepr.models.encoder import load_biencoder

        self.corpus = load_corpus(passages)
        if self.corpus.fingerprint() != fingerprint:  # another file at that path on this node
            raise DenseprError(f"{passages} on node {os.uname().nodename} is not the driver's corpus")
        _, self.encoder = load_biencoder(encoder, device=device)
        self.part_size, self.batch_size, self.throttle_s = part_size, batch_size, throttle_s

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c, parts, vectors = self.corpus, [], []
        for i in batch["part"].tolist():
            lo, hi = i * self.part_size, min(len(c), (i + 1) * self.part_size)
            parts.append(i)
            time.sleep(self.throttle_s)
            vectors.append(self.encoder.encode_passages(c.titles[lo:hi], c.texts[lo:hi], self.batch_size))
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {"part": np.asarray(parts), "vectors": np.stack(vectors), "node": np.asarray([node] * len(parts))}  # batches of one part (the last is shorter)


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
    corpus = load_corpus(passages)
    final = Path(out_dir)
    plan = encoding_plan(p_enc, corpus, q_enc.name, part_size, dtype)
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
                write_part(out, i, corpus.ids[lo:hi], vecs, dtype)
                advance(hi - lo)
                if on_part is not None:
                    on_part(i, str(row["node"]))
    manifest = complete(out, final, plan, corpus, p_enc.dim)
    if manifest is None:
        raise DenseprError(f"{out}: parts are still missing after the Ray run: {missing_parts(out, corpus, part_size, p_enc.dim)}")
    return manifest
