"""One progress-bar helper for every long stage (rich, on stderr; silent when disabled)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs, progress and errors go to stderr; when piped to a file, keep lines long rather than wrapped.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with count, rate and time left when ``enabled``."""
    if not enabled:
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
