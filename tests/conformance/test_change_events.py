"""Change stream events: scopes, pipelines, event fields, full documents and tokens."""

from __future__ import annotations

import datetime as dt
import struct
from typing import Any

import pytest
from bson import ObjectId, Timestamp
from pymongo.errors import OperationFailure

from tests.conformance.helpers import next_events, no_more_events, token_time

AWAIT_MS = 100


def test_collection_stream_sees_crud_events_with_their_fields(mongo_db: Any) -> None:
    coll = mongo_db.c
    with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1, "a": 1, "b": {"x": 1, "y": 2}, "arr": [1, 2, 3]})
        coll.update_one(
            {"_id": 1}, {"$set": {"a": 2, "b.x": 5}, "$unset": {"b.y": ""}, "$pop": {"arr": 1}}
        )
        coll.replace_one({"_id": 1}, {"z": 1})
        coll.delete_one({"_id": 1})
        mongo_db.other.insert_one({"_id": 1})  # another collection: not in this stream
        insert, update, replace, delete = next_events(stream, 4)
        no_more_events(stream)
    ns = {"db": mongo_db.name, "coll": "c"}
    for event in (insert, update, replace, delete):
        assert event["ns"] == ns
        assert event["documentKey"] == {"_id": 1}
        assert isinstance(event["clusterTime"], Timestamp)
        assert isinstance(event["wallTime"], dt.datetime)
        assert set(event["_id"]) == {"_data"}
    assert [e["operationType"] for e in (insert, update, replace, delete)] == [
        "insert",
        "update",
        "replace",
        "delete",
    ]
    assert insert["fullDocument"] == {"_id": 1, "a": 1, "b": {"x": 1, "y": 2}, "arr": [1, 2, 3]}
    description = update["updateDescription"]
    assert description["updatedFields"]["a"] == 2
    assert description["updatedFields"]["b.x"] == 5
    assert description["removedFields"] == ["b.y"]
    assert "truncatedArrays" in description
    assert "fullDocument" not in update
    assert replace["fullDocument"] == {"_id": 1, "z": 1}
    assert "fullDocument" not in delete


def test_tokens_lead_with_the_cluster_time_and_increase(mongo_db: Any) -> None:
    with mongo_db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        mongo_db.c.insert_many([{"_id": i} for i in range(5)])
        mongo_db.c.update_many({}, {"$set": {"u": 1}})
        events = next_events(stream, 10)
    tokens = [e["_id"]["_data"] for e in events]
    for event in events:
        assert bytes.fromhex(event["_id"]["_data"])[0] == 0x82
        assert token_time(event["_id"]) == event["clusterTime"]
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_database_and_cluster_streams(mongo_client: Any, mongo_db: Any) -> None:
    with (
        mongo_db.watch(max_await_time_ms=AWAIT_MS) as db_stream,
        mongo_client.watch(max_await_time_ms=AWAIT_MS) as cluster_stream,
    ):
        mongo_db.a.insert_one({"_id": "a"})
        mongo_db.b.insert_one({"_id": "b"})
        db_events = next_events(db_stream, 2)
        cluster_events = [
            e for e in next_events(cluster_stream, 2) if e["ns"]["db"] == mongo_db.name
        ]
    assert [e["ns"]["coll"] for e in db_events] == ["a", "b"]
    assert [e["documentKey"]["_id"] for e in cluster_events] == ["a", "b"]


def test_match_and_project_after_change_stream(mongo_db: Any) -> None:
    pipeline = [
        {"$match": {"operationType": "insert", "fullDocument.keep": True}},
        {"$project": {"operationType": 1, "fullDocument.n": 1}},
    ]
    with mongo_db.c.watch(pipeline, max_await_time_ms=AWAIT_MS) as stream:
        mongo_db.c.insert_many([{"n": 1, "keep": True, "x": 1}, {"n": 2, "keep": False}])
        mongo_db.c.update_many({}, {"$set": {"u": 1}})
        mongo_db.c.insert_one({"n": 3, "keep": True})
        events = next_events(stream, 2)
        no_more_events(stream)
    assert [e["fullDocument"] for e in events] == [{"n": 1}, {"n": 3}]
    assert all(set(e) == {"_id", "operationType", "fullDocument"} for e in events)


