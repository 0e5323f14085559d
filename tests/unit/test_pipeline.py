"""The core loop with test doubles at its edges: order of write and checkpoint,
coalescing, poison policies, embedding reuse."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from bson.timestamp import Timestamp

from syncd.applier import Planned
from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings
from syncd.embedder import HashingEmbedder
from syncd.errors import (
    ConsistencyError,
    HaltedError,
    SinkLostError,
    SinkRejectedError,
    TransientError,
)
from syncd.identity import ID_KEY
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.plan import PlanResult, coalesce
from syncd.sink import Upsert, WritePlan
from syncd.source import Batch, Position, id_key
from syncd.telemetry import Telemetry
from tests.doubles import Log, MemoryDeadLetters, MemorySink, MemoryStore
from tests.standin import tokens as standin_tokens

T0 = 1_700_000_000


def token(n: int) -> dict[str, str]:
    """A v2 event token for cluster time (T0, n), as MongoDB lays it out."""
    return {
        "_data": standin_tokens.encode(
            (T0, n), event_id={"operationType": "insert", "documentKey": {"_id": n}}
        )
    }


def event(n: int, op: str, _id: Any, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {
        "_id": token(n),
        "operationType": op,
        "clusterTime": Timestamp(T0, n),
        "ns": {"db": "app", "coll": "docs"},
        "documentKey": {"_id": _id},
    }
    if op != "delete":
        ev["fullDocument"] = {"_id": _id, **(doc or {})}
    return ev


class FakeSource:
    """A collection whose current documents the test sets, and a quiet change stream."""

    def __init__(self, current: dict[Any, dict[str, Any]] | None = None) -> None:
        self.current = current or {}

    def read_batch(self, max_events: int, max_wait_s: float) -> Batch:
        return Batch(events=[], token=self.current_token())

    def server_time(self) -> Timestamp:
        return Timestamp(T0, 0)

    def scan(
        self,
        collection: str,
        *,
        after_id: Any = None,
        has_after: bool = False,
        batch_size: int = 1000,
        query: Mapping[str, Any] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        docs = list(self.current.values())  # in insertion order, which stands for _id order
        if has_after:
            ids = [id_key(d["_id"]) for d in docs]
            docs = docs[ids.index(id_key(after_id)) + 1 :]
        for start in range(0, len(docs), batch_size):
            yield docs[start : start + batch_size]

    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]:
        return {id_key(i): self.current[i] for i in ids if i in self.current}

    def close(self) -> None:
        pass

    def open(self, position: Position, *, max_await_ms: int) -> None:
        pass

    def current_token(self) -> dict[str, str]:
        return token(99)


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__(8)
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts.extend(texts)
        return super().embed(texts)


def make(
    on_error: str = "halt",
    consistency: str = "eventual",
    source: Any = None,
    batch_size: int | None = None,
) -> Any:
    settings = PipelineSettings.model_validate(
        {
            "name": "p",
            "database": "app",
            "collection": "docs",
            "on_error": on_error,
            "consistency": consistency,
            "mapping": {"text": "body", "metadata": ["tag", "n"]},
            "embedder": {"kind": "hashing", "dimensions": 8},
            **({"batch_size": batch_size} if batch_size else {}),
        }
    )
    log = Log()
    sink, store, emb = MemorySink(log), MemoryStore(log), CountingEmbedder()
    dlq = MemoryDeadLetters(log)
    pipeline = Pipeline(
        settings,
        source=source or FakeSource(),
        sink=sink,
        store=store,
        mapper=Mapper(settings),
        embedder=emb,
        telemetry=Telemetry.disabled().pipeline("p"),
        dead_letters=dlq,
    )
    pipeline.checkpoint = Checkpoint(pipeline="p", fingerprint=pipeline.mapper.fingerprint)
    return pipeline, log, sink, store, dlq, emb


def test_write_happens_before_checkpoint_and_covers_the_batch() -> None:
    p, log, sink, _store, _, _ = make()
    p.process(
        Batch(
            [event(1, "insert", 1, {"body": "a"}), event(2, "insert", 2, {"body": "b"})], token(2)
        )
    )
    assert log.calls == ["write 2", f"checkpoint {Timestamp(T0, 2)}"]
    assert set(sink.records) == {"i:1", "i:2"}


def test_failed_write_never_checkpoints() -> None:
    p, _log, sink, store, _, _ = make()
    sink.fail_writes = 1
    with pytest.raises(TransientError):
        p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    assert store.saved == []


def test_coalesces_to_the_last_event_per_key() -> None:
    p, _, sink, _, _, emb = make()
    p.process(
        Batch(
            [
                event(1, "insert", 1, {"body": "first"}),
                event(2, "update", 1, {"body": "second", "tag": "x"}),
                event(3, "insert", 2, {"body": "other"}),
                event(4, "delete", 2),
            ],
            token(4),
        )
    )
    assert set(sink.records) == {"i:1"}
    assert sink.records["i:1"]["document"] == "second"
    assert emb.texts == ["second"], "coalesced events must not be embedded"


def test_metadata_only_update_does_not_embed_and_removes_fields() -> None:
    p, _, sink, _, _, emb = make()
    p.process(Batch([event(1, "insert", 1, {"body": "text", "tag": "a", "n": 1})], token(1)))
    p.process(Batch([event(2, "replace", 1, {"body": "text", "n": 2})], token(2)))
    assert emb.texts == ["text"]
    meta = sink.records["i:1"]["metadata"]
    assert meta["n"] == 2 and "tag" not in meta


def test_halt_stops_before_the_poison_and_writes_nothing_after_it() -> None:
    still_bad = FakeSource({2: {"_id": 2, "nobody": "still poison"}, 3: {"_id": 3, "body": "x"}})
    p, _log, sink, store, dlq, _ = make(on_error="halt", source=still_bad)
    batch = Batch(
        [
            event(1, "insert", 1, {"body": "good"}),
            event(2, "insert", 2, {"nobody": "poison"}),
            event(3, "insert", 3, {"body": "after"}),
        ],
        token(3),
    )
    with pytest.raises(HaltedError) as info:
        p.process(batch)
    assert info.value.document_id == 2
    assert set(sink.records) == {"i:1"}
    assert store.saved[-1].cluster_time == Timestamp(T0, 1)
    assert dlq.items == []


def test_dead_letter_is_written_before_the_checkpoint_moves_on() -> None:
    still_bad = FakeSource({2: {"_id": 2, "nobody": "still poison"}})
    p, log, sink, _store, dlq, _ = make(on_error="dead_letter", source=still_bad)
    p.process(
        Batch(
            [
                event(1, "insert", 1, {"body": "good"}),
                event(2, "insert", 2, {"nobody": "poison"}),
            ],
            token(2),
        )
    )
    assert [i.change.source_id for i in dlq.items] == [2]
    assert log.calls.index("dead-letter 1") < log.calls.index(f"checkpoint {Timestamp(T0, 2)}")
    assert set(sink.records) == {"i:1"}


def test_a_fixed_document_is_applied_instead_of_halting() -> None:
    source = FakeSource({2: {"_id": 2, "body": "fixed since"}})
    p, _, sink, store, _, _ = make(on_error="halt", source=source)
    p.process(Batch([event(1, "insert", 2, {"nobody": "poison"})], token(1)))
    assert sink.records["i:2"]["document"] == "fixed since"
    assert store.saved[-1].cluster_time == Timestamp(T0, 1)


def test_strong_consistency_never_checkpoints_a_disagreeing_read_back() -> None:
    p, _, sink, store, _, _ = make(consistency="strong")
    sink.lie_on_read = True
    with pytest.raises(ConsistencyError):
        p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    assert store.saved == []
    sink.lie_on_read = False
    p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    assert store.saved[-1].cluster_time == Timestamp(T0, 1)


def test_a_new_record_never_keeps_a_mapping_key_chroma_left_behind() -> None:
    p, _, sink, store, _, _ = make()  # eventual: nothing is read back
    sink.phantoms = {"tag": ["PHANTOM"]}
    p.process(Batch([event(1, "insert", 1, {"body": "a", "n": 1})], token(1)))
    assert "tag" not in sink.records["i:1"]["metadata"]
    assert sink.records["i:1"]["metadata"]["n"] == 1
    assert store.saved[-1].cluster_time == Timestamp(T0, 1)


def test_strong_read_back_deletes_keys_it_did_not_write_before_checkpointing() -> None:
    p, log, sink, store, _, _ = make(consistency="strong")
    sink.phantoms = {"elsewhere": ["PHANTOM"]}  # not a key of the mapping
    p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    assert "elsewhere" not in sink.records["i:1"]["metadata"]
    assert log.calls == ["write 1", "write 1", f"checkpoint {Timestamp(T0, 1)}"]
    assert store.saved[-1].cluster_time == Timestamp(T0, 1)


def test_strong_read_back_never_checkpoints_keys_that_will_not_go() -> None:
    p, _, sink, store, _, _ = make(consistency="strong")
    sink.phantoms, sink.stubborn = {"elsewhere": ["PHANTOM"]}, True
    with pytest.raises(ConsistencyError):
        p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    assert store.saved == []


def test_drop_purges_then_checkpoints() -> None:
    p, _log, sink, store, _, _ = make()
    p.process(Batch([event(1, "insert", 1, {"body": "a"})], token(1)))
    drop = {
        "_id": token(2),
        "operationType": "drop",
        "clusterTime": Timestamp(T0, 2),
        "ns": {"db": "app", "coll": "docs"},
    }
    p.process(Batch([drop], token(2)))
    assert sink.records == {}
    assert store.saved[-1].cluster_time == Timestamp(T0, 2)


def test_an_update_without_its_document_applies_the_current_state() -> None:
    # full_document = "whenAvailable" on a collection without post-images: the update
    # carries no document. The document still exists: its record must follow, not vanish.
    source = FakeSource({1: {"_id": 1, "body": "a", "tag": "new"}})
    p, _, sink, store, _, _ = make(source=source)
    p.process(Batch([event(1, "insert", 1, {"body": "a", "tag": "old"})], token(1)))
    bare = event(2, "update", 1)
    bare["fullDocument"] = None
    p.process(Batch([bare], token(2)))
    assert sink.records["i:1"]["metadata"]["tag"] == "new"
    assert store.saved[-1].cluster_time == Timestamp(T0, 2)

    del source.current[1]  # deleted before the next update was read: its records go
    gone = event(3, "update", 1)
    gone["fullDocument"] = None
    p.process(Batch([gone], token(3)))
    assert sink.records == {}


def test_a_poison_update_under_dead_letter_removes_the_record_until_a_fix_applies() -> None:
    source = FakeSource()
    p, _, sink, _, dlq, _ = make(on_error="dead_letter", source=source)
    p.process(Batch([event(1, "insert", 1, {"body": "good"})], token(1)))
    source.current[1] = {"_id": 1, "nobody": "text removed"}
    p.process(Batch([event(2, "update", 1, {"nobody": "text removed"})], token(2)))
    assert sink.records == {}, "an unmappable document keeps no searchable copy"
    assert [i.change.key for i in dlq.items] == ["i:1"]
    source.current[1] = {"_id": 1, "body": "fixed"}
    p.process(Batch([event(3, "update", 1, {"body": "fixed"})], token(3)))
    assert sink.records["i:1"]["document"] == "fixed"
    assert dlq.items == [], "the dead letter of an applied document is removed"


def test_a_poison_update_under_halt_leaves_the_record_alone() -> None:
    source = FakeSource({1: {"_id": 1, "nobody": "text removed"}})
    p, _, sink, _, _, _ = make(on_error="halt", source=source)
    sink.records["i:1"] = {"document": "old", "metadata": {ID_KEY: "i:1"}}
    with pytest.raises(HaltedError):
        p.process(Batch([event(1, "update", 1, {"nobody": "text removed"})], token(1)))
    assert set(sink.records) == {"i:1"}


def stored(p: Any, **fields: Any) -> Checkpoint:
    cp = Checkpoint(pipeline="p", fingerprint=p.mapper.fingerprint, **fields)
    p.store.saved.append(cp)
    p.checkpoint = None
    return cp


def test_the_checkpoint_must_describe_the_collection_there_is() -> None:
    p, _, sink, _, _, _ = make()
    stored(p, chroma_collection_id="coll-1", counts={"insert": 3})
    assert p._load().chroma_collection_id == "coll-1"

    for found, words in ((None, "there is no Chroma collection named"), ("other", "was replaced")):
        sink.id = found
        stored(p, chroma_collection_id="coll-1", counts={"insert": 3})
        with pytest.raises(SinkLostError) as info:
            p._load()
        assert words in info.value.message
        assert "`syncd snapshot p`" in (info.value.hint or "")
        assert p.checkpoint is None and sink.id == found, "nothing may be created or adopted"


def test_an_old_checkpoint_adopts_the_collection_it_finds() -> None:
    p, _, sink, _, _, _ = make()
    stored(p, counts={"insert": 3})
    assert p._load().chroma_collection_id == "coll-1"
    sink.id = None  # gone, and the checkpoint applied changes: lost
    stored(p, counts={"insert": 3})
    with pytest.raises(SinkLostError):
        p._load()
    stored(p)  # never applied anything (e.g. `tokens set` before a first run): create it
    assert p._load().chroma_collection_id == "coll-2"


def test_on_sink_lost_resnapshot_starts_a_snapshot_into_the_new_collection() -> None:
    p, _, sink, store, _, _ = make()
    p.settings = p.settings.model_copy(update={"on_sink_lost": "resnapshot"})
    sink.id = None
    stored(p, chroma_collection_id="coll-1", counts={"insert": 3})
    cp = p._load()
    assert cp.phase == "snapshot" and store.saved[-1] is cp and cp.counts == {"insert": 3}
    p._open_sink(cp)  # reaching Chroma: the new snapshot names the collection it fills
    assert cp.chroma_collection_id == "coll-2"


class RefusingSink(MemorySink):
    """Refuses the records in ``refused`` as ChromaSink does once it has split a write
    down to one record: what comes before is written, the refusal names the record."""

    def __init__(self, log: Log, refused: set[str]) -> None:
        super().__init__(log)
        self.refused = refused

    def write(self, plan: WritePlan) -> None:
        for index, upsert in enumerate(plan.upserts):
            if upsert.id in self.refused:
                super().write(WritePlan(upserts=plan.upserts[:index]))
                exc = SinkRejectedError("Chroma rejected the write: HTTP 413 (Payload too large)")
                exc.record_id = upsert.id
                raise exc
        super().write(plan)


def refusing(on_error: str, refused: set[str]) -> tuple[Any, ...]:
    p, log, _sink, store, dlq, emb = make(on_error=on_error)
    sink = RefusingSink(log, refused)
    sink.records["i:2"] = {"document": "old", "metadata": {ID_KEY: "i:2"}, "embedding": [0.0]}
    p.applier.sink = p.progress.sink = sink
    return p, log, sink, store, dlq, emb


def three_inserts() -> Batch:
    return Batch([event(n, "insert", n, {"body": f"text {n}"}) for n in (1, 2, 3)], token(3))


def test_a_record_chroma_refuses_alone_is_dead_lettered_and_the_rest_written() -> None:
    # Chroma (or a proxy in front of it) refuses one document's record even alone: that
    # document is poison, parked with its records removed; the others are written.
    p, log, sink, store, dlq, _ = refusing("dead_letter", {"i:2"})
    p.process(three_inserts())
    assert set(sink.records) == {"i:1", "i:3"}, "i:2's old record is removed"
    assert [(i.change.source_id, type(i.error).__name__) for i in dlq.items] == [
        (2, "SinkRejectedError")
    ]
    assert dlq.items[0].error.document_id == 2
    assert log.calls.index("dead-letter 1") < log.calls.index(f"checkpoint {Timestamp(T0, 3)}")
    assert store.saved[-1].cluster_time == Timestamp(T0, 3)


def test_a_record_chroma_refuses_alone_halts_at_its_document() -> None:
    # Under on_error = "halt" the halt names the document (so a fix of it, or
    # dead_letter and a restart, can lift it); the rest is written, the old record kept.
    p, _log, sink, store, dlq, _ = refusing("halt", {"i:2"})
    with pytest.raises(SinkRejectedError) as raised:
        p.process(three_inserts())
    assert raised.value.document_id == 2 and raised.value.namespace == "app.docs"
    assert sink.records["i:2"]["document"] == "old"
    assert {"i:1", "i:3"} <= set(sink.records)
    assert store.saved == [] and dlq.items == []


def test_a_refusal_of_no_single_record_is_raised_as_it_was() -> None:
    p, _log, sink, store, _, _ = refusing("dead_letter", set())

    def refuse_all(plan: WritePlan) -> None:
        raise SinkRejectedError("Chroma rejected the write: HTTP 400")

    sink.write = refuse_all
    with pytest.raises(SinkRejectedError) as raised:
        p.process(three_inserts())
    assert raised.value.document_id is None
    assert store.saved == []


@pytest.mark.parametrize("on_error", ["halt", "dead_letter"])
def test_repair_and_dlq_retry_get_a_refused_record_back_as_poison(on_error: str) -> None:
    # write_changes (repair, dlq retry) reports what cannot be applied instead of
    # raising: the refused document is counted as poison, the others are applied; its
    # old record is removed only under dead_letter, as the pipeline itself does.
    p, _log, sink, _store, _, _ = refusing(on_error, {"i:2"})
    result = p.write_changes(coalesce(three_inserts().events, prefixed=False))
    assert [x.change.key for x in result.poisoned] == ["i:2"]
    assert result.poisoned[0].error.document_id == 2
    assert {"i:1", "i:3"} <= set(sink.records)
    assert ("i:2" in sink.records) is (on_error == "halt")
    assert "i:2" not in result.keys_written


def test_a_chunk_refused_after_another_was_taken_removes_the_document_under_halt() -> None:
    # Chroma took chunk #0 of the new text and refused #1: the document is half new,
    # half old. Even under halt (which keeps a poison document's old records) its
    # records go: a mix of two versions must not be searchable while the halt holds.
    p, _log, sink, _store, _, _ = refusing("halt", {"i:2#1"})
    for rid, text in (("i:2#0", "old 0"), ("i:2#1", "old 1"), ("i:2#2", "old 2")):
        sink.records[rid] = {"document": text, "metadata": {ID_KEY: "i:2"}, "embedding": [0.0]}
    del sink.records["i:2"]
    change = coalesce([event(1, "update", 2, {"body": "new"})], prefixed=False)[0]
    upserts = [Upsert(f"i:2#{k}", f"new {k}", {ID_KEY: "i:2"}, [1.0]) for k in range(3)]
    planned = Planned([change], PlanResult(WritePlan(upserts=upserts), [], 0, ["i:2"]))
    with pytest.raises(SinkRejectedError) as raised:
        p.applier.write(planned)
    assert raised.value.document_id == 2
    assert not [rid for rid in sink.records if rid.startswith("i:2")], sink.records
