"""Document → Chroma records: id, text, metadata, chunks and content hashes.

Pure: no I/O. Everything that decides what a record looks like lives here, so that
the fingerprint of a :class:`Mapper` changes exactly when the records would.
"""

from __future__ import annotations

import array
import base64
import datetime as dt
import hashlib
import json
import math
import re
import string
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import bson
from bson import json_util
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions
from bson.decimal128 import Decimal128
from bson.timestamp import Timestamp

from syncd.config import PipelineSettings
from syncd.errors import ConfigError, MappingError, OversizedError, PoisonError
from syncd.identity import (
    CHUNK_KEY,
    CLUSTER_TIME_KEY,
    HASH_KEY,
    ID_KEY,
    TEXT_HASH_KEY,
    compact_json,
    encode_id,
    is_reserved,
    is_uuid,
    iso_ms,
    record_id,
    tree,
)
from syncd.matcher import compile_filter

MetadataValue = str | int | float | bool | list[str] | list[int] | list[float] | list[bool]
# Bump when the record layout changes in a way settings do not capture, so that
# checkpoints written by an older layout are recognised as stale.
MAPPING_VERSION = 1

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MISSING: Any = object()
# Only for measuring size: a uuid.UUID inside a document must not make us fail.
_SIZE: CodecOptions[dict[str, Any]] = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    metadata: dict[str, MetadataValue]
    text_hash: str
    content_hash: str
    embedding: list[float] | None = None


@dataclass(frozen=True)
class MappedDocument:
    key: str
    source_id: Any
    records: list[Record]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- paths ---------------------------------------------------------------------


def get_path(document: Mapping[str, Any], path: str) -> Any:
    """Value at a dot path; numeric parts index arrays, other parts map over them.

    MongoDB allows field names with dots, which a dot path cannot tell from nesting:
    ``a.b`` reaches both ``{"a": {"b": 2}}`` and ``{"a.b": 1}``. A key spelled with the
    dots is read too, so a field named ``a.b`` is not dropped; a document in which the
    path reaches two different values is poison, since keeping one would drop the other
    in silence.
    """
    if "." not in path and isinstance(document, Mapping):
        return document.get(path, _MISSING)
    found = _reach(document, path.split("."), ())
    if len(found) > 1:
        raise MappingError(
            f"field {path!r} reaches two different values, at "
            + " and at ".join(" → ".join(map(repr, steps)) for steps, _ in found),
            hint="rename one of the fields in the document",
        )
    return found[0][1] if found else _MISSING


def _reach(
    node: Any, parts: list[str], steps: tuple[str, ...]
) -> list[tuple[tuple[str, ...], Any]]:
    """Every distinct value ``parts`` reaches from ``node``, each with the keys (or array
    positions) it was reached through."""
    if not parts:
        return [(steps, node)]
    if isinstance(node, Mapping):
        found: list[tuple[tuple[str, ...], Any]] = []
        for n in range(1, len(parts) + 1):
            key = ".".join(parts[:n])
            if key in node:
                for how, value in _reach(node[key], parts[n:], (*steps, key)):
                    if not any(_same(value, seen) for _, seen in found):
                        found.append((how, value))
        return found
    if isinstance(node, list) and parts[0].isdigit():
        index = int(parts[0])
        return _reach(node[index], parts[1:], (*steps, parts[0])) if index < len(node) else []
    if isinstance(node, list):
        values = [v[parts[0]] for v in node if isinstance(v, Mapping) and parts[0] in v]
        return _reach(values, parts[1:], (*steps, parts[0])) if values else []
    return []


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind, all the way down (``True`` is not ``1`` here, nor
    ``[1, True]`` ``[1, 1]``, as in the records)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float):  # -0.0 is kept as such; NaN is NaN
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


# --- metadata values -------------------------------------------------------------


def _scalar(value: Any) -> str | int | float | bool | None:
    """One BSON value as the exact Python type Chroma accepts, or None to omit it."""
    if value is None or value is _MISSING:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value) if _INT64_MIN <= value <= _INT64_MAX else str(int(value))
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        # NaN/inf cannot travel as JSON numbers; Extended JSON's spelling keeps them visible.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dt.datetime):
        return iso_ms(value)
    if isinstance(value, uuid.UUID) or is_uuid(value):
        return str(value if isinstance(value, uuid.UUID) else uuid.UUID(bytes=bytes(value)))
    if isinstance(value, bytes):
        return base64.b64encode(bytes(value)).decode()
    return str(value)  # ObjectId, Decimal128, Timestamp, Code, Regex, ...


