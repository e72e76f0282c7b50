"""What a model directory holds, told from its ``config.json`` alone (nothing loaded, no torch imported)."""

from __future__ import annotations

import os
from pathlib import Path

from densepr.fileio.atomic import read_json


def is_reader_dir(path: str | os.PathLike[str]) -> bool:
    """``path`` holds a reader (a Hugging Face ``DPRReader`` checkpoint, or a torch model directory with
    densepr's reader settings beside it: what ``densepr train-reader`` saves), not an encoder:
    ``densepr export-onnx`` exports it as a reader. An ONNX export (no ``config.json``) is neither."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    data = read_json(path / "config.json")  # malformed JSON: a located InputError
    return (isinstance(data, dict) and "DPRReader" in (data.get("architectures") or [])) or (path / "densepr_reader.json").is_file()
