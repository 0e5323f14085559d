"""A snapshot into a collection that was empty when it began looks up no stored records
for the documents it has not reached, and still converges after a crash at any point of
a write: what a crashed write may have put in Chroma is looked up again on resume, up to
the last document of the part it was writing (to the end of the collection if that
document is gone since), whatever the part size is then."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings
from syncd.embedder import HashingEmbedder
from syncd.identity import ID_KEY, base_id
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.source import Batch
from syncd.telemetry import Telemetry
from tests.doubles import MemorySink, MemoryStore
from tests.unit.test_pipeline import FakeSource, event, token

LONG = "aaaa bbbb cccc dddd eeee ffff"  # three chunks of at most 10 characters
SHORT = "short"  # one chunk


class Killed(Exception):
    """The process died here: nothing after it ran."""


class CrashingStore(MemoryStore):
    """Keeps a copy of each checkpoint as it was saved; ``die_at``: the save (counted from
    1) at which the process dies instead of saving."""

    def __init__(self) -> None:
        super().__init__()
        self.die_at: int | None = None
        self.saves = 0

    def save(self, checkpoint: Checkpoint, *, history_reason: str | None = None) -> None:
        self.saves += 1
        if self.die_at is not None and self.saves == self.die_at:
            raise Killed
        super().save(copy.deepcopy(checkpoint), history_reason=history_reason)


class LookingSink(MemorySink):
    """Records the keys it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.looked_up: list[str] = []

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        self.looked_up.extend(keys)
        return super().existing(keys)


def doc(i: int, body: str = LONG, **fields: Any) -> dict[str, Any]:
    return {"_id": i, "body": body, **({"tag": "t"} | fields)}


def pipeline(source: FakeSource, sink: MemorySink, store: MemoryStore, page: int) -> Pipeline:
    """A new process's pipeline over the same stores."""
    settings = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "app",
            "collection": "docs",
            "snapshot_batch_size": page,
            "mapping": {"text": "body", "metadata": ["tag"], "chunk_size": 10},
            "embedder": {"kind": "hashing", "dimensions": 8},
        }
    )
    return Pipeline(
        settings,
        source=source,
        sink=sink,
        store=store,
        mapper=Mapper(settings),
        embedder=HashingEmbedder(8),
        telemetry=Telemetry.disabled().pipeline("p"),
    )


def snapshot(p: Pipeline) -> Checkpoint:
    cp = p.progress.load()
    p.progress.open_sink(cp)
    assert cp.phase == "snapshot"
    p.snapshotter().run(cp)
    return p.progress.require()


def records_of(sink: MemorySink, i: int) -> dict[str, dict[str, Any]]:
    return {rid: rec for rid, rec in sink.records.items() if base_id(rid) == f"i:{i}"}


def assert_mirrors(sink: MemorySink, source: FakeSource) -> None:
    """Each document has one record per chunk of its body (ids ``i:N#k``), with its tag
    if it has one and no other user metadata; no other record exists."""
    for _id, d in source.current.items():
        body = d["body"]
        chunks = 1 if len(body) <= 10 else 3
        got = records_of(sink, _id)
        assert sorted(got) == sorted(f"i:{_id}#{k}" for k in range(chunks)), (_id, sorted(got))
        for rec in got.values():
            user = {k: v for k, v in rec["metadata"].items() if not k.startswith("syncd_")}
            assert user == ({"tag": d["tag"]} if "tag" in d else {}), (_id, rec["metadata"])
    keys = {f"i:{i}" for i in source.current}
    assert {base_id(rid) for rid in sink.records} <= keys


def crash_in_second_write(source: FakeSource, sink: LookingSink, store: CrashingStore) -> None:
    """Pages of 4: the records of documents 5-8 are written, the checkpoint after them is not."""
    # Saves: the snapshot's start, then per page one before its write and one after it.
    store.die_at = 1 + 2 + 2
    with pytest.raises(Killed):
        snapshot(pipeline(source, sink, store, page=4))
    store.die_at = None
    snap = store.load("p").snapshot  # type: ignore[union-attr]
    assert snap is not None and snap.last_id == 4 and snap.empty_ahead
    assert snap.has_writing_id and snap.writing_id == 8
    assert len(records_of(sink, 8)) == 3, "the crash must come after the write"
    assert sink.looked_up == [], "a new collection needs no lookup"


