"""Queries MongoDB answers from the ``_id`` index: ranges, ``$in``, ``_id`` order and counts.

Written against MongoDB's documented behaviour, so they pass on a real ``mongod`` too:
values of different BSON types sort in the documented type order, numbers compare by value
whatever their type, and comparison operators only match values of the query value's type
("type bracketing").
"""

from __future__ import annotations

import datetime as dt
import math
import random
from typing import Any

from bson import Binary, Decimal128, Int64, ObjectId

OID_1 = ObjectId("5f0000000000000000000001")
OID_2 = ObjectId("6f0000000000000000000002")
DATE_1 = dt.datetime(2020, 1, 1)
DATE_2 = dt.datetime(2024, 6, 1, 12, 30)
UUID_1 = Binary(bytes(15) + b"\x01", 4)  # a UUID, as binary subtype 4

# One _id of each kind, in MongoDB's ascending _id order: null < numbers < strings < objects
# < binary data < ObjectId < bool < date. Numbers of every type interleave by value.
ORDERED: list[Any] = [
    None,
    float("nan"),
    float("-inf"),
    -5,
    Int64(-2),
    0.5,
    1,
    Decimal128("1.5"),
    2.0,
    Int64(3),
    10,
    float("inf"),
    "",
    "10",
    "2",
    "B",
    "a",
    "ab",
    "b",
    "é",
    {"a": 1},
    {"a": 1, "b": 0},
    {"a": 2},
    {"b": 0},
    Binary(b"z", 0),
    Binary(b"ab", 0),
    UUID_1,
    OID_1,
    OID_2,
    False,
    True,
    DATE_1,
    DATE_2,
]


def _norm(v: Any) -> Any:
    """A value as it must come back: drivers return 64-bit integers as int, and binary
    subtype 0 as bytes."""
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, int):
        return ("int", int(v))
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    if isinstance(v, bytes):
        return ("bin", getattr(v, "subtype", 0), bytes(v))
    return (type(v).__name__, v)


def _same(a: Any, b: Any) -> bool:
    return bool(_norm(a) == _norm(b))


def _ids(docs: Any) -> list[Any]:
    return [d["_id"] for d in docs]


def _assert_ids(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want) and all(map(_same, got, want)), (got, want)


def _load(coll: Any) -> None:
    shuffled = list(ORDERED)
    random.Random(5).shuffle(shuffled)
    coll.insert_many([{"_id": v, "k": i % 3} for i, v in enumerate(shuffled)])


def _page(coll: Any, flt: dict[str, Any], direction: int = 1, size: int = 3) -> list[Any]:
    return _ids(coll.find(flt).sort("_id", direction).limit(size))


def test_mixed_type_ids_sort_in_bson_type_order(mongo_db: Any) -> None:
    coll = mongo_db.c
    _load(coll)
    _assert_ids(_ids(coll.find().sort("_id", 1)), ORDERED)
    _assert_ids(_ids(coll.find().sort("_id", -1)), ORDERED[::-1])
    _assert_ids(_ids(coll.find().sort("_id", 1).skip(12).limit(3)), ORDERED[12:15])


