"""`syncd repair PIPELINE`: make Chroma match MongoDB again."""

from __future__ import annotations

import argparse
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, print_json
from syncd.errors import ConfigError, ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "repair",
        help="fix what `syncd verify` finds",
        description="Run a verify and fix each finding as it is found: documents behind "
        "missing or stale records are re-applied from their current MongoDB state through "
        "the pipeline's own mapping and embedder; orphaned records are deleted. The "
        "checkpoint is not touched. Safe while the pipeline streams: each document is "
        "read again after it is written and applied again if it changed meanwhile; one "
        "still changing after 5 writes is left to the running pipeline. Exit 0 when "
        "everything found was fixed or left to the pipeline (or, with --dry-run, nothing "
        "was found), 1 otherwise.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    parser.add_argument(
        "--force",
        action="store_true",
        help="repair a pipeline halted at a drop, rename or dropDatabase too (the records "
        "the halt keeps are deleted)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also list the ids re-applied and deleted (the first 20 of each)",
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args, chroma=True)
    from syncd.applier import Applier
    from syncd.consistency import open_checker
    from syncd.mapping import Mapper
    from syncd.repair import repair
    from syncd.runtime import Runtime

    ps = settings.pipeline(args.pipeline)
    runtime = Runtime(settings)
    try:
        checker = open_checker(runtime, ps)
        halt = checker.halt
        if halt is not None and not halt.has_document and not (args.dry_run or args.force):
            raise _refused(ps.name, halt.reason)
        applier = Applier(
            ps,
            source=runtime.source(ps),
            sink=checker.sink,
            mapper=Mapper(ps),
            embedder=runtime.embedder(ps) if not args.dry_run else None,
            telemetry=runtime.telemetry.pipeline(ps.name),
        )
        result = repair(applier, checker, dry_run=args.dry_run, progress=True)
    finally:
        runtime.close()
    data = result.to_json()
    if args.json:
        print_json(data)
    else:
        _print(data, verbose=args.verbose, on_error=ps.on_error)
    if args.dry_run:
        return ExitCode.OK if result.verify.consistent else ExitCode.DRIFT_OR_FAILURE
    return ExitCode.DRIFT_OR_FAILURE if result.failed.count else ExitCode.OK


def _refused(pipeline: str, reason: str) -> ConfigError:
    """Repair would make Chroma match MongoDB now: under a halt at a drop, rename or
    dropDatabase, it would delete the records the halt keeps for the operator to decide on."""
    return ConfigError(
        f"refusing to repair {pipeline}: it is halted ({reason}) with its records left "
        "alone for you to decide what the Chroma collection should hold, and repair would "
        "delete those whose documents are gone",
        hint=f"`{hints.command('status', pipeline)}` says how to lift the halt; "
        f"`{hints.command('repair', pipeline, '--dry-run')}` shows what repair would do, "
        f"and `{hints.command('repair', pipeline, '--force')}` does it",
    )


def _print(data: dict[str, Any], *, verbose: bool, on_error: str) -> None:
    from syncd.cli.verify import held_aside, print_report

    print_report(data["found"], on_error=on_error)
    prefix = "would " if data["dry_run"] else ""
    reapply, delete, failed = data["reapply"], data["delete"], data["failed"]
    done = reapply["count"] - failed["count"]
    if data["dry_run"]:
        print(
            f"would re-apply {reapply['count']} document(s) from MongoDB and delete "
            f"{delete['count']} orphaned record(s)"
        )
    else:
        print(
            f"re-applied {done} document(s) from MongoDB, deleted {delete['count']} "
            f"orphaned record(s), {failed['count']} document(s) could not be repaired"
        )
    changed, unsettled = data["changed"], data["still_changing"]
    if changed["count"]:
        print(
            f"{changed['count']} document(s) changed while being repaired and were applied "
            "again from their new state"
        )
    if unsettled["count"]:
        print(
            f"{unsettled['count']} document(s) still changing, left to the running pipeline, "
            f"e.g. {', '.join(unsettled['sample'][:5])}"
        )
    if verbose:
        for key in reapply["sample"]:
            print(f"  {prefix}re-apply {key}")
        for rid in delete["sample"]:
            print(f"  {prefix}delete {rid}")
        shown = len(reapply["sample"]) + len(delete["sample"])
        if shown < reapply["count"] + delete["count"]:
            print(f"  ({shown} of {reapply['count'] + delete['count']} listed)")
    elif reapply["count"] or delete["count"]:
        print("  --verbose lists the ids")
    if failed["count"]:
        pipeline = data["found"]["pipeline"]
        print(
            f"{failed['count']} document(s) cannot be applied (they cannot be mapped, or "
            "the embedding API or Chroma refuses them) and were not repaired, "
            f"e.g. {', '.join(failed['sample'][:5])}; see "
            f"`{hints.command('explain', pipeline, 'ID')}` and {held_aside(pipeline, on_error)}"
        )
