"""`syncd resume PIPELINE`: lift a halt so the change is tried again."""

from __future__ import annotations

import argparse
from typing import Any

from syncd.cli.common import add_config_options, load_settings, print_json
from syncd.errors import ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "resume",
        help="lift a pipeline's halt so the change it stopped at is tried again",
        description="Clear the halt recorded next to the pipeline's checkpoint. A running "
        "`syncd run` that holds the pipeline notices within seconds; otherwise the next "
        "start does. The change is tried again from the document's current state and, if "
        "it still cannot be applied, halts the pipeline again. Needs no lease and does not "
        "move the checkpoint. Exit 0 also when the pipeline was not halted.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("--json", action="store_true", help="print what was lifted as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    ps = settings.pipeline(args.pipeline)
    from syncd import halts
    from syncd.checkpoint import whoami
    from syncd.runtime import Runtime

    runtime = Runtime(settings)
    try:
        lifted = halts.clear(runtime.store, ps.name)
        if lifted is not None:
            runtime.store.set_status(ps.name, {"state": "resumed", "by": whoami()})
    finally:
        runtime.close()
    if args.json:
        print_json({"pipeline": ps.name, "lifted": lifted.describe() if lifted else None})
    elif lifted is None:
        print(f"{ps.name}: not halted; nothing to resume")
    else:
        where = f" at _id {lifted.describe()['document_id']}" if lifted.has_document else ""
        print(
            f"{ps.name}: halt{where} lifted; a running `syncd run` tries the change again "
            "within seconds, else the next start does"
        )
    return ExitCode.OK
