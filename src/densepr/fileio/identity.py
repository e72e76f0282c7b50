"""The identity of a file or a set of files: the one rule every fingerprint of files goes through.

:func:`file_identity` walks the files (a file itself, a directory's files recursively), sorts them
by path and gives each its relative name and one of three content identities:

* ``"sha256"``: the content's sha256 (a reader export's fingerprint, reproduce's encoder weights,
  a stage's record of its outputs): exact, read whole.
* ``"quick"``: the sha256 below ``QUICK_HASH_BYTES`` (16 MiB), else ``[size, mtime_ns]`` (reading
  keys, :func:`densepr.pipeline.reading_key`): a key computed at every call, where hashing a 21M-passage
  corpus or a model's weights would take long.
* ``"head"``: ``(size, first HEAD_BYTES bytes)``: what a passage encoder's ``weights_id`` hashes
  (:func:`densepr.index.embeddings.weights_id`); cheap, and differs between checkpoints.

The values these give are stored on disk (reading keys, ``weights_id`` in embeddings and index manifests,
stage fingerprints): a rule here never changes; a new one is added under a new name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from densepr.fileio.manifest import sha256_file

QUICK_HASH_BYTES = 16 << 20  # "quick": files below this are identified by content, larger ones by size and time
HEAD_BYTES = 1 << 20  # "head": bytes read from the start of each file

Rule = Literal["sha256", "quick", "head"]
RULES = ("sha256", "quick", "head")


def file_identity(root: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]], rule: Rule = "sha256") -> list[tuple[str, Any]]:
    """``[(name relative to root, identity), ...]`` of each file under ``paths`` (a file, or a directory's
    files recursively; a missing path is skipped), sorted by path, each file once; ``rule`` as in the module
    docstring."""
    if rule not in RULES:
        raise ValueError(f"file identity rule {rule!r}: one of {', '.join(RULES)}")
    files = sorted({f for p in map(Path, paths) if p.exists() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()})
    return [(os.path.relpath(f, root), _identity(f, rule)) for f in files]


def _identity(f: Path, rule: Rule) -> Any:
    if rule == "sha256":
        return sha256_file(f)
    st = f.stat()
    if rule == "quick":
        return sha256_file(f) if st.st_size < QUICK_HASH_BYTES else [st.st_size, st.st_mtime_ns]
    with open(f, "rb") as fh:
        return st.st_size, fh.read(HEAD_BYTES)
