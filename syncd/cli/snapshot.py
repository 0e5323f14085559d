"""`syncd snapshot PIPELINE`: copy every document again and drop orphans."""

from __future__ import annotations

import argparse
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, stop_on_signals


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "snapshot",
        help="re-copy a pipeline's documents and remove orphaned records",
        description="Record the stream position, re-scan the collection in _id order "
        "(resumable), remove Chroma records whose documents are gone, and leave the pipeline "
        "ready to stream from the recorded position. Also clears a mapping change or a lost "
        "oplog position. The command holds the pipeline while it runs, with a fresh epoch "
        "that fences older writers off; while a live daemon holds the pipeline's lease it "
        "refuses (exit 7) unless --force; without leases, stop the daemon first. An outage of "
        "MongoDB, Chroma or the embedding API once the copy has begun is retried from the last "
        "checkpointed page for retry_deadline_s (60 s when it is 0), then it stops (exit 4 or "
        "5). SIGTERM or Ctrl-C stops after the current batch (exit 1); the same command "
        "continues.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument(
        "--force",
        action="store_true",
        help="proceed even while a live daemon holds the pipeline: it is fenced out, stops "
        "the pipeline and takes it again when the snapshot is done",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args, chroma=True)
    from syncd.operations import snapshot

    stop = stop_on_signals()
    return snapshot(
        settings,
        settings.pipeline(args.pipeline),
        force=args.force,
        command=hints.again(),
        stop=stop,
    )
