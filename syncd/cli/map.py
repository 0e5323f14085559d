"""`syncd map PIPELINE (--id ID | --document JSON|FILE|-)`: one document's Chroma records.

Shows the record ids, text, metadata and content hashes the pipeline's mapping makes
of one document, without writing anything or calling the embedder. ``--id`` reads the
document from MongoDB; ``--document`` takes it as (Extended) JSON: inline, from a
file, or ``-`` for stdin. Exit 0 when it maps (or the filter excludes it), 1 when it
cannot be mapped (the change would be poison).

``--json`` prints ``{"pipeline", "collection", "key", "matches_filter": bool, "error":
{"class", "message"} | null, "embedder": str, "records": [{"id", "text", "metadata",
"text_hash", "content_hash", "embedding": {"dimensions"} | null}]}``. Keys may be added,
never renamed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from syncd.cli.common import add_config_options, load_settings, print_json
from syncd.errors import ConfigError, ExitCode

TEXT_CHARS = 300  # text shown per record without --json


def register(verbs: Any) -> None:
    parser = verbs.add_parser(
        "map",
        help="show the Chroma records one document maps to, without writing",
        description="Map one document with PIPELINE's settings and print the Chroma records "
        "(ids, text, metadata, content hashes) it becomes. Nothing is written and no "
        "embedding is computed; records written by a change also carry syncd_cluster_time. "
        "Exit 0 when the document maps or the filter excludes it, 1 when it cannot be mapped.",
    )
    add_config_options(parser)
    parser.add_argument("pipeline", metavar="PIPELINE")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id",
        metavar="ID",
        help="a record id as syncd writes it (s:hello, i:42, oid:..., COLL/ID with "
        "several collections): the document is read from MongoDB",
    )
    which.add_argument(
        "--document",
        metavar="JSON|FILE|-",
        help="the document as (Extended) JSON: inline, a file, or - for stdin",
    )
    parser.add_argument(
        "--collection",
        metavar="NAME",
        help="with --document on a multi-collection pipeline: the collection it is in",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    from syncd.preview import preview

    ps = settings.pipeline(args.pipeline)
    if args.id is not None:
        collection, document = _from_mongodb(settings, ps, args.id)
    else:
        collection, document = _collection(ps, args.collection), _document(args.document)
    result = preview(ps, collection, document)
    if args.json:
        print_json(result)
    else:
        _print(result)
    return ExitCode.DRIFT_OR_FAILURE if result["error"] else ExitCode.OK


def _from_mongodb(settings: Any, ps: Any, record_id: str) -> tuple[str, dict[str, Any]]:
    from syncd.explain import locate, user_key
    from syncd.runtime import Runtime
    from syncd.source import id_key

    collection, source_id = locate(ps, user_key(ps, record_id))
    runtime = Runtime(settings)
    try:
        found = runtime.source(ps).fetch(collection, [source_id]).get(id_key(source_id))
    finally:
        runtime.close()
    if found is None:
        raise ConfigError(
            f"no document with _id {source_id!r} in {ps.database}.{collection}",
            hint="pass it with --document to see what it would become",
        )
    return collection, found


def _collection(ps: Any, given: str | None) -> str:
    if given is None:
        if ps.collection:
            return str(ps.collection)
        raise ConfigError(
            f"pipeline {ps.name!r} reads several collections: say which with --collection"
        )
    if given not in ps.source_collections:
        known = ", ".join(ps.source_collections)
        raise ConfigError(f"pipeline {ps.name!r} does not read {given!r} (it reads {known})")
    return given


def _document(value: str) -> dict[str, Any]:
    from syncd.preview import parse_document

    if value == "-":
        text, origin = _utf8(sys.stdin.buffer.read(), "stdin"), "stdin"
    elif value.lstrip()[:1] in ("{", "[", '"') or (not Path(value).exists() and _is_json(value)):
        # JSON that is not an object ([1, 2], 42) is a wrong document, not a file name
        text, origin = value, "--document"
    else:
        try:
            raw = Path(value).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read document file {value}: {exc.strerror}") from None
        text, origin = _utf8(raw, value), value
    try:
        return parse_document(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{origin}: not a JSON document: {exc}") from None


def _is_json(value: str) -> bool:
    import json

    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _utf8(raw: bytes, origin: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte order mark, as some editors write, is skipped
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{origin}: not UTF-8 text (byte {exc.start}); JSON documents are UTF-8"
        ) from None


def _print(result: dict[str, Any]) -> None:
    print(f"{result['pipeline']} / {result['key']}  (collection {result['collection']})")
    if not result["matches_filter"]:
        print("  does not match the pipeline filter: no records (syncd deletes any it had)")
        return
    if result["error"]:
        error = result["error"]
        print(f"  cannot be mapped: {error['class']}: {error['message']}")
        print("  a change to it is poison: it halts the pipeline or is dead-lettered (on_error)")
        return
    print(f"  {len(result['records'])} record(s); embedder {result['embedder']}")
    for record in result["records"]:
        text = record["text"]
        shown = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS] + f"… ({len(text)} chars)"
        print(f"  {record['id']}")
        print(f"    text:         {json.dumps(shown, ensure_ascii=False)}")
        print(f"    metadata:     {json.dumps(record['metadata'], ensure_ascii=False)}")
        print(f"    content_hash: {record['content_hash']}")
        if record["embedding"]:
            dims = record["embedding"]["dimensions"]
            print(f"    embedding:    {dims} dimensions, from the document")
