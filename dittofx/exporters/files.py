"""Output files: checked before any work, written whole or not at all.

Every exporter (and the CLI's --json / --plot) writes into a temporary file or folder next to the
target and renames it into place only when everything it checks has passed, so a failure never
leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from dittofx.errors import ExportError


def check_output_path(path, error=ExportError, what: str = "output path") -> str:
    """The absolute path if a file can be written there, else `error` (one line)."""
    try:
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    except TypeError:
        raise error(f"not a file path: {path!r}") from None
    if os.path.isdir(path):
        raise error(f"{what} {path} is a directory: give a file name, e.g. {os.path.join(path, 'model.onnx')}")
    parent = os.path.dirname(path)
    if not os.path.exists(parent):
        raise error(f"{what} {path}: the directory {parent} does not exist")
    if not os.path.isdir(parent):
        raise error(f"cannot write {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dittofx-write-test-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise error(f"cannot write to {parent}: {e.strerror or e}") from None
    return path


def check_new_folder(path, what: str = "export") -> str:
    """The absolute path of a folder to create (it may exist if empty), else ExportError."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ExportError(f"{path} exists and is not an empty folder: give a new folder for the {what}")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ExportError(f"output directory {parent} does not exist")
    return path


@contextlib.contextmanager
def staging_folder(target: str) -> Iterator[str]:
    """A temporary folder next to `target`, removed afterwards whatever happens (what was moved out
    of it by then stays)."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=os.path.dirname(target))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: str, target: str) -> None:
    """Rename the finished folder `tmp` to `target` (an empty folder there is replaced)."""
    if os.path.isdir(target):
        os.rmdir(target)
    os.replace(tmp, target)


def write_atomic(path: str, write) -> None:
    """`write(tmp_path)`, then rename into place with the usual permissions: nothing half-written is
    left at `path`."""
    fd, tmp = tempfile.mkstemp(prefix=".dittofx-", suffix=os.path.splitext(path)[1], dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
