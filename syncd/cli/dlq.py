"""`syncd dlq list|show|retry|purge PIPELINE [KEY]`: the dead-letter store.

``--json`` prints Extended JSON (relaxed: dates as ``{"$date": ISO}``, ObjectIds as
``{"$oid": HEX}``): ``list`` an array of entries, ``show`` one entry, ``retry``
``{"retried", "fixed": {"count", "sample"}, "failing": {"count", "sample"}}``, ``purge``
``{"removed"}``. Keys may be added, never renamed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from syncd import hints
from syncd.cli.common import (
    add_config_options,
    add_subcommand_config_options,
    load_settings,
    print_json,
    whole_number,
)
from syncd.errors import ConfigError, ExitCode

SHOW_STRING_CHARS = 500  # `dlq show` cuts longer strings unless --full
SHOW_LIST_ITEMS = 20  # ... and longer arrays


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "dlq",
        help="list, show, retry or purge a pipeline's dead letters",
        description='Under on_error = "dead_letter", changes that cannot be applied are '
        "parked here, one entry per document. Fix documents in MongoDB before retrying them.",
    )
    add_config_options(parser)  # `syncd dlq -c FILE list P` as well as `... list P -c FILE`
    subs = parser.add_subparsers(dest="dlq_command", metavar="SUBCOMMAND", required=True)

    listing = _sub(subs, "list", "one line per entry (or only KEY)")
    listing.add_argument("key", metavar="KEY", nargs="?", help="only this entry")
    listing.add_argument(
        "--limit", type=whole_number(0), default=0, help="at most this many (0: all)"
    )
    listing.set_defaults(handler=_list)

    show = _sub(subs, "show", "one entry in full, as JSON (long strings and arrays cut)")
    show.add_argument("key", metavar="KEY", help="the entry's key, as `syncd dlq list` prints it")
    show.add_argument(
        "--full",
        action="store_true",
        help=f"print every value whole (default: strings cut at {SHOW_STRING_CHARS} "
        f"characters, arrays at {SHOW_LIST_ITEMS} items)",
    )
    show.set_defaults(handler=_show)

    retry = _sub(
        subs, "retry", "re-apply from MongoDB's current state; remove what succeeds (all, or KEY)"
    )
    retry.add_argument("key", metavar="KEY", nargs="?", help="only this entry")
    retry.set_defaults(handler=_retry)

    purge = _sub(subs, "purge", "delete all entries (or KEY); needs --yes")
    purge.add_argument("key", metavar="KEY", nargs="?", help="only this entry")
    purge.add_argument("--yes", action="store_true", help="really delete")
    purge.set_defaults(handler=_purge)


def _sub(subs: Any, name: str, text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subs.add_parser(name, help=text, description=text + ".")
    add_subcommand_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _open(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    settings = load_settings(args, chroma=True)
    from syncd.explain import user_key
    from syncd.runtime import Runtime

    ps = settings.pipeline(args.pipeline)
    if args.key:  # dead letters are kept by key, spelled as syncd writes it (i:3, not i:03)
        args.key = user_key(ps, args.key)
    runtime = Runtime(settings)
    return runtime, ps, runtime.dead_letters(ps)


def _list(args: argparse.Namespace) -> int:
    runtime, ps, letters = _open(args)
    try:
        entries = [_plain(e) for e in letters.list(ps.name, limit=args.limit)]
    finally:
        runtime.close()
    if args.key:
        entries = [e for e in entries if e["key"] == args.key]
    if args.json:
        print_json(entries)
        return ExitCode.OK
    if not entries:
        print(f"no dead letters for {ps.name}")
        return ExitCode.OK
    for e in entries:
        print(
            f"{e['key']}  {e.get('operation', '?')}  attempts={e.get('attempts', 0)}  "
            f"last={_readable(e.get('last_seen', '?'))}  "
            f"{e.get('error_class', '')}: {e.get('message', '')}"
        )
    print(
        f"{len(entries)} dead letter(s); `{hints.command('dlq', 'show', ps.name, 'KEY')}` "
        "for one in full"
    )
    return ExitCode.OK


def _show(args: argparse.Namespace) -> int:
    runtime, ps, letters = _open(args)
    try:
        entry = letters.get(ps.name, args.key)
    finally:
        runtime.close()
    if entry is None:
        raise ConfigError(f"no dead letter with key {args.key!r} in pipeline {ps.name!r}")
    data = _plain(entry)
    print_json(data if args.full else _shortened(data))
    return ExitCode.OK


def _retry(args: argparse.Namespace) -> int:
    runtime, ps, letters = _open(args)
    try:
        from syncd.repair import retry_dead_letters

        result = retry_dead_letters(
            runtime.applier(ps), letters, [args.key] if args.key else None, progress=True
        )
        reasons = {key: _reason(letters.get(ps.name, key)) for key in result.failing.sample}
    finally:
        runtime.close()
    if args.json:
        print_json(result.to_json())
    elif args.key and result.retried == 0:
        _not_parked(ps.name, args.key)
    else:
        print(
            f"retried {result.retried}: {result.fixed.count} applied and removed, "
            f"{result.failing.count} still failing"
        )
        for key in result.failing.sample:
            print(f"  still failing: {key}" + (f": {reasons[key]}" if reasons.get(key) else ""))
    return ExitCode.DRIFT_OR_FAILURE if result.failing.count else ExitCode.OK


def _not_parked(pipeline: str, key: str) -> None:
    """KEY has no dead letter: most often a running daemon applied the fixed document
    and removed it between `syncd explain`'s hint and this retry. Nothing is left to
    retry, which is no failure (exit 0); explain tells whether the document is in sync."""
    print(
        f"{key} is not a dead letter of {pipeline}, nothing to retry (applied since it was "
        f"parked, or never parked): `{hints.command('explain', pipeline, key)}` shows whether "
        f"it is in Chroma, `{hints.command('dlq', 'list', pipeline)}` the dead letters"
    )


def _reason(entry: dict[str, Any] | None) -> str:
    """Why a dead letter is still failing, as `dlq list` shows it: its last attempt's."""
    if not entry or not entry.get("message"):
        return ""
    return f"{entry.get('error_class', '')}: {entry['message']}"


