"""Verify, repair, dead-letter retry and strong read-back against in-memory doubles.

The doubles behave like the real parts where it matters here: the sink merges
metadata on upsert and update (``None`` deletes a key), as Chroma does, and the
source scans in ``_id`` order. The same behaviours run against real servers in
``tests/e2e/test_verify_repair.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from bson.timestamp import Timestamp

from syncd import compare, consistency
from syncd import repair as repair_mod
from syncd.checkpoint import Checkpoint
from syncd.config import PipelineSettings
from syncd.embedder import build_embedder
from syncd.errors import ConfigError, ConsistencyError, MappingError
from syncd.identity import ID_KEY
from syncd.mapping import Mapper
from syncd.pipeline import Pipeline
from syncd.sink import WritePlan
from syncd.source import Batch, id_key
from syncd.telemetry import Telemetry
from syncd.tokens import encode_high_water_mark
from syncd.waiting import covers, parse_after, target_time
from tests.doubles import MemoryDeadLetters, MemorySink, MemoryStore

# --- doubles -------------------------------------------------------------------------


class MemorySource:
    def __init__(self, collections: dict[str, list[dict[str, Any]]]) -> None:
        self.collections = collections

    def scan(
        self,
        collection: str,
        *,
        after_id: Any = None,
        has_after: bool = False,
        batch_size: int = 1000,
        query: Mapping[str, Any] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        docs = sorted(self.collections.get(collection, []), key=lambda d: d["_id"])
        for start in range(0, len(docs), batch_size):
            yield docs[start : start + batch_size]

    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]:
        wanted = {id_key(i) for i in ids}
        return {
            id_key(d["_id"]): d
            for d in self.collections.get(collection, [])
            if id_key(d["_id"]) in wanted
        }

    def close(self) -> None:
        pass


# --- fixtures ------------------------------------------------------------------------


def settings(**extra: Any) -> PipelineSettings:
    data: dict[str, Any] = {
        "name": "p",
        "database": "db",
        "collection": "docs",
        "filter": {"kind": {"$ne": "skip"}},
        "mapping": {"text": "body", "metadata": ["title"]},
        "embedder": {"kind": "hashing", "dimensions": 8},
        "snapshot_batch_size": 3,  # several pages even for a handful of documents
    }
    data.update(extra)
    return PipelineSettings.model_validate(data)


def make_pipeline(ps: PipelineSettings, source: Any, sink: Any, store: Any = None) -> Pipeline:
    return Pipeline(
        ps,
        source=source,
        sink=sink,
        store=store or MemoryStore(),
        mapper=Mapper(ps),
        embedder=build_embedder(ps.embedder),
        telemetry=Telemetry.disabled().pipeline(ps.name),
    )


def synced(ps: PipelineSettings, docs: dict[str, list[dict[str, Any]]]) -> tuple[Any, Any, Any]:
    """A source, a sink holding exactly what the pipeline makes of it, and a checker."""
    source, sink = MemorySource(docs), MemorySink()
    pipeline = make_pipeline(ps, source, sink)
    checker = consistency.Checker(ps, source=source, sink=sink, mapper=Mapper(ps), page_size=3)
    repair_mod.repair(pipeline, checker)
    assert checker.verify().consistent
    return source, sink, checker


def docs_of(n: int) -> list[dict[str, Any]]:
    return [{"_id": i, "body": f"text number {i}", "title": f"t{i}"} for i in range(n)]


# --- verify --------------------------------------------------------------------------


def test_verify_names_each_kind_of_drift() -> None:
    ps = settings()
    docs = docs_of(10)
    source, sink, checker = synced(ps, {"docs": docs})
    del sink.records["i:1"]  # missing
    sink.records["i:2"]["document"] = "tampered"  # stale text, hashes intact
    sink.records["i:3"]["metadata"]["title"] = "tampered"  # stale metadata, hashes intact
    sink.records["i:4"]["metadata"]["extra"] = 1  # a key the document does not have
    sink.records["i:5"]["metadata"]["syncd_hash"] = "0" * 64  # hash differs
    docs[6]["title"] = "changed while syncd was not looking"  # stale by MongoDB's side
    source.collections["docs"] = [d for d in docs if d["_id"] != 7]  # deleted: orphan
    docs[8]["kind"] = "skip"  # stopped matching the filter: orphan
    sink.records["garbage"] = {"document": "x", "metadata": {}, "embedding": []}
    sink.records["s:nobody"] = {"document": "x", "metadata": {ID_KEY: "s:nobody"}}
    sink.records["i:0#1"] = {"document": "x", "metadata": {ID_KEY: "i:0"}}  # a chunk too many

    report = checker.verify()

    assert not report.consistent
    assert sorted(report.missing.sample) == ["i:1"]
    assert sorted(report.stale.sample) == ["i:2", "i:3", "i:4", "i:5", "i:6"]
    assert sorted(report.orphaned.sample) == ["garbage", "i:0#1", "i:7", "i:8", "s:nobody"]
    assert (report.missing.count, report.stale.count, report.orphaned.count) == (1, 5, 5)
    assert report.documents == 8
    assert report.records == 12


def test_chunks_that_should_not_exist_are_orphans() -> None:
    ps = settings(mapping={"text": "body", "chunk_size": 20, "chunk_overlap": 0})
    long_doc = {"_id": 1, "body": "word " * 30}
    _, sink, checker = synced(ps, {"docs": [long_doc]})
    chunks = sorted(sink.records)
    assert len(chunks) > 2
    long_doc["body"] = "short now"  # one chunk left; the pipeline has not seen it
    report = checker.verify()
    assert report.orphaned.sample == chunks[1:]
    assert report.stale.sample == ["i:1#0"]


def test_unmappable_documents_are_reported_apart_and_their_records_are_orphans() -> None:
    ps = settings()
    docs = docs_of(3)
    _, sink, checker = synced(ps, {"docs": docs})
    docs[1]["body"] = {"not": "text"}
    report = checker.verify()
    assert report.unmappable.sample == ["i:1"]
    assert report.orphaned.sample == ["i:1"], "an unmappable document must have no record"
    assert not report.consistent
    source = checker.source
    sampler = consistency.Checker(
        ps, source=source, sink=sink, mapper=Mapper(ps), database=FakeDatabase(source)
    )
    assert sampler.sample(3).orphaned.sample == ["i:1"]
    del sink.records["i:1"]
    report = checker.verify()
    assert report.consistent and report.unmappable.sample == ["i:1"]


def test_dead_lettered_documents_without_records_are_not_missing_nor_repaired() -> None:
    # An embedding API refused the text of i:1: its change is parked and its records
    # removed on purpose. Verify counts it apart; i:2, missing with no dead letter, is drift.
    ps = settings()
    source, sink, checker = synced(ps, {"docs": docs_of(4)})
    del sink.records["i:1"], sink.records["i:2"]
    asked: list[list[str]] = []

    def parked(keys: Any) -> set[str]:
        asked.append(list(keys))
        return {"i:1"} & set(keys)

    checker.parked = parked
    report = checker.verify()
    assert report.dead_lettered.sample == ["i:1"] and report.dead_lettered.count == 1
    assert report.missing.sample == ["i:2"] and not report.consistent
    assert asked == [["i:1", "i:2"]], "asked once, for the missing keys only"
    result = repair_mod.repair(make_pipeline(ps, source, sink), checker)
    assert result.reapplied.sample == ["i:2"]
    assert "i:1" not in sink.records and "i:2" in sink.records
    report = checker.verify()
    assert report.consistent and report.dead_lettered.count == 1


def test_multi_collection_pipelines_verify_prefixed_ids() -> None:
    ps = settings(collection=None, collections=["a", "b"])
    source, sink, checker = synced(ps, {"a": docs_of(2), "b": docs_of(2)})
    assert sorted(sink.records) == ["a/i:0", "a/i:1", "b/i:0", "b/i:1"]
    del sink.records["b/i:1"]
    source.collections["a"].pop(0)
    sink.records["c/i:0"] = {"document": "x", "metadata": {}}  # not one of our collections
    report = checker.verify()
    assert report.missing.sample == ["b/i:1"]
    assert sorted(report.orphaned.sample) == ["a/i:0", "c/i:0"]


# --- repair --------------------------------------------------------------------------


def test_repair_fixes_exactly_what_verify_found() -> None:
    ps = settings()
    docs = docs_of(12)
    source, sink, checker = synced(ps, {"docs": docs})
    untouched = {rid: dict(sink.records[rid]["metadata"]) for rid in ("i:0", "i:11")}
    del sink.records["i:1"]
    sink.records["i:3"]["metadata"]["title"] = "tampered"
    sink.records["i:4"]["metadata"]["extra"] = 1
    sink.records["i:5"]["document"] = "tampered"
    source.collections["docs"] = [d for d in docs if d["_id"] != 7]
    sink.records["garbage"] = {"document": "x", "metadata": {}}
    pipeline = make_pipeline(ps, source, sink)

    dry = repair_mod.repair(pipeline, checker, dry_run=True)
    assert sorted(dry.reapplied.sample) == ["i:1", "i:3", "i:4", "i:5"]
    assert sorted(dry.deleted.sample) == ["garbage", "i:7"]
    assert "i:1" not in sink.records and "garbage" in sink.records  # nothing changed

    done = repair_mod.repair(pipeline, checker)
    assert done.reapplied.count == 4 and done.deleted.count == 2 and done.failed.count == 0
    assert checker.verify().consistent
    assert "extra" not in sink.records["i:4"]["metadata"]
    assert sink.records["i:5"]["document"] == "text number 5"
    for rid, metadata in untouched.items():
        assert sink.records[rid]["metadata"] == metadata


def test_repair_deletes_orphans_in_batches_without_skipping_any(monkeypatch) -> None:
    monkeypatch.setattr(consistency, "ORPHAN_BATCH", 4)
    ps = settings()
    source, sink, checker = synced(ps, {"docs": docs_of(3)})
    for n in range(11):
        sink.records[f"s:orphan{n:02}"] = {"document": "x", "metadata": {}}
    result = repair_mod.repair(make_pipeline(ps, source, sink), checker)
    assert result.deleted.count == 11
    assert sorted(sink.records) == ["i:0", "i:1", "i:2"]


# --- dead letters ----------------------------------------------------------------------


def test_retry_removes_what_applies_now_and_keeps_what_still_fails() -> None:
    ps = settings(on_error="dead_letter")
    docs: list[dict[str, Any]] = [{"_id": 1, "body": 5.5j}, {"_id": 2, "body": None}, {"_id": 3}]
    source, sink = MemorySource({"docs": docs}), MemorySink()
    pipeline = make_pipeline(ps, source, sink)
    letters = MemoryDeadLetters()
    with pytest.raises(MappingError):
        Mapper(ps).map(docs[0])
    letters.put_many("p", pipeline.write_changes(_changes(docs)).poisoned)
    assert sorted(letters.entries) == ["i:1", "i:2", "i:3"]

    docs[0]["body"] = "fixed"
    source.collections["docs"] = [docs[0], docs[1]]  # 3 was deleted meanwhile
    result = repair_mod.retry_dead_letters(pipeline, letters)

    assert result.retried == 3
    assert sorted(result.fixed.sample) == ["i:1", "i:3"]
    assert result.failing.sample == ["i:2"]
    assert list(letters.entries) == ["i:2"]
    assert letters.entries["i:2"]["attempts"] == 2
    assert sink.records["i:1"]["document"] == "fixed"


def _changes(docs: list[dict[str, Any]]) -> list[Any]:
    from syncd.plan import Change

    return [
        Change(f"i:{d['_id']}", "docs", d["_id"], d, "insert", Timestamp(1, 1), None) for d in docs
    ]


# --- strong consistency ------------------------------------------------------------------


class UndeadSink(MemorySink):
    """Acknowledges deletes but keeps the records."""

    def write(self, plan: WritePlan) -> None:
        super().write(WritePlan(upserts=plan.upserts, updates=plan.updates))


def _batch(*events: dict[str, Any]) -> Batch:
    return Batch(list(events), {"_data": encode_high_water_mark(Timestamp(200, 1))})


def _event(op: str, _id: int, ts: int, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "_id": {"_data": encode_high_water_mark(Timestamp(ts, 1))},
        "operationType": op,
        "ns": {"db": "db", "coll": "docs"},
        "documentKey": {"_id": _id},
        "clusterTime": Timestamp(ts, 1),
    }
    if doc is not None:
        event["fullDocument"] = doc
    return event


@pytest.mark.parametrize("consistency_level", ["strong", "eventual"])
def test_strong_never_checkpoints_a_batch_whose_read_back_disagrees(consistency_level) -> None:
    ps = settings(consistency=consistency_level)
    store = MemoryStore()
    lying = MemorySink()
    lying.lie_on_read = True  # acknowledges writes, then reads back something else
    pipeline = make_pipeline(ps, MemorySource({}), lying, store)
    pipeline.checkpoint = Checkpoint(pipeline="p", fingerprint=pipeline.mapper.fingerprint)
    batch = _batch(_event("insert", 1, 100, {"_id": 1, "body": "hello"}))
    if consistency_level == "eventual":  # the control: the same batch checkpoints
        pipeline.process(batch)
        assert len(store.saved) == 1
        return
    with pytest.raises(ConsistencyError, match="not checkpointing"):
        pipeline.process(batch)
    assert store.saved == []


def test_strong_read_back_catches_a_delete_that_did_not_happen() -> None:
    ps = settings(consistency="strong")
    sink = UndeadSink()
    store = MemoryStore()
    pipeline = make_pipeline(ps, MemorySource({}), sink, store)
    pipeline.checkpoint = Checkpoint(pipeline="p", fingerprint=pipeline.mapper.fingerprint)
    pipeline.process(_batch(_event("insert", 1, 100, {"_id": 1, "body": "hello"})))
    assert len(store.saved) == 1
    with pytest.raises(ConsistencyError):
        pipeline.process(_batch(_event("delete", 1, 101)))
    assert len(store.saved) == 1


# --- sampled verify in the daemon -----------------------------------------------------------


class FakeDatabase:
    """``db[collection].aggregate([$sample])`` over the memory source."""

    def __init__(self, source: MemorySource) -> None:
        self.source = source

    def __getitem__(self, name: str) -> _SampledCollection:
        return _SampledCollection(self.source.collections[name])


class _SampledCollection:
    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def aggregate(self, stages: Sequence[Mapping[str, Any]], /) -> list[dict[str, Any]]:
        return self.docs[: stages[0]["$sample"]["size"]]


def test_sampled_verify_reports_only_drift_that_outlives_the_pipeline() -> None:
    ps = settings()
    docs = docs_of(5)
    source, sink, _ = synced(ps, {"docs": docs})
    source.server_time = lambda: Timestamp(100, 0)
    pipeline = make_pipeline(ps, source, sink)
    pipeline.checkpoint = Checkpoint(
        pipeline="p", fingerprint="f", phase="streaming", cluster_time=Timestamp(99, 0)
    )
    checker = consistency.Checker(
        ps, source=source, sink=sink, mapper=Mapper(ps), database=FakeDatabase(source)
    )
    docs[0]["title"] = "in flight"  # the pipeline applies it while we wait
    del sink.records["i:1"]  # real drift

    def pipeline_catches_up() -> None:
        repair_mod._reapply(
            pipeline,
            consistency.Drift(documents={"i:0": ("docs", docs[0])}),
            repair_mod.RepairReport(consistency.Report("p"), False),
        )
        pipeline.checkpoint.cluster_time = Timestamp(100, 5)  # type: ignore[union-attr]

    timer = threading.Timer(0.3, pipeline_catches_up)
    timer.start()
    report = consistency.sample_once(pipeline, checker, size=5, settle_s=5, stop=threading.Event())
    timer.join()
    assert report is not None
    assert report.stale.count == 0
    assert report.missing.sample == ["i:1"]


def test_sampled_verify_reports_nothing_while_the_pipeline_is_behind() -> None:
    ps = settings()
    source, sink, _ = synced(ps, {"docs": docs_of(3)})
    source.server_time = lambda: Timestamp(100, 0)
    pipeline = make_pipeline(ps, source, sink)
    pipeline.checkpoint = Checkpoint(
        pipeline="p", fingerprint="f", phase="streaming", cluster_time=Timestamp(50, 0)
    )
    del sink.records["i:0"]
    checker = consistency.Checker(
        ps, source=source, sink=sink, mapper=Mapper(ps), database=FakeDatabase(source)
    )
    assert (
        consistency.sample_once(pipeline, checker, size=3, settle_s=0.3, stop=threading.Event())
        is None
    )


# --- read-your-writes targets ------------------------------------------------------------


def test_parse_after_accepts_cluster_times_iso_and_tokens() -> None:
    assert parse_after("1718000000.3") == Timestamp(1718000000, 3)
    assert parse_after("2024-06-10T06:13:20Z") == Timestamp(1718000000, 0xFFFFFFFF)
    token = encode_high_water_mark(Timestamp(1718000000, 7))
    assert parse_after(token) == Timestamp(1718000000, 7)
    assert target_time({"_data": token}) == Timestamp(1718000000, 7)
    with pytest.raises(ConfigError):
        parse_after("yesterday")


def test_a_checkpoint_covers_a_time_at_or_after_it_but_not_inside_a_transaction() -> None:
    def cp(ts: Timestamp, token: Any = None, phase: str = "streaming") -> Checkpoint:
        return Checkpoint(pipeline="p", fingerprint="f", phase=phase, cluster_time=ts, token=token)  # type: ignore[arg-type]

    target = Timestamp(100, 2)
    assert covers(cp(Timestamp(100, 3)), target)
    assert covers(cp(Timestamp(100, 2), {"_data": encode_high_water_mark(target)}), target)
    assert not covers(cp(Timestamp(100, 1)), target)
    assert not covers(cp(Timestamp(101, 0), phase="snapshot"), target)


def test_floats_match_as_chroma_stores_them() -> None:
    # Values Chroma 1.5 returned changed by 1 to 3 units in the last place.
    assert compare.same_value(-943305.0469559873, -943305.0469559872)
    assert compare.same_value(9.443133249767594e-76, 9.443133249767591e-76)
    assert compare.same_value([0.1, 443080.06468156516], [0.1, 443080.0646815651])
    assert not compare.same_value(0.5, 0.75)
    assert not compare.same_value(1.0, 1.0000000001)
    assert not compare.same_value([1.0], [1.0, 2.0])
    assert compare.same_value("x", "x") and not compare.same_value(1, 2)
    assert compare.same_metadata({"a": 0.1, "syncd_cluster_time": 1}, {"a": 0.1})
    assert not compare.same_metadata({"a": 0.1}, {"a": 0.1, "b": 1})
