"""Hugging Face checkpoints in and out, devices and mixed precision: one policy for every model.

Both towers of the bi-encoder and the reader are Hugging Face model directories
(``config.json``, safetensors weights, tokenizer files, plus densepr's own settings file and a
``manifest.json``). Loading never runs remote code and never unpickles objects (a ``pytorch_model.bin``
from elsewhere is read by torch's ``weights_only`` unpickler: tensors only, see :func:`bin_state_dict`); a
directory with a manifest is checked against it first, so a truncated or altered file is refused with a message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from densepr.errors import DenseprError
from densepr.fileio.dirs import writable_dir
from densepr.fileio.manifest import check_dir_manifest, write_dir_manifest


def quiet_transformers() -> None:
    """No download bars or advisory warnings from transformers (we load local directories only)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("fp32", "bf16", "auto")


def cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX), as oneDNN sees them."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, flag: str = "precision") -> str:
    """``precision`` when it is one of :data:`PRECISIONS`; else one clear error naming ``flag``."""
    if precision not in PRECISIONS:
        raise DenseprError(f"{flag} {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def inference_dtype(device: torch.device, precision: str = "fp32") -> torch.dtype:
    """The weights' dtype for inference on ``device``. ``fp32``: as trained. ``bf16``: bfloat16 weights
    (on a CPU without native bf16 this is emulated and slower). ``auto``: bfloat16 on CPUs with native
    bf16, where reading measured 1.64x faster (benchmarks/reader/reader_precision.py), else float32. GPUs
    keep float32 weights either way: :func:`autocast` already runs them in half precision."""
    if device.type != "cpu" or check_precision(precision) == "fp32":
        return torch.float32
    return torch.bfloat16 if precision == "bf16" or cpu_has_bf16() else torch.float32


def autocast(device: torch.device, training: bool = False, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The mixed-precision policy: bfloat16 on GPUs that have it; for inference float16 on
    older GPUs (no gradients to underflow); float32 on the CPU unless ``precision`` asks for bf16
    autocast there (``bf16``, or ``auto`` on a CPU with native bf16: a step measured 1.4x faster,
    benchmarks/training/train_precision.py, and a reader so trained as accurate, docs/training.md). Inference on such a
    CPU can use bf16 weights instead (:func:`inference_dtype`)."""
    if device.type != "cuda":
        if inference_dtype(device, precision) == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext() if training else torch.autocast("cuda", dtype=torch.float16)


def check_model_dir(path: str | os.PathLike[str], kind: str) -> Path:
    """``path`` as a Path, after checking it is a Hugging Face directory and matches its manifest."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise DenseprError(f"{path}: not a Hugging Face model directory (no config.json); "
                           "give a directory with config.json, weights and tokenizer files")  # fmt: skip
    check_dir_manifest(path, (kind,))  # a truncated or altered file is refused here, clearly
    return path


def bin_state_dict(path: Path) -> dict | None:
    """The weights of a checkpoint that ships only ``pytorch_model.bin`` (older Hub checkpoints, Haystack's,
    Tevatron's), else None (safetensors are read by transformers). Read with torch's ``weights_only``
    unpickler, which builds tensors only: a file holding any other object (code to run) is refused."""
    if any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("pytorch_model*.bin"))  # one file, or the shards of a large checkpoint
    if not files:
        return None
    state: dict = {}
    for f in files:
        try:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # pickle's UnpicklingError (not imported: no pickle here) for any non-tensor object
            if type(e).__name__ == "UnpicklingError":
                raise DenseprError(f"{f}: refused: it holds Python objects besides tensors, which could run code when "
                                   "loaded; save the weights as safetensors where the checkpoint is trusted") from None  # fmt: skip
            raise DenseprError(f"{f}: cannot read the weights: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return state


@contextlib.contextmanager
def load_errors(path: Path, what: str) -> Iterator[None]:
    """Turn transformers' loading errors into one clear :class:`DenseprError` naming ``path``."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise DenseprError(f"{path}: cannot load the {what}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # transformers: weight shapes differ from config.json
        raise DenseprError(f"{path}: the weights do not match config.json (wrong or corrupt checkpoint): "
                           f"{str(e).splitlines()[0]}") from None  # fmt: skip


def check_vocab(path: Path, tokenizer, model) -> None:
    """A tokenizer with more tokens than the model's embedding table belongs to another model."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise DenseprError(f"{path}: tokenizer has {len(tokenizer)} tokens but the model only {vocab}; "
                           "the tokenizer does not belong to this model")  # fmt: skip


# The files of a Hugging Face model directory (weights, tokenizer, sentence-transformers and densepr
# settings): one without a manifest (downloaded, or an interrupted save) that holds only these may be saved over.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
               "sentencepiece.bpe.model", "spiece.model", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "densepr_*.json", "validation.json", "1_Pooling/", "2_Normalize/")


def save_model_dir(path: str | os.PathLike[str], model, tokenizer, save_settings: Callable[[Path], None], kind: str, **meta) -> None:
    """Write weights (safetensors), tokenizer, densepr's settings, then the manifest (last: complete).

    ``path`` must be new, empty, or a model directory (a ``kind`` manifest, or only :data:`MODEL_FILES`):
    a folder densepr did not write, or another artefact, is refused untouched (``fileio.writable_dir``;
    a symbolic link is judged by its target)."""
    path = writable_dir(path, kind, MODEL_FILES)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    save_settings(path)
    write_dir_manifest(path, kind, **meta)
