from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import math
import struct
import uuid
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.binary import Binary, BinaryVectorDtype
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from syncd.config import PipelineSettings
from syncd.errors import ConfigError, MappingError, OversizedError
from syncd.identity import RESERVED_PREFIX
from syncd.mapping import (
    Mapper,
    _scalar,
    chunk_spans,
    chunk_text,
    compile_template,
    get_path,
)


def pipeline(**mapping: Any) -> PipelineSettings:
    embedder = mapping.pop("embedder", {})
    extra = mapping.pop("pipeline", {})
    mapping.setdefault("text", None if "text_template" in mapping else "body")
    return PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "db",
            "collection": "c",
            "mapping": mapping,
            "embedder": embedder,
            **extra,
        }
    )


OID = ObjectId("65a1b2c3d4e5f60718293a4b")
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


# --- text -------------------------------------------------------------------------------


def test_text_from_dot_path_and_numbers_and_lists() -> None:
    mapper = Mapper(pipeline(text="content.text"))
    assert mapper.map({"_id": 1, "content": {"text": "hi"}}).records[0].text == "hi"
    assert mapper.map({"_id": 1, "content": {"text": 3.5}}).records[0].text == "3.5"
    assert mapper.map({"_id": 1, "content": {"text": ["a", "b"]}}).records[0].text == "a\nb"
    with pytest.raises(MappingError):
        mapper.map({"_id": 1, "content": {"text": {"nested": 1}}})


# The README's table of text rules, row by row: (field value, text or None for poison).
TEXT_RULES: list[tuple[Any, str | None]] = [
    ("plain", "plain"),
    (42, "42"),
    (Int64(2**40), str(2**40)),
    (12.5, "12.5"),
    (1e20, "1e+20"),
    (math.nan, "nan"),
    (-math.inf, "-inf"),
    (Decimal128("1.10"), "1.10"),
    (["a", "b", "c"], "a\nb\nc"),
    ([], ""),
    (True, None),
    ({"nested": "x"}, None),
    (["a", 1], None),
    (dt.datetime(2024, 1, 1), None),
    (OID, None),
    (Binary(b"x"), None),
]


@pytest.mark.parametrize(("value", "text"), TEXT_RULES)
def test_text_rules_as_the_readme_states(value: Any, text: str | None) -> None:
    field, template = Mapper(pipeline(text="body")), Mapper(pipeline(text_template="<{body}>"))
    doc = {"_id": 1, "body": value}
    if text is None:
        for mapper in (field, template):
            with pytest.raises(MappingError, match="not text"):
                mapper.map(doc)
        return
    assert field.map(doc).records[0].text == text
    assert template.map(doc).records[0].text == f"<{text}>"


def test_missing_or_null_text_is_poison_but_blank_in_a_template() -> None:
    for doc in ({"_id": 1}, {"_id": 1, "body": None}):
        with pytest.raises(MappingError, match="missing"):
            Mapper(pipeline(text="body")).map(doc)
        assert Mapper(pipeline(text_template="[{body}]")).map(doc).records[0].text == "[]"
    spec = Mapper(pipeline(text_template="{title:>6}|{n:<4}|"))
    assert spec.map({"_id": 1, "title": "ab", "n": 7}).records[0].text == "    ab|7   |"


def test_missing_text_is_poison_naming_field_and_id() -> None:
    mapper = Mapper(pipeline(text="body"))
    with pytest.raises(MappingError) as info:
        mapper.map({"_id": OID, "title": "x"})
    assert "'body'" in str(info.value)
    assert str(OID) in str(info.value)
    assert info.value.document_id == OID
    assert info.value.pipeline == "p"


def test_template_renders_paths_and_blanks_missing_fields() -> None:
    mapper = Mapper(pipeline(text_template="{title}\n\n{body.main} ({n})"))
    doc = {"_id": 1, "title": "T", "body": {"main": "B"}}
    assert mapper.map(doc).records[0].text == "T\n\nB ()"
    assert mapper.map({**doc, "n": 4}).records[0].text == "T\n\nB (4)"


