"""Record identity: _id encoding, keys, record ids, the collection prefix, reserved keys.

Expected ids are written from the README's rules ("Record ids", "What syncd promises" 2).
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import bson
import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.binary import Binary
from bson.regex import Regex
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.config import PipelineSettings
from syncd.errors import MappingError
from syncd.identity import (
    COLL_KEY,
    ID_KEY,
    base_id,
    canonical_key,
    decode_id,
    encode_id,
    in_collection,
    is_reserved,
    prefixed,
    record_id,
    record_key,
    split_key,
)
from syncd.mapping import Mapper

OID = ObjectId("65a1b2c3d4e5f60718293a4b")
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (OID, "oid:65a1b2c3d4e5f60718293a4b"),
        ("hello", "s:hello"),
        ("a#b%c", "s:a%23b%25c"),
        (42, "i:42"),
        (Int64(42), "i:42"),
        (-(2**63), f"i:{-(2**63)}"),
        (1.5, "f:1.5"),
        (True, "b:true"),
        (UUID, f"uuid:{UUID}"),
        (Binary.from_uuid(UUID), f"uuid:{UUID}"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 123999), "dt:2024-01-02T03:04:05.123Z"),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 123000, tzinfo=dt.UTC), "dt:2024-01-02T03:04:05.123Z"),
        (None, "null:"),
        ({"a": 1, "b": "x"}, 'doc:{"a":"i:1","b":"s:x"}'),
    ],
)
def test_encode_id_is_readable_for_common_types(value: Any, encoded: str) -> None:
    assert encode_id(value) == encoded


def test_same_key_whatever_python_type_carried_it() -> None:
    # The _id index treats these as one key, so the record id must not depend on the decoder.
    assert encode_id(7) == encode_id(Int64(7))
    assert encode_id(UUID) == encode_id(Binary.from_uuid(UUID))
    naive = dt.datetime(2024, 5, 1, 12, 0)
    aware = dt.datetime(2024, 5, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert encode_id(naive) == encode_id(aware)


def test_compound_ids_keep_field_order() -> None:
    # {a, b} and {b, a} are different _ids in MongoDB.
    assert encode_id({"a": 1, "b": 2}) != encode_id({"b": 2, "a": 1})
    decoded = decode_id(encode_id({"b": 2, "a": {"y": 1, "x": [1, "s"]}}))
    assert list(decoded) == ["b", "a"]
    assert list(decoded["a"]) == ["y", "x"]


def test_types_do_not_collide() -> None:
    values = [1, 1.0, "1", True, b"1", Decimal128("1"), {"1": 1}, None, "null:", "i:1"]
    assert len({encode_id(v) for v in values}) == len(values)


def test_chunk_suffix_is_stripped() -> None:
    key = encode_id("doc#1")
    assert "#" not in key
    assert base_id(f"{key}#3") == key
    assert decode_id(f"{key}#3") == "doc#1"


def test_decode_rejects_foreign_ids() -> None:
    for bad in ("plain", "zz:1", "i:notanumber", "oid:xyz"):
        with pytest.raises(MappingError):
            decode_id(bad)


def _same(a: Any, b: Any) -> bool:
    """Equality as MongoDB's _id index sees it, for values that came back from decode_id."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, uuid.UUID):
        return b == Binary.from_uuid(a)
    if isinstance(a, dt.datetime):
        return encode_id(a) == encode_id(b) and isinstance(b, dt.datetime)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return (bool(a == b) and type(a) is type(b)) or (isinstance(a, int) and a == b)


