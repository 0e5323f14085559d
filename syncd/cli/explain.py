"""`syncd explain PIPELINE ID`: one document's story across both stores."""

from __future__ import annotations

import argparse
import json
from typing import Any

from syncd import hints
from syncd.cli.common import add_config_options, load_settings, print_json
from syncd.errors import ExitCode


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "explain",
        help="show one document in MongoDB and Chroma, its recent syncs and dead letter",
        description="ID is a record id as syncd writes it (i:42, s:hello, oid:65a1..., "
        "or COLLECTION/ID for multi-collection pipelines; a chunk id like i:42#3 works too). "
        "Exit 0 when the Chroma records match the document, or are held back by a halt or "
        "a dead letter (as `syncd verify` counts them), 1 otherwise.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    parser.add_argument("id", metavar="ID")
    parser.add_argument("--json", action="store_true", help="print the story as JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args, chroma=True)
    from syncd.explain import explain

    story = explain(settings, settings.pipeline(args.pipeline), args.id)
    if args.json:
        print_json(story)
    else:
        _print(story)
    return ExitCode.OK if story["consistent"] else ExitCode.DRIFT_OR_FAILURE


_SYNCS_SHOWN = 10  # the newest; --json has all that explain found


def _unlike_written(record: dict[str, Any]) -> str:
    """What differs from what syncd wrote, without guessing who changed it."""
    parts = [] if record.get("text_matches") else ["text"]
    keys = record.get("differing_keys") or []
    if keys:
        parts.append(f"metadata ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})")
    what = " and ".join(parts) or "the record"
    verb = "differ" if len(parts) > 1 else "differs"
    return (
        f"{what} in Chroma {verb} from what syncd wrote "
        "(edited in Chroma, or left behind by Chroma)"
    )


def _print(story: dict[str, Any]) -> None:
    print(f"{story['pipeline']} / {story['id']}  (collection {story['collection']})")
    doc = story["mongodb"]
    print(f"  MongoDB:  {'absent' if doc is None else json.dumps(doc, default=str)[:400]}")
    if doc is not None and not story["matches_filter"]:
        print("            does not match the pipeline filter: it must not be in Chroma")
    if story["mapping_error"]:
        print(f"            cannot be mapped: {story['mapping_error']}")
    if not story["chroma"] and not story["missing_in_chroma"]:
        print("  Chroma:   no records")
    for record in story["chroma"]:
        if record["matches"]:
            verdict = "matches"
        elif record.get("orphaned"):
            verdict = "ORPHANED (no record should exist for this document now)"
        elif record["hash_matches"]:
            verdict = f"STALE ({_unlike_written(record)})"
        else:
            verdict = "STALE (hash differs)"
        print(f"  Chroma:   {record['id']}  {verdict}")
    for rid in story["missing_in_chroma"]:
        print(f"  Chroma:   {rid}  MISSING")
    print(f"  verdict:  {_verdict(story)}")
    syncs = story["recent_syncs"]
    shown = syncs[-_SYNCS_SHOWN:]
    counted = f"{len(shown)} of {len(syncs)}" if len(shown) < len(syncs) else f"{len(syncs)}"
    print(f"  recent syncs ({counted}):")
    for entry in shown:
        print(
            f"    {entry.get('time', '?')}  {entry.get('operation', '?'):8} "
            f"{entry.get('outcome', '?')}  trace {entry.get('trace_id') or '-'}"
        )
    dead = story["dead_letter"]
    if dead:
        print(f"  dead letter: {dead.get('error_class')}: {dead.get('message')}")
    halt = story["halt"]
    if halt:
        print(f"  halt:     {halt['error_class']}: {halt['reason']}")
        print(f"            {halt['hint']}")


def _verdict(story: dict[str, Any]) -> str:
    """Consistent or drift, and what holds the document back: a halt or a dead letter."""
    pipeline = story["pipeline"]
    held = None
    halt = story["halt"]
    if halt and halt.get("here"):
        held = (
            "the pipeline is halted at this document and applies none of its changes "
            f"until the halt is lifted (below; `{hints.command('status', pipeline)}`)"
        )
    elif halt:
        held = (
            "the pipeline is halted (below) and applies no change after the halt until it "
            f"is lifted, this document's included (`{hints.command('status', pipeline)}`)"
        )
    elif story["dead_letter"]:
        held = (
            "its change is parked as a dead letter (below); fix the document, then "
            f"`{hints.command('dlq', 'retry', pipeline, story['id'])}`"
        )
    if story["records_match"]:
        return "consistent" if held is None else f"consistent with what it maps to now, but {held}"
    if held is not None and halt and not halt.get("here"):
        return f"drift, or not synced yet: {held}"
    if held is not None:
        return f"not synced: {held}"
    return f"drift; `{hints.command('repair', pipeline)}` fixes it"
