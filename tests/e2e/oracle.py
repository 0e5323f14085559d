"""What Chroma must hold for some MongoDB documents, derived from the README's rules alone.

Written without `syncd.mapping` on purpose, so that a mapping bug cannot hide behind
itself. It covers this mapping: `mapping = {text = "body", metadata = [...]}` and
`embedder = EMBEDDER`:

* one record per document (no chunking); its id is the `_id` encoded as `i:<int>` (any
  width), `f:<double>` (`f:nan`, `f:-0.0`), `b:true`, `dec:<decimal>`, `s:<string>`,
  `oid:<hex>` or `uuid:<uuid>` (a UUID, or BSON binary of subtype 4), behind
  `<collection>/` for a multi-collection pipeline;
* the record's text is the document's `body`;
* metadata: the listed fields (`METADATA` unless told otherwise); nested documents
  flatten to dotted keys, `null` and missing fields are dropped; keys starting with
  `syncd_` are reserved and not compared;
* metadata floats as Chroma stores them: within a few units in the last place;
* the embedding is the document's own vector (`embedder.kind = "field"`), or, for a
  pipeline whose embedder is an embedding service, what that service answers for the
  text; compared within float32 precision, as Chroma stores it.

Which documents are mirrored is for the caller to say: the ones MongoDB finds with the
pipeline's `filter`, less those that cannot be mapped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from bson import Binary, Decimal128, ObjectId

from syncd.embedder import HashingEmbedder

from .helpers import chroma_records, diff, pipeline_table

DIMENSIONS = 4
METADATA = ("title", "tags", "n", "nested")
EMBEDDER: dict[str, Any] = {"kind": "field", "field": "vec", "dimensions": DIMENSIONS}


def pipeline(
    name: str, database: str, *, metadata: Sequence[str] = METADATA, **overrides: Any
) -> dict[str, Any]:
    """A pipeline table with the mapping and embedder this oracle describes; `mapping`
    in `overrides` adds to it (`max_text_chars`, ...), anything else is the pipeline's."""
    mapping = {"text": "body", "metadata": list(metadata), **overrides.pop("mapping", {})}
    overrides.setdefault("embedder", EMBEDDER)
    return pipeline_table(name, database, mapping=mapping, **overrides)


def vector(n: float) -> list[float]:
    """A document's own embedding (`vec`) of DIMENSIONS numbers, distinct for small `n`."""
    return [1.0, (n % 64) / 64, 0.25, -0.5]  # |x| <= 1: float32 keeps 1e-5


def document(key: int | str, *, version: int = 0) -> dict[str, Any]:
    """A document exercising the rules above; `version` changes every mapped part."""
    n = key if isinstance(key, int) else len(key)
    doc: dict[str, Any] = {
        "_id": key,
        "body": f"document {key} version {version}",
        "title": f"title {key}.{version}",
        "tags": ["a", f"v{version}"],
        "n": n + version,
        "nested": {"depth": version, "label": f"l{key}", "gone": None},
        "vec": [1.0, (n % 64) / 64, version / 4, -0.5],  # |x| <= 1: float32 keeps 1e-5
        "unmapped": "not in the metadata",
    }
    if version % 2:
        del doc["title"]  # a field that comes and goes
    return doc


def record_id(source_id: Any, collection: str | None = None) -> str:
    if isinstance(source_id, bool):
        encoded = f"b:{'true' if source_id else 'false'}"
    elif isinstance(source_id, int):  # any width: int32, Int64
        encoded = f"i:{int(source_id)}"
    elif isinstance(source_id, float):
        encoded = f"f:{source_id!r}"  # f:1.5, f:nan, f:-0.0
    elif isinstance(source_id, str):
        encoded = f"s:{source_id}"
    elif isinstance(source_id, Decimal128):
        encoded = f"dec:{source_id}"
    elif isinstance(source_id, ObjectId):
        encoded = f"oid:{source_id}"
    elif isinstance(source_id, uuid.UUID):
        encoded = f"uuid:{source_id}"
    elif isinstance(source_id, Binary) and source_id.subtype == 4:
        encoded = f"uuid:{uuid.UUID(bytes=bytes(source_id))}"
    else:
        raise TypeError(
            f"the oracle encodes bool, number, str, ObjectId and UUID ids only, not {source_id!r}"
        )
    return f"{collection}/{encoded}" if collection else encoded


def _flat(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flat(f"{prefix}.{key}", inner)
    else:
        yield prefix, list(value) if isinstance(value, list) else value


def expected(
    docs: Iterable[Mapping[str, Any]],
    *,
    collection: str | None = None,
    metadata_fields: Sequence[str] = METADATA,
    embed: Callable[[str], Sequence[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Record id -> {document, metadata, embedding} for these documents; `embed` is the
    embedding service's answer for a text, when the pipeline embeds with one."""
    out: dict[str, dict[str, Any]] = {}
    for doc in docs:
        metadata: dict[str, Any] = {}
        for field in metadata_fields:
            metadata.update(_flat(field, doc.get(field)))
        vec = doc["vec"] if embed is None else embed(doc["body"])
        out[record_id(doc["_id"], collection)] = {
            "document": doc["body"],
            "metadata": metadata,
            "embedding": [float(x) for x in vec],
        }
    return out


def embedded_by_the_api(
    docs: Iterable[Mapping[str, Any]], *, dimensions: int = 32, **kw: Any
) -> dict[str, dict[str, Any]]:
    """The records, with the vectors the test embedding API serves for their texts
    (`tests/harness/embedding_api.py` answers with the hashing embedder's)."""
    model = HashingEmbedder(dimensions)
    return expected(docs, embed=lambda text: model.embed([text])[0], **kw)


def actual(chroma_collection: Any) -> dict[str, dict[str, Any]]:
    """What the Chroma collection holds, reserved `syncd_` metadata left out."""
    records = chroma_records(chroma_collection)
    for record in records.values():
        record["metadata"] = {
            k: v for k, v in record["metadata"].items() if not k.startswith("syncd_")
        }
    return records


def mismatch(
    docs: Iterable[Mapping[str, Any]],
    chroma_collection: Any,
    *,
    collection: str | None = None,
    metadata_fields: Sequence[str] = METADATA,
    embed: Callable[[str], Sequence[float]] | None = None,
) -> str:
    """ "" when Chroma mirrors `docs` exactly, else what differs."""
    want = expected(docs, collection=collection, metadata_fields=metadata_fields, embed=embed)
    return diff(want, actual(chroma_collection))
