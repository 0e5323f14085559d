"""Command line: a thin layer over the parts. Each verb lives in its own module.

Every verb accepts ``--config``; user mistakes become one line on stderr and a
distinct exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from syncd import __version__
from syncd.cli import signals

# verb module names, in the order `syncd --help` lists them
VERBS = (
    "run",
    "check",
    "snapshot",
    "status",
    "resume",
    "verify",
    "repair",
    "dlq",
    "wait",
    "tokens",
    "explain",
)

log = logging.getLogger("syncd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncd",
        description="Keep Chroma collections a faithful mirror of MongoDB collections.",
        epilog="Run `syncd COMMAND --help` for a command's options. Exit codes are listed "
        "in the README.",
    )
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    verbs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in VERBS:
        try:
            module = importlib.import_module(f"syncd.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"syncd.cli.{name}":
                raise
            continue
        module.register(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    signals.catch_early()  # before the slow imports: a SIGTERM now must not kill `syncd run`
    from syncd.errors import ExitCode, SyncdError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version or a usage error
        signals.restore()
        raise
    if args.command != "run":
        signals.restore()  # one-shot commands stop on a signal as they always did
    try:
        return int(args.handler(args))
    except SyncdError as exc:
        print(f"syncd: error: {exc.describe()}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.OK
