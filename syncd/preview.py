"""What one document becomes in Chroma, for `syncd map`: no writes, no embedding calls.

The records come from the pipeline's own mapping (the code every write goes through),
with the multi-collection id prefix and ``syncd_coll`` key where the pipeline has them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import bson.errors
from bson import json_util

from syncd.config import PipelineSettings
from syncd.errors import PoisonError
from syncd.identity import in_collection, prefixed, record_key
from syncd.mapping import Mapper


def preview(
    settings: PipelineSettings, collection: str, document: Mapping[str, Any]
) -> dict[str, Any]:
    """``{"pipeline", "collection", "key", "matches_filter", "error", "records": [...]}``.

    A document the filter rejects has no records (syncd deletes any it had); one that
    cannot be mapped has an ``error`` (poison: halted on or dead-lettered by
    ``on_error``).
    """
    mapper = Mapper(settings)
    multi = prefixed(settings)
    key = record_key(collection, document["_id"], prefixed=multi)
    out: dict[str, Any] = {
        "pipeline": settings.name,
        "collection": collection,
        "key": key,
        "matches_filter": mapper.matches(document),
        "error": None,
        "records": [],
        "embedder": settings.embedder.kind,
    }
    if not out["matches_filter"]:
        return out
    try:
        mapped = mapper.map(document)
    except PoisonError as exc:
        out["error"] = {"class": type(exc).__name__, "message": exc.describe()}
        return out
    if multi:
        mapped = in_collection(mapped, key, collection)
    out["records"] = [
        {
            "id": r.id,
            "text": r.text,
            "metadata": r.metadata,
            "text_hash": r.text_hash,
            "content_hash": r.content_hash,
            "embedding": None if r.embedding is None else {"dimensions": len(r.embedding)},
        }
        for r in mapped.records
    ]
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object; ValueError for a key given twice, which MongoDB would not store as one
    value (JSON parsers keep the last and drop the first without a word)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_document(text: str) -> dict[str, Any]:
    """A document given as (Extended) JSON text; ValueError when it is not one."""
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
        value = json_util.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except (ValueError, TypeError, bson.errors.BSONError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    if "_id" not in value:
        raise ValueError('the document needs an "_id"')
    try:
        bson.encode(value)  # what MongoDB could not store, no change stream brings either
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise ValueError(
            f"{ascii(bad)[1:-1]} is a lone surrogate, not UTF-8 text, which MongoDB cannot store"
        ) from None
    except RecursionError:
        raise ValueError("nested too deeply for MongoDB") from None
    except (ValueError, TypeError, OverflowError, bson.errors.BSONError) as exc:
        raise ValueError(f"MongoDB cannot store it: {exc}") from None
    return value