def test_top_level_exclusions_drop_those_fields_and_keep_the_rest(mongo_db: Any) -> None:
    """$match stages, then a $project that only excludes (and an $unset): each event is
    as it would be without them, less the fields named."""
    coll = mongo_db.c
    pipeline = [
        {"$match": {"operationType": {"$in": ["insert", "update", "delete"]}}},
        {"$project": {"updateDescription": 0}},
        {"$unset": "wallTime"},
    ]
    with coll.watch(pipeline, full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1, "t": "one"})
        coll.update_one({"_id": 1}, {"$set": {"t": "uno"}})
        coll.delete_one({"_id": 1})
        insert, update, delete = next_events(stream, 3)
        no_more_events(stream)
    assert insert["fullDocument"] == {"_id": 1, "t": "one"}
    assert update["operationType"] == "update" and "updateDescription" not in update
    assert update["documentKey"] == {"_id": 1}
    assert set(update) >= {"_id", "clusterTime", "ns", "documentKey", "fullDocument"}
    assert delete["documentKey"] == {"_id": 1}
    assert all("wallTime" not in e for e in (insert, update, delete))


def test_an_event_past_the_size_limit_fails_unless_projected_under_it(mongo_db: Any) -> None:
    """An update of a 9 MiB field, its document looked up, makes an event of twice that
    (updateDescription and fullDocument): the server fails the stream with
    BSONObjectTooLarge. Projected away, updateDescription leaves an event under 16 MiB."""
    coll = mongo_db.c
    coll.insert_one({"_id": 1, "blob": "a" * (9 << 20)})
    projection = [{"$project": {"updateDescription": 0}}]
    with (
        coll.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as whole,
        coll.watch(projection, full_document="updateLookup", max_await_time_ms=AWAIT_MS) as cut,
    ):
        coll.update_one({"_id": 1}, {"$set": {"blob": "b" * (9 << 20)}})
        (event,) = next_events(cut, 1)
        with pytest.raises(OperationFailure) as failed:
            next_events(whole, 1)
    assert failed.value.code == 10334, failed.value.details
    assert event["fullDocument"]["blob"] == "b" * (9 << 20)


def test_match_only_pipeline_with_update_lookup(mongo_db: Any) -> None:
    """$match stages alone (as syncd's stream has) pick events whole: inserts and deletes
    as they were written, updates with the document looked up."""
    coll = mongo_db.c
    pipeline = [
        {"$match": {"operationType": {"$in": ["insert", "update", "delete"]}}},
        {"$match": {"documentKey._id": {"$lt": 10}}},
    ]
    with coll.watch(pipeline, full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_many([{"_id": 1, "v": [0.5, 1], "t": "one"}, {"_id": 11, "v": 0}])
        coll.update_one({"_id": 1}, {"$set": {"t": "uno"}})
        coll.replace_one({"_id": 1}, {"t": "replaced"})
        coll.delete_one({"_id": 1})
        insert, update, delete = next_events(stream, 3)
        no_more_events(stream)
    assert insert["operationType"] == "insert"
    assert insert["fullDocument"] == {"_id": 1, "v": [0.5, 1], "t": "one"}
    assert set(insert) >= {"_id", "clusterTime", "ns", "documentKey", "fullDocument"}
    assert update["operationType"] == "update"
    assert update["updateDescription"]["updatedFields"] == {"t": "uno"}
    assert update["fullDocument"] is None  # looked up after the delete: gone
    assert delete["operationType"] == "delete"
    assert delete["documentKey"] == {"_id": 1}
    assert "fullDocument" not in delete


def test_update_lookup_returns_the_current_document_or_null(mongo_db: Any) -> None:
    coll = mongo_db.c
    with coll.watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1, "v": 0})
        coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        coll.update_one({"_id": 1}, {"$set": {"v": 2}})
        _, first, second = next_events(stream, 3)
        assert first["fullDocument"] == second["fullDocument"] == {"_id": 1, "v": 2}
        coll.update_one({"_id": 1}, {"$set": {"v": 3}})
        coll.delete_one({"_id": 1})
        update, delete = next_events(stream, 2)
    assert update["fullDocument"] is None
    assert delete["operationType"] == "delete"