def _purge(args: argparse.Namespace) -> int:
    runtime, ps, letters = _open(args)
    try:
        count = 1 if args.key else letters.count(ps.name)
        what = f"the dead letter {args.key!r}" if args.key else f"all {count} dead letter(s)"
        if not args.yes:
            raise ConfigError(
                f"refusing to delete {what} of {ps.name} without --yes",
                hint="the changes they stand for will not be retried; "
                f"`{hints.command('dlq', 'retry', ps.name)}` applies fixed documents instead",
            )
        removed = letters.remove(ps.name, [args.key]) if args.key else letters.purge(ps.name)
    finally:
        runtime.close()
    if args.json:
        print_json({"removed": removed})
    else:
        print(f"removed {removed} dead letter(s) of {ps.name}")
    return ExitCode.OK


def _plain(entry: dict[str, Any]) -> dict[str, Any]:
    """Extended JSON (relaxed) so ObjectIds, dates and tokens print readably."""
    from bson import json_util

    data: dict[str, Any] = json.loads(
        json_util.dumps(entry, json_options=json_util.RELAXED_JSON_OPTIONS)
    )
    data.pop("_id", None)
    return data


def _readable(value: Any) -> str:
    """A relaxed Extended JSON date as its ISO-8601 text; anything else as compact JSON."""
    if isinstance(value, dict) and set(value) == {"$date"}:
        return str(value["$date"])
    return value if isinstance(value, str) else json.dumps(value)


def _shortened(value: Any) -> Any:
    """Long strings and arrays cut, with a note of what was left out."""
    if isinstance(value, str) and len(value) > SHOW_STRING_CHARS:
        more = len(value) - SHOW_STRING_CHARS
        return f"{value[:SHOW_STRING_CHARS]}… ({more} more characters; --full shows all)"
    if isinstance(value, list):
        items = [_shortened(v) for v in value[:SHOW_LIST_ITEMS]]
        if len(value) > SHOW_LIST_ITEMS:
            items.append(f"… ({len(value) - SHOW_LIST_ITEMS} more items; --full shows all)")
        return items
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    return value