def test_gt_pages_within_the_bound_s_type_only(mongo_db: Any) -> None:
    coll = mongo_db.c
    _load(coll)
    numbers = ORDERED[2:12]  # every number but NaN, which no range on numbers matches
    pages, last = [], None
    first = _page(coll, {"_id": {"$gte": float("-inf")}})
    pages.append(first)
    last = first[-1]
    while True:
        page = _page(coll, {"_id": {"$gt": last}})
        if not page:
            break
        pages.append(page)
        last = page[-1]
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    _assert_ids([i for p in pages for i in p], numbers)
    # Strings, objects, dates...: a bound of one type never reaches into another.
    _assert_ids(_page(coll, {"_id": {"$gt": 5}}, size=100), [10, float("inf")])
    _assert_ids(_page(coll, {"_id": {"$gt": "a"}}, size=100), ["ab", "b", "é"])
    _assert_ids(_page(coll, {"_id": {"$lt": "a"}}, -1, size=100), ["B", "2", "10", ""])
    _assert_ids(_page(coll, {"_id": {"$gt": OID_1}}, size=100), [OID_2])
    _assert_ids(_page(coll, {"_id": {"$gte": DATE_1}}, size=100), [DATE_1, DATE_2])
    _assert_ids(_page(coll, {"_id": {"$gt": False}}, size=100), [True])
    _assert_ids(
        _page(coll, {"_id": {"$lt": 10}}, -1, size=4), [Int64(3), 2.0, Decimal128("1.5"), 1]
    )
    _assert_ids(
        _page(coll, {"_id": {"$gt": 1, "$lte": Decimal128("3")}}, size=100),
        [Decimal128("1.5"), 2.0, Int64(3)],
    )
    _assert_ids(_page(coll, {"_id": {"$gt": 10, "$lt": "z"}}, size=100), [])
    # The same without a sort: what matches does not depend on how it is read.
    assert sorted(str(i) for i in _ids(coll.find({"_id": {"$gt": 5}}))) == ["10", "inf"]


