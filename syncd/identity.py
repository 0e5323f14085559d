"""Record identity: how a MongoDB document is named in Chroma, and the keys syncd keeps.

A document's *key* is its encoded ``_id`` (``i:42``, ``oid:65a1...``, ``s:hello``);
a pipeline that reads several collections puts the collection in front of it
(``docs/i:42``), since two collections may hold the same ``_id``. A record id is the
key, or the key and a chunk number (``i:42#3``) when the pipeline chunks text. Every
record carries its key in ``syncd_id``, so that a document's records are found by
one metadata lookup, and, in a multi-collection pipeline, its collection in
``syncd_coll``.

Every part of syncd that builds, parses or looks up a record id, or reads a reserved
metadata key, does it through this module. Pure: no I/O.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import bson
from bson import json_util
from bson.binary import Binary
from bson.code import Code
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId

from syncd.errors import MappingError

if TYPE_CHECKING:
    from syncd.config import PipelineSettings
    from syncd.mapping import MappedDocument

# --- reserved metadata keys ------------------------------------------------------
#
# Keys syncd writes into every record's metadata. A mapping may not produce a key with
# the reserved prefix (nor Chroma's own "chroma:"), so none of these is ever shadowed.

RESERVED_PREFIX = "syncd_"
CHROMA_RESERVED_PREFIX = "chroma:"
ID_KEY = "syncd_id"  # the record's key: a document's records are looked up by it
COLL_KEY = "syncd_coll"  # the source collection, in multi-collection pipelines only
CHUNK_KEY = "syncd_chunk"  # the chunk number, 0 for an unchunked record
HASH_KEY = "syncd_hash"  # digest of text, metadata, chunk number (and given vector)
TEXT_HASH_KEY = "syncd_text_hash"  # digest of the text alone: re-embed only when it moves
CLUSTER_TIME_KEY = "syncd_cluster_time"  # the event that wrote the record (not compared)

CHUNK_SEPARATOR = "#"
COLLECTION_SEPARATOR = "/"


def is_reserved(key: str) -> bool:
    """Whether a metadata key belongs to syncd or Chroma, never to a mapping."""
    return key.startswith((RESERVED_PREFIX, CHROMA_RESERVED_PREFIX))


# --- keys and record ids -----------------------------------------------------------


def prefixed(pipeline: PipelineSettings) -> bool:
    """Whether the pipeline's keys name their collection: it reads several."""
    return bool(pipeline.collections)


def record_key(collection: str, source_id: Any, *, prefixed: bool) -> str:
    """The key of a document; prefixed by collection for multi-collection pipelines."""
    key = encode_id(source_id)
    return f"{collection}{COLLECTION_SEPARATOR}{key}" if prefixed else key


def split_key(key: str, *, prefixed: bool, collection: str) -> tuple[str, str]:
    """The collection and the encoded ``_id`` a key names.

    An unprefixed key names ``collection`` (the pipeline's only one). The collection is
    what stands before the first ``/``: an encoded ``_id`` may contain ``/``
    (``docs/s:a/b``), a tag never does.
    """
    if not prefixed:
        return collection, key
    named, _, encoded = key.partition(COLLECTION_SEPARATOR)
    return named, encoded


def record_id(key: str, chunk: int, *, chunked: bool) -> str:
    """The id of one record of a document: its key, with the chunk number when chunked."""
    return f"{key}{CHUNK_SEPARATOR}{chunk}" if chunked else key


def base_id(record_id: str) -> str:
    """The key a record id belongs to (the chunk number stripped)."""
    return record_id.split(CHUNK_SEPARATOR, 1)[0]


def canonical_key(record_id: str, *, prefixed: bool, collection: str) -> str:
    """The key of a record id a user typed, spelled as syncd writes it.

    ``i:03``, ``i:+3`` and ``i: 3`` all decode to the ``_id`` 3, whose records syncd
    wrote as ``i:3``: looking up the typed spelling would find none. A chunk number
    (``i:3#2``) is dropped, but must be one. MappingError when it names no ``_id``.
    """
    key, sep, chunk = record_id.partition(CHUNK_SEPARATOR)
    if sep and not (chunk.isascii() and chunk.isdigit()):
        raise MappingError(
            f"not a syncd record id: {record_id!r} (after '#' comes a chunk number: 0, 1, ...)"
        )
    named, encoded = split_key(key, prefixed=prefixed, collection=collection)
    return record_key(named, decode_id(encoded), prefixed=prefixed)


def in_collection(doc: MappedDocument, key: str, collection: str) -> MappedDocument:
    """A mapped document's records renamed to a prefixed key, with ``syncd_coll`` set."""
    records = []
    for record in doc.records:
        suffix = record.id[len(doc.key) :]
        metadata = dict(record.metadata)
        metadata[ID_KEY] = key
        metadata[COLL_KEY] = collection
        records.append(dataclasses.replace(record, id=key + suffix, metadata=metadata))
    return dataclasses.replace(doc, key=key, records=records)