def _metadata_list(values: list[Any]) -> MetadataValue | None:
    items = [
        compact_json(tree(v, _scalar)) if isinstance(v, Mapping | list) else _scalar(v)
        for v in values
    ]
    kept = [v for v in items if v is not None]
    kinds = {type(v) for v in kept}
    if len(kinds) == 1:  # Chroma wants exactly one element type per list
        return cast(MetadataValue, kept)
    if kinds == {int, float}:
        return [float(v) for v in kept]
    return [v if isinstance(v, str) else compact_json(v) for v in kept] or None


def _flatten(key: str, value: Any) -> Iterator[tuple[str, MetadataValue]]:
    if isinstance(value, Mapping):
        for sub, child in value.items():
            yield from _flatten(f"{key}.{sub}", child)
        return
    converted = _metadata_list(value) if isinstance(value, list) else _scalar(value)
    if converted is not None:
        yield key, converted


# --- text ------------------------------------------------------------------------


def _text_value(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | Decimal128) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise MappingError(f"{what} is a {type(value).__name__}, not text")


# [[fill]align][sign][z][#][0][width]: the width, which pads every rendering to its size.
_SPEC_WIDTH = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(?P<width>\d*)")
_MAX_TEMPLATE_WIDTH = 10_000


def _check_spec(field: str | None, spec: str) -> None:
    width = _SPEC_WIDTH.match(spec)
    problem = None
    if width and width["width"] and int(width["width"]) > _MAX_TEMPLATE_WIDTH:
        problem = f"a width over {_MAX_TEMPLATE_WIDTH:,}"
    else:
        try:
            format("", spec)
        except (ValueError, OverflowError) as exc:
            problem = str(exc)
    if problem:
        raise ConfigError(
            f"mapping.text_template: {{{field}:{spec}}} cannot format text ({problem})",
            hint="fields are text: use no format spec, or an alignment such as {title:>20}",
        )


def _check_field(field: str) -> None:
    """A field is a dot path (:func:`get_path`). Python's format syntax (``{0}``,
    ``{a[0]}``, ``{a.__class__}``) passes the parser but names no field of a document,
    so every rendering would be empty without a word."""
    parts = field.split(".")
    if (
        parts[0].isdigit()
        or any(not part or "[" in part or "]" in part for part in parts)
        or any(part.startswith("__") and part.endswith("__") for part in parts)
    ):
        raise ConfigError(
            f"mapping.text_template: {{{field}}} is not a field path",
            hint="name fields by dot paths such as {title} or {author.name} ({tags.0} for "
            "an array's first item); positions, [index] and Python attributes are not read",
        )


