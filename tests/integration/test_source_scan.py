"""The snapshot scan reads every document once, in MongoDB's `_id` order, across BSON
types, and resumes after any `_id` it handed out."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from bson import Binary, Decimal128, Int64, ObjectId
from bson.timestamp import Timestamp

from syncd.config import PipelineSettings
from syncd.source import ChangeSource

MIXED_IDS: list[Any] = [
    None,
    -3,
    2.5,
    Int64(7),
    Decimal128("8.5"),
    10,
    "a",
    "b",
    "zz",
    {"k": 1},
    {"k": 2, "j": "x"},
    Binary.from_uuid(uuid.UUID(int=5)),
    ObjectId("65a1c2d3e4f5a6b7c8d9e0f1"),
    ObjectId("75a1c2d3e4f5a6b7c8d9e0f1"),
    False,
    True,
    datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    Timestamp(1_700_000_000, 1),
]


def _source(client: Any, db: str) -> ChangeSource:
    settings = PipelineSettings.model_validate(
        {"name": "scan", "database": db, "collection": "docs", "mapping": {"text": "body"}}
    )
    return ChangeSource(client, settings)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 100])
def test_scan_covers_every_type_bracket_in_order(mongo_client, mongo_db, batch_size):
    mongo_db["docs"].insert_many([{"_id": i, "body": str(n)} for n, i in enumerate(MIXED_IDS)])
    expected = [d["_id"] for d in mongo_db["docs"].find().sort("_id", 1)]
    assert len(expected) == len(MIXED_IDS)
    seen = [
        d["_id"]
        for page in _source(mongo_client, mongo_db.name).scan("docs", batch_size=batch_size)
        for d in page
    ]
    assert seen == expected


def test_scan_resumes_after_any_id(mongo_client, mongo_db):
    mongo_db["docs"].insert_many([{"_id": i, "body": "x"} for i in MIXED_IDS])
    ordered = [d["_id"] for d in mongo_db["docs"].find().sort("_id", 1)]
    source = _source(mongo_client, mongo_db.name)
    for cut, last in enumerate(ordered):
        rest = [
            d["_id"]
            for page in source.scan("docs", after_id=last, has_after=True, batch_size=3)
            for d in page
        ]
        assert rest == ordered[cut + 1 :], f"resuming after {last!r}"


def test_scan_applies_the_query_in_every_bracket(mongo_client, mongo_db):
    mongo_db["docs"].insert_many(
        [{"_id": i, "body": "x", "keep": n % 2 == 0} for n, i in enumerate(MIXED_IDS)]
    )
    source = _source(mongo_client, mongo_db.name)
    seen = [
        d["_id"] for page in source.scan("docs", batch_size=2, query={"keep": True}) for d in page
    ]
    expected = [d["_id"] for d in mongo_db["docs"].find({"keep": True}).sort("_id", 1)]
    assert seen == expected and len(seen) == (len(MIXED_IDS) + 1) // 2


def test_oplog_start_is_read_where_an_oplog_exists(mongo_server, mongo_client):
    from syncd.source import oplog_start

    if mongo_server.kind == "external":
        pytest.skip("whether an external deployment lets this user read the oplog is unknown")
    start = oplog_start(mongo_client)
    if mongo_server.kind == "standin":
        # The stand-in keeps its change history in its own journal, not in local.oplog.rs.
        assert start is None
    else:
        assert start is not None
        assert start.time <= mongo_client.admin.command("ping")["operationTime"].time
