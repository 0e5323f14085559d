"""`syncd snapshot PIPELINE`: copy every document again and drop orphans."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "snapshot",
        help="re-copy a pipeline's documents and remove orphaned records",
        description="Record the stream position, re-scan the collection in _id order "
        "(resumable), remove Chroma records whose documents are gone, and leave the pipeline "
        "ready to stream from the recorded position. Also clears a mapping change or a lost "
        "oplog position. Stop the daemon for this pipeline first.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    from syncd.operations import snapshot

    return snapshot(settings, settings.pipeline(args.pipeline))
