"""The command line's display of long work (capture, passes, export, checks), on stderr; silent when
quiet. The library logs to `logging.getLogger("dittofx")` (dittofx/_log.py); `library_log()`
renders those records here: a spinner while a stage runs, a check mark and its time after, warnings
as `dittofx: warning: ...`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from rich.console import Console

from dittofx._log import stage  # noqa: F401 - the command line's own stages show as the library's do

_console = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class _RichHandler(logging.Handler):
    """dittofx's log records on the console: stages with a spinner and a check mark, warnings in one line."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self._titles: list[str] = []  # the stages running, outermost first: one spinner shows the innermost
        self._status = None

    def emit(self, record: logging.LogRecord) -> None:
        stage_mark = getattr(record, "dittofx_stage", None)
        if record.levelno >= logging.WARNING:
            warn(record.getMessage())
        elif _quiet:
            return
        elif stage_mark == "start":
            self._titles.append(record.title)
            self._spin()
        elif stage_mark in ("done", "failed"):
            if self._titles:
                self._titles.pop()
            self._spin()
            if stage_mark == "done":
                _console.print(f"[green]✓[/green] {record.title} [dim]({record.seconds:.1f}s)[/dim]")
        elif record.levelno >= logging.INFO:
            _console.print(record.getMessage(), soft_wrap=True, markup=False, highlight=False)

    def _spin(self) -> None:
        if not _console.is_terminal:
            return
        if not self._titles:
            if self._status is not None:
                self._status.stop()
                self._status = None
        elif self._status is None:
            self._status = _console.status(f"{self._titles[-1]} ...")
            self._status.start()
        else:
            self._status.update(f"{self._titles[-1]} ...")


_handler = _RichHandler()


@contextlib.contextmanager
def library_log() -> Iterator[None]:
    """Render the library's log on this console while the block runs (the CLI's main does)."""
    log = logging.getLogger("dittofx")
    level = log.level
    log.addHandler(_handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(_handler)
        log.setLevel(level)


def is_quiet() -> bool:
    return _quiet


def console() -> Console:
    return _console


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
