"""Output files: checked before any work, written whole or not at all.

Every exporter (and the CLI's --json / --plot) writes into a temporary file or folder next to the
target and renames it into place only when everything it checks has passed, so a failure never
leaves a half-written file behind: not an exception, not Ctrl-C, not SIGTERM (what `timeout` and CI
cancellation send; while a staging folder is open in the main thread it ends the process through
SystemExit(143), so the clean-up runs), not a full disk (one ExportError line).

A target that is a symbolic link is written through: the file or folder the link points to is
replaced and the link stays, as a shell redirection does. What is written gets the permissions of a
new file or folder (the umask's), not those of a private temporary.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator

from dittofx.errors import ExportError

_staging = threading.local()  # depth of open staging folders in this thread


def _resolve(path) -> str:
    """The absolute path, through a symbolic link at the end (the link's target is written)."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    return os.path.realpath(path) if os.path.islink(path) else path


def _check_writable(parent: str, error) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".dittofx-write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise error(f"cannot write to {parent}: {e.strerror or e}") from None


def check_output_path(path, error=ExportError, what: str = "output path") -> str:
    """The absolute path if a file can be written there, else `error` (one line)."""
    try:
        path = _resolve(path)
    except TypeError:
        raise error(f"not a file path: {path!r}") from None
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory: give a file name, e.g. {os.path.join(path, 'model.onnx')}")
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        raise error(f"{what} {path}: the directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise error(f"cannot write {path}: {parent} is not a directory")
    _check_writable(parent, error)
    return path


def check_new_folder(path, what: str = "export", error=ExportError) -> str:
    """The absolute path of a folder to create (it may exist if empty) where one can be written, else
    `error` (one line)."""
    try:
        path = _resolve(path)
    except TypeError:
        raise error(f"not a folder path: {path!r}") from None
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise error(f"{path} exists and is not an empty folder: give a new folder for the {what}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise error(f"output directory {parent} does not exist")
    _check_writable(parent, error)
    return path


class Terminated(SystemExit):
    """SIGTERM while a staging folder was open: raised so that the folder is removed; the process
    then exits with status 143 (128 + SIGTERM), silently, as the signal would have ended it."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises Terminated during the block, where it would otherwise kill the process (its
    default action) and skip every clean-up; a handler the program set itself is left alone. Signal
    handlers can only be set from the main thread: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove(tmp: str) -> None:
    """Remove `tmp`; a SIGTERM meanwhile waits until it is gone (the clean-up is not cut short)."""
    if signal.getsignal(signal.SIGTERM) is not _raise_terminated or \
            threading.current_thread() is not threading.main_thread():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    pending = []
    signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    try:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, _raise_terminated)
    if pending:
        _raise_terminated(pending[0], None)


def _make_folder(parent: str, prefix: str, suffix: str) -> str:
    """A new folder with a random name, created with the umask's permissions (mkdtemp's are 0700,
    which a published folder would keep)."""
    while True:
        path = os.path.join(parent, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def staging_folder(target: str, error=ExportError) -> Iterator[str]:
    """A temporary folder next to `target`, removed afterwards whatever happens (what was moved out
    of it by then stays). The outermost staging folder of a thread turns an OSError inside (a full
    disk, a folder one may not write) into `error` naming `target`, and SIGTERM into Terminated."""
    depth = getattr(_staging, "depth", 0)
    _staging.depth = depth + 1
    try:
        with _sigterm_as_exit() if depth == 0 else contextlib.nullcontext():
            try:
                tmp = _make_folder(os.path.dirname(target), f".{os.path.basename(target)}.", ".tmp")
                try:
                    yield tmp
                finally:
                    _remove(tmp)
            except OSError as e:
                if depth:
                    raise
                raise error(f"cannot write {target}: {e.strerror or e}; nothing was written") from None
    finally:
        _staging.depth = depth


def publish_folder(tmp: str, target: str) -> None:
    """Rename the finished folder `tmp` to `target` (an empty folder there is replaced)."""
    if os.path.isdir(target):
        os.rmdir(target)
    os.replace(tmp, target)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only set it:
    reading it so would briefly change it for every thread)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def write_atomic(path: str, write, error=ExportError) -> None:
    """`write(tmp_path)`, then rename into place with the usual permissions: nothing half-written is
    left at `path`; an OSError (a full disk) is `error`, one line."""
    path = _resolve(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dittofx-", suffix=os.path.splitext(path)[1], dir=os.path.dirname(path))
        os.close(fd)
        with _sigterm_as_exit():
            try:
                write(tmp)
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as e:
        raise error(f"cannot write {path}: {e.strerror or e}; nothing was written") from None