@pytest.mark.parametrize(
    "template",
    [
        "{title!r}",
        "{}",
        "{title:d}",
        "{title:,}",
        "{title:=5}",
        "{title:{width}}",
        "{title:99999}",
        "{0}",
        "{a[0]}",
        "{a.__class__}",
        "{a..b}",
    ],
)
def test_a_template_that_could_fail_is_refused_with_the_config(template: str) -> None:
    with pytest.raises(ConfigError):
        compile_template(template)
    with pytest.raises(ValidationError, match="text_template"):
        pipeline(text_template=template)


def test_a_template_field_is_a_dot_path_whose_numbers_index_arrays() -> None:
    mapper = Mapper(pipeline(text_template="{a.0}|{a.1}|{b.0.c}"))
    doc = {"_id": 1, "a": ["x", "y"], "b": [{"c": "z"}]}
    assert mapper.map(doc).records[0].text == "x|y|z"


def test_text_format_specs_render() -> None:
    mapper = Mapper(pipeline(text_template="[{title:>6}|{body:.3}]"))
    assert mapper.map({"_id": 1, "title": "T", "body": "abcdef"}).records[0].text == "[     T|abc]"


def test_oversized_text_and_documents() -> None:
    with pytest.raises(OversizedError):
        Mapper(pipeline(max_text_chars=5)).map({"_id": 1, "body": "123456"})
    with pytest.raises(OversizedError) as info:
        Mapper(pipeline(max_document_bytes=100)).map({"_id": 1, "body": "x" * 200})
    assert info.value.document_id == 1


def test_document_without_id_is_poison() -> None:
    with pytest.raises(MappingError):
        Mapper(pipeline()).map({"body": "x"})


# --- metadata ------------------------------------------------------------------------------


def test_metadata_conversion() -> None:
    doc = {
        "_id": OID,
        "body": "b",
        "s": "str",
        "i": Int64(7),
        "f": 1.25,
        "flag": False,
        "nan": math.nan,
        "when": dt.datetime(2024, 3, 1, 10, 0, 0, 5000),
        "dec": Decimal128("1.10"),
        "oid": OID,
        "uuid": Binary.from_uuid(UUID),
        "none": None,
        "author": {"name": "Ann", "meta": {"age": 40}},
        "tags": ["a", "b"],
        "nums": [1, 2.5],
        "mixed": [1, "a", True],
        "empty": [],
        "objs": [{"k": 1}],
    }
    paths = [k for k in doc if k not in ("_id", "body")] + ["missing"]
    meta = Mapper(pipeline(metadata=paths)).map(doc).records[0].metadata
    user = {k: v for k, v in meta.items() if not k.startswith(RESERVED_PREFIX)}
    assert user == {
        "s": "str",
        "i": 7,
        "f": 1.25,
        "flag": False,
        "nan": "NaN",
        "when": "2024-03-01T10:00:00.005Z",
        "dec": "1.10",
        "oid": str(OID),
        "uuid": str(UUID),
        "author.name": "Ann",
        "author.meta.age": 40,
        "tags": ["a", "b"],
        "nums": [1.0, 2.5],
        "mixed": ["1", "a", "true"],
        "objs": ['{"k":1}'],
    }
    # Chroma checks exact types: an Int64 would be refused.
    assert type(user["i"]) is int


@pytest.mark.parametrize(
    ("paths", "rename", "doc"),
    [
        (["title"], {}, {"title": {"a.b": 1, "a": {"b": 2}}}),
        (["title"], {}, {"title": {"a.b": True, "a": {"b": 1}}}),
        (["a", "x"], {"x": "a.b"}, {"a": {"b": 1}, "x": 2}),
    ],
    ids=["dotted and nested", "true and 1", "a rename onto a flattened key"],
)
def test_two_values_for_one_metadata_key_are_poison(
    paths: list[str], rename: dict[str, str], doc: dict[str, Any]
) -> None:
    mapper = Mapper(pipeline(metadata=paths, rename=rename))
    with pytest.raises(MappingError, match=r"metadata key '(title\.)?a\.b' would hold two") as info:
        mapper.map({"_id": "c", "body": "x", **doc})
    assert info.value.document_id == "c"