def test_paging_with_a_user_filter_and_writes_between_pages(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_many([{"_id": i, "even": i % 2 == 0} for i in range(0, 40)])
    coll.insert_many([{"_id": f"s{i:02d}", "even": i % 2 == 0} for i in range(10)])
    seen, last = [], None
    while True:
        flt: dict[str, Any] = {"even": True}
        if last is not None:
            flt = {"$and": [flt, {"_id": {"$gt": last}}]}
        page = _page(coll, flt, size=4)
        if not page:
            break
        seen += page
        last = page[-1]
        if last == 6:  # writes racing the scan: ahead of it, behind it, removed ahead of it
            coll.insert_many(
                [
                    {"_id": 100, "even": True},
                    {"_id": 2.5, "even": True},
                    {"_id": Decimal128("13.5"), "even": True},
                ]
            )
            coll.delete_many({"_id": {"$in": [14, 16]}})
    assert seen == [0, 2, 4, 6, 8, 10, 12, Decimal128("13.5"), *range(18, 40, 2), 100]
    # Descending, with $lt, covers the same numbers in reverse.
    _assert_ids(
        _page(coll, {"$and": [{"even": True}, {"_id": {"$lt": 8}}]}, -1, size=10), [6, 4, 2.5, 2, 0]
    )


NUMBERS = ["double", "int", "long", "decimal"]


def test_a_range_with_more_conditions_on_id_matches_what_each_allows(mongo_db: Any) -> None:
    coll = mongo_db.c
    _load(coll)
    # A snapshot's pages: {$gt: last, $type: bracket}, starting with the bracket alone.
    pages, last = [_page(coll, {"_id": {"$type": NUMBERS}})], None
    while True:
        last = pages[-1][-1]
        page = _page(coll, {"_id": {"$gt": last, "$type": NUMBERS}})
        if not page:
            break
        pages.append(page)
    assert [len(p) for p in pages] == [3, 3, 3, 2]
    _assert_ids([i for p in pages for i in p], ORDERED[1:12])  # NaN first, then by value
    _assert_ids(_page(coll, {"_id": {"$type": ["string"], "$gt": "a"}}, size=100), ["ab", "b", "é"])
    # Each operator of the condition must hold: the range, and what else it says.
    _assert_ids(_page(coll, {"_id": {"$gt": 1, "$type": "int"}}, size=100), [10])
    _assert_ids(
        _page(coll, {"_id": {"$lt": 10, "$type": ["long", "decimal"]}}, -1, size=100),
        [Int64(3), Decimal128("1.5"), Int64(-2)],
    )
    _assert_ids(
        _page(coll, {"_id": {"$gte": "", "$ne": "b", "$type": "string"}}, size=3), ["", "10", "2"]
    )
    _assert_ids(_page(coll, {"_id": {"$gt": OID_1, "$in": [OID_1, OID_2, "x"]}}, size=100), [OID_2])
    _assert_ids(_page(coll, {"_id": {"$gte": 2, "$nin": [2, 3]}}, size=100), [10, float("inf")])
    # A bound of one type and a $type of another: nothing, in either direction.
    assert _page(coll, {"_id": {"$gt": 5, "$type": "string"}}, size=100) == []
    assert _page(coll, {"_id": {"$lt": "z", "$type": "double"}}, -1, size=100) == []
    # The same without a sort, and under $and with a condition on another field.
    assert sorted(_norm(i) for i in _ids(coll.find({"_id": {"$gt": 1, "$type": NUMBERS}}))) == (
        sorted(_norm(i) for i in [Decimal128("1.5"), 2.0, Int64(3), 10, float("inf")])
    )
    both = {"$and": [{"k": 1}, {"_id": {"$gt": -5, "$type": NUMBERS}}]}
    _assert_ids(
        _page(coll, both, size=100),
        [
            d["_id"]
            for d in coll.find({"k": 1}).sort("_id", 1)
            if any(_same(d["_id"], n) for n in ORDERED[4:12])
        ],
    )


def test_a_type_condition_alone_reads_its_bracket_in_either_direction(mongo_db: Any) -> None:
    coll = mongo_db.c
    _load(coll)
    numbers = ORDERED[1:12]  # NaN is a double
    strings, binary, oids, bools, dates = (
        ORDERED[12:20], ORDERED[24:27], ORDERED[27:29], ORDERED[29:31], ORDERED[31:33]
    )  # fmt: skip
    for types, want in [
        (NUMBERS, numbers),
        ("number", numbers),
        ([1, 16, 18, 19], numbers),
        ("string", strings),
        (2, strings),
        ("binData", binary),
        ("objectId", oids),
        ("bool", bools),
        ("date", dates),
        (["int", "long"], [-5, Int64(-2), 1, Int64(3), 10]),
        ("double", [float("nan"), float("-inf"), 0.5, 2.0, float("inf")]),
        (["string", "bool"], strings + bools),
        ("null", [None]),
        ("object", ORDERED[20:24]),
        (["string", "symbol"], strings),  # a snapshot's brackets, the empty ones too
        ("minKey", []),
        ("maxKey", []),
    ]:
        _assert_ids(_page(coll, {"_id": {"$type": types}}, size=100), want)
        _assert_ids(_page(coll, {"_id": {"$type": types}}, -1, size=100), want[::-1])
        _assert_ids(_page(coll, {"_id": {"$type": types}}, -1, size=2), want[::-1][:2])
    # With a range of its own bracket, from either end, and with another field's condition.
    _assert_ids(_page(coll, {"_id": {"$lte": "2", "$type": "string"}}, -1, size=2), ["2", "10"])
    _assert_ids(_page(coll, {"_id": {"$gte": 2, "$type": "number"}}, -1, size=100),
                [float("inf"), 10, Int64(3), 2.0])  # fmt: skip
    _assert_ids(
        _page(coll, {"_id": {"$type": "string"}, "k": 0}, size=100),
        [d["_id"] for d in coll.find({"k": 0}).sort("_id", 1) if isinstance(d["_id"], str)],
    )


def test_snapshot_pages_with_a_type_condition_and_writes_between_pages(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_many([{"_id": i, "even": i % 2 == 0} for i in range(0, 40)])
    coll.insert_many([{"_id": f"s{i:02d}", "even": True} for i in range(10)])
    seen: list[Any] = []
    bound: dict[str, Any] = {"$type": NUMBERS}
    while True:
        page = _page(coll, {"$and": [{"even": True}, {"_id": bound}]}, size=4)
        if not page:
            break
        seen += page
        bound = {"$gt": page[-1], "$type": NUMBERS}
        if page[-1] == 6:  # writes racing the scan: ahead of it, behind it, removed ahead
            coll.insert_many(
                [
                    {"_id": 100, "even": True},
                    {"_id": 2.5, "even": True},
                    {"_id": Decimal128("13.5"), "even": True},
                    {"_id": "s99", "even": True},
                ]
            )
            coll.delete_many({"_id": {"$in": [14, 16]}})
    assert seen == [0, 2, 4, 6, 8, 10, 12, Decimal128("13.5"), *range(18, 40, 2), 100]


def test_in_with_mixed_types_duplicates_and_missing_ids(mongo_db: Any) -> None:
    coll = mongo_db.c
    _load(coll)
    wanted = [
        Int64(1),
        "2",
        2,
        2,
        {"b": 0},
        {"b": 0, "a": 1},
        OID_2,
        ObjectId(),
        "missing",
        999,
        None,
        True,
        DATE_2,
        Decimal128("10"),
        UUID_1,
        Binary(b"ab", 0),
    ]
    found = _ids(coll.find({"_id": {"$in": wanted}}).sort("_id", 1))
    _assert_ids(
        found, [None, 1, 2.0, 10, "2", {"b": 0}, Binary(b"ab", 0), UUID_1, OID_2, True, DATE_2]
    )
    docs = list(coll.find({"_id": {"$in": wanted}}))
    assert len(docs) == len(found)  # each match once, whatever the order
    assert list(coll.find({"_id": {"$in": []}})) == []
    assert list(coll.find({"_id": {"$in": ["nothing", 12345, ObjectId()]}})) == []
    assert coll.count_documents({"_id": {"$in": wanted}}) == len(found)
    _assert_ids(
        _ids(coll.find({"_id": {"$in": wanted}, "k": 0}).sort("_id", -1)),
        [
            d["_id"]
            for d in coll.find({"k": 0}).sort("_id", -1)
            if any(_same(d["_id"], f) for f in found)
        ],
    )
    # Equality on _id across numeric types, and on embedded documents field order matters.
    assert coll.find_one({"_id": 3})["_id"] == Int64(3)
    assert coll.find_one({"_id": Decimal128("2")})["_id"] == 2.0
    assert coll.find_one({"_id": {"b": 0, "a": 1}}) is None
    assert coll.find_one({"_id": {"a": 1, "b": 0}})["k"] in (0, 1, 2)


def test_counts(mongo_client: Any, mongo_db: Any) -> None:
    coll = mongo_db.c
    assert coll.count_documents({}) == 0
    assert coll.estimated_document_count() == 0
    assert mongo_db.missing.count_documents({}) == 0
    _load(coll)
    total = len(ORDERED)
    assert coll.count_documents({}) == total
    assert coll.estimated_document_count() == total
    assert coll.count_documents({"_id": {"$gt": 1}}) == 5  # numbers only
    assert coll.count_documents({"_id": {"$gte": ""}}) == 8  # strings only
    assert coll.count_documents({}, skip=30) == total - 30
    assert coll.count_documents({}, skip=total + 5) == 0
    assert coll.count_documents({}, limit=7) == 7
    assert coll.count_documents({}, skip=31, limit=7) == total - 31
    assert coll.count_documents({"k": 1}) == len([i for i in range(total) if i % 3 == 1])
    assert coll.count_documents({"$and": [{"k": 0}, {"_id": {"$gte": ""}}]}) == len(
        [d for d in coll.find({"k": 0}) if isinstance(d["_id"], str)]
    )
    assert coll.count_documents({"_id": {"$lt": "zz"}}) == 7  # "é" is above "z" in UTF-8
    coll.delete_many({"_id": {"$in": [None, 1, "a"]}})
    assert coll.count_documents({}) == total - 3
    assert coll.estimated_document_count() == total - 3
    assert coll.count_documents({"_id": {"$lte": 2}}) == 6


def test_sample_returns_distinct_documents(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_many([{"_id": i} for i in range(50)])
    sample = _ids(coll.aggregate([{"$sample": {"size": 10}}]))
    assert len(sample) == 10 and len(set(sample)) == 10 and set(sample) <= set(range(50))
    assert sorted(_ids(coll.aggregate([{"$sample": {"size": 80}}]))) == list(range(50))
    assert list(mongo_db.missing.aggregate([{"$sample": {"size": 3}}])) == []
