"""torch.export and torch.onnx work, one thread at a time and quiet in its own thread only.

torch.export is not thread-safe: while it runs it patches process-wide state (module calls, the
mkldnn/cudnn switches), so two captures at once fail with errors that blame the inputs ("Trying to
pop empty mode stack", fake weights on `meta`). `quiet_export()` runs them one after the other
(re-entrant: an export may capture an OptimizedModule's new call form inside it).

On the way to a failure torch logs multi-line diagnostics (graphs) that dittofx reports in one line.
They are dropped by a filter on torch's own loggers that keeps every record of other threads, and
what this thread logs at ERROR or above. torch.export also prints the partial graph of a
data-dependent failure to sys.stderr: while a thread exports, sys.stderr is a stream that drops that
thread's writes and passes every other thread's through (put back on the way out, unless someone
else replaced it meanwhile). `logging.disable` and the warnings filters are process-wide, so they
are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator

EXPORT_LOCK = threading.RLock()

_TORCH_LOGGERS = ("torch", "onnxscript", "onnx_ir")  # with their children ("torch.fx.experimental...")
_quiet_thread: int | None = None  # the thread inside quiet_export() (it holds EXPORT_LOCK)


class _TorchChatter(logging.Filter):
    """Drops the records below ERROR that the quiet thread logs; keeps everything of other threads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != _quiet_thread or record.levelno >= logging.ERROR


_FILTER = _TorchChatter()


def _filter_torch_loggers() -> None:
    """Put the filter on every torch logger that exists (a logger's filter sees only its own records,
    not its children's, so each gets it; idempotent, and loggers created later get it next time)."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and name.split(".", 1)[0] in _TORCH_LOGGERS \
                and _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


class _OtherThreads:
    """A stream that drops the writes of one thread and passes the others' to `stream`."""

    def __init__(self, stream, thread: int):
        self._stream, self._thread = stream, thread

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() == self._thread else self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The block runs while no other thread exports, with torch's chatter of this thread dropped."""
    global _quiet_thread
    with EXPORT_LOCK:
        _filter_torch_loggers()
        outer = _quiet_thread
        _quiet_thread = threading.get_ident()
        stderr = sys.stderr
        quiet = sys.stderr = _OtherThreads(stderr, _quiet_thread) if outer is None else stderr
        try:
            yield
        finally:
            _quiet_thread = outer
            if sys.stderr is quiet:
                sys.stderr = stderr
