"""Progress display for long work (capture, passes, export, checks), on stderr; silent when quiet."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def bar(total: int, description: str) -> Iterator[Callable[..., None]]:
    """A progress bar of `total` steps; yields `advance()`. Plain lines when not on a terminal."""
    if _quiet:
        yield lambda *_: None
        return
    if not _console.is_terminal:
        done = [0]

        def advance(*_):
            done[0] += 1
            _console.print(f"  {description}: {done[0]}/{total}")

        yield advance
        return
    from rich.progress import Progress

    with Progress(console=_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda *_: progress.advance(task)


def info(message: str) -> None:
    if not _quiet:
        _console.print(message)


def warn(message: str) -> None:
    print(f"dittofx: warning: {message}", file=sys.stderr)
