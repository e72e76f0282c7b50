"""What a model directory holds, told from its ``config.json`` alone (nothing loaded, no torch imported)."""

from __future__ import annotations

import os
from pathlib import Path

from densepr.fileio.atomic import read_json


def is_reader_dir(path: str | os.PathLike[str]) -> bool:
    """``path`` holds a DPR reader (a Hugging Face ``DPRReader`` checkpoint: what ``densepr train-reader`` saves),
    not an encoder: ``densepr export-onnx`` exports it as a reader."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = read_json(config)  # malformed JSON: a located InputError
    return isinstance(data, dict) and "DPRReader" in (data.get("architectures") or [])
