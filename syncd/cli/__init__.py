"""Command line: a thin layer over the parts. Each verb lives in its own module.

Every verb accepts ``--config``; user mistakes become one line on stderr and a
distinct exit code, never a traceback. :func:`main` is the one place that turns what
a verb raises into an exit code: syncd's errors into theirs, a reader that closed the
pipe early into a quiet exit, and anything else into INTERNAL with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from syncd import __version__
from syncd.cli import signals

# verb module names, in the order `syncd --help` lists them
VERBS = (
    "run",
    "check",
    "snapshot",
    "rebuild",
    "status",
    "resume",
    "verify",
    "repair",
    "dlq",
    "wait",
    "tokens",
    "explain",
    "map",
    "config",
    "completion",
)

log = logging.getLogger("syncd")


class Parser(argparse.ArgumentParser):
    """A usage mistake is one line and exit code 2 (CONFIG), like every other mistake.

    Sub-command parsers are made by ``add_subparsers``/``add_parser`` with the parent's
    class, so every verb's parser is one of these.
    """

    def error(self, message: str) -> NoReturn:
        print(f"syncd: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)  # ExitCode.CONFIG, not imported yet: see main()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def _config_flag_last(argv: Sequence[str]) -> list[str]:
    """``syncd --config F COMMAND ...`` read as ``syncd COMMAND ... --config F``: the flag
    is each command's own, and people write it first as often as last."""
    args = list(argv)
    if args and _option(args[0]) == "--config":
        if "=" in args[0] or (args[0].startswith("-c") and len(args[0]) > 2):
            return [*args[1:], args[0]]
        if len(args) > 2:
            return [*args[2:], args[0], args[1]]
    return args


_ONCE = ("--config", "--log-level", "--log-format")


def _option(arg: str) -> str | None:
    """The configuration option ``arg`` names: itself, ``-c``, or an abbreviation argparse
    takes for it (``--conf``, ``--log-l``), with or without ``=VALUE``."""
    if arg == "-c" or (arg.startswith("-c") and not arg.startswith("--")):
        return "--config"
    name = arg.split("=", 1)[0]
    if not name.startswith("--") or len(name) < 3:
        return None
    matches = [option for option in _ONCE if option.startswith(name)]
    return matches[0] if len(matches) == 1 else None


def _given_twice(args: Sequence[str]) -> str | None:
    """The configuration option given twice, if one is (``syncd --config a run --config b``,
    ``--log-level`` before and after the command): argparse would keep one of them without
    a word, and which one depends on where each was written."""
    seen: set[str] = set()
    for arg in args:
        if arg == "--":
            break
        option = _option(arg)
        if option is None:
            continue
        if option in seen:
            return option
        seen.add(option)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    signals.catch_early()  # before the slow imports: a SIGTERM now must not kill `syncd run`
    from syncd.errors import ExitCode, SyncdError

    parser = build_parser()
    _complete(parser)  # a shell asking for completions gets them and exits here
    given = list(sys.argv[1:] if argv is None else argv)
    twice = _given_twice(given)
    if twice:
        signals.restore()
        parser.error(f"{twice} is given twice: give it once")
    try:
        args = parser.parse_args(_config_flag_last(given))
    except SystemExit:  # --help, --version or a usage error
        signals.restore()
        raise
    if args.command != "run":
        signals.restore()  # one-shot commands stop on a signal as they always did
    _print_paths_as_given()
    undecodable = _not_text(parser, args)
    if undecodable:
        print(f"syncd: error: {undecodable}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # a reader that went away is noticed here, not at exit
        return code
    except SyncdError as exc:
        print(f"syncd: error: {exc.describe()}", file=sys.stderr)
        return int(exc.exit_code)
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        return ExitCode.OK
    except Exception as exc:  # noqa: BLE001 - a bug: shown with its traceback, exit 70
        from syncd.redact import redact_text

        print(redact_text("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
        print(
            "syncd: internal error: this is a bug; please report it with the lines above",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


def _not_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """What is wrong with an argument that is not UTF-8 text, if one is; else None.

    The shell hands over bytes; Python keeps those that are not UTF-8 as surrogate
    escapes, which no record id, name or JSON document may hold and no UTF-8 output can
    print. Paths (``--config``) are left alone: the file system takes any bytes.
    """
    from syncd.utf8 import is_text, shown

    for dest, given in vars(args).items():
        for value in given if isinstance(given, list) else [given]:
            if isinstance(value, str) and not is_text(value):
                return f"{_argument_name(parser, args, dest)} {shown(value)} is not UTF-8 text"
    return None


def _print_paths_as_given() -> None:
    """A path given in bytes that are not UTF-8 (``--config``) is printed back as those
    bytes (``config show``, hints), as stderr already does, not refused by a stdout
    that is strict about UTF-8 (a UTF-8 locale other than C.UTF-8)."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="surrogateescape")


def _argument_name(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str) -> str:
    """How the verb's `--help` names the argument stored in ``dest``: ``--id``, ``ID``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(str(getattr(args, action.dest, "")))
            if chosen is not None:
                return _argument_name(chosen, args, dest)
    for action in parser._actions:
        if action.dest == dest:
            if action.option_strings:
                return max(action.option_strings, key=len)
            return str(action.metavar or dest.upper())
    return dest


def _reader_gone() -> int:
    """``syncd ... | head``: the reader closed the pipe early. Exit quietly.

    As the Python documentation recommends (signal module, "Note on SIGPIPE"): point
    stdout at /dev/null so the interpreter's final flush does not fail again, and exit
    with 1 as Python does on EPIPE. Not SIG_DFL for SIGPIPE: that would kill the daemon
    on a write to a closed socket.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1  # ExitCode.DRIFT_OR_FAILURE


def _complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request (`syncd completion SHELL`) and exit; else nothing.

    argcomplete does this only when the shell's script set _ARGCOMPLETE in the environment.
    """
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    from syncd.cli.completion import pipeline_names

    for action in _actions(parser):
        if action.dest in {"pipeline", "pipelines"}:
            action.completer = pipeline_names  # type: ignore[attr-defined]
    argcomplete.autocomplete(parser)


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_actions(sub))
    return found