def test_post_images_need_the_collection_option(mongo_db: Any) -> None:
    coll = mongo_db.create_collection("plain")
    with coll.watch(full_document="whenAvailable", max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_one({"_id": 1})
        coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        insert, update = next_events(stream, 2)
    assert insert["fullDocument"] == {"_id": 1}
    assert update["fullDocument"] is None
    with coll.watch(full_document="required", max_await_time_ms=AWAIT_MS) as stream:
        coll.update_one({"_id": 1}, {"$set": {"v": 2}})
        with pytest.raises(OperationFailure):
            next_events(stream, 1)


def test_pre_and_post_images_are_point_in_time(mongo_db: Any) -> None:
    coll = mongo_db.create_collection("imaged", changeStreamPreAndPostImages={"enabled": True})
    with coll.watch(
        full_document="required", full_document_before_change="required", max_await_time_ms=AWAIT_MS
    ) as stream:
        coll.insert_one({"_id": 1, "v": 0})
        coll.update_one({"_id": 1}, {"$set": {"v": 1}})
        coll.update_one({"_id": 1}, {"$set": {"v": 2}})
        coll.delete_one({"_id": 1})
        _, first, second, delete = next_events(stream, 4)
    assert first["fullDocumentBeforeChange"] == {"_id": 1, "v": 0}
    assert first["fullDocument"] == {"_id": 1, "v": 1}
    assert second["fullDocument"] == {"_id": 1, "v": 2}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "v": 2}


def test_drop_then_invalidate_closes_a_collection_stream(mongo_db: Any) -> None:
    mongo_db.c.insert_one({"_id": 1})
    with mongo_db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        mongo_db.c.drop()
        drop, invalidate = next_events(stream, 2)
        assert not stream.alive
    assert drop["operationType"] == "drop"
    assert drop["ns"] == {"db": mongo_db.name, "coll": "c"}
    assert invalidate["operationType"] == "invalidate"
    assert isinstance(invalidate["clusterTime"], Timestamp)
    assert invalidate["_id"]["_data"] > drop["_id"]["_data"]


def test_rename_invalidates_the_source_collection_stream_only(mongo_db: Any) -> None:
    mongo_db.src.insert_one({"_id": 1})
    with (
        mongo_db.src.watch(max_await_time_ms=AWAIT_MS) as coll_stream,
        mongo_db.watch(max_await_time_ms=AWAIT_MS) as db_stream,
    ):
        mongo_db.src.rename("dst")
        rename, invalidate = next_events(coll_stream, 2)
        (db_rename,) = next_events(db_stream, 1)
        assert db_stream.alive
    assert rename["operationType"] == db_rename["operationType"] == "rename"
    assert rename["ns"] == {"db": mongo_db.name, "coll": "src"}
    assert rename["to"] == {"db": mongo_db.name, "coll": "dst"}
    assert invalidate["operationType"] == "invalidate"


def test_drop_database_events(mongo_client: Any, mongo_db: Any) -> None:
    mongo_db.c.insert_one({"_id": 1})
    with (
        mongo_db.watch(max_await_time_ms=AWAIT_MS) as db_stream,
        mongo_client.watch(max_await_time_ms=AWAIT_MS) as cluster_stream,
    ):
        mongo_client.drop_database(mongo_db.name)
        drop, drop_db, invalidate = next_events(db_stream, 3)
        assert not db_stream.alive
        ops = [
            e["operationType"]
            for e in next_events(cluster_stream, 2)
            if e["ns"]["db"] == mongo_db.name
        ]
    assert (drop["operationType"], drop["ns"]["coll"]) == ("drop", "c")
    assert drop_db["operationType"] == "dropDatabase"
    assert drop_db["ns"] == {"db": mongo_db.name}
    assert invalidate["operationType"] == "invalidate"
    assert ops == ["drop", "dropDatabase"]


def test_event_token_has_mongodb_v2_keystring_layout(mongo_db: Any) -> None:
    # Layout from MongoDB's manual ("Resume Tokens from Change Events"): cluster time,
    # version 2, event token type, txnOpIndex 0, fromInvalidate false, collection UUID,
    # then {operationType, documentKey} as KeyString.
    oid = ObjectId()
    with mongo_db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        mongo_db.c.insert_one({"_id": oid})
        (event,) = next_events(stream, 1)
    info = next(mongo_db.list_collections(filter={"name": "c"}))["info"]
    coll_uuid = info["uuid"]
    coll_uuid = coll_uuid.as_uuid() if hasattr(coll_uuid, "as_uuid") else coll_uuid
    ts = event["clusterTime"]
    expected = (
        b"\x82"
        + struct.pack(">II", ts.time, ts.inc)
        + bytes.fromhex("2B042C0100296E5A1004")
        + coll_uuid.bytes
        + b"\x46\x3coperationType\x00\x3cinsert\x00"
        + b"\x46documentKey\x00\x46\x64_id\x00\x64"
        + oid.binary
        + b"\x00\x00\x04"
    )
    assert event["_id"]["_data"] == expected.hex().upper()
