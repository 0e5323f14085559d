"""`syncd wait PIPELINE --after T`: block until a MongoDB write is visible in Chroma."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, seconds, stop_on_signals
from syncd.errors import ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "wait",
        help="wait until a pipeline has applied everything up to a MongoDB operation time",
        description="Exit 0 as soon as the pipeline's checkpoint has passed the given "
        "time, so every write up to it is in Chroma; exit 1 when --timeout passes first "
        "or the wait is interrupted (Ctrl-C, SIGTERM).",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument(
        "--after",
        required=True,
        metavar="TIME",
        help="a cluster time T.I (session.operation_time), an ISO-8601 time (second "
        "resolution: waits for that whole second) or a resume token's hex",
    )
    parser.add_argument(
        "--timeout", type=seconds, default=30.0, metavar="S", help="seconds (default 30)"
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    stop = stop_on_signals()  # Ctrl-C ends the wait with exit 1: the write was not seen applied
    settings = load_settings(args)
    from syncd.checkpoint import open_store
    from syncd.source import make_client
    from syncd.status import format_timestamp
    from syncd.waiting import parse_after, wait_with

    settings.pipeline(args.pipeline)
    target = parse_after(args.after)
    client = make_client(settings.mongodb)
    try:
        store = open_store(settings.checkpoint, client)
        reached = wait_with(
            store, args.pipeline, target, max(0.0, args.timeout), poll_s=0.1, stop=stop
        )
        if reached is not None:
            print(f"{args.pipeline} has applied everything up to {format_timestamp(target)}")
            return ExitCode.OK
        cp = store.load(args.pipeline)
    finally:
        client.close()
    where = "has no checkpoint yet"
    if cp is not None and cp.cluster_time is not None:
        where = f"is at cluster time {format_timestamp(cp.cluster_time)} (phase {cp.phase})"
    if stop.is_set():
        print(
            f"syncd: interrupted: pipeline {args.pipeline!r} {where}, "
            f"short of {format_timestamp(target)}",
            file=sys.stderr,
        )
        return ExitCode.DRIFT_OR_FAILURE
    print(
        f"syncd: timed out after {args.timeout:g} s: pipeline {args.pipeline!r} {where}, "
        f"short of {format_timestamp(target)}; is the daemon running and healthy? "
        f"(`{hints.command('status', args.pipeline)}`)",
        file=sys.stderr,
    )
    return ExitCode.DRIFT_OR_FAILURE