def compile_template(template: str) -> Callable[[Mapping[str, Any]], str]:
    """A renderer for ``mapping.text_template``; a ConfigError for a template that could
    fail on some document.

    Fields are rendered as text (:func:`_text_value`), so a format spec is checked once,
    here, against a string: ``{title:d}`` or ``{title:{width}}`` can never work.
    """
    parts: list[tuple[str, str | None, str]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"mapping.text_template is not a valid template: {exc}") from None
    for literal, field, spec, conversion in parsed:
        if field is not None and (not field or conversion):
            raise ConfigError(
                "mapping.text_template: use named dot paths such as {title}, without !r/!s"
            )
        if field is not None:
            _check_field(field)
        _check_spec(field, spec or "")
        parts.append((literal, field, spec or ""))

    def render(document: Mapping[str, Any]) -> str:
        out: list[str] = []
        for literal, field, spec in parts:
            out.append(literal)
            if field is None:
                continue
            value = get_path(document, field)
            text = (
                ""
                if value is _MISSING or value is None
                else _text_value(value, f"template field {field!r}")
            )
            out.append(format(text, spec) if spec else text)
        return "".join(out)

    return render


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Windows of at most ``size`` characters, ending at whitespace when one is near."""
    return [text[start:end] for start, end in chunk_spans(text, size, overlap)]


def chunk_spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    if size <= 0 or len(text) <= size:
        return [(0, len(text))]
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = start + size
        if end >= len(text):
            spans.append((start, len(text)))
            return spans
        # Break after the last whitespace in the back half of the window, but never so
        # early that the next window (end - overlap) would not move forward.
        floor = start + max(overlap + 1, size // 2)
        cut = max(text.rfind(c, floor, end) for c in " \n\t\r")
        if cut >= floor:
            end = cut + 1
        spans.append((start, end))
        start = _word_start(text, end - overlap, max(start + 1, end - 2 * overlap))


def _word_start(text: str, at: int, floor: int) -> int:
    """Move an overlap start back (at most to ``floor``) to a word start, if one is near."""
    if at <= floor or text[at - 1].isspace():
        return at
    cut = max(text.rfind(c, floor, at) for c in " \n\t\r")
    return cut + 1 if cut >= floor else at


# --- the mapper --------------------------------------------------------------------


class Mapper:
    def __init__(self, pipeline: PipelineSettings) -> None:
        self._pipeline = pipeline
        mapping = pipeline.mapping
        self._mapping = mapping
        self._embedder = pipeline.embedder
        self._template = compile_template(mapping.text_template) if mapping.text_template else None
        # MappingSettings has refused a reserved key already.
        self._metadata = [(path, mapping.rename.get(path, path)) for path in mapping.metadata]
        self._matches = compile_filter(pipeline.filter)
        self._fingerprint = _sha256(compact_json(self._fingerprint_inputs(), sort_keys=True))

    def _fingerprint_inputs(self) -> dict[str, Any]:
        m, e = self._mapping, self._embedder
        return {
            "version": MAPPING_VERSION,
            "text": m.text,
            "text_template": m.text_template,
            "metadata": m.metadata,
            "rename": m.rename,
            "chunk_size": m.chunk_size,
            "chunk_overlap": m.chunk_overlap if m.chunk_size else 0,
            "filter": json.loads(json_util.dumps(self._pipeline.filter)),
            "embedder": [e.kind, e.model, e.field, e.dimensions],
        }

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def metadata_keys(self) -> frozenset[str]:
        """The top-level metadata keys this mapping can produce (fields after rename).

        A record lacking one is written with ``None`` for it, which deletes the key in
        Chroma: a key Chroma left behind can then never pass for the document's.
        """
        return frozenset(key for _, key in self._metadata)

    def matches(self, document: Mapping[str, Any]) -> bool:
        return self._matches(document)

    def map(
        self, document: Mapping[str, Any], *, cluster_time: Timestamp | None = None
    ) -> MappedDocument:
        if "_id" not in document:
            raise MappingError("document has no _id", pipeline=self._pipeline.name)
        source_id = document["_id"]
        key = encode_id(source_id)
        try:
            return self._map(document, key, source_id, cluster_time)
        except PoisonError as exc:
            exc.with_context(pipeline=self._pipeline.name, document_id=source_id)
            raise

    def _map(
        self, document: Mapping[str, Any], key: str, source_id: Any, cluster_time: Timestamp | None
    ) -> MappedDocument:
        self._check_size(document)
        text = self._text(document, source_id)
        if len(text) > self._mapping.max_text_chars:
            raise OversizedError(
                f"text is {len(text)} characters, over mapping.max_text_chars "
                f"({self._mapping.max_text_chars})",
                hint="raise mapping.max_text_chars, or exclude the document with the filter",
            )
        user = self._user_metadata(document)
        embedding = self._embedding(document) if self._embedder.kind == "field" else None
        vector_hash = vector_digest(embedding) if embedding is not None else None
        size, overlap = self._mapping.chunk_size, self._mapping.chunk_overlap
        pieces = chunk_text(text, size, overlap) if size else [text]
        records = []
        for n, piece in enumerate(pieces):
            # The chunk index is hashed too: moving text between chunks is a change.
            hashed: dict[str, Any] = {"text": piece, "metadata": user, "chunk": n}
            if vector_hash is not None:
                hashed["embedding"] = vector_hash
            text_hash, content_hash = (
                _sha256(piece),
                _sha256(compact_json(hashed, sort_keys=True)),
            )
            metadata: dict[str, MetadataValue] = {**user, ID_KEY: key, CHUNK_KEY: n}
            if cluster_time is not None:
                metadata[CLUSTER_TIME_KEY] = cluster_time.time << 32 | cluster_time.inc
            metadata |= {HASH_KEY: content_hash, TEXT_HASH_KEY: text_hash}
            rid = record_id(key, n, chunked=bool(size))
            records.append(Record(rid, piece, metadata, text_hash, content_hash, embedding))
        return MappedDocument(key=key, source_id=source_id, records=records)

    def _check_size(self, document: Mapping[str, Any]) -> None:
        raw = getattr(document, "raw", None)  # RawBSONDocument already knows its size
        try:
            size = len(
                raw if isinstance(raw, bytes) else bson.encode(document, codec_options=_SIZE)
            )
        except (bson.errors.InvalidDocument, TypeError, OverflowError) as exc:
            raise MappingError(f"document cannot be encoded as BSON: {exc}") from None
        if size > (limit := self._mapping.max_document_bytes):
            raise OversizedError(
                f"document is {size} bytes of BSON, over mapping.max_document_bytes ({limit})",
                hint="raise mapping.max_document_bytes or exclude the document with the filter",
            )

    def _text(self, document: Mapping[str, Any], source_id: Any) -> str:
        if self._template is not None:
            return self._template(document)
        path = self._mapping.text or ""
        value = get_path(document, path)
        if value is _MISSING or value is None:
            raise MappingError(
                f"text field {path!r} is missing in document _id={source_id!r}",
                hint="fix the document, or narrow the pipeline filter to documents that have it",
            )
        return _text_value(value, f"text field {path!r}")

    def _user_metadata(self, document: Mapping[str, Any]) -> dict[str, MetadataValue]:
        out: dict[str, MetadataValue] = {}
        source: dict[str, str] = {}  # metadata key -> the mapping.metadata path it came from
        for path, name in self._metadata:
            value = get_path(document, path)
            for key, converted in _flatten(name, value):
                if is_reserved(key):
                    raise MappingError(
                        f"metadata key {key!r} (from {path!r}) uses a reserved prefix",
                        hint="rename the field with mapping.rename",
                    )
                if key in out and compact_json(out[key]) != compact_json(converted):
                    # {"a.b": 1, "a": {"b": 2}} flattens to "a.b" twice: keeping either
                    # value would lose the other without a word.
                    raise MappingError(
                        f"metadata key {key!r} would hold two different values "
                        f"({_sources(source[key], path)})",
                        hint="rename the field in the document, or change mapping.metadata "
                        "or mapping.rename",
                    )
                out[key] = converted
                source[key] = path
        return out

    def _embedding(self, document: Mapping[str, Any]) -> list[float]:
        path = self._embedder.field or ""
        value = get_path(document, path)
        if isinstance(value, Binary) and value.subtype == 9:  # BSON vector (float32/int8)
            value = list(value.as_vector().data)
        if value is _MISSING or value is None:
            raise MappingError(f"vector field {path!r} is missing")
        if not isinstance(value, list) or not _numbers(value):
            raise MappingError(f"vector field {path!r} is not a list of numbers")
        vector_f = list(map(float, value))
        if len(vector_f) != self._embedder.dimensions:
            raise MappingError(
                f"vector field {path!r} has {len(vector_f)} dimensions, expected "
                f"{self._embedder.dimensions} (embedder.dimensions)"
            )
        if not all(map(math.isfinite, vector_f)):
            raise MappingError(f"vector field {path!r} contains NaN or infinity")
        return vector_f


def _sources(first: str, second: str) -> str:
    if first == second:
        return f"in {first!r}, a field name with a dot and a nested field flatten to it"
    return f"from {first!r} and {second!r}"


def vector_digest(vector: list[float]) -> str:
    """SHA-256 of the vector as little-endian float64s: part of the stored content hash.

    Hashing the packed bytes costs microseconds where rendering 384 doubles as JSON
    cost half a millisecond per event, and it is just as exact.
    """
    packed = array.array("d", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return hashlib.sha256(packed.tobytes()).hexdigest()


def _numbers(values: list[Any]) -> bool:
    """Every item an int or float (not a bool): a set of types first, as vectors are long."""
    if set(map(type, values)) <= {float, int}:
        return True
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
