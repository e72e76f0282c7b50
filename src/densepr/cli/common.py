"""What every command shares: the typer apps, the options used by several commands, and the
checks of output paths (before any work), the default index and one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from densepr.errors import ConfigError, DenseprError
from densepr.progress import console, set_quiet
from densepr.retrieve.modes import Mode

app = typer.Typer(
    name="densepr", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Dense Passage Retrieval end to end: data, BM25, dual encoders, FAISS, hybrid retrieval, DPR evaluation.",
)  # fmt: skip
data_app = typer.Typer(no_args_is_help=True, help="Fetch the embedded benchmark; convert and split passage files.")
index_app = typer.Typer(no_args_is_help=True, help="Build BM25 and dense (FAISS) indexes.")
app.add_typer(data_app, name="data")
app.add_typer(index_app, name="index")


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("densepr")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from densepr import __version__ as v
        typer.echo(f"densepr {v}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print densepr's version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars or log lines (stderr); results and errors still print. "
                                                       "Also accepted after the command, e.g. `densepr index bm25 ... --quiet`.")] = False,
) -> None:  # fmt: skip
    if quiet:
        set_quiet()

# stdout: tables and results (wide when piped, so tables stay readable); logs and errors: stderr.
out = Console(width=None if sys.stdout.isatty() else 160)

CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache root (default $DENSEPR_CACHE or ~/.cache/densepr).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="torch device (default: cuda if available, else cpu).")]
PrecisionOpt = Annotated[str, typer.Option(help="Reader weights when reading: fp32, bf16, or auto (bf16 on CPUs with native bf16, AVX512-BF16/AMX: "
                                                "1.64x faster reading measured there, 98.6% of spans identical; benchmarks/reader/reader_precision.py).")]
TrainPrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, or bf16 autocast on the CPU (auto: where the CPU has native bf16; 1.4x a step measured "
                                                                   "there, benchmarks/training/train_precision.py; weights and optimizer stay float32).")]  # fmt: skip
DEFAULT_INDEX = Path("runs/embedded")  # `make reproduce`'s output
TRAINED_INDEX = Path("runs/dpr")  # `make reproduce-dpr`'s: the trained retriever (and reader/)


def _index(index: Optional[Path]) -> Path:
    """--index, else the trained retriever's index when `make reproduce-dpr` built it, else `make reproduce`'s."""
    if index is not None:
        return index
    from densepr.retrieve.index_dir import IndexDir

    return TRAINED_INDEX if IndexDir(TRAINED_INDEX).dense_manifest_path.is_file() else DEFAULT_INDEX
IndexOpt = Annotated[Optional[Path], typer.Option(help="Index directory: passages.tsv, bm25/, dense/, hybrid.json (default: runs/dpr if `make reproduce-dpr` built it, else runs/embedded).")]
_MODES = ", ".join(Mode.values())
ModeOpt = Annotated[Optional[str], typer.Option(help=f"Retrieval mode: {_MODES} (default: hybrid when both indexes exist).")]


def _default(cls: type, name: str) -> Any:
    """The default of dataclass field ``cls.name``: options fall back to the one definition in the library."""
    field = cls.__dataclass_fields__[name]
    return field.default if field.default is not MISSING else field.default_factory()


@contextmanager
def _options(**renamed: str) -> Iterator[None]:
    """A library config's :class:`ConfigError` worded with the option that set the field: ``--max-k`` for
    ``max_k``, or the option named here where the names differ (``timeout_s="--timeout"``)."""
    try:
        yield
    except ConfigError as e:
        raise DenseprError(f"{renamed.get(e.field, '--' + e.field.replace('_', '-'))} {e.problem}") from None


def _log(msg: str) -> None:
    console.print(f"[dim]{msg}[/dim]")


def _check_output(path: Optional[Path], kind: str, what: str, inputs: tuple[Optional[Path], ...] = ()) -> None:
    """Refuse, before any work, an output path that cannot be written as ``kind`` (``file`` or ``dir``).

    Checks only the shape of the path: a file output that is a directory, a directory output that
    is a file, the current directory (or one above it), the same path as an input, and the
    nearest existing parent (parents are created) being a file or not writable. Whether an
    existing directory holds an artefact of the right kind is each artefact's own check.
    """
    if path is None:
        return
    p = Path(path)
    absolute = Path.cwd() / p
    if kind == "file" and p.is_dir():
        raise DenseprError(f"{path}: is a directory; give a file name for the {what}")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise DenseprError(f"{path}: is a file, not a directory; give a directory (new or from an earlier run) for the {what}")
    if kind == "dir" and p.exists() and (p.resolve() == Path.cwd().resolve() or p.resolve() in Path.cwd().resolve().parents):
        raise DenseprError(f"{path}: is the current directory{'' if p.resolve() == Path.cwd().resolve() else ' or above it'}; "
                           f"give a directory of its own for the {what}")  # fmt: skip
    for i in inputs:
        if i is not None and Path(i).exists() and p.exists() and p.resolve() == Path(i).resolve():
            raise DenseprError(f"{path}: is also an input of this command; give another path for the {what}")
    parent = next((a for a in absolute.parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DenseprError(f"{path}: cannot be created, {os.path.normpath(parent)} is a file")
    writable = p if kind == "dir" and p.is_dir() else parent
    if writable is not None and not os.access(writable, os.W_OK | os.X_OK):
        raise DenseprError(f"{path}: cannot write in {os.path.normpath(writable)} (permission denied or read-only)")


def _check_outputs_differ(*paths: Optional[Path]) -> None:
    given = [p for p in paths if p is not None]
    for i, a in enumerate(given):
        for b in given[i + 1 :]:
            if (Path.cwd() / a).resolve() == (Path.cwd() / b).resolve():
                raise DenseprError(f"{a}: given as two outputs ({a} and {b}); one would overwrite the other")



def _load_qa(spec: str, limit: int | None, regex: bool | None, cache_dir: Path | None):
    from densepr.data import EmbeddedData

    return EmbeddedData(cache_dir).resolve_qa(spec, limit, None if regex is None else ("regex" if regex else "string"))


RegexOpt = Annotated[Optional[bool], typer.Option("--regex/--no-regex", help="Answers are regexes (default: yes for CuratedTREC files).")]


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise DenseprError(f"{option} {text!r}: expected comma-separated positive integers") from None
    if not values or values[0] <= 0:
        raise DenseprError(f"{option} {text!r}: expected comma-separated positive integers")
    return values



def _error_line(e: BaseException) -> str:
    """One line for an error: an OSError as ``file: what happened`` (e.g. ``out.json: No space left on device``)."""
    if isinstance(e, OSError) and e.strerror:
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{files}: {e.strerror}" if files else f"{e.strerror} (errno {e.errno})"
    return " ".join(str(e).split("\n"))