# --- _id encoding ------------------------------------------------------------------
#
# "<tag>:<payload>", escaped so that '#' (the chunk separator) never appears.
# Integers of any width share "i:" and UUIDs share "uuid:" whichever Python type
# carried them: MongoDB's _id index treats those as the same key, so the record id
# must not depend on how the driver happened to decode the value.


def encode_id(value: Any) -> str:
    return _escape(_encode(value))


def decode_id(record_id: str) -> Any:
    try:
        return _decode(_unescape(base_id(record_id)))
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,  # a JSON leaf that is no encoded value (doc:{"a":1})
        ArithmeticError,  # decimal.InvalidOperation (dec:abc), OverflowError
        RecursionError,
        bson.errors.BSONError,
    ) as exc:
        why = "not a number" if isinstance(exc, decimal.DecimalException) else str(exc)
        raise MappingError(f"not a syncd record id: {record_id!r} ({why})") from None


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("#", "%23")


def _unescape(text: str) -> str:
    return text.replace("%23", "#").replace("%25", "%")


def _encode(value: Any) -> str:
    if isinstance(value, bool):
        return f"b:{'true' if value else 'false'}"
    if isinstance(value, int):
        return f"i:{int(value)}"
    if isinstance(value, float):
        return f"f:{value!r}"
    if isinstance(value, str) and not isinstance(value, Code):
        return f"s:{value}"
    if isinstance(value, ObjectId):
        return f"oid:{value}"
    if isinstance(value, uuid.UUID):
        return f"uuid:{value}"
    if is_uuid(value):
        return f"uuid:{uuid.UUID(bytes=bytes(value))}"
    if isinstance(value, bytes):
        subtype = value.subtype if isinstance(value, Binary) else 0
        return f"bin{subtype}:{base64.urlsafe_b64encode(bytes(value)).decode()}"
    if isinstance(value, dt.datetime):
        return f"dt:{iso_ms(value)}"
    if isinstance(value, Decimal128):
        return f"dec:{value}"
    if value is None:
        return "null:"
    if isinstance(value, Mapping):
        return "doc:" + compact_json(tree(value, _encode))
    if isinstance(value, list | tuple):
        return "arr:" + compact_json(tree(value, _encode))
    # Timestamp, DatetimeMS out of range, MinKey, MaxKey, Code, DBRef, Regex...:
    # canonical Extended JSON is exact for all of them.
    return "ej:" + json_util.dumps(
        {"v": value}, json_options=json_util.CANONICAL_JSON_OPTIONS, separators=(",", ":")
    )


def _decode_int(payload: str) -> int:
    number = int(payload)
    # Re-encoded as int32 or int64 as the driver would; queries match either width.
    return number if -(2**31) <= number < 2**31 else bson.Int64(number)


def _decode_binary(tag: str, payload: str) -> bytes:
    data, subtype = base64.urlsafe_b64decode(payload.encode()), int(tag[3:])
    return data if subtype == 0 else Binary(data, subtype)


_DECODERS: dict[str, Callable[[str], Any]] = {
    "s": lambda p: p,
    "i": _decode_int,
    "oid": ObjectId,
    "uuid": lambda p: Binary.from_uuid(uuid.UUID(p)),
    "b": lambda p: {"true": True, "false": False}[p],
    "f": float,
    "dt": lambda p: dt.datetime.fromisoformat(p.replace("Z", "+00:00")),
    "dec": Decimal128,
    "null": lambda p: None,
    "doc": lambda p: tree(json.loads(p), _decode),
    "ej": lambda p: json_util.loads(p, json_options=json_util.CANONICAL_JSON_OPTIONS)["v"],
}


def _decode(text: str) -> Any:
    tag, sep, payload = text.partition(":")
    if not sep:
        raise ValueError("missing type tag")
    if tag.startswith("bin"):
        return _decode_binary(tag, payload)
    tag = "doc" if tag == "arr" else tag
    if tag not in _DECODERS:
        raise ValueError(f"unknown type tag {tag!r}")
    return _DECODERS[tag](payload)


# --- BSON value helpers, shared with mapping's metadata ------------------------------


def is_uuid(value: Any) -> bool:
    return isinstance(value, Binary) and value.subtype == 4 and len(value) == 16


def tree(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Nested documents and arrays as JSON (field order kept), ``leaf`` for the rest."""
    if isinstance(value, Mapping):
        return {str(k): tree(v, leaf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [tree(v, leaf) for v in value]
    return leaf(value)


def iso_ms(value: dt.datetime) -> str:
    """UTC ISO-8601 at BSON's millisecond precision; naive datetimes are UTC (driver default)."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    value = value.replace(microsecond=value.microsecond // 1000 * 1000)
    return value.isoformat(timespec="milliseconds") + "Z"


def compact_json(value: Any, *, sort_keys: bool = False) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
