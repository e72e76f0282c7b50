"""The encode stage: passage vectors written as ``.npy`` shards with their ids.

Layout of an embeddings directory::

    encoding.json          # written first: encoder, corpus fingerprint, shard size (for resuming)
    part-00000.npy         # float32 (or float16) [rows, dim], rows in corpus order
    part-00000.ids         # the passage id of each row, one per line (UTF-8)
    ...
    manifest.json          # written last: dim, count, dtype, shard list, sizes and sha256

Each shard is written atomically, so a killed run resumes at the first missing shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.passages import Corpus, check_corpus
from .encoder import Encoder
from .errors import DenseprError, MismatchError
from .fileio import read_ids, read_json, read_manifest, save_npy, write_ids, write_json, write_manifest
from .progress import progress_bar

KIND = "embeddings"


def encoder_info(encoder: Encoder) -> dict:
    """What identifies an encoder in manifests: path, pooling, dimension and a weights hash."""
    h = hashlib.sha256()
    root = Path(encoder.name)
    for f in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:  # header + first MiB: cheap, and differs between checkpoints
            h.update(fh.read(1 << 20))
    return {"path": encoder.name, "pooling": encoder.config.pooling, "normalize": encoder.config.normalize,
            "max_length": encoder.config.max_length, "dim": encoder.dim, "weights_id": h.hexdigest()[:16]}  # fmt: skip


def _shard_names(i: int) -> tuple[str, str]:
    return f"part-{i:05d}.npy", f"part-{i:05d}.ids"


def encode_corpus(
    encoder: Encoder,
    corpus: Corpus,
    out_dir: str | os.PathLike[str],
    *,
    question_encoder: str | None = None,
    shard_size: int = 100_000,
    batch_size: int = 64,
    dtype: str = "float32",
    show_progress: bool = False,
) -> dict:
    """Encode every passage of ``corpus`` into shards under ``out_dir``; resumes a killed run.

    Args:
        encoder: the passage encoder E_P.
        corpus: the passages, in the order rows will be written.
        out_dir: the embeddings directory.
        question_encoder: path of the matching E_Q, recorded so retrieval pairs them.
        shard_size: passages per shard (the unit of resumption).
        batch_size: passages per forward pass.
        dtype: ``float32`` or ``float16`` storage.
        show_progress: draw a progress bar.

    Returns:
        The manifest written.
    """
    if dtype not in ("float32", "float16"):
        raise DenseprError(f"dtype must be float32 or float16, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"encoder": encoder_info(encoder), "question_encoder": question_encoder or encoder.name,
            "corpus": corpus.fingerprint(), "shard_size": shard_size, "dtype": dtype}  # fmt: skip
    if (out / "encoding.json").is_file():
        previous = read_json(out / "encoding.json")
        if previous != plan:
            raise MismatchError(
                f"{out} holds embeddings from another encoder, corpus or shard size; "
                "use a new directory (or delete this one) to re-encode"
            )
    else:
        (out / "manifest.json").unlink(missing_ok=True)
        write_json(out / "encoding.json", plan)
    n_shards = max(1, -(-len(corpus) // shard_size))
    shards, files = [], []
    with progress_bar(len(corpus), "encode passages", show_progress, unit="psg") as advance:
        for s in range(n_shards):
            lo, hi = s * shard_size, min(len(corpus), (s + 1) * shard_size)
            npy, ids = _shard_names(s)
            if not _shard_ok(out, s, hi - lo, encoder.dim):
                vecs = encoder.encode_passages(corpus.titles[lo:hi], corpus.texts[lo:hi], batch_size, progress=advance)
                write_ids(out / ids, corpus.ids[lo:hi])
                save_npy(out / npy, vecs.astype(dtype))  # written last: its presence marks the shard done
            else:
                advance(hi - lo)
            shards.append({"vectors": npy, "ids": ids, "count": hi - lo})
            files += [npy, ids]
    return write_manifest(out, KIND, files + ["encoding.json"], dim=encoder.dim, count=len(corpus), dtype=dtype,
                          encoder=plan["encoder"], question_encoder=plan["question_encoder"],
                          corpus=plan["corpus"], shards=shards)  # fmt: skip


def _shard_ok(out: Path, s: int, count: int, dim: int) -> bool:
    npy, ids = _shard_names(s)
    if not (out / npy).is_file() or not (out / ids).is_file():
        return False
    try:
        arr = np.load(out / npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    return arr.shape == (count, dim) and len(read_ids(out / ids)) == count


@dataclass
class Embeddings:
    """A complete embeddings directory, read shard by shard."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | os.PathLike[str], corpus: Corpus | None = None) -> Embeddings:
        manifest = read_manifest(directory, KIND)
        if corpus is not None:
            check_corpus(manifest, corpus, f"embeddings {directory}")
        return cls(Path(directory), manifest)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def shards(self):
        """Yield ``(ids, vectors)`` per shard; vectors are memory-mapped."""
        for sh in self.manifest["shards"]:
            vecs = np.load(self.directory / sh["vectors"], mmap_mode="r", allow_pickle=False)
            ids = read_ids(self.directory / sh["ids"])
            if vecs.shape != (sh["count"], self.dim) or len(ids) != sh["count"]:
                raise DenseprError(f"{self.directory / sh['vectors']}: shape {vecs.shape} does not match the manifest")
            yield ids, vecs
