"""A Chroma sink whose bound collection was found gone looks the name up again only when
asked (``collection_id``): a write that follows never goes into whatever the name
serves now, such as the collection a rebuild switched it to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from syncd.errors import SinkLostError
from syncd.identity import ID_KEY
from syncd.sink import ChromaSink, Upsert, WritePlan


def _plan(key: str) -> WritePlan:
    return WritePlan(upserts=[Upsert(key, "a text", {ID_KEY: key}, [0.1, 0.2, 0.3, 0.4])])


def test_a_write_after_the_collection_was_found_gone_never_goes_into_its_namesake(
    chroma_persistent_client: Any,
) -> None:
    client = chroma_persistent_client
    sink = ChromaSink(lambda: client, "coll", dimensions=4, pipeline="p")
    old_id = sink.collection_id(create=True)
    sink.write(_plan("1"))
    # A switch: the name serves another collection (vectors of the same size), and the
    # one the sink is bound to is deleted (`--drop-previous`).
    client.get_collection("coll").modify(name="coll--v1")
    new = client.create_collection("coll", metadata={"hnsw:space": "cosine"})
    vector: list[Sequence[float]] = [[1.0, 0.0, 0.0, 0.0]]
    new.add(ids=["x"], embeddings=vector, documents=["new"])
    client.delete_collection("coll--v1")

    with pytest.raises(SinkLostError):
        sink.existing(["1"])  # a read finds the bound collection gone
    with pytest.raises(SinkLostError):
        sink.write(_plan("2"))  # and the write after it goes nowhere
    assert new.get()["ids"] == ["x"]
    # Asked, the sink looks the name up again, for the caller to judge what it finds.
    assert sink.collection_id() == str(new.id) != old_id


def test_once_gone_a_lookup_that_finds_nothing_leaves_every_call_refusing(
    chroma_persistent_client: Any,
) -> None:
    # One thread finds the bound collection gone and asks whether the name serves one
    # (`collection_id`, nothing there); another thread's call must not then create an
    # empty namesake, as a first run would.
    client = chroma_persistent_client
    sink = ChromaSink(lambda: client, "coll", dimensions=4, pipeline="p")
    sink.collection_id(create=True)
    sink.write(_plan("1"))
    client.delete_collection("coll")

    with pytest.raises(SinkLostError):
        sink.existing(["1"])
    assert sink.collection_id() is None
    with pytest.raises(SinkLostError):
        sink.existing(["1"])
    with pytest.raises(SinkLostError):
        sink.write(_plan("2"))
    names = {c if isinstance(c, str) else c.name for c in client.list_collections()}
    assert "coll" not in names
