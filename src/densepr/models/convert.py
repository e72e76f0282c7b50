"""``densepr convert``: a checkpoint that ships only ``pytorch_model.bin`` rewritten with ``model.safetensors``.

Many Hub checkpoints, older ones especially, and Haystack's and Tevatron's folders ship their weights as
``pytorch_model.bin`` (a pickle). densepr reads those through torch's ``weights_only`` unpickler
(:func:`densepr.models.hf.bin_state_dict`: tensors only, a file holding any other object is refused);
``convert`` does that once and writes the tensors as safetensors, so that every later load (densepr's,
transformers', sentence-transformers') reads no pickle at all.

The folder is copied file by file into a new directory (built beside it, moved into place whole:
:func:`densepr.fileio.atomic_dir`), sub-folders included (a two-tower checkpoint's ``query_encoder/`` +
``passage_encoder/``, sentence-transformers' ``1_Pooling/``): in each folder, ``pytorch_model*.bin`` (one
file or shards) becomes one ``model.safetensors``; config, tokenizer and settings files are copied as
they are; other frameworks' copies of the weights (TensorFlow, Flax, ONNX, ...) and training state
(``optimizer.pt``, ``training_args.bin``, ...) are left out; any other pickle (``*.pt``, ``*.pkl``, ...,
e.g. Tevatron's ``pooler.pt``) is refused, naming it: densepr would not use it, so a copy without it
would compute other vectors. No manifest is written (as a checkpoint from elsewhere has none).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from densepr.errors import DenseprError
from densepr.fileio import MANIFEST, atomic_dir
from densepr.models.hf import bin_state_dict

KIND = "converted checkpoint"
WEIGHTS = "model.safetensors"
BIN = re.compile(r"^pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?$")  # the weights (and a sharded file's index)
TRAINING_STATE = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
OTHER_FRAMEWORKS = (".h5", ".msgpack", ".ot", ".onnx", ".ckpt", ".tflite", ".mlmodel")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".joblib")


def default_output(source: str | os.PathLike[str]) -> Path:
    """Where ``densepr convert DIR`` writes without ``-o``: ``DIR-safetensors`` beside it (the input stays as it was)."""
    source = Path(source)
    return source.parent / f"{source.resolve().name}-safetensors"


def _plan(source: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """``(folders to convert, files to copy, files left out)``, relative to ``source``; a pickle densepr
    would not read is refused."""
    convert, copy, left = [], [], []
    for root, dirs, files in os.walk(source, followlinks=True):
        dirs.sort()
        here = Path(root)
        has_safetensors = any(f.endswith(".safetensors") for f in files)
        for name in sorted(files):
            rel = (here / name).relative_to(source)
            if BIN.match(name):
                if not has_safetensors and rel.parent not in convert:
                    convert.append(rel.parent)
                elif has_safetensors:
                    left.append(rel)  # transformers reads the safetensors beside it
            elif name == MANIFEST or TRAINING_STATE.match(name) or name.endswith(OTHER_FRAMEWORKS):
                left.append(rel)
            elif name.endswith(PICKLES):
                raise DenseprError(f"{here / name}: not converted: densepr converts only pytorch_model*.bin, and would not "
                                   "use this file; remove it from a copy of the checkpoint if it is not needed")  # fmt: skip
            else:
                copy.append(rel)
    return convert, copy, left


def _tensors(folder: Path) -> dict:
    """The folder's weights as safetensors takes them: a flat dict of contiguous tensors, none sharing memory
    (tied weights, saved once by torch, are stored twice; transformers ties them again on load)."""
    import torch

    state = bin_state_dict(folder) or {}
    out, seen = {}, set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DenseprError(f"{folder}: pytorch_model.bin is not a Hugging Face state dict ({key!r} holds a "
                               f"{type(value).__name__}, not a tensor)")  # fmt: skip
        value = value.contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    if not out:
        raise DenseprError(f"{folder}: pytorch_model.bin holds no tensors")
    return out


def convert_checkpoint(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict:
    """Write ``out``: ``source`` with each ``pytorch_model*.bin`` as ``model.safetensors`` (see the module docstring).

    Returns ``{"converted": [folders], "copied": n, "left_out": [files]}``. Raises :class:`DenseprError`
    for a source with no ``pytorch_model.bin`` to convert, a pickle payload (refused unread by
    :func:`bin_state_dict`) or another pickle; an existing non-empty ``out`` is never replaced.
    """
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise DenseprError(f"{source}: {'not found' if not source.exists() else 'not a directory'}; give a checkpoint folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DenseprError(f"{out}: already exists; refusing to replace it (convert writes a new directory: give another, or delete it first)")
    convert, copy, left = _plan(source)
    if not convert:
        has = "it already has safetensors weights" if any(source.rglob("*.safetensors")) else "no pytorch_model*.bin in it"
        raise DenseprError(f"{source}: nothing to convert ({has})")
    with atomic_dir(out, KIND, manifest=False) as tmp:  # a refused file below: nothing left at out
        for folder in convert:
            (tmp / folder).mkdir(parents=True, exist_ok=True)
            save_file(_tensors(source / folder), str(tmp / folder / WEIGHTS), metadata={"format": "pt"})  # "pt": what transformers expects
        for rel in copy:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, tmp / rel)  # a link (the Hub cache's) copied as the file it points to
    return {"converted": [str(f) for f in convert], "copied": len(copy), "left_out": [str(f) for f in left]}