def test_one_value_reaching_a_key_twice_is_stored_once() -> None:
    mapper = Mapper(pipeline(metadata=["a", "a.b"]))
    meta = mapper.map({"_id": 1, "body": "x", "a": {"b": 2}}).records[0].metadata
    assert meta["a.b"] == 2


@pytest.mark.parametrize(
    ("doc", "path", "expected"),
    [
        ({"a.b": 1}, "a.b", 1),
        ({"a": {"b": 2}}, "a.b", 2),
        ({"a.b": 2, "a": {"b": 2}}, "a.b", 2),
        ({"x": {"a.b.c": 3}}, "x.a.b.c", 3),
        ({"x.a": {"b.c": 4}}, "x.a.b.c", 4),
        ({"t": [{"a": 1}, {"a": 2}]}, "t.a", [1, 2]),
        ({"t": ["p", "q"]}, "t.1", "q"),
    ],
)
def test_a_dot_path_reaches_keys_that_hold_dots(
    doc: dict[str, Any], path: str, expected: Any
) -> None:
    assert get_path(doc, path) == expected


@pytest.mark.parametrize(
    ("paths", "doc"),
    [
        (["a.b"], {"a.b": 1, "a": {"b": 2}}),
        (["a", "a.b"], {"a.b": 1, "a": {"b": 2}}),
        (["a.b"], {"a.b": 1, "a": {"b": True}}),
        # equal to Python, not as records: lists and documents compare item by item
        (["a.b"], {"a.b": [1, True], "a": {"b": [1, 1]}}),
        (["a.b"], {"a.b": {"k": 1.0}, "a": {"b": {"k": 1}}}),
    ],
)
def test_a_path_reaching_two_values_is_poison(paths: list[str], doc: dict[str, Any]) -> None:
    with pytest.raises(MappingError, match=r"field 'a\.b' reaches two different values"):
        Mapper(pipeline(metadata=paths)).map({"_id": "c", "body": "x", **doc})


def test_a_dotted_text_field_is_read() -> None:
    [record] = Mapper(pipeline(text="t.x")).map({"_id": 1, "t.x": "hello"}).records
    assert record.text == "hello"


def test_list_items_that_are_null_are_dropped_and_a_mix_becomes_strings() -> None:
    meta = Mapper(pipeline(metadata=["m", "n"])).map(
        {"_id": 1, "body": "x", "m": [1, "a", None, {"x": 1}], "n": [None]}
    )
    assert meta.records[0].metadata["m"] == ["1", "a", '{"x":1}']
    assert "n" not in meta.records[0].metadata


def test_ints_beyond_int64_become_strings() -> None:
    # Not storable in BSON, but a template or computed value could still produce one.
    assert _scalar(2**70) == str(2**70)
    assert _scalar(2**63 - 1) == 2**63 - 1


def test_metadata_is_accepted_by_chroma() -> None:
    from chromadb.api.types import validate_metadata

    doc = {"_id": 1, "body": "b", "a": [Int64(1), Int64(2)], "d": {"x": [True]}, "n": 2.0}
    for record in Mapper(pipeline(metadata=["a", "d", "n"])).map(doc).records:
        validate_metadata(record.metadata)  # type: ignore[arg-type]


def test_rename_and_reserved_prefix() -> None:
    mapper = Mapper(pipeline(metadata=["author.name"], rename={"author.name": "author"}))
    meta = mapper.map({"_id": 1, "body": "b", "author": {"name": "A"}}).records[0].metadata
    assert meta["author"] == "A"
    for path in ("syncd_x", "chroma:document"):
        # Refused with the config, so that check and map refuse it as run does.
        with pytest.raises(ValidationError, match=f"metadata field '{path}' would become"):
            pipeline(metadata=[path])
        with pytest.raises(ValidationError, match="reserved prefix"):
            pipeline(metadata=["x"], rename={"x": path})
    # The hint: a rename entry makes the field usable.
    mapper = Mapper(pipeline(metadata=["syncd_x"], rename={"syncd_x": "x"}))
    assert mapper.map({"_id": 1, "body": "b", "syncd_x": 3}).records[0].metadata["x"] == 3
    # Flattening appends ".sub", so "syncd" itself stays usable.
    mapper = Mapper(pipeline(metadata=["x"], rename={"x": "syncd"}))
    meta = mapper.map({"_id": 1, "body": "b", "x": {"_a": 1}}).records[0].metadata
    assert meta["syncd._a"] == 1


