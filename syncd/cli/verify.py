"""`syncd verify PIPELINE`: compare MongoDB with Chroma; exit 1 on drift."""

from __future__ import annotations

import argparse
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, print_json, whole_number
from syncd.errors import ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "verify",
        help="compare a pipeline's MongoDB documents with its Chroma records",
        description="Map every document the pipeline's filter matches and compare the "
        "result with Chroma by record id and content hash; then look for Chroma records "
        "whose documents are gone. Streams both sides in constant memory. Documents "
        "without records whose change is parked as a dead letter are counted as "
        "dead-lettered, not missing (`syncd dlq retry` applies them once fixed). Exit 0 "
        "when consistent, 1 when missing, orphaned or stale records were found. Changes "
        "still in flight show up as drift: verify a caught-up or stopped pipeline.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--sample",
        type=whole_number(1),
        default=None,
        metavar="N",
        help="check N random documents instead of everything (finds missing and stale "
        "records, not orphans of deleted documents)",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args, chroma=True)
    from syncd.consistency import open_checker
    from syncd.runtime import Runtime

    ps = settings.pipeline(args.pipeline)
    runtime = Runtime(settings)
    try:
        checker = open_checker(runtime, ps)
        report = checker.sample(args.sample) if args.sample else checker.verify(progress=True)
    finally:
        runtime.close()
    if args.json:
        print_json(report.to_json())
    else:
        print_report(report.to_json(), on_error=ps.on_error)
        if not report.consistent and report.halt:
            print(
                f"drift found while the pipeline is halted: lift the halt first "
                f"(`{hints.command('status', ps.name)}` says how), then verify again; "
                f"`{hints.command('repair', ps.name)}` fixes what is left"
            )
        elif not report.consistent:
            print(
                f"drift found: `{hints.command('repair', ps.name)}` fixes it "
                "(`--dry-run` shows what it would do)"
            )
    return ExitCode.OK if report.consistent else ExitCode.DRIFT_OR_FAILURE


def print_report(data: dict[str, Any], *, on_error: str) -> None:
    what = "sampled documents" if data["sampled"] else "documents"
    records = "Chroma records of those documents" if data["sampled"] else "Chroma records"
    print(
        f"pipeline {data['pipeline']}: {data['documents']} {what}, "
        f"{data['records']} {records} checked in {data['seconds']:.1f} s"
    )
    for kind in ("missing", "orphaned", "stale", "unmappable", "dead_lettered", "halted"):
        finding = data[kind]
        example = f"  e.g. {', '.join(finding['sample'][:5])}" if finding["count"] else ""
        print(f"  {kind.replace('_', '-'):<13} {finding['count']:>8}{example}")
    if data["unmappable"]["count"]:
        # Where the pipeline sets such a change aside: its dead letters, or a halt.
        print(
            "  unmappable documents cannot be mapped at all; fix them in MongoDB; see "
            + held_aside(data["pipeline"], on_error)
        )
    if data["dead_lettered"]["count"]:
        print(
            "  dead-lettered documents have no records because their change is parked; "
            f"once fixed in MongoDB, `{hints.command('dlq', 'retry', data['pipeline'])}` "
            "applies them"
        )
    halt = data.get("halt")
    if halt:
        at = (
            f"at _id {halt['document_id']} ({halt['key']})"
            if halt.get("key")
            else f"({halt['error_class']}: {halt['reason']})"
        )
        print(
            f"  the pipeline is halted {at} since {halt['since']}: the changes after the "
            "halt are not applied until it is lifted, so they show up here as drift, which "
            f"repair would only write early; see `{hints.command('status', data['pipeline'])}`"
        )
    print("consistent" if data["consistent"] else "NOT consistent")


def held_aside(pipeline: str, on_error: str) -> str:
    """Where the pipeline sets aside a change it cannot apply, as a command to look."""
    if on_error == "dead_letter":
        return f"`{hints.command('dlq', 'list', pipeline)}`"
    return f"`{hints.command('status', pipeline)}` (the pipeline halts at such a change)"
