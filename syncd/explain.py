"""One document's story, for `syncd explain PIPELINE ID`.

Its current MongoDB state, its Chroma record(s) and whether their content hashes match
what the document maps to now, its recent syncs from the local span log, and any dead
letter. Reads only; changes nothing.
"""

from __future__ import annotations

from typing import Any

import bson
import bson.errors
from bson import json_util

from syncd.compare import differing_keys, differs
from syncd.config import PipelineSettings, Settings
from syncd.errors import ConfigError, MappingError, PoisonError
from syncd.identity import (
    HASH_KEY,
    ID_KEY,
    base_id,
    canonical_key,
    decode_id,
    prefixed,
    split_key,
)
from syncd.mapping import Record
from syncd.runtime import Runtime
from syncd.source import id_key
from syncd.spanlog import SpanLog


def explain(settings: Settings, pipeline: PipelineSettings, record_id: str) -> dict[str, Any]:
    key = user_key(pipeline, record_id)
    collection, source_id = locate(pipeline, key)
    runtime = Runtime(settings)
    try:
        doc = runtime.source(pipeline).fetch(collection, [source_id]).get(id_key(source_id))
        expected, mapping_error = _expected(runtime, pipeline, doc, key)
        sink = runtime.sink(pipeline, create=False)
        stored = sink.get_where({ID_KEY: key})
        records = [
            {
                "id": r.id,
                "document": r.document,
                "metadata": dict(r.metadata),
                "hash_matches": r.id in expected
                and expected[r.id].content_hash == r.metadata.get(HASH_KEY),
                # As `syncd verify` judges it: a record that differs from what syncd
                # wrote (edited in Chroma, or keys Chroma left behind) keeps its hash.
                "matches": r.id in expected and not differs(expected[r.id], r),
                "text_matches": r.id in expected and (r.document or "") == expected[r.id].text,
                # Metadata keys whose value (or presence) differs from what syncd writes.
                "differing_keys": differing_keys(expected[r.id].metadata, r.metadata)
                if r.id in expected
                else [],
                # No such record should exist: the document is gone, filtered out or
                # cannot be mapped, or the chunk is one too many (verify: orphaned).
                "orphaned": r.id not in expected,
            }
            for r in stored
        ]
        missing = sorted(set(expected) - {r.id for r in stored})
        dead = runtime.dead_letters(pipeline).get(pipeline.name, key)
        halt = _halt_at(runtime, pipeline, key)
    finally:
        runtime.close()
    matching = not missing and all(r["matches"] for r in records) and len(records) == len(expected)
    log = SpanLog(settings.telemetry.span_log_path, settings.telemetry.span_log_max_bytes)
    try:
        syncs = log.find(pipeline.name, key) if settings.telemetry.span_log_path else []
    finally:
        log.close()
    return {
        "pipeline": pipeline.name,
        "id": key,
        "collection": collection,
        "source_id": json_util.dumps(source_id),
        "mongodb": _jsonable(doc),
        "matches_filter": doc is not None and runtime_matches(pipeline, doc),
        "mapping_error": mapping_error,
        "chroma": records,
        "missing_in_chroma": missing,
        "records_match": matching,
        # As verify counts them: the records of a document whose change is parked as a
        # dead letter (removed) or that the pipeline is halted at (missing or old) are
        # held back, not drift.
        "consistent": matching
        or (dead is not None and not records)
        or (halt is not None and halt["here"] and not any(r["orphaned"] for r in records)),
        "recent_syncs": syncs,
        "dead_letter": _jsonable(dead),
        "halt": halt,
    }


def _halt_at(runtime: Runtime, pipeline: PipelineSettings, key: str) -> dict[str, Any] | None:
    """The halt in force, described, when it holds this document (``here``) or the whole
    pipeline at no document (a refused write, a drop); None otherwise."""
    from syncd import halts

    halt = halts.active(runtime.store.load(pipeline.name))
    if halt is None or (halt.has_document and halt.key != key):
        return None
    return {**halt.describe(), "here": halt.has_document}


def runtime_matches(pipeline: PipelineSettings, doc: Any) -> bool:
    from syncd.mapping import Mapper

    return Mapper(pipeline).matches(doc)


def _expected(
    runtime: Runtime, pipeline: PipelineSettings, doc: Any, key: str
) -> tuple[dict[str, Record], str | None]:
    if doc is None:
        return {}, None
    from syncd.consistency import open_checker

    checker = open_checker(runtime, pipeline)
    if not checker.mapper.matches(doc):
        return {}, None
    collection, _ = locate(pipeline, key)
    try:
        mapped = checker.expected(collection, doc)
    except (MappingError, PoisonError) as exc:
        return {}, exc.message
    return {r.id: r for r in mapped.records}, None


def user_key(pipeline: PipelineSettings, record_id: str) -> str:
    """The document key a record id given on the command line names, as syncd writes
    it (``i:03`` is ``i:3``); ConfigError if it names none."""
    locate(pipeline, base_id(record_id))  # a collection it does not read, an _id too odd
    try:
        return canonical_key(
            record_id, prefixed=prefixed(pipeline), collection=pipeline.collection or ""
        )
    except MappingError as exc:
        raise ConfigError(exc.message, hint=_ID_HINT) from None


_ID_HINT = (
    "ids syncd writes look like i:42, s:hello, oid:65a1..., uuid:...; a record with any other "
    "id was not written by syncd and has no document: `syncd verify` counts it as orphaned "
    "and `syncd repair` deletes it"
)


def locate(pipeline: PipelineSettings, key: str) -> tuple[str, Any]:
    """The collection and `_id` a record id (or key) stands for; ConfigError if none."""
    multi = prefixed(pipeline)
    collection, encoded = split_key(key, prefixed=multi, collection=pipeline.collection or "")
    if multi and collection not in (pipeline.collections or ()):
        raise ConfigError(
            f"record id {key!r} names no collection of pipeline {pipeline.name!r}",
            hint="multi-collection ids look like COLLECTION/ID, e.g. docs/i:42",
        )
    try:
        source_id = decode_id(encoded)
        bson.encode({"_id": source_id})  # one MongoDB cannot hold: i:99999999999999999999
        return collection, source_id
    except (OverflowError, UnicodeEncodeError, bson.errors.BSONError) as exc:
        raise ConfigError(
            f"not a syncd record id: {key!r} (MongoDB cannot hold that _id: {exc})"
        ) from None
    except MappingError as exc:
        raise ConfigError(exc.message, hint=_ID_HINT) from None


def _jsonable(value: Any) -> Any:
    if value is None:
        return None
    return json_util.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))
