"""The server presents itself as a replica-set primary and answers CRUD as MongoDB does."""

from __future__ import annotations

from typing import Any

import pymongo
import pytest
from bson import Int64, ObjectId, Regex, Timestamp
from pymongo import monitoring
from pymongo.errors import DuplicateKeyError, OperationFailure, WriteError

from tests.harness.mongo import MongoServer


def test_hello_reports_a_writable_replica_set_primary(mongo_client: Any) -> None:
    hello = mongo_client.admin.command("hello")
    assert hello["isWritablePrimary"] is True
    assert hello["setName"]
    assert hello["primary"] in hello["hosts"]
    assert hello["maxWireVersion"] >= 17
    assert hello["logicalSessionTimeoutMinutes"] > 0
    legacy = mongo_client.admin.command("isMaster")
    assert legacy["ismaster"] is True


def test_replica_set_and_direct_connections_both_work(mongo_server: MongoServer) -> None:
    if mongo_server.kind == "external":
        pytest.skip("the external URI decides how to connect")
    with pymongo.MongoClient[dict[str, Any]](
        mongo_server.replica_set_uri, serverSelectionTimeoutMS=5000
    ) as client:
        assert client.admin.command("ping")["ok"] == 1
        assert client.primary is not None
    with pymongo.MongoClient[dict[str, Any]](
        mongo_server.uri, serverSelectionTimeoutMS=5000
    ) as client:
        assert client.admin.command("ping")["ok"] == 1
        assert client.is_primary


