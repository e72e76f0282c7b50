"""Where ``densepr evaluate-qa`` keeps a QA set's readings piece by piece while it reads them, so that a
killed run resumes: ``<output>/pieces/<set>/<key[:16]>/`` (:func:`densepr.pipeline.read_in_pieces` writes
the pieces; the key is :func:`densepr.pipeline.reading_key`, so pieces of other inputs are never reused)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from densepr.fileio.atomic import file_name
from densepr.fileio.dirs import remove_tree

PIECES = "pieces"


@dataclass
class SetPieces:
    """The pieces directory of one QA set's readings under ``output``, for inputs with reading key ``key``."""

    output: Path
    set_name: str
    key: str

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if not re.fullmatch(r"[0-9a-f]{16,}", self.key):
            raise ValueError(f"reading key {self.key!r}: expected a hex digest (densepr.pipeline.reading_key)")
        if not self.set_name:
            raise ValueError("a QA set's pieces need the set's name")

    @property
    def set_dir(self) -> Path:
        """All pieces of this set, whatever their inputs."""
        return self.output / PIECES / file_name(self.set_name)

    @property
    def directory(self) -> Path:
        """The pieces of these inputs."""
        return self.set_dir / self.key[:16]

    def open(self, resume: bool = True) -> int:
        """Make :attr:`directory`, removing pieces of other inputs (another reader, k, ...), and with
        ``resume`` False these inputs' too; returns how many finished pieces are kept."""
        for other in self.set_dir.glob("*") if self.set_dir.is_dir() else ():
            if other.name != self.key[:16] or not resume:
                remove_tree(other)
        self.directory.mkdir(parents=True, exist_ok=True)
        return len(list(self.directory.glob("readings-*.json")))

    def close(self) -> None:
        """The set's result is written: remove its pieces, and ``<output>/pieces`` once empty."""
        remove_tree(self.set_dir)
        top = self.output / PIECES
        if top.is_dir() and not any(top.iterdir()):
            top.rmdir()
