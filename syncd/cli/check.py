"""`syncd check`: validate the config and reach every server."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings
from syncd.errors import ExitCode, SyncdError


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "check",
        help="validate the config and connect to MongoDB and Chroma",
        description="Exit 0 when the config is valid and every server answers; "
        "2 for a bad config; another non-zero code naming the server otherwise.",
    )
    add_config_options(parser)
    parser.add_argument("--offline", action="store_true", help="validate the config only")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    print(f"config ok: {len(settings.pipelines)} pipeline(s)")
    if args.offline:
        return ExitCode.OK
    from syncd.checks import run_checks

    failures = 0
    for line, error in run_checks(settings):
        if error is None:
            print(f"ok    {line}")
        else:
            failures += 1
            print(f"FAIL  {line}: {error.describe() if isinstance(error, SyncdError) else error}")
    return ExitCode.OK if failures == 0 else ExitCode.DRIFT_OR_FAILURE
