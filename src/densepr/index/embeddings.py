"""The encode stage: passage vectors written as ``.npy`` shards with their ids.

Layout of an embeddings directory::

    encoding.json          # written first: encoder, corpus fingerprint, part size, dtype (for resuming)
    part-00000.npy         # float32 (or float16) [rows, dim], rows in corpus order
    part-00000.ids         # the passage id of each row, one per line (UTF-8)
    ...
    manifest.json          # written last: dim, count, dtype, part list, sizes and sha256

Each part is written atomically, so a killed run resumes at the first missing part, and
several processes (``--shard-id/--num-shards`` or ``torchrun``) can fill one directory.

Re-encoding over a complete embeddings directory (another encoder, corpus, part size or
dtype; or a damaged part) never touches it: the new parts go to ``NAME.building`` beside it
(resumable the same way, shared by the shard processes), and whichever process completes the
last part swaps the new directory in (``fileio.install_dir``); a dense index or server reading
the old vectors keeps them until it reloads. Encoding the same corpus with the same encoder over
a complete directory does nothing. A directory that holds anything else than embeddings is
refused, never overwritten.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densepr.data.passages import Corpus, check_corpus
from densepr.data.store import StreamedCorpus
from densepr.errors import DenseprError, MismatchError
from densepr.fileio.atomic import read_json, save_npy, write_json
from densepr.fileio.dirs import check_target, install_dir, remove_tree, sibling_abandoned, sibling_prefix
from densepr.fileio.identity import file_identity
from densepr.fileio.ids import open_ids, write_ids
from densepr.fileio.manifest import MANIFEST, check_file, read_manifest, write_manifest
from densepr.models.encoder import Encoder
from densepr.progress import progress_bar

KIND = "embeddings"
OWN_FILES = ("encoding.json", "part-*.npy", "part-*.ids")  # what encoding writes before the manifest
QE_KEY = "question_encoder_info"  # the question encoder by content, beside its path (see index.encoder_ref)


def weights_id(directory: str | os.PathLike[str]) -> str:
    """The ``weights_id`` of the encoder saved in ``directory`` (16 hex digits): its ``*.safetensors`` files'
    names, sizes and first MiB (:func:`~densepr.fileio.identity.file_identity`, rule ``head``: cheap, and
    differs between checkpoints); for a checkpoint with only ``pytorch_model*.bin`` (models.hf.bin_state_dict),
    those files. Stored in embeddings and index manifests: never change it."""
    h = hashlib.sha256()
    root = Path(directory)
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin")) if root.is_dir() else []
    for name, (size, head) in file_identity(root, files, "head"):
        h.update(name.encode())
        h.update(str(size).encode())
        h.update(head)
    return h.hexdigest()[:16]


def encoder_info(encoder: Encoder) -> dict:
    """What identifies an encoder in manifests: path, pooling, dimension and a weights hash (:func:`weights_id`)."""
    return {"path": encoder.name, "pooling": encoder.config.pooling, "normalize": encoder.config.normalize,
            "max_length": encoder.config.max_length, "dim": encoder.dim, "weights_id": weights_id(encoder.name)}  # fmt: skip


def _part_names(i: int) -> tuple[str, str]:
    return f"part-{i:05d}.npy", f"part-{i:05d}.ids"


def shard_parts(n_parts: int, shard_id: int, num_shards: int) -> range:
    """The contiguous block of parts process ``shard_id`` of ``num_shards`` encodes."""
    if not 0 <= shard_id < num_shards:
        raise DenseprError(f"shard id {shard_id} is not in 0..{num_shards - 1}")
    bounds = np.linspace(0, n_parts, num_shards + 1).astype(int)
    return range(int(bounds[shard_id]), int(bounds[shard_id + 1]))


def process_share(shard_id: int | None, num_shards: int | None, device: str | None) -> tuple[int, int, str | None, bool]:
    """This process's share of an encoding: ``(shard_id, num_shards, device, show_progress)``.

    Under torchrun (``WORLD_SIZE`` > 1) with no shard given, each process encodes shard ``RANK`` of
    ``WORLD_SIZE``, on ``cuda:LOCAL_RANK`` when there is a GPU, else with its share of the CPU's
    threads (set here). Otherwise the shard given (default: all, shard 0 of 1). Only rank 0 shows progress.
    """
    import torch

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and shard_id is None and num_shards is None:
        shard_id, num_shards = rank, world  # one shard per torchrun process
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if device in (None, "cpu"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return shard_id or 0, num_shards or 1, device, rank == 0 or world == 1


def encode_corpus(
    encoder: Encoder,
    corpus: Corpus | StreamedCorpus,
    out_dir: str | os.PathLike[str],
    *,
    question_encoder: Encoder | str | None = None,
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
        corpus: the passages, in the order rows will be written; read part by part (:meth:`Corpus.blocks`),
            so a passage store or a :class:`~densepr.data.store.StreamedCorpus` file is never held whole.
        out_dir: the embeddings directory.
        question_encoder: the matching E_Q (default: ``encoder``, one model for both), recorded by path and
            weights id so retrieval pairs them (``index.encoder_ref``); a path alone is recorded as it is.
        part_size: passages per part file.
        batch_size: passages per forward pass.
        dtype: ``float32`` or ``float16`` storage.
        shard_id, num_shards: this process's share of the parts.
        show_progress: draw a progress bar.

    Returns:
        The manifest when every part is complete, else None (other shards still to run).
    """
    final = Path(out_dir)
    plan = encoding_plan(encoder, corpus, question_encoder, part_size, dtype)
    out = prepare(final, plan)
    if isinstance(out, dict):
        return out  # already complete with the same settings
    n = len(corpus)
    mine = shard_parts(max(1, -(-n // part_size)), shard_id, num_shards)
    todo = [i for i in mine if not _part_ok(out, i, _part_count(n, i, part_size), encoder.dim)]
    label = "encode passages" + (f" (shard {shard_id + 1}/{num_shards})" if num_shards > 1 else "")
    with progress_bar(sum(_part_count(n, i, part_size) for i in mine), label, show_progress, unit="psg") as advance:
        advance(sum(_part_count(n, i, part_size) for i in mine if i not in todo))
        for i, ids, titles, texts in corpus.blocks(part_size, todo):  # only the missing parts' passages are held, one at a time
            if not _part_ok(out, i, len(ids), encoder.dim):  # another process may have written it since
                write_part(out, i, ids, encoder.encode_passages(titles, texts, batch_size, progress=advance), dtype)
            else:
                advance(len(ids))
    return complete(out, final, plan, corpus, encoder.dim)


def _part_count(n: int, i: int, part_size: int) -> int:
    return min(n, (i + 1) * part_size) - i * part_size


def encoding_plan(encoder: Encoder, corpus: Corpus | StreamedCorpus, question_encoder: Encoder | str | None, part_size: int,
                  dtype: str) -> dict:  # fmt: skip
    """What ``encoding.json`` records, and what a resumed run must match."""
    if dtype not in ("float32", "float16"):
        raise DenseprError(f"dtype must be float32 or float16, not {dtype!r}")
    if part_size <= 0:
        raise DenseprError("the part size must be positive")
    if question_encoder is None or question_encoder == encoder.name:
        question_encoder = encoder
    q = question_encoder if isinstance(question_encoder, Encoder) else None
    if q is not None and q.dim != encoder.dim:
        raise MismatchError(f"question encoder {q.name} gives {q.dim}-d vectors, passage encoder {encoder.name} "
                            f"{encoder.dim}-d: they are not two towers of one model")  # fmt: skip
    by_content = {QE_KEY: encoder_info(q)} if q is not None else {}  # a bare path: recorded as it is
    return {"encoder": encoder_info(encoder), "question_encoder": q.name if q is not None else str(question_encoder), **by_content,
            "corpus": corpus.fingerprint(), "part_size": part_size, "dtype": dtype}  # fmt: skip


def prepare(final: Path, plan: dict) -> Path | dict:
    """The directory the parts go to (``final``, or ``NAME.building`` beside a complete one of other
    settings), made and holding ``encoding.json``; or ``final``'s manifest when it is complete already."""
    check_target(final, KIND, OWN_FILES)
    out = final
    if (final / MANIFEST).is_file():  # a complete directory: done already, or re-encoded beside it
        if _same_plan(final, plan):
            try:
                return read_manifest(final, KIND)
            except DenseprError:
                pass  # a damaged part: encode again beside it, reusing the intact parts
        out = final.with_name(final.name + ".building")
        for claimed in out.parent.glob(f".{glob.escape(out.name)}.installing-*"):  # its installer was killed mid-swap
            if sibling_abandoned(claimed, out, "installing"):
                os.rename(claimed, out) if not out.exists() else remove_tree(claimed)
        check_target(out, KIND, OWN_FILES)
        if (out / "encoding.json").is_file() and not _same_plan(out, plan):
            remove_tree(out)  # an abandoned re-encode with other settings
        out.mkdir(parents=True, exist_ok=True)
        if _same_plan(final, plan):
            _reuse_parts(final, out, read_json(final / MANIFEST))
    elif (final / "encoding.json").is_file() and not _same_plan(final, plan):
        raise MismatchError(
            f"{final} holds an unfinished encoding with another encoder, corpus, part size or dtype; "
            "finish it with the same settings, or use a new directory (or delete this one)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "encoding.json").is_file():
        write_json(out / "encoding.json", plan)
    return out


def missing_parts(out: Path, corpus: Corpus | StreamedCorpus, part_size: int, dim: int) -> list[int]:
    """The parts not yet (intactly) written."""
    n = len(corpus)
    return [i for i in range(max(1, -(-n // part_size))) if not _part_ok(out, i, _part_count(n, i, part_size), dim)]


def write_part(out: Path, i: int, ids: list[str], vectors: np.ndarray, dtype: str) -> None:
    """One part: its ids, then its vectors (written last: their presence marks the part done)."""
    npy, id_file = _part_names(i)
    write_ids(out / id_file, ids)
    save_npy(out / npy, vectors.astype(dtype))


def complete(out: Path, final: Path, plan: dict, corpus: Corpus | StreamedCorpus, dim: int) -> dict | None:
    """The manifest once every part is written (installing a ``.building`` directory), else None."""
    manifest = finalize(out, corpus, dim)
    if manifest is None or out == final:
        return manifest
    return _install(out, final, plan)


def _same_plan(directory: Path, plan: dict) -> bool:
    """``directory`` was (or is being) encoded with ``plan``; one written before manifests named the
    question encoder by content (no ``question_encoder_info``) counts as the same when all else is."""
    old = _plan_of(directory)
    if old is not None and QE_KEY not in old:
        plan = {k: v for k, v in plan.items() if k != QE_KEY}
    return old == plan


def _plan_of(directory: Path) -> dict | None:
    try:
        return read_json(directory / "encoding.json")
    except DenseprError:
        return None


def _reuse_parts(old: Path, new: Path, manifest: dict) -> None:
    """Hard-link (else copy) into ``new`` the parts of ``old`` whose files match its manifest
    (sha256): parts are never rewritten in place, so sharing their files is safe."""
    entries = manifest.get("files", {})
    for part in manifest.get("parts", []):
        names = (part["ids"], part["vectors"])  # the .npy last: its presence marks the part done
        try:
            for name in names:
                check_file(old / name, entries[name], "sha256")
        except (DenseprError, KeyError):
            continue
        for name in names:
            (new / name).unlink(missing_ok=True)
            try:
                os.link(old / name, new / name)
            except OSError:
                shutil.copyfile(old / name, new / name)


def _install(build: Path, final: Path, plan: dict, wait_s: float = 60.0) -> dict | None:
    """Swap the completed ``build`` in at ``final``. With several shard processes, only the one
    that claims ``build`` (renames it) installs it; the others wait for it to appear."""
    claimed = build.with_name(sibling_prefix(build, "installing") + "x")
    try:
        os.rename(build, claimed)
    except FileNotFoundError:  # another process is installing it
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if _same_plan(final, plan) and (final / MANIFEST).is_file():
                return read_manifest(final, KIND)
            time.sleep(0.2)
        return None
    try:
        install_dir(claimed, final, KIND)
    except BaseException:
        if claimed.exists() and not build.exists():
            os.rename(claimed, build)  # not installed: leave it resumable
        raise
    return read_manifest(final, KIND, "none")


def finalize(out: Path, corpus: Corpus | StreamedCorpus, dim: int) -> dict | None:
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
                          **{k: plan[k] for k in (QE_KEY,) if k in plan}, corpus=plan["corpus"], parts=parts)  # fmt: skip


def _part_ok(out: Path, i: int, count: int, dim: int) -> bool:
    npy, ids = _part_names(i)
    if not (out / npy).is_file() or not (out / ids).is_file():
        return False
    try:
        arr = np.load(out / npy, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):
        return False
    return arr.shape == (count, dim) and len(open_ids(out / ids)) == count


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
            ids = open_ids(self.directory / part["ids"])  # mapped, decoded only when read
            if vecs.shape != (part["count"], self.dim) or len(ids) != part["count"]:
                raise DenseprError(f"{self.directory / part['vectors']}: shape {vecs.shape} does not match the manifest")
            yield ids, vecs
