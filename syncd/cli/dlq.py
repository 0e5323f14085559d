"""`syncd dlq list|show|retry|purge PIPELINE [KEY]`: the dead-letter store."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bson import json_util

from syncd.cli.common import add_config_options, load_settings, print_json, whole_number
from syncd.errors import ConfigError, ExitCode

ACTIONS = {
    "list": "one line per entry (or only KEY)",
    "show": "one entry in full, as JSON (KEY required)",
    "retry": "re-apply from MongoDB's current state; remove what succeeds (all, or KEY)",
    "purge": "delete all entries (or KEY); needs --yes",
}


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "dlq",
        help="list, show, retry or purge a pipeline's dead letters",
        description='Under on_error = "dead_letter", changes that cannot be applied are '
        "parked here, one entry per document. "
        + "; ".join(f"{name}: {text}" for name, text in ACTIONS.items())
        + ". Fix documents in MongoDB before retrying them.",
    )
    add_config_options(parser)
    parser.add_argument("action", choices=list(ACTIONS), metavar="ACTION", help="|".join(ACTIONS))
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument(
        "key", metavar="KEY", nargs="?", help="an entry's key, as `syncd dlq list` prints it"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--yes", action="store_true", help="purge: really delete")
    parser.add_argument(
        "--limit", type=whole_number(0), default=0, help="list: at most this many (0: all)"
    )
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    from syncd.runtime import Runtime

    ps = settings.pipeline(args.pipeline)
    if args.action == "show" and not args.key:
        raise ConfigError("`syncd dlq show` needs the KEY of an entry (see `syncd dlq list`)")
    runtime = Runtime(settings)
    try:
        letters = runtime.dead_letters(ps)
        if args.action == "list":
            return _list(letters, ps.name, args)
        if args.action == "show":
            return _show(letters, ps.name, args)
        if args.action == "purge":
            return _purge(letters, ps.name, args)
        from syncd.repair import retry_dead_letters

        pipeline = runtime.pipeline(ps)
        result = retry_dead_letters(pipeline, letters, [args.key] if args.key else None)
    finally:
        runtime.close()
    if args.json:
        print_json(result.to_json())
    else:
        print(
            f"retried {result.retried}: {result.fixed.count} applied and removed, "
            f"{result.failing.count} still failing"
        )
        for key in result.failing.sample:
            print(f"  still failing: {key}")
    if args.key and result.retried == 0:
        raise ConfigError(f"no dead letter with key {args.key!r} in pipeline {ps.name!r}")
    return ExitCode.DRIFT_OR_FAILURE if result.failing.count else ExitCode.OK


def _list(letters: Any, pipeline: str, args: argparse.Namespace) -> int:
    entries = [_plain(e) for e in letters.list(pipeline, limit=args.limit)]
    if args.key:
        entries = [e for e in entries if e["key"] == args.key]
    if args.json:
        print_json(entries)
        return ExitCode.OK
    if not entries:
        print(f"no dead letters for {pipeline}")
        return ExitCode.OK
    for e in entries:
        print(
            f"{e['key']}  {e.get('operation', '?')}  attempts={e.get('attempts', 0)}  "
            f"last={e.get('last_seen', '?')}  {e.get('error_class', '')}: {e.get('message', '')}"
        )
    print(f"{len(entries)} dead letter(s); `syncd dlq show {pipeline} KEY` for one in full")
    return ExitCode.OK


def _show(letters: Any, pipeline: str, args: argparse.Namespace) -> int:
    entry = letters.get(pipeline, args.key)
    if entry is None:
        raise ConfigError(f"no dead letter with key {args.key!r} in pipeline {pipeline!r}")
    print_json(_plain(entry))
    return ExitCode.OK


def _purge(letters: Any, pipeline: str, args: argparse.Namespace) -> int:
    count = 1 if args.key else letters.count(pipeline)
    what = f"the dead letter {args.key!r}" if args.key else f"all {count} dead letter(s)"
    if not args.yes:
        raise ConfigError(
            f"refusing to delete {what} of {pipeline} without --yes",
            hint="the changes they stand for will not be retried; "
            "`syncd dlq retry` applies fixed documents instead",
        )
    removed = letters.remove(pipeline, [args.key]) if args.key else letters.purge(pipeline)
    if args.json:
        print_json({"removed": removed})
    else:
        print(f"removed {removed} dead letter(s) of {pipeline}")
    return ExitCode.OK


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """Extended JSON (relaxed) so ObjectIds, dates and tokens print readably."""
    data: dict[str, Any] = json.loads(
        json_util.dumps(entry, json_options=json_util.RELAXED_JSON_OPTIONS)
    )
    data.pop("_id", None)
    return data
