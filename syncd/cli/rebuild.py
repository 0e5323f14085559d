"""`syncd rebuild PIPELINE [--rollback | --drop-previous]`: a new collection beside the
live one, then a switch (see :mod:`syncd.rebuild`)."""

from __future__ import annotations

import argparse
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, stop_on_signals


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "rebuild",
        help="build a pipeline's collection beside the live one with the configured "
        "mapping, then switch to it",
        description="Build a new Chroma collection (NAME--vN) with the configured mapping "
        "and embedder while the live collection keeps serving and streaming: a snapshot, "
        "then streaming until caught up. Then take the pipeline (fencing a running daemon "
        "out for the switch), catch up, and switch: NAME serves the new records, the old "
        "collection is kept as NAME--vN-1. A crash at any point is resumed by running the "
        "same command again. An outage of MongoDB, Chroma or the embedding API is retried "
        "until retry_deadline_s (0: forever). SIGTERM or Ctrl-C stops after the current batch "
        "(exit 1). A "
        'document the new mapping cannot apply under on_error = "halt" stops it (exit 6): '
        'fix the document, or set on_error = "dead_letter", and the same command continues.',
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--rollback",
        action="store_true",
        help="switch back to the previous collection, which streams on from where it stopped",
    )
    what.add_argument("--drop-previous", action="store_true", help="delete the previous collection")
    parser.add_argument(
        "--force",
        action="store_true",
        help="proceed even while another `syncd rebuild` of this pipeline holds it",
    )
    parser.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="serve /metrics (the rebuild's phase, progress and lag), /healthz and /readyz "
        "(the pipeline rebuilding, or retrying while the build cannot reach a server) "
        "while the command runs (default: none; telemetry.listen is the daemon's)",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    listen = {"telemetry.listen": args.listen} if args.listen else {}
    settings = load_settings(args, chroma=True, **listen)  # a bad address: one line, exit 2
    from syncd.rebuild import rebuild

    stop = stop_on_signals()
    action = "rollback" if args.rollback else "drop_previous" if args.drop_previous else "build"
    return rebuild(
        settings,
        settings.pipeline(args.pipeline),
        action=action,
        force=args.force,
        command=hints.again(),
        stop=stop,
        listen=settings.telemetry.listen if args.listen else None,
    )
