"""Starting and resuming change streams, batch tokens, waiting getMores and history loss."""

from __future__ import annotations

import threading
import time
from typing import Any

import pymongo
import pytest
from bson import Int64
from pymongo.errors import OperationFailure

from tests.conformance.helpers import next_events, no_more_events, token_time
from tests.harness.mongo import MongoServer

AWAIT_MS = 100


def _record(coll: Any, n: int) -> list[dict[str, Any]]:
    with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
        coll.insert_many([{"_id": i} for i in range(n)])
        return next_events(stream, n)


def test_resume_after_and_start_after_continue_after_the_token(mongo_db: Any) -> None:
    events = _record(mongo_db.c, 5)
    for option in ("resume_after", "start_after"):
        with mongo_db.c.watch(max_await_time_ms=AWAIT_MS, **{option: events[1]["_id"]}) as stream:
            rest = next_events(stream, 3)
            no_more_events(stream, 0.2)
        assert [e["documentKey"]["_id"] for e in rest] == [2, 3, 4]


def test_start_at_operation_time_is_inclusive(mongo_db: Any) -> None:
    events = _record(mongo_db.c, 4)
    with mongo_db.c.watch(
        max_await_time_ms=AWAIT_MS, start_at_operation_time=events[2]["clusterTime"]
    ) as stream:
        rest = next_events(stream, 2)
    assert [e["documentKey"]["_id"] for e in rest] == [2, 3]


def test_start_after_an_invalidate_but_not_resume_after_it(mongo_db: Any) -> None:
    mongo_db.c.insert_one({"_id": 0})
    with mongo_db.c.watch(max_await_time_ms=AWAIT_MS) as stream:
        mongo_db.c.drop()
        _, invalidate = next_events(stream, 2)
    mongo_db.c.insert_one({"_id": "after"})
    with mongo_db.c.watch(max_await_time_ms=AWAIT_MS, start_after=invalidate["_id"]) as stream:
        (event,) = next_events(stream, 1)
    assert event["documentKey"] == {"_id": "after"}
    with pytest.raises(OperationFailure) as info:
        mongo_db.c.watch(resume_after=invalidate["_id"])
    assert info.value.code == 260


def test_malformed_resume_token_is_rejected(mongo_db: Any) -> None:
    mongo_db.c.insert_one({})
    for token in ({"_data": "not hex at all"}, {"_data": "82"}):
        with pytest.raises(OperationFailure) as info:
            mongo_db.c.watch(resume_after=token)
        assert info.value.code == 260


def test_post_batch_resume_token_on_empty_batches_advances(mongo_db: Any) -> None:
    mongo_db.create_collection("quiet")
    reply = mongo_db.command("aggregate", "quiet", pipeline=[{"$changeStream": {}}], cursor={})
    cursor = reply["cursor"]
    assert cursor["firstBatch"] == []
    first = cursor["postBatchResumeToken"]
    assert bytes.fromhex(first["_data"])[0] == 0x82
    mongo_db.busy.insert_many([{} for _ in range(3)])  # other namespaces move the cluster on
    more = mongo_db.command("getMore", Int64(cursor["id"]), collection="quiet", maxTimeMS=100)
    assert more["cursor"]["nextBatch"] == []
    second = more["cursor"]["postBatchResumeToken"]
    assert second["_data"] > first["_data"]
    assert token_time(second) >= token_time(first)
    with mongo_db.quiet.watch(max_await_time_ms=AWAIT_MS, resume_after=second) as stream:
        mongo_db.quiet.insert_one({"_id": "late"})
        (event,) = next_events(stream, 1)
    assert event["documentKey"] == {"_id": "late"}
    mongo_db.command("killCursors", "quiet", cursors=[Int64(cursor["id"])])


def test_get_more_waits_for_max_time_ms_or_the_next_event(mongo_db: Any) -> None:
    mongo_db.create_collection("c")
    reply = mongo_db.command("aggregate", "c", pipeline=[{"$changeStream": {}}], cursor={})
    cursor_id = Int64(reply["cursor"]["id"])
    started = time.monotonic()
    empty = mongo_db.command("getMore", cursor_id, collection="c", maxTimeMS=600)
    assert time.monotonic() - started >= 0.5
    assert empty["cursor"]["nextBatch"] == []
    timer = threading.Timer(0.3, lambda: mongo_db.c.insert_one({"_id": 1}))
    timer.start()
    started = time.monotonic()
    full = mongo_db.command("getMore", cursor_id, collection="c", maxTimeMS=10_000)
    elapsed = time.monotonic() - started
    timer.join()
    assert [e["documentKey"] for e in full["cursor"]["nextBatch"]] == [{"_id": 1}]
    assert elapsed < 5
    mongo_db.command("killCursors", "c", cursors=[cursor_id])


def _fill(server: MongoServer, coll: Any, count: int) -> None:
    # A real mongod's oplog is sized in bytes (1 MB at least), so pad the documents there.
    pad = "x" * (200_000 if server.kind == "mongod" else 1)
    for i in range(count):
        coll.insert_one({"i": i, "pad": pad})


def test_history_lost_is_error_286_and_not_resumable(mongo_server_factory: Any) -> None:
    server = mongo_server_factory(history_size=10)
    with pymongo.MongoClient[dict[str, Any]](server.uri) as client:
        coll = client.db.c
        with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
            coll.insert_one({"first": True})
            (first,) = next_events(stream, 1)
        _fill(server, coll, 60)
        attempts = [
            {"resume_after": first["_id"]},
            {"start_at_operation_time": first["clusterTime"]},
        ]
        for options in attempts:
            with pytest.raises(OperationFailure) as info:
                coll.watch(**options)
            assert info.value.code == 286, options
            assert info.value.has_error_label("NonResumableChangeStreamError")
