"""User-facing errors: each is one line saying what was wrong and what is accepted.

The CLI prints them without a traceback and exits with code 2; the Python API raises them.
"""

import re

# ANSI escape sequences (colours, cursor moves) that libraries put into their messages
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class DittoError(Exception):
    """Base of every error caused by the user's input rather than by a bug in dittofx."""


class ModelSpecError(DittoError):
    """A MODEL argument that cannot be resolved to a model."""


class CaptureError(DittoError):
    """torch.export could not capture the model as one graph."""


class UnsupportedModelError(DittoError):
    """The model was captured but has nothing a pass can work on (no attention, no tubelets, ...)."""


class InexactRewriteError(UnsupportedModelError):
    """At its exact setting, a rewritten model does not compute what the original does (passes/exact.py):
    dittofx refuses the model rather than hand back something that computes something else."""


class PassSpecError(DittoError):
    """An unknown pass, an unknown option of a pass, or an option value out of range."""


class ExportError(DittoError):
    """An export that failed or did not match its PyTorch module; no file is left behind."""


def plain(text: str) -> str:
    """`text` as one line of plain text: colour codes dropped, line breaks and tabs made spaces, any other
    control character shown as an escape (\\x1b), so an error line never drives the terminal."""
    text = _ANSI.sub("", str(text))
    text = re.sub(r"\s*[\r\n\t\v\f]+\s*", " ", text).strip()
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name if there is none), as plain
    text cut to `limit` characters: what a one-line user error quotes of an underlying failure."""
    lines = (plain(ln) for ln in _ANSI.sub("", str(e)).splitlines())
    line = next((ln for ln in lines if ln), type(e).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


class InternalError(Exception):
    """A bug in dittofx, not the user's input: a pass produced a graph that does not run. The message
    names the pass and asks for a report; it is not a DittoError, so nothing mistakes it for bad input."""


def internal_error(what: str, cause: BaseException) -> InternalError:
    return InternalError(f"{what} ({first_line(cause)}). This is a bug in dittofx, not in your model or "
                         f"options: please report it to the dittofx developers with the model, "
                         "the pass list and this message")