def test_resumed_snapshot_looks_up_what_a_crashed_write_reached_and_nothing_after():
    source = FakeSource({i: doc(i) for i in range(1, 13)})
    sink, store = LookingSink(), CrashingStore()
    crash_in_second_write(source, sink, store)

    # While it was down, documents the crashed write reached changed: fewer chunks, and
    # a metadata field gone. Chroma merges metadata and keeps other ids on an upsert.
    source.current[6] = {"_id": 6, "body": SHORT}
    source.current[7] = doc(7, SHORT)
    source.current[8] = {"_id": 8, "body": LONG}
    cp = snapshot(pipeline(source, sink, store, page=2))  # pages 5-6, 7-8, 9-10, 11-12

    assert cp.phase == "streaming"
    assert_mirrors(sink, source)
    assert sorted(sink.looked_up) == sorted(f"i:{i}" for i in range(5, 9))


def test_resumed_snapshot_looks_up_to_the_end_when_the_last_written_document_is_gone():
    source = FakeSource({i: doc(i) for i in range(1, 13)})
    sink, store = LookingSink(), CrashingStore()
    crash_in_second_write(source, sink, store)

    # The document the crashed write ended at is gone: nothing tells where its records
    # end, so every later page is looked up.
    del source.current[8]
    source.current[7] = {"_id": 7, "body": SHORT}
    p = pipeline(source, sink, store, page=2)
    cp = snapshot(p)  # pages 5-6, 7-9, 10-11, 12

    assert cp.phase == "streaming"
    assert sorted(sink.looked_up) == sorted(f"i:{i}" for i in [5, 6, 7, 9, 10, 11, 12])
    # The document existed when the scan read it, so its deletion came after the position
    # recorded before the scan: streaming from there removes its records.
    p.process(Batch(events=[event(100, "delete", 8)], token=token(100)))
    assert records_of(sink, 8) == {}
    assert_mirrors(sink, source)


def test_resumed_snapshot_killed_before_its_first_write_lost_nothing_to_look_up():
    source = FakeSource({i: doc(i) for i in range(1, 7)})
    sink, store = LookingSink(), CrashingStore()
    store.die_at = 1 + 1  # the save that announces the first page's write
    with pytest.raises(Killed):
        snapshot(pipeline(source, sink, store, page=4))
    store.die_at = None
    assert sink.records == {}

    snapshot(pipeline(source, sink, store, page=4))
    assert_mirrors(sink, source)
    assert sink.looked_up == []


def test_snapshot_into_a_collection_that_holds_records_looks_every_document_up():
    # `syncd snapshot` over an existing mirror: stale chunks and removed fields go.
    source = FakeSource({i: doc(i) for i in range(1, 7)})
    sink, store = LookingSink(), CrashingStore()
    snapshot(pipeline(source, sink, store, page=4))
    assert_mirrors(sink, source)

    source.current[2] = {"_id": 2, "body": SHORT}
    source.current[5] = doc(5, SHORT)
    p = pipeline(source, sink, store, page=4)
    p.progress.checkpoint = p.progress.start_snapshot(reason="syncd snapshot")
    snapshot(p)

    assert_mirrors(sink, source)
    assert sorted(sink.looked_up) == sorted(f"i:{i}" for i in range(1, 7))


def test_snapshot_into_a_collection_holding_records_it_has_not_reached_looks_them_up():
    # A first snapshot into a collection that already holds a record (a stale chunk):
    # it is not empty, so its documents are looked up and the stale chunk goes.
    source = FakeSource({i: doc(i) for i in range(1, 5)})
    sink, store = LookingSink(), CrashingStore()
    sink.records["i:3#5"] = {"document": "stale", "metadata": {ID_KEY: "i:3"}, "embedding": [0.0]}
    snapshot(pipeline(source, sink, store, page=2))
    assert_mirrors(sink, source)
    assert sorted(sink.looked_up) == sorted(f"i:{i}" for i in range(1, 5))
