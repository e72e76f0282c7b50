"""Errors meant for the user: the CLI prints their message, never a traceback."""

from __future__ import annotations

from os import PathLike


class DenseprError(Exception):
    """Base class of every error densepr raises on purpose (bad input, missing files, mismatches)."""


class InputError(DenseprError):
    """A malformed input file, located as precisely as we can.

    Args:
        path: the file being read.
        message: what is wrong and what was expected.
        line: 1-based line (or record) number, when known.
        field: the offending field or column, when known.
        unit: what ``line`` counts ("line" or "record").
    """

    def __init__(
        self,
        path: str | PathLike[str],
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f", {unit} {line}" if line is not None else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class MismatchError(DenseprError):
    """Two artefacts that must agree do not (index vs encoder dimension, shards of different models)."""


class ConfigError(DenseprError):
    """A setting out of its range. ``field`` names the dataclass field, so a front end can name its own
    option instead (the CLI: ``--max-k`` for ``max_k``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")
