"""The `dittofx` command line. Each subcommand lives in its own module with `register(subparsers)`.

User errors (DittoError) print one line and exit with code 2, never a traceback; a bug in dittofx
(InternalError: a pass broke the graph) prints one line asking for a report and exits with code 3.
Both are plain text (errors.plain): whatever a library or the user's input put in the message, no
colour code or line break reaches the terminal or a log.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dittofx.errors import DittoError, InternalError, plain

# Subcommand modules, in the order `dittofx --help` lists them.
COMMANDS = ["inspect", "export", "bench", "tune", "demo"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {plain(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dittofx", description="Make vision and diffusion transformers skip repeated work.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"dittofx.cli.{name}").register(subparsers)
    return parser


def _version() -> str:
    from dittofx import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed in one line
        return e.code
    from dittofx.cli import progress

    progress.set_quiet(getattr(args, "quiet", False))
    try:
        with progress.library_log():
            return args.run(args) or 0
    except DittoError as e:
        print(f"dittofx: error: {plain(str(e))}", file=sys.stderr)
        return 2
    except InternalError as e:
        print(f"dittofx: internal error: {plain(str(e))}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("dittofx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
