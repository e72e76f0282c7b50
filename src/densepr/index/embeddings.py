"""The encode stage: passage vectors written as ``.npy`` shards with their ids.

Layout of an embeddings directory::

    encoding.json          # written first: encoder, corpus fingerprint, part size, dtype (for resuming)
    part-00000.npy         # float32 (or float16) [rows, dim], rows in corpus order
    part-00000.ids         # the passage id of each row, one per line (UTF-8)
    ...
    manifest.json          # written last: dim, count, dtype, part list, sizes and sha256

Each part is written atomically, so a killed run resumes at the first missing part, and
several processes (``--shard-id/--num-shards`` or ``torchrun``) can fill one directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densepr.data.passages import Corpus, check_corpus
from densepr.errors import DenseprError, MismatchError
from densepr.fileio import read_ids, read_json, read_manifest, save_npy, write_ids, write_json, write_manifest
from densepr.models.encoder import Encoder
from densepr.progress import progress_bar

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


def _part_names(i: int) -> tuple[str, str]:
    return f"part-{i:05d}.npy", f"part-{i:05d}.ids"


def shard_parts(n_parts: int, shard_id: int, num_shards: int) -> range:
    """The contiguous block of parts process ``shard_id`` of ``num_shards`` encodes."""
    if not 0 <= shard_id < num_shards:
        raise DenseprError(f"shard id {shard_id} is not in 0..{num_shards - 1}")
    bounds = np.linspace(0, n_parts, num_shards + 1).astype(int)
    return range(int(bounds[shard_id]), int(bounds[shard_id + 1]))


def encode_corpus(
    encoder: Encoder,
    corpus: Corpus,
    out_dir: str | os.PathLike[str],
    *,
    question_encoder: str | None = None,
    part_size: int = 100_000,
    batch_size: int = 64,
    dtype: str = "float32",
    shard_id: int = 0,
    num_shards: int = 1,
    show_progress: bool = False,
) -> dict | None:
    """Encode the passages of ``corpus`` into parts under ``out_dir``; resumes a killed run.

    The corpus is cut into parts of ``part_size`` rows (the unit of resumption); process
    ``shard_id`` of ``num_shards`` encodes its contiguous block of parts. Several processes
    (or machines sharing the directory) can work at once: whichever finds every part complete
    writes the manifest.

    Args:
        encoder: the passage encoder E_P.
        corpus: the passages, in the order rows will be written.
        out_dir: the embeddings directory.
        question_encoder: path of the matching E_Q, recorded so retrieval pairs them.
        part_size: passages per part file.
        batch_size: passages per forward pass.
        dtype: ``float32`` or ``float16`` storage.
        shard_id, num_shards: this process's share of the parts.
        show_progress: draw a progress bar.

    Returns:
        The manifest when every part is complete, else None (other shards still to run).
    """
    if dtype not in ("float32", "float16"):
        raise DenseprError(f"dtype must be float32 or float16, not {dtype!r}")
    if part_size <= 0:
        raise DenseprError("the part size must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"encoder": encoder_info(encoder), "question_encoder": question_encoder or encoder.name,
            "corpus": corpus.fingerprint(), "part_size": part_size, "dtype": dtype}  # fmt: skip
    if (out / "encoding.json").is_file():
        previous = read_json(out / "encoding.json")
        if previous != plan:
            raise MismatchError(
                f"{out} holds embeddings from another encoder, corpus, part size or dtype; "
                "use a new directory (or delete this one) to re-encode"
            )
    else:
        (out / "manifest.json").unlink(missing_ok=True)
        write_json(out / "encoding.json", plan)
    n_parts = max(1, -(-len(corpus) // part_size))
    mine = shard_parts(n_parts, shard_id, num_shards)
    todo = sum(min(len(corpus), (i + 1) * part_size) - i * part_size for i in mine)
    label = "encode passages" + (f" (shard {shard_id + 1}/{num_shards})" if num_shards > 1 else "")
    with progress_bar(todo, label, show_progress, unit="psg") as advance:
        for i in mine:
            lo, hi = i * part_size, min(len(corpus), (i + 1) * part_size)
            npy, ids = _part_names(i)
            if not _part_ok(out, i, hi - lo, encoder.dim):
                vecs = encoder.encode_passages(corpus.titles[lo:hi], corpus.texts[lo:hi], batch_size, progress=advance)
                write_ids(out / ids, corpus.ids[lo:hi])
                save_npy(out / npy, vecs.astype(dtype))  # written last: its presence marks the part done
            else:
                advance(hi - lo)
    return finalize(out, corpus, encoder.dim)


def finalize(out: Path, corpus: Corpus, dim: int) -> dict | None:
    """Write the manifest if every part is complete (else return None)."""
    plan = read_json(out / "encoding.json")
    part_size = plan["part_size"]
    n_parts = max(1, -(-len(corpus) // part_size))
    parts, files = [], []
    for i in range(n_parts):
        count = min(len(corpus), (i + 1) * part_size) - i * part_size
        if not _part_ok(out, i, count, dim):
            return None
        npy, ids = _part_names(i)
        parts.append({"vectors": npy, "ids": ids, "count": count})
        files += [npy, ids]
    return write_manifest(out, KIND, files + ["encoding.json"], dim=dim, count=len(corpus), dtype=plan["dtype"],
                          encoder=plan["encoder"], question_encoder=plan["question_encoder"],
                          corpus=plan["corpus"], parts=parts)  # fmt: skip


def _part_ok(out: Path, i: int, count: int, dim: int) -> bool:
    npy, ids = _part_names(i)
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

    def parts(self):
        """Yield ``(ids, vectors)`` per part file; vectors are memory-mapped."""
        for part in self.manifest.get("parts") or self.manifest["shards"]:  # "shards": densepr 0.1's name
            vecs = np.load(self.directory / part["vectors"], mmap_mode="r", allow_pickle=False)
            ids = read_ids(self.directory / part["ids"])
            if vecs.shape != (part["count"], self.dim) or len(ids) != part["count"]:
                raise DenseprError(f"{self.directory / part['vectors']}: shape {vecs.shape} does not match the manifest")
            yield ids, vecs
