"""Library output: everything dittofx says goes through `logging.getLogger("dittofx")`.

Stages of long work (capture, export, checks) are two records: one when the stage starts (DEBUG,
`dittofx_stage="start"`) and one when it ends (INFO, `dittofx_stage="done"`, with `seconds`; DEBUG
`"failed"` when it raised). A library user sees nothing below WARNING unless they configure
logging; the CLI renders these records with rich (a spinner while a stage runs, a check mark and
its time after).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("dittofx")


@contextlib.contextmanager
def stage(title: str) -> Iterator[None]:
    log.debug("%s ...", title, extra={"dittofx_stage": "start", "title": title})
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        log.debug("%s failed", title, extra={"dittofx_stage": "failed", "title": title})
        raise
    seconds = time.perf_counter() - start
    log.info("%s (%.1fs)", title, seconds, extra={"dittofx_stage": "done", "title": title, "seconds": seconds})


class SaidOnFirstCall:
    """A torch.compile'd callable whose first call is shown as a progress stage: it compiles then
    (minutes). Its attributes are the callable's."""

    def __init__(self, fn, what: str):
        self.fn, self.what, self.done = fn, what, False

    def __call__(self, *args, **kwargs):
        if self.done:
            return self.fn(*args, **kwargs)
        with stage(self.what):
            out = self.fn(*args, **kwargs)
        self.done = True
        return out

    def __getattr__(self, name: str):
        return getattr(self.__dict__["fn"], name)
