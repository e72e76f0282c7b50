"""One progress-bar helper for every long stage (rich, on stderr; silent when disabled)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs, progress and errors go to stderr; when piped to a file, keep lines long rather than wrapped.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def set_quiet(quiet: bool = True) -> None:
    """``--quiet``: no progress bars and no log lines on stderr, here and in the libraries that draw their
    own (Hugging Face, tqdm); results (stdout) still print, and so do errors (:func:`densepr.cli.main`
    un-quiets the console for them)."""
    console.quiet = quiet
    # read when those libraries are first imported, which the CLI does lazily, after this; restored when un-quieted
    for name, value in _QUIET_ENV.items():
        if quiet and name not in _saved_env:
            _saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        elif not quiet and name in _saved_env:
            old = _saved_env.pop(name)
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
_saved_env: dict[str, str | None] = {}


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with count, rate and time left when ``enabled`` (and not ``--quiet``)."""
    if not enabled or console.quiet:
        yield lambda n: None
        return
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:,.0f} {unit}/s")

        yield advance
