"""kill -9 of the server loses no acknowledged write and no change history."""

from __future__ import annotations

import threading
from typing import Any

import pymongo
import pytest
from pymongo.errors import PyMongoError

from tests.conformance.helpers import next_events, no_more_events

AWAIT_MS = 100


@pytest.fixture
def server(mongo_server_factory: Any) -> Any:
    server = mongo_server_factory()
    if not server.supports_kill:
        pytest.skip("the server cannot be killed")
    return server


def test_data_and_history_survive_kill_9(server: Any) -> None:
    with pymongo.MongoClient[dict[str, Any]](server.uri) as client:
        coll = client.db.c
        with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
            coll.insert_one({"_id": 0})
            (start,) = next_events(stream, 1)
        coll.insert_many([{"_id": i} for i in range(1, 6)])
        coll.with_options(write_concern=pymongo.WriteConcern(w=1)).insert_one({"_id": "w1"})
        coll.with_options(write_concern=pymongo.WriteConcern(w="majority")).update_one(
            {"_id": 1}, {"$set": {"v": "majority"}}
        )
        coll.delete_one({"_id": 2})
    server.kill()
    server.start()
    with pymongo.MongoClient[dict[str, Any]](server.uri) as client:
        coll = client.db.c
        assert sorted(map(str, coll.distinct("_id"))) == ["0", "1", "3", "4", "5", "w1"]
        assert coll.find_one({"_id": 1}) == {"_id": 1, "v": "majority"}
        with coll.watch(max_await_time_ms=AWAIT_MS, resume_after=start["_id"]) as stream:
            events = next_events(stream, 8)
            no_more_events(stream, 0.3)
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in events] == [
        ("insert", 1),
        ("insert", 2),
        ("insert", 3),
        ("insert", 4),
        ("insert", 5),
        ("insert", "w1"),
        ("update", 1),
        ("delete", 2),
    ]


def test_a_stream_resumes_across_kill_9_without_loss_or_duplicates(server: Any) -> None:
    acknowledged: list[int] = []
    stop = threading.Event()

    def write() -> None:
        with pymongo.MongoClient[dict[str, Any]](
            server.uri, retryWrites=False, serverSelectionTimeoutMS=20_000
        ) as client:
            coll = client.db.c.with_options(write_concern=pymongo.WriteConcern(w="majority"))
            i = 0
            while not stop.is_set():
                try:
                    coll.insert_one({"_id": i})
                    acknowledged.append(i)
                except PyMongoError:
                    pass  # unacknowledged: it may or may not have been applied
                i += 1

    with pymongo.MongoClient[dict[str, Any]](server.uri, serverSelectionTimeoutMS=20_000) as client:
        coll = client.db.c
        coll.insert_one({"_id": "begin"})
        with coll.watch(max_await_time_ms=AWAIT_MS) as stream:
            writer = threading.Thread(target=write)
            writer.start()
            seen = [e["documentKey"]["_id"] for e in next_events(stream, 20)]
            server.kill()
            server.start()
            seen += [e["documentKey"]["_id"] for e in next_events(stream, 20, timeout=30)]
            stop.set()
            writer.join()
            stored = set(coll.distinct("_id"))
            total = len(stored) - 1  # without "begin"
            seen += [e["documentKey"]["_id"] for e in next_events(stream, total - len(seen))]
            no_more_events(stream, 0.3)
    assert set(acknowledged) <= stored
    assert len(seen) == len(set(seen)), "a resumed stream repeated events"
    assert set(seen) == stored - {"begin"}
    assert seen == sorted(seen)