def test_reserved_keys_on_every_record() -> None:
    mapper = Mapper(pipeline(metadata=["k"]))
    mapped = mapper.map({"_id": "a", "body": "text", "k": 1}, cluster_time=Timestamp(100, 7))
    (record,) = mapped.records
    assert record.id == mapped.key == "s:a"
    assert record.metadata["syncd_id"] == "s:a"
    assert record.metadata["syncd_chunk"] == 0
    assert record.metadata["syncd_cluster_time"] == (100 << 32) | 7
    assert record.metadata["syncd_hash"] == record.content_hash
    assert record.metadata["syncd_text_hash"] == record.text_hash
    assert record.text_hash == hashlib.sha256(b"text").hexdigest()
    untimed = mapper.map({"_id": "a", "body": "text", "k": 1}).records[0]
    assert "syncd_cluster_time" not in untimed.metadata


def test_hashes() -> None:
    mapper = Mapper(pipeline(metadata=["k"]))
    base = mapper.map({"_id": 1, "body": "t", "k": 1}).records[0]
    meta_changed = mapper.map({"_id": 1, "body": "t", "k": 2}).records[0]
    text_changed = mapper.map({"_id": 1, "body": "u", "k": 1}).records[0]
    other_field = mapper.map({"_id": 1, "body": "t", "k": 1, "z": 9}).records[0]
    assert base.text_hash == meta_changed.text_hash  # no re-embedding for metadata edits
    assert base.content_hash != meta_changed.content_hash
    assert base.text_hash != text_changed.text_hash
    assert base.content_hash == other_field.content_hash  # unmapped fields do not matter
    # The definition is stable (persisted in Chroma; verify recomputes it).
    expected = json.dumps(
        {"chunk": 0, "metadata": {"k": 1}, "text": "t"}, separators=(",", ":"), sort_keys=True
    )
    assert base.content_hash == hashlib.sha256(expected.encode()).hexdigest()


# --- chunking ------------------------------------------------------------------------------


def test_chunked_records() -> None:
    mapper = Mapper(pipeline(chunk_size=20, chunk_overlap=5, metadata=["k"]))
    text = "some long text about many things that goes on and on"
    mapped = mapper.map({"_id": OID, "body": text, "k": "v"})
    assert len(mapped.records) > 1
    for n, record in enumerate(mapped.records):
        assert record.id == f"{mapped.key}#{n}"
        assert record.metadata["syncd_id"] == mapped.key
        assert record.metadata["syncd_chunk"] == n
        assert record.metadata["k"] == "v"
        assert record.text_hash == hashlib.sha256(record.text.encode()).hexdigest()
    assert len({r.content_hash for r in mapped.records}) == len(mapped.records)
    assert [r.text for r in mapped.records] == [
        "some long text ",
        "text about many ",
        "many things that ",
        "that goes on and on",
    ]


