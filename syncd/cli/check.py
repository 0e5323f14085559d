"""`syncd check`: validate the config and reach every server."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings, select_pipelines
from syncd.errors import ExitCode, SyncdError
from syncd.redact import redact_text


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "check",
        help="validate the config, reach every server, embed a probe, write a checkpoint",
        description="Validate the config, then do once what the daemon does first: reach "
        "MongoDB and Chroma, open each change stream, embed one probe input and compare its "
        "size with embedder.dimensions and the existing collection (and its distance), write "
        "to the checkpoint store, and send the trace exporter an empty export. Exit 0 when "
        "all pass; 2 for a bad config; another non-zero code otherwise.",
    )
    add_config_options(parser)
    parser.add_argument("--offline", action="store_true", help="validate the config only")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    select_pipelines(settings, None)  # a config without pipelines would run nothing
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
            text = error.describe() if isinstance(error, SyncdError) else redact_text(str(error))
            print(f"FAIL  {line}: {text}")
    return ExitCode.OK if failures == 0 else ExitCode.DRIFT_OR_FAILURE
