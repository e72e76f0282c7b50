"""How an index names its question encoder, so that the index directory can be copied or moved.

Embeddings and dense-index manifests keep ``question_encoder`` (the encoder's absolute path when
encoding ran, as older densepr wrote it, and what older readers use) and add ``question_encoder_info``:
the encoder's identity by content (:func:`densepr.index.embeddings.encoder_info`: weights id, pooling,
dimension, its path) and, once saved as a dense index, ``relative_path``: the encoder's folder relative
to the index's own directory. An index copied or moved together with its encoder, or holding it
(``densepr index dense --bundle-encoder`` copies it to ``question_encoder/`` inside), keeps working.

:func:`load_recorded` finds the encoder: the relative path, then the absolute one; the first folder
there whose weights id is the manifest's is loaded (a different encoder at either place is refused,
never used silently). When none is found, the error names the manifest and ``--question-encoder``,
which gives the encoder explicitly (and skips this lookup).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from densepr.errors import DenseprError, MismatchError
from densepr.fileio import MANIFEST, remove_tree
from densepr.index.embeddings import QE_KEY as KEY
from densepr.index.embeddings import encoder_info

BUNDLE_DIR = "question_encoder"  # where --bundle-encoder puts the encoder, inside the dense index


def describe(encoder) -> dict:
    """The manifest entries naming ``encoder`` as the question encoder: path, and identity by content."""
    return {"question_encoder": encoder.name, KEY: encoder_info(encoder)}


def with_relative_path(manifest: dict, directory: str | os.PathLike[str]) -> dict:
    """``manifest`` with the question encoder's path relative to ``directory`` (where it is being saved)
    added to its ``question_encoder_info``; unchanged when it records no path."""
    info = dict(manifest.get(KEY) or {})
    if info.get("relative_path") == BUNDLE_DIR:
        return manifest  # bundled: it travels inside the index
    absolute = info.get("path") or manifest.get("question_encoder")
    if not absolute or not Path(absolute).is_absolute():
        return manifest
    info.setdefault("path", absolute)
    info["relative_path"] = Path(os.path.relpath(absolute, Path(directory).resolve())).as_posix()
    return {**manifest, KEY: info}


def candidates(manifest: dict, directory: str | os.PathLike[str]) -> list[Path]:
    """Where the question encoder may be, in the order tried: relative to ``directory``, then absolute."""
    info = manifest.get(KEY) or {}
    out = []
    if info.get("relative_path"):
        out.append(Path(os.path.normpath(Path(directory) / info["relative_path"])))
    for p in (info.get("path"), manifest.get("question_encoder")):
        if p and Path(p) not in out:
            out.append(Path(p))
    return out


def locate(manifest: dict, directory: str | os.PathLike[str]) -> Path:
    """The folder of the question encoder ``directory/manifest.json`` records: the first place tried (see
    :func:`candidates`) that holds a model whose weights id is the manifest's; nothing is loaded (what a
    process that loads it elsewhere, a Ray replica, needs).

    Raises:
        MismatchError: an encoder is there but its weights are not the ones the index was built with.
        DenseprError: no encoder at any recorded place.
    """
    from densepr.index.embeddings import weights_id

    mpath = Path(directory) / MANIFEST
    want = (manifest.get(KEY) or {}).get("weights_id")
    tried = candidates(manifest, directory)
    wrong = []
    for path in tried:
        if not (path / "config.json").is_file():
            continue
        if want and (got := weights_id(path)) != want:
            wrong.append(f"{path} (weights {got})")
            continue
        return path
    if wrong:
        raise MismatchError(f"{mpath}: the question encoder found is not the one this index was built with (weights {want}): "
                            f"{'; '.join(wrong)}; pass --question-encoder DIR to use another encoder on purpose")  # fmt: skip
    where = " nor ".join(str(p) for p in tried) or "(no path recorded)"
    raise DenseprError(f"{mpath}: the question encoder this index was built with is not at {where} (moved or deleted?); "
                       "pass --question-encoder DIR with its model directory")  # fmt: skip


def load_recorded(manifest: dict, directory: str | os.PathLike[str], device: str | None = None):
    """The question encoder ``directory/manifest.json`` records, found by :func:`locate` and loaded.

    Raises:
        MismatchError, DenseprError: as :func:`locate`; DenseprError also when it is a DPR context encoder.
    """
    from densepr.models.encoder import Encoder, check_question_encoder

    path = locate(manifest, directory)
    enc = Encoder.load(path, device=device)
    check_question_encoder(enc, f"{Path(directory) / MANIFEST}: question encoder {path}")
    return enc


def set_question_encoder(index, path: str | os.PathLike[str]) -> None:
    """Record the encoder at ``path`` as ``index``'s question encoder (its vectors must have the index's size)."""
    from densepr.models.encoder import Encoder, check_question_encoder

    enc = Encoder.load(path, device="cpu")
    check_question_encoder(enc)
    if enc.dim != index.dim:
        raise MismatchError(f"{path}: gives {enc.dim}-d vectors, the index holds {index.dim}-d ones; not its question encoder")
    index.manifest.update(describe(enc))


def save_bundled(index, directory: str | os.PathLike[str]) -> None:
    """Save ``index`` at ``directory`` with a copy of its question encoder in ``question_encoder/``.

    The manifest names the copy first; the copy is made beside it and renamed in whole, so until it
    is complete the index still finds the encoder at its recorded absolute path."""
    from densepr.models.encoder import TOKENIZER_FILES, tokenizer_dir

    src = Path(load_recorded(index.manifest, directory, "cpu").name)  # the encoder found, its weights checked
    index.manifest[KEY] = {**(index.manifest.get(KEY) or {}), "relative_path": BUNDLE_DIR}
    index.save(directory)
    final = Path(directory) / BUNDLE_DIR
    tmp = final.with_name(f".{BUNDLE_DIR}.copying-{os.getpid()}")
    remove_tree(tmp)
    shutil.copytree(src, tmp, symlinks=False)
    if tokenizer_dir(src) != src:  # Tevatron keeps the tokenizer beside its towers: the copy holds it
        for name in TOKENIZER_FILES + ("special_tokens_map.json",):
            if (tokenizer_dir(src) / name).is_file():
                shutil.copyfile(tokenizer_dir(src) / name, tmp / name)
    remove_tree(final)
    os.rename(tmp, final)
