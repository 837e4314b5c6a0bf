"""Progress display for long work (capture, passes, export, checks), on stderr; silent when quiet."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

from rich.console import Console

_console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def console() -> Console:
    return _console


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    """Show `title` with a spinner while the block runs, then a check mark and the time it took."""
    if _quiet:
        yield
        return
    start = time.perf_counter()
    if _console.is_terminal:
        with _console.status(f"{title} ..."):
            yield
    else:
        yield
    _console.print(f"[green]✓[/green] {title} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def track(iterable, total: int | None = None, description: str = "working"):
    """A progress bar over `iterable` (rich), or the plain iterable when quiet or not on a terminal."""
    if _quiet or not _console.is_terminal:
        return iterable
    from rich.progress import track as rich_track

    return rich_track(iterable, total=total, description=description, console=_console, transient=True)


def info(message: str) -> None:
    if not _quiet:
        _console.print(message)


def warn(message: str) -> None:
    print(f"dittofx: warning: {message}", file=sys.stderr)
