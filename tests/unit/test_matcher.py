"""The filter evaluator against MongoDB's documented query behaviour.

Each row of the table cites the manual's example it reproduces where there is one
(https://www.mongodb.com/docs/manual/reference/operator/query/).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

import pytest
from bson import Decimal128, Int64, ObjectId, Regex

from syncd.errors import ConfigError
from syncd.matcher import compile_filter

INVENTORY = {
    "item": "journal",
    "qty": 25,
    "size": {"h": 14, "w": 21, "uom": "cm"},
    "status": "A",
    "tags": ["blank", "red"],
    "dim_cm": [14, 21],
    "instock": [{"warehouse": "A", "qty": 5}, {"warehouse": "C", "qty": 15}],
}
OID = ObjectId("65a1b2c3d4e5f60718293a4b")
STUDENT = {"_id": 1, "results": [82, 85, 88], "grades": [{"g": 90, "m": 1}, {"g": 60, "m": 2}]}
MISSING_QTY = {"item": "x"}
NULL_QTY = {"item": "y", "qty": None}

# (filter, document, expected)
TABLE: list[tuple[dict[str, Any], dict[str, Any], bool]] = [
    # implicit equality, dot paths, embedded documents (manual: "Query on Embedded Documents")
    ({"status": "A"}, INVENTORY, True),
    ({"status": "D"}, INVENTORY, False),
    ({"size.uom": "cm"}, INVENTORY, True),
    ({"size": {"h": 14, "w": 21, "uom": "cm"}}, INVENTORY, True),
    # whole-document equality needs the same field order
    ({"size": {"w": 21, "h": 14, "uom": "cm"}}, INVENTORY, False),
    ({"size": {"h": 14, "w": 21}}, INVENTORY, False),
    # arrays (manual: "Query an Array")
    ({"tags": "red"}, INVENTORY, True),  # contains
    ({"tags": ["blank", "red"]}, INVENTORY, True),  # exact array
    ({"tags": ["red", "blank"]}, INVENTORY, False),  # order matters for exact match
    ({"tags": {"$all": ["red", "blank"]}}, INVENTORY, True),
    ({"tags": {"$all": ["red", "plain"]}}, INVENTORY, False),
    ({"tags": {"$all": []}}, INVENTORY, False),
    ({"dim_cm": {"$gt": 20}}, INVENTORY, True),  # some element > 20
    ({"dim_cm": {"$gt": 15, "$lt": 20}}, INVENTORY, True),  # 21 > 15 and 14 < 20
    ({"dim_cm": {"$elemMatch": {"$gt": 15, "$lt": 20}}}, INVENTORY, False),
    ({"dim_cm": {"$elemMatch": {"$gt": 20, "$lt": 22}}}, INVENTORY, True),
    ({"dim_cm.1": {"$gt": 20}}, INVENTORY, True),  # index position
    ({"dim_cm.0": {"$gt": 20}}, INVENTORY, False),
    ({"tags": {"$size": 2}}, INVENTORY, True),
    ({"tags": {"$size": 3}}, INVENTORY, False),
    # arrays of embedded documents (manual: "Query an Array of Embedded Documents")
    ({"instock": {"warehouse": "A", "qty": 5}}, INVENTORY, True),
    ({"instock": {"qty": 5, "warehouse": "A"}}, INVENTORY, False),
    ({"instock.qty": {"$lte": 5}}, INVENTORY, True),
    ({"instock.0.qty": {"$lte": 5}}, INVENTORY, True),
    ({"instock.1.qty": {"$lte": 5}}, INVENTORY, False),
    ({"instock": {"$elemMatch": {"qty": 5, "warehouse": "A"}}}, INVENTORY, True),
    ({"instock": {"$elemMatch": {"qty": {"$gt": 10, "$lte": 20}}}}, INVENTORY, True),
    ({"instock": {"$elemMatch": {"qty": 5, "warehouse": "C"}}}, INVENTORY, False),
    # without $elemMatch, conditions may be met by different elements
    ({"instock.qty": 5, "instock.warehouse": "C"}, INVENTORY, True),
    ({"instock.qty": {"$gt": 10, "$lte": 20}}, INVENTORY, True),
    ({"grades": {"$elemMatch": {"g": {"$gte": 80}, "m": 2}}}, STUDENT, False),
    ({"grades": {"$elemMatch": {"$or": [{"g": 60}, {"m": 9}]}}}, STUDENT, True),
    ({"results": {"$elemMatch": {"$gte": 80, "$lt": 85}}}, STUDENT, True),
    ({"grades": {"$all": [{"$elemMatch": {"g": 90}}, {"$elemMatch": {"m": 2}}]}}, STUDENT, True),
    # comparison
    ({"qty": {"$eq": 25}}, INVENTORY, True),
    ({"qty": {"$gte": 25}}, INVENTORY, True),
    ({"qty": {"$gt": 25}}, INVENTORY, False),
    ({"qty": {"$lt": 25.5}}, INVENTORY, True),  # numbers compare across int/double
    ({"qty": 25.0}, INVENTORY, True),
    ({"qty": Int64(25)}, INVENTORY, True),
    ({"qty": Decimal128("25.00")}, INVENTORY, True),
    ({"qty": {"$gt": "1"}}, INVENTORY, False),  # no cross-type ordering
    ({"item": {"$gt": 1}}, INVENTORY, False),
    ({"item": {"$gt": "a"}}, INVENTORY, True),
    ({"qty": True}, {"qty": 1}, False),  # booleans are not numbers
    ({"qty": 1}, {"qty": True}, False),
    ({"qty": {"$in": [5, 25]}}, INVENTORY, True),
    ({"qty": {"$in": [5, 15]}}, INVENTORY, False),
    ({"tags": {"$in": ["red", "x"]}}, INVENTORY, True),
    ({"qty": {"$nin": [5, 15]}}, INVENTORY, True),
    ({"tags": {"$nin": ["red"]}}, INVENTORY, False),
    ({"qty": {"$ne": 20}}, INVENTORY, True),
    ({"tags": {"$ne": "red"}}, INVENTORY, False),  # $ne on arrays: no element equals
    ({"qty": {"$ne": 20}}, MISSING_QTY, True),  # $ne matches documents without the field
    ({"qty": {"$nin": [20]}}, MISSING_QTY, True),
    # null and missing (manual: "Query for Null or Missing Fields")
    ({"qty": None}, NULL_QTY, True),
    ({"qty": None}, MISSING_QTY, True),
    ({"qty": None}, INVENTORY, False),
    ({"qty": {"$ne": None}}, MISSING_QTY, False),
    ({"qty": {"$ne": None}}, INVENTORY, True),
    ({"qty": {"$exists": True}}, NULL_QTY, True),
    ({"qty": {"$exists": False}}, NULL_QTY, False),
    ({"qty": {"$exists": False}}, MISSING_QTY, True),
    ({"qty": {"$in": [None, 3]}}, MISSING_QTY, True),
    ({"qty": {"$gte": None}}, MISSING_QTY, True),
    ({"qty": {"$gt": None}}, NULL_QTY, False),
    ({"qty": {"$lt": 5}}, NULL_QTY, False),
    ({"instock.missing": None}, INVENTORY, True),
    ({"instock.qty": {"$exists": True}}, INVENTORY, True),
    ({"instock.nope": {"$exists": True}}, INVENTORY, False),
    ({"size.h.deeper": {"$exists": True}}, INVENTORY, False),
    # logical
    ({"$and": [{"status": "A"}, {"qty": {"$lt": 30}}]}, INVENTORY, True),
    ({"$or": [{"status": "D"}, {"qty": {"$lt": 30}}]}, INVENTORY, True),
    ({"$or": [{"status": "D"}, {"qty": {"$lt": 10}}]}, INVENTORY, False),
    ({"$nor": [{"status": "D"}, {"qty": {"$lt": 10}}]}, INVENTORY, True),
    ({"$nor": [{"price": 1.99}]}, MISSING_QTY, True),
    ({"qty": {"$not": {"$gt": 30}}}, INVENTORY, True),
    ({"qty": {"$not": {"$gt": 30}}}, MISSING_QTY, True),  # $not matches missing fields
    ({"qty": {"$not": {"$lt": 30}}}, INVENTORY, False),
    ({"item": {"$not": re.compile("^j")}}, INVENTORY, False),
    ({"item": {"$not": {"$regex": "^x"}}}, INVENTORY, True),
    # regular expressions
    ({"item": {"$regex": "^jour"}}, INVENTORY, True),
    ({"item": {"$regex": "^JOUR"}}, INVENTORY, False),
    ({"item": {"$regex": "^JOUR", "$options": "i"}}, INVENTORY, True),
    ({"item": {"$regex": "^nal", "$options": "m"}}, {"item": "jour\nnal"}, True),
    ({"item": {"$regex": "r.n", "$options": "s"}}, {"item": "r\nn"}, True),
    ({"item": {"$regex": "r n", "$options": "x"}}, {"item": "rn"}, True),
    ({"item": re.compile("^jour")}, INVENTORY, True),
    ({"item": Regex("^JOUR", "i")}, INVENTORY, True),
    ({"tags": {"$regex": "^re"}}, INVENTORY, True),  # any element
    ({"qty": {"$regex": "25"}}, INVENTORY, False),  # only strings match a regex
    ({"item": {"$in": [re.compile("^jo"), "zzz"]}}, INVENTORY, True),
    # other BSON types
    ({"d": {"$gt": dt.datetime(2020, 1, 1)}}, {"d": dt.datetime(2021, 1, 1)}, True),
    ({"d": {"$gt": dt.datetime(2020, 1, 1)}}, {"d": "2021-01-01"}, False),
    ({"d": dt.datetime(2020, 1, 1)}, {"d": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}, True),
    (
        {"o": ObjectId("65a1b2c3d4e5f60718293a4b")},
        {"o": ObjectId("65a1b2c3d4e5f60718293a4b")},
        True,
    ),
    ({"n": math.nan}, {"n": math.nan}, True),
    ({"n": {"$gt": 0}}, {"n": math.nan}, False),
    ({"n": {"$lt": 0}}, {"n": math.nan}, False),
    ({"n": {"$gte": math.nan}}, {"n": math.nan}, True),
    ({"a": [1, [2, 3]]}, {"a": [1, [2, 3]]}, True),
    ({"a": [2, 3]}, {"a": [1, [2, 3]]}, True),  # an element that is itself the array
    ({"a.b": 1}, {"a": [[{"b": 1}]]}, False),  # nested arrays are not traversed
    ({"$comment": "why this filter exists", "qty": 25}, INVENTORY, True),
]


@pytest.mark.parametrize(("spec", "document", "expected"), TABLE)
def test_mongodb_documented_behaviour(
    spec: dict[str, Any], document: dict[str, Any], expected: bool
) -> None:
    assert compile_filter(spec)(document) is expected


def test_empty_filter_matches_everything() -> None:
    match = compile_filter({})
    assert match({}) and match(INVENTORY)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"qty": {"$foo": 1}}, "$foo"),
        ({"$where": "this.qty > 1"}, "$where"),
        ({"$expr": {"$gt": ["$a", "$b"]}}, "$expr"),
        ({"$and": [{"qty": {"$near": [1, 2]}}]}, "$near"),
        ({"tags": {"$elemMatch": {"$bogus": 1}}}, "$bogus"),
        ({"qty": {"$not": {"$mod": [2, 0]}}}, "$mod"),
    ],
)
def test_unknown_operators_fail_at_compile_time(spec: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_filter(spec)
    assert named in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [
        {"$and": []},
        {"$or": {"a": 1}},
        {"$nor": [1]},
        {"a": {"$in": 5}},
        {"a": {"$all": "x"}},
        {"a": {"$size": "2"}},
        {"a": {"$size": 1.5}},
        {"a": {"$regex": "("}},
        {"a": {"$regex": "x", "$options": "q"}},
        {"a": {"$options": "i"}},
        {"a": {"$gt": 1, "b": 2}},
        {"a": {"$not": 5}},
        {"a": {"$elemMatch": 5}},
    ],
)
def test_malformed_filters_are_config_errors(spec: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        compile_filter(spec)


def test_unusual_values_in_documents_do_not_crash() -> None:
    from bson import DBRef

    match = compile_filter({"ref": {"$gt": 1}, "b": {"$exists": True}})
    assert not match({"ref": DBRef("c", 1), "b": 1})
    assert compile_filter({"ref": DBRef("c", 1)})({"ref": DBRef("c", 1)})