scalar_ids = st.one_of(
    st.builds(ObjectId),
    st.text(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(Int64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.uuids(),
    st.uuids().map(Binary.from_uuid),
    st.booleans(),
    st.binary(max_size=40),
    st.tuples(st.binary(max_size=20), st.sampled_from([1, 2, 3, 5, 128])).map(lambda t: Binary(*t)),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
    st.decimals(allow_nan=False, places=4, min_value=-(10**29), max_value=10**29).map(
        lambda d: Decimal128(str(d))
    ),
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.just(bson.MinKey()),
    st.just(bson.MaxKey()),
    st.none(),
)
any_ids = st.recursive(
    scalar_ids,
    lambda inner: (
        st.dictionaries(st.text(min_size=1), inner, max_size=4) | st.lists(inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(any_ids)
def test_encode_decode_round_trip(value: Any) -> None:
    encoded = encode_id(value)
    assert "#" not in encoded
    assert encode_id(value) == encoded  # deterministic
    assert _same(value, decode_id(encoded))
    assert encode_id(decode_id(encoded)) == encoded
    assert decode_id(f"{encoded}#12") is not None or value is None


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text())
def test_distinct_strings_get_distinct_ids(a: str, b: str) -> None:
    assert (encode_id(a) == encode_id(b)) == (a == b)


def test_decoded_ids_can_be_sent_to_mongodb() -> None:
    for value in (OID, "x", 5, Int64(2**40), UUID, {"a": UUID}, dt.datetime(2020, 1, 1)):
        bson.encode({"_id": decode_id(encode_id(value))})


@pytest.mark.parametrize(
    "record_id", ["dec:abc", "dec:1e99999", 'doc:{"a":1}', "doc:{", "i:", "zz", ":", "b:maybe"]
)
def test_a_record_id_that_is_not_one_is_a_mapping_error(record_id: str) -> None:
    with pytest.raises(MappingError, match="not a syncd record id"):
        decode_id(record_id)


# --- unusual _ids, one at a time ------------------------------------------------------

UNUSUAL = [
    OID,
    "a/b/c",
    "/",
    "docs/s:x",
    "a#b",
    "%23",
    "%",
    "i:1",
    "",
    " spaced out ",
    "ünïcödé ✓ 日本",
    "line\nbreak",
    0,
    -1,
    2**31,
    Int64(-(2**63)),
    2**63 - 1,
    0.1,
    -0.0,
    float("inf"),
    float("nan"),
    False,
    None,
    Decimal128("-0.000"),
    Decimal128("NaN"),
    UUID,
    b"",
    Binary(b"\x00\xff", 5),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999000),
    Timestamp(1, 2),
    bson.MinKey(),
    bson.MaxKey(),
    Regex("^a/b#", "i"),
    {"a": 1, "b": {"c": [1, "x/y#z", None]}},
    {"": "empty key", "a.b": 1, "$x": 2},
    {"b": 2, "a": 1},
    [1, [2, [3]], {"k": "v"}],
    [],
    {},
]


@pytest.mark.parametrize("value", UNUSUAL, ids=repr)
def test_unusual_ids_round_trip(value: Any) -> None:
    encoded = encode_id(value)
    assert "#" not in encoded
    assert _same(value, decode_id(encoded))
    assert encode_id(decode_id(encoded)) == encoded
    # A chunk suffix does not change what the id stands for.
    chunk = record_id(encoded, 3, chunked=True)
    assert base_id(chunk) == encoded
    assert encode_id(decode_id(chunk)) == encoded


@pytest.mark.parametrize("value", UNUSUAL, ids=repr)
def test_prefixed_keys_round_trip_for_unusual_ids(value: Any) -> None:
    key = record_key("docs", value, prefixed=True)
    assert key == "docs/" + encode_id(value)
    collection, encoded = split_key(base_id(f"{key}#0"), prefixed=True, collection="")
    assert collection == "docs"
    assert encode_id(decode_id(encoded)) == encode_id(value)


def test_a_slash_in_an_id_is_not_a_collection_prefix() -> None:
    assert record_key("docs", "a/b", prefixed=True) == "docs/s:a/b"
    assert split_key("docs/s:a/b", prefixed=True, collection="") == ("docs", "s:a/b")
    # Without collections the whole key is the id, whatever it holds.
    assert record_key("docs", "a/b", prefixed=False) == "s:a/b"
    assert split_key("s:a/b", prefixed=False, collection="docs") == ("docs", "s:a/b")
    assert decode_id("s:a/b") == "a/b"


def test_record_ids_carry_the_chunk_only_when_chunked() -> None:
    assert record_id("i:42", 0, chunked=False) == "i:42"
    assert record_id("i:42", 0, chunked=True) == "i:42#0"
    assert record_id("articles/i:42", 7, chunked=True) == "articles/i:42#7"
    assert base_id("articles/i:42#7") == "articles/i:42"
    assert base_id("i:42") == "i:42"


@pytest.mark.parametrize(
    ("typed", "key"),
    [
        ("i:3", "i:3"),
        ("i:03", "i:3"),
        ("i:+3", "i:3"),
        ("i: 3", "i:3"),
        ("i:03#2", "i:3"),
        ("oid:65A1B2C3D4E5F60718293A4B", "oid:65a1b2c3d4e5f60718293a4b"),
        ("f:1.50", "f:1.5"),
        ("s:a%23b#0", "s:a%23b"),
    ],
)
def test_a_typed_record_id_names_the_key_syncd_writes(typed: str, key: str) -> None:
    assert canonical_key(typed, prefixed=False, collection="c") == key
    assert canonical_key(f"docs/{typed}", prefixed=True, collection="") == f"docs/{key}"


@pytest.mark.parametrize("typed", ["i:3#abc", "s:n0#x", "i:3#-1", "i:3#+1", "i:3#", "i:3#\u0663"])
def test_a_chunk_suffix_must_be_a_chunk_number(typed: str) -> None:
    with pytest.raises(MappingError, match="after '#' comes a chunk number"):
        canonical_key(typed, prefixed=False, collection="c")


def _settings(**where: Any) -> PipelineSettings:
    return PipelineSettings.model_validate(
        {"name": "p", "database": "db", "mapping": {"text": "body"}, **where}
    )


def test_only_multi_collection_pipelines_prefix_their_keys() -> None:
    assert not prefixed(_settings(collection="c"))
    assert prefixed(_settings(collections=["a", "b"]))


def test_a_document_in_a_collection_gets_prefixed_records_and_its_collection() -> None:
    ps = _settings(collection="c", mapping={"text": "body", "chunk_size": 10, "chunk_overlap": 0})
    mapped = Mapper(ps).map({"_id": "x/y", "body": "one two three four five six"})
    assert len(mapped.records) > 1
    key = record_key("articles", "x/y", prefixed=True)
    moved = in_collection(mapped, key, "articles")
    assert moved.key == "articles/s:x/y"
    for n, record in enumerate(moved.records):
        assert record.id == f"articles/s:x/y#{n}"
        assert record.metadata[ID_KEY] == "articles/s:x/y"
        assert record.metadata[COLL_KEY] == "articles"
        assert record.metadata["syncd_chunk"] == n
    assert [r.text for r in moved.records] == [r.text for r in mapped.records]
    assert COLL_KEY not in mapped.records[0].metadata  # the original is left alone


def test_reserved_keys() -> None:
    for key in ("syncd_id", "syncd_coll", "syncd_anything", "chroma:document"):
        assert is_reserved(key)
    for key in ("syncd", "syncd.x", "title", "chroma", "_syncd_id"):
        assert not is_reserved(key)
    record = Mapper(_settings(collection="c")).map({"_id": 1, "body": "b"}).records[0]
    assert {k for k in record.metadata if is_reserved(k)} == {
        "syncd_id",
        "syncd_chunk",
        "syncd_hash",
        "syncd_text_hash",
    }
