"""`syncd run`: stream changes until stopped."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings, select_pipelines


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "run",
        help="mirror MongoDB into Chroma until stopped",
        description="Snapshot (on first run) and then stream changes for every configured "
        "pipeline, checkpointing only what Chroma acknowledged. A change that cannot be applied "
        'under on_error = "halt" halts only its pipeline (see `syncd status`, `syncd resume`); '
        "the others keep streaming. SIGTERM drains and exits 0.",
    )
    add_config_options(parser)
    parser.add_argument(
        "--pipeline",
        "-p",
        action="append",
        dest="pipelines",
        metavar="NAME",
        help="run only this pipeline (repeatable; default: all)",
    )
    parser.add_argument(
        "--resync",
        action="store_true",
        help="if a pipeline's mapping changed, re-snapshot it instead of refusing to start",
    )
    parser.add_argument(
        "--listen", default=None, metavar="HOST:PORT", help="metrics and health listener"
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args, chroma=True, **{"telemetry.listen": args.listen})
    from syncd.cli import signals
    from syncd.daemon import Daemon

    pipelines = select_pipelines(settings, args.pipelines)
    return Daemon(settings, pipelines=pipelines, resync=args.resync, stop=signals.received).run()
