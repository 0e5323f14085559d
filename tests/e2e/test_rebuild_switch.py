"""The switch of `syncd rebuild` stopped after each of its steps (against a real Chroma
server, the file checkpoint store and dead letters in MongoDB): completing it again ends
in the same state, and while it is recorded a daemon does not stream the pipeline."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp

from syncd import switching
from syncd.checkpoint import Checkpoint, FileCheckpointStore
from syncd.config import CheckpointSettings
from syncd.deadletter import DeadLetterStore
from syncd.errors import MappingSwitchedError

STEPS = (
    "intent",
    "first rename",
    "second rename",
    "letters parked",  # moved, not yet recorded as moved
    "letters taken",
    "live checkpoint",
    "build dropped",
)


def _letter(letters: DeadLetterStore, pipeline: str, key: str) -> None:
    letters._coll.insert_one(
        {"_id": {"pipeline": pipeline, "key": key}, "pipeline": pipeline, "key": key,
         "collection": "docs", "source_id": key, "attempts": 1}
    )  # fmt: skip


def _owners(letters: DeadLetterStore) -> dict[str, str]:
    return {doc["key"]: doc["pipeline"] for doc in letters._coll.find()}


def _setup(tmp_path: Path, chroma: Any) -> tuple[FileCheckpointStore, dict[str, Any], str, str]:
    name = f"sw-{uuid.uuid4().hex[:8]}"
    store = FileCheckpointStore(CheckpointSettings(store="file", path=str(tmp_path / "cp")))
    old = chroma.create_collection(name, embedding_function=None)
    new = chroma.create_collection(f"{name}--v2", embedding_function=None)
    old.add(ids=["i:1"], embeddings=[[1.0, 0.0]], documents=["old"])
    new.add(ids=["i:1"], embeddings=[[0.0, 1.0, 0.0]], documents=["new"])
    live = Checkpoint(pipeline="p", fingerprint="old-fp", chroma_collection_id=str(old.id))
    live.token, live.cluster_time = {"_data": "8200000064000000012B"}, Timestamp(100, 1)
    store.save(live)
    store.save(Checkpoint(pipeline="p~rebuild", fingerprint="new-fp"))
    position = {
        "token": {"_data": "82000000C8000000012B"},
        "token_is_invalidate": False,
        "start_at": None,
        "cluster_time": Timestamp(200, 1),
        "counts": {"snapshot": 1},
        "fingerprint": "new-fp",
    }
    record = {
        "state": "switching",
        "generation": 1,
        "target": f"{name}--v2",
        "fingerprint": "new-fp",
        "previous": None,
        "switch": {
            "live_name": name,
            "out": {"id": str(old.id), "name": f"{name}--v1"},
            "in": {"id": str(new.id), "name": f"{name}--v2", "position": position},
            "after": {
                "generation": 2,
                "fingerprint": "new-fp",
                "target": None,
                "previous": {"name": f"{name}--v1", "id": str(old.id), "generation": 1},
            },
        },
    }
    switching.save_record(store, "p", record)
    return store, record, str(old.id), str(new.id)


@pytest.mark.parametrize("done", range(len(STEPS)))
def test_a_switch_interrupted_after_any_step_completes_the_same(
    tmp_path, chroma_server, mongo_client, done
):
    chroma = chroma_server.client()
    store, record, old_id, new_id = _setup(tmp_path, chroma)
    name = record["switch"]["live_name"]
    db = f"sw_{uuid.uuid4().hex[:8]}"
    letters = DeadLetterStore(mongo_client, db, "dead_letters")
    _letter(letters, "p", "s:old-only")  # the live collection lacks it
    _letter(letters, "p~rebuild", "s:new-only")  # the built one lacks it
    record["switch"]["in"]["letters"] = "p~rebuild"
    # What a crash after step `done` leaves behind.
    if done >= 1:
        chroma.get_collection(name).modify(name=f"{name}--v1")
    if done >= 2:
        chroma.get_collection(f"{name}--v2").modify(name=name)
    if done >= 3:
        letters.move("p", switching.parked_letters("p", old_id))
    if done >= 4:
        record = dict(record, switch=dict(record["switch"], letters_moved=1))
        switching.save_record(store, "p", record)
        letters.move("p~rebuild", "p")
    if done >= 5:
        switching.write_live(store, "p", record["switch"], epoch=0)
    if done >= 6:
        store.delete("p~rebuild")
    live = store.load("p")
    assert live is not None
    # Meanwhile a daemon, with either mapping, waits.
    for fingerprint in ("old-fp", "new-fp"):
        with pytest.raises(MappingSwitchedError):
            switching.check_start(store, "p", fingerprint, live)

    after = switching.complete(store, chroma, "p", record, epoch=0, letters=letters)
    names = {str(c.id): c.name for c in chroma.list_collections() if c.name.startswith(name)}
    assert names == {new_id: name, old_id: f"{name}--v1"}, names
    cp = store.load("p")
    assert cp is not None
    assert (cp.fingerprint, cp.chroma_collection_id) == ("new-fp", new_id)
    assert cp.token == {"_data": "82000000C8000000012B"} and cp.cluster_time == Timestamp(200, 1)
    assert store.load("p~rebuild") is None
    assert after["state"] == "switched" and after["previous"]["id"] == old_id
    assert switching.load_record(store, "p") == after
    parked = switching.parked_letters("p", old_id)
    assert _owners(letters) == {"s:old-only": parked, "s:new-only": "p"}
    assert [e["key"] for e in letters.list("p")] == ["s:new-only"]
    # A daemon with the new mapping streams; one with the old mapping waits.
    switching.check_start(store, "p", "new-fp", cp)
    with pytest.raises(MappingSwitchedError):
        switching.check_start(store, "p", "old-fp", cp)
    # Completing it once more changes nothing.
    switching.complete(store, chroma, "p", record, epoch=0, letters=letters)
    assert _owners(letters) == {"s:old-only": parked, "s:new-only": "p"}
    again = {str(c.id): c.name for c in chroma.list_collections() if c.name.startswith(name)}
    assert again == names
    for collection in names.values():
        chroma.delete_collection(collection)
    mongo_client.drop_database(db)


@pytest.mark.parametrize("renamed", [False, True])  # the first rename done before a crash
@pytest.mark.parametrize("was", ["building", "switched"])  # a build's switch, a rollback's
def test_a_switch_whose_collection_to_switch_to_is_gone_is_abandoned(
    tmp_path, chroma_server, was, renamed
):
    from syncd.errors import SinkLostError

    chroma = chroma_server.client()
    store, record, old_id, new_id = _setup(tmp_path, chroma)
    name = record["switch"]["live_name"]
    record["switch"]["was"] = was
    if was == "switched":  # rolling back to the kept collection, which is the one gone
        record["previous"] = {"name": f"{name}--v2", "id": new_id, "generation": 1}
    switching.save_record(store, "p", record)
    chroma.delete_collection(f"{name}--v2")
    if renamed:
        chroma.get_collection(name).modify(name=f"{name}--v1")

    with pytest.raises(SinkLostError) as raised:
        switching.complete(store, chroma, "p", record, epoch=0)

    assert "to switch to is gone" in str(raised.value)
    kept = switching.load_record(store, "p")
    assert kept["state"] == was and "switch" not in kept, kept
    if was == "switched":
        assert kept["previous"] is None, "a rollback still offered to a collection that is gone"
    else:  # the build's position described the collection that is gone
        assert store.load("p~rebuild") is None, "the next rebuild would resume into nothing"
    live = store.load("p")
    assert live is not None and live.chroma_collection_id == old_id
    switching.check_start(store, "p", "old-fp", live)  # the live pipeline streams again
    assert {c.name for c in chroma.list_collections() if c.name.startswith(name)} == {name}
    chroma.delete_collection(name)