def test_short_text_is_one_chunk_with_suffix() -> None:
    mapper = Mapper(pipeline(chunk_size=100))
    assert [r.id for r in mapper.map({"_id": 3, "body": "short"}).records] == ["i:3#0"]


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from("ab \n"), max_size=300),
    st.integers(1, 40),
    st.data(),
)
def test_chunks_cover_the_text(text: str, size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    spans = chunk_spans(text, size, overlap)
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    for (start, end), (next_start, _) in itertools.pairwise(spans):
        assert start < next_start <= end  # progress, no gap
        assert end - next_start <= 2 * overlap  # overlap only grows to reach a word start
    assert all(0 < end - start <= size for start, end in spans if text)
    assert chunk_text(text, size, overlap) == [text[s:e] for s, e in spans]


# --- vectors from the document ----------------------------------------------------------------


def field_mapper(dims: int = 3) -> Mapper:
    return Mapper(pipeline(embedder={"kind": "field", "field": "vec.v", "dimensions": dims}))


def test_vector_from_document() -> None:
    record = field_mapper().map({"_id": 1, "body": "b", "vec": {"v": [1, 0.5, Int64(2)]}})
    assert record.records[0].embedding == [1.0, 0.5, 2.0]
    changed = field_mapper().map({"_id": 1, "body": "b", "vec": {"v": [1, 0.5, 3]}})
    assert changed.records[0].content_hash != record.records[0].content_hash
    # The definition is stable: the vector enters the hash as the SHA-256 of its
    # little-endian float64 bytes.
    vector = hashlib.sha256(struct.pack("<3d", 1.0, 0.5, 2.0)).hexdigest()
    expected = json.dumps(
        {"chunk": 0, "embedding": vector, "metadata": {}, "text": "b"},
        separators=(",", ":"),
        sort_keys=True,
    )
    assert record.records[0].content_hash == hashlib.sha256(expected.encode()).hexdigest()


def test_bson_vector_from_document() -> None:
    vector = Binary.from_vector([0.5, 0.25, 1.0], BinaryVectorDtype.FLOAT32)
    record = field_mapper().map({"_id": 1, "body": "b", "vec": {"v": vector}})
    assert record.records[0].embedding == [0.5, 0.25, 1.0]


@pytest.mark.parametrize(
    "value", [None, "x", [1, 2], [1, 2, 3, 4], [1, "2", 3], [True, 1, 2], [1, math.nan, 2]]
)
def test_bad_vectors_are_poison(value: Any) -> None:
    doc: dict[str, Any] = {"_id": 1, "body": "b"}
    if value is not None:
        doc["vec"] = {"v": value}
    with pytest.raises(MappingError, match=r"vec\.v"):
        field_mapper().map(doc)


# --- fingerprint and filter ---------------------------------------------------------------------


def test_fingerprint_tracks_what_changes_records() -> None:
    base = Mapper(pipeline(metadata=["a"])).fingerprint
    assert base == Mapper(pipeline(metadata=["a"])).fingerprint
    assert base == Mapper(pipeline(metadata=["a"], pipeline={"batch_size": 7})).fingerprint
    assert base == Mapper(pipeline(metadata=["a"], max_text_chars=10)).fingerprint
    changed = [
        pipeline(metadata=["b"]),
        pipeline(metadata=["a"], rename={"a": "x"}),
        pipeline(metadata=["a"], text="other"),
        pipeline(metadata=["a"], chunk_size=100),
        pipeline(metadata=["a"], pipeline={"filter": {"x": 1}}),
        pipeline(metadata=["a"], embedder={"dimensions": 8}),
        pipeline(metadata=["a"], embedder={"kind": "sentence_transformers", "model": "m"}),
    ]
    prints = {Mapper(p).fingerprint for p in changed}
    assert base not in prints
    assert len(prints) == len(changed)


def test_fingerprint_ignores_secrets() -> None:
    common = {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    a = Mapper(pipeline(embedder={**common, "api_key": "key-one-1234"})).fingerprint
    b = Mapper(pipeline(embedder={**common, "api_key": "key-two-5678"})).fingerprint
    assert a == b


def test_matches_uses_the_pipeline_filter() -> None:
    mapper = Mapper(pipeline(pipeline={"filter": {"status": "published"}}))
    assert mapper.matches({"_id": 1, "status": "published"})
    assert not mapper.matches({"_id": 1, "status": "draft"})
    assert Mapper(pipeline()).matches({"_id": 1})
    # An unsupported operator is refused when the settings are validated, before
    # any Mapper exists.
    with pytest.raises(ValidationError, match=r"\$where"):
        Mapper(pipeline(pipeline={"filter": {"$where": "1"}}))