class _Replies(monitoring.CommandListener):
    def __init__(self) -> None:
        self.replies: list[tuple[str, Any]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.replies.append((event.command_name, event.reply))

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_replies_carry_operation_time_and_cluster_time(mongo_uri: str) -> None:
    listener = _Replies()
    with pymongo.MongoClient[dict[str, Any]](mongo_uri, event_listeners=[listener]) as client:
        coll = client["t_optime"]["c"]
        coll.insert_one({"x": 1})
        coll.find_one({"x": 1})
        client.drop_database("t_optime")
    checked = [(n, r) for n, r in listener.replies if n in ("insert", "find", "dropDatabase")]
    assert len(checked) == 3
    for name, reply in checked:
        assert isinstance(reply.get("operationTime"), Timestamp), (name, reply)
        assert isinstance(reply["$clusterTime"]["clusterTime"], Timestamp), (name, reply)


def test_insert_find_update_replace_delete(mongo_db: Any) -> None:
    coll = mongo_db.c
    oid = coll.insert_one({"a": 1}).inserted_id
    assert isinstance(oid, ObjectId)
    coll.insert_many([{"_id": i, "n": i, "tags": ["x"]} for i in range(10)])
    assert coll.count_documents({}) == 11
    assert coll.estimated_document_count() == 11
    assert [d["_id"] for d in coll.find({"n": {"$gte": 7}}).sort("n", -1)] == [9, 8, 7]
    assert coll.find_one({"_id": 3}, {"n": 1}) == {"_id": 3, "n": 3}
    result = coll.update_one({"_id": 3}, {"$set": {"n": 30}, "$push": {"tags": "y"}})
    assert (result.matched_count, result.modified_count) == (1, 1)
    assert coll.update_one({"_id": 3}, {"$set": {"n": 30}}).modified_count == 0
    assert coll.update_many({"n": {"$lt": 5}}, {"$inc": {"n": 100}}).modified_count == 4
    assert coll.replace_one({"_id": 4}, {"r": True}).modified_count == 1
    assert coll.find_one({"_id": 4}) == {"_id": 4, "r": True}
    upserted = coll.update_one({"_id": "new"}, {"$set": {"u": 1}}, upsert=True)
    assert upserted.upserted_id == "new"
    assert coll.delete_one({"_id": 5}).deleted_count == 1
    assert coll.delete_many({"tags": "x"}).deleted_count == 8
    assert sorted(map(str, coll.distinct("_id"))) == sorted([str(oid), "4", "new"])
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": "new"})


def test_find_and_modify_and_cursors(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_many([{"_id": i} for i in range(250)])
    assert len(list(coll.find().batch_size(7))) == 250
    before = coll.find_one_and_update({"_id": 1}, {"$set": {"v": 1}})
    after = coll.find_one_and_update(
        {"_id": 1}, {"$inc": {"v": 1}}, return_document=pymongo.ReturnDocument.AFTER
    )
    assert before == {"_id": 1} and after == {"_id": 1, "v": 2}
    assert coll.find_one_and_delete({"_id": 2}) == {"_id": 2}
    pipeline = [{"$match": {"_id": {"$lt": 10}}}, {"$group": {"_id": None, "n": {"$sum": 1}}}]
    assert list(coll.aggregate(pipeline)) == [{"_id": None, "n": 9}]


def test_collections_indexes_rename_and_drop(mongo_client: Any, mongo_db: Any) -> None:
    mongo_db.a.insert_one({"_id": 1})
    mongo_db.a.create_index("k")
    assert {ix["name"] for ix in mongo_db.a.list_indexes()} == {"_id_", "k_1"}
    mongo_db.a.rename("b")  # sent to admin, as the drivers do
    assert mongo_db.list_collection_names() == ["b"]
    assert mongo_db.b.find_one() == {"_id": 1}
    mongo_db.b.drop()
    assert mongo_db.list_collection_names() == []
    mongo_db.c.insert_one({})
    assert mongo_db.name in mongo_client.list_database_names()
    mongo_client.drop_database(mongo_db.name)
    assert mongo_db.name not in mongo_client.list_database_names()


def test_a_retried_write_is_applied_once(mongo_client: Any, mongo_db: Any) -> None:
    mongo_db.create_collection("c")
    with mongo_client.start_session() as session:
        command = {"insert": "c", "documents": [{"_id": 1}], "txnNumber": Int64(1)}
        first = mongo_db.command(dict(command), session=session)
        again = mongo_db.command(dict(command), session=session)
        assert first["n"] == again["n"] == 1
        assert "writeErrors" not in again
        update = {
            "update": "c",
            "updates": [{"q": {"_id": 1}, "u": {"$inc": {"n": 1}}}],
            "txnNumber": Int64(2),
        }
        mongo_db.command(dict(update), session=session)
        mongo_db.command(dict(update), session=session)
    assert mongo_db.c.find_one({"_id": 1}) == {"_id": 1, "n": 1}


def test_unknown_command_fails_like_mongodb(mongo_db: Any) -> None:
    with pytest.raises(OperationFailure) as info:
        mongo_db.command("noSuchCommandAtAll")
    assert info.value.code == 59


def test_id_range_pages_in_id_order(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_many([{"_id": i} for i in (5, 1, 9, 3, 7)] + [{"_id": "b"}, {"_id": "a"}])
    coll.insert_one({"_id": 4.5})
    coll.delete_one({"_id": 9})
    page = coll.find({"_id": {"$gt": 3}}).sort("_id", 1).limit(2)
    assert [d["_id"] for d in page] == [4.5, 5]
    assert [d["_id"] for d in coll.find({"_id": {"$gte": 3, "$lt": 7}}).sort("_id", -1)] == [
        5,
        4.5,
        3,
    ]
    assert [d["_id"] for d in coll.find({"_id": {"$gt": "a"}}).sort("_id", 1)] == ["b"]
    assert [d["_id"] for d in coll.find().sort("_id", 1)] == [1, 3, 4.5, 5, 7, "a", "b"]
    coll.insert_one({"_id": 2})
    assert [d["_id"] for d in coll.find({"_id": {"$lte": 3}}).sort("_id", 1)] == [1, 2, 3]


def test_update_operators_follow_mongodb_semantics(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.insert_one({"_id": 1, "z": 0, "a": {"b": 1}, "arr": [1, 2]})
    coll.update_one({"_id": 1}, {"$set": {"y": 1, "x": 2, "z": 5}, "$unset": {"a": ""}})
    assert list(coll.find_one({"_id": 1})) == ["_id", "z", "arr", "x", "y"]
    coll.update_one({"_id": 1}, {"$set": {"a.b.c": 1}, "$inc": {"z": 1}, "$push": {"arr": 3}})
    assert coll.find_one({"_id": 1}) == {
        "_id": 1,
        "z": 6,
        "arr": [1, 2, 3],
        "x": 2,
        "y": 1,
        "a": {"b": {"c": 1}},
    }
    with pytest.raises(OperationFailure) as info:
        coll.update_one({"_id": 1}, {"$set": {"_id": 2}})
    assert info.value.code == 66
    coll.update_one({"_id": 1}, [{"$set": {"sum": {"$add": ["$z", "$x"]}}}])
    assert coll.find_one({"_id": 1})["sum"] == 8


def test_unique_secondary_index_rejects_duplicates(mongo_db: Any) -> None:
    coll = mongo_db.c
    coll.create_index("email", unique=True)
    coll.insert_one({"_id": 1, "email": "a@x"})
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 2, "email": "a@x"})
    coll.insert_one({"_id": 3, "email": "b@x"})
    with pytest.raises(DuplicateKeyError):
        coll.update_one({"_id": 3}, {"$set": {"email": "a@x"}})
    coll.update_one({"_id": 3}, {"$set": {"email": "b@x", "n": 1}})
    assert coll.count_documents({}) == 2


@pytest.mark.parametrize("bad_id", [Regex("a.*"), [1, 2]], ids=["regex", "array"])
def test_an_id_of_a_type_mongodb_refuses_is_a_write_error(mongo_db: Any, bad_id: Any) -> None:
    """MongoDB refuses a regular expression or an array as _id (BadValue, code 2)."""
    with pytest.raises(WriteError) as err:
        mongo_db.refused.insert_one({"_id": bad_id, "x": 1})
    assert err.value.code == 2
    assert mongo_db.refused.count_documents({}) == 0
