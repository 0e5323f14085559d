"""Writes Chroma did not answer: their records are looked at again once due, and what a
late-applied request put back (an older version, a deleted document) is re-applied from
MongoDB. The late request is landed by hand here; the same with a real Chroma behind a
delaying proxy runs in ``tests/e2e/test_late_writes.py``."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from syncd import plan as planning
from syncd.errors import SinkUnavailableError, TransientError
from syncd.identity import ID_KEY
from syncd.sink import ChromaSink, Upsert, WritePlan
from syncd.unanswered import SETTLE_MAX_S, Unanswered, settle_delay
from tests.doubles import MemorySink
from tests.unit.test_consistency import _event, docs_of, settings, synced
from tests.unit.test_consistency import make_pipeline as plain_pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording(MemorySink):
    """Chroma that keeps every plan written, to land one again later."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[WritePlan] = []

    def write(self, plan: WritePlan) -> None:
        self.written.append(plan)
        super().write(plan)


def live(n: int = 5) -> tuple[Any, Recording, Any, Any, Clock]:
    """A synced source and Chroma, a pipeline on them with a register of unanswered
    writes (settle delay 10 s, on ``clock``), and a checker."""
    ps = settings()
    source, synced_sink, checker = synced(ps, {"docs": docs_of(n)})
    sink = Recording()
    sink.records = synced_sink.records
    checker.sink = sink
    clock = Clock()
    pipeline = plain_pipeline(ps, source, sink)
    pipeline.unanswered = Unanswered(10.0, clock=clock)
    return source, sink, checker, pipeline, clock


def apply(pipeline: Any, op: str, _id: int, doc: dict[str, Any] | None = None) -> WritePlan:
    """The pipeline applies one change event, as its loop does; returns what it wrote."""
    written = len(pipeline.sink.written)
    pipeline.write_changes(planning.coalesce([_event(op, _id, 300, doc)], prefixed=False))
    (plan,) = pipeline.sink.written[written:]
    return plan


def land_late(sink: Recording, plan: WritePlan) -> None:
    """The request that timed out, applied by Chroma after the writes that followed it."""
    MemorySink.write(sink, plan)


def test_the_register_gives_ids_once_they_waited_the_settle_delay() -> None:
    clock = Clock()
    unanswered = Unanswered(10.0, clock=clock)
    unanswered.note(["a", "b"])
    clock.now += 4
    unanswered.note(["c", "a"])  # a timed out again: its wait starts again
    clock.now += 6
    assert unanswered.due()
    assert unanswered.take_due() == {"b": 1000.0}
    assert not unanswered.due()
    clock.now += 4
    taken = unanswered.take_due(limit=1)
    assert list(taken) == ["c"] and len(unanswered) == 1
    unanswered.put_back(taken)  # its recheck failed: due again at once
    assert unanswered.due() and sorted(unanswered.take_due()) == ["a", "c"]
    assert len(unanswered) == 0 and not unanswered.due()


def test_the_settle_delay_is_a_few_timeouts_and_bounded() -> None:
    assert settle_delay(5) == 15
    assert settle_delay(10_000) == SETTLE_MAX_S


def test_an_older_version_applied_late_is_replaced_by_the_current_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, sink, checker, pipeline, clock = live()
    v1 = {"_id": 3, "body": "VERSION ONE", "title": "v1"}
    v2 = {"_id": 3, "body": "VERSION TWO", "title": "v2"}
    source.collections["docs"][3] = v1
    late = apply(pipeline, "replace", 3, v1)  # timed out, then written by a retry
    pipeline.unanswered.note(u.id for u in late.upserts)
    source.collections["docs"][3] = v2
    apply(pipeline, "replace", 3, v2)
    land_late(sink, late)
    assert sink.records["i:3"]["document"] == "VERSION ONE"

    clock.now += 9
    pipeline.recheck_unanswered()  # not due yet: it could still land
    assert sink.records["i:3"]["document"] == "VERSION ONE"

    clock.now += 1
    with caplog.at_level(logging.WARNING):
        pipeline.recheck_unanswered()
    assert sink.records["i:3"]["document"] == "VERSION TWO"
    assert checker.verify().consistent
    assert "may have been applied late; re-applied 1 document(s)" in caplog.text
    assert len(pipeline.unanswered) == 0


def test_a_deleted_document_brought_back_late_is_deleted_again() -> None:
    source, sink, checker, pipeline, clock = live()
    late = apply(pipeline, "replace", 2, {"_id": 2, "body": "edited", "title": "t2"})
    pipeline.unanswered.note(u.id for u in late.upserts)
    source.collections["docs"] = [d for d in source.collections["docs"] if d["_id"] != 2]
    apply(pipeline, "delete", 2)
    land_late(sink, late)
    assert "i:2" in sink.records

    clock.now += 10
    pipeline.recheck_unanswered()
    assert "i:2" not in sink.records
    assert checker.verify().consistent


def test_a_delete_applied_late_after_the_document_came_back_is_written_again() -> None:
    source, sink, checker, pipeline, clock = live()
    docs = source.collections["docs"]
    source.collections["docs"] = [d for d in docs if d["_id"] != 1]
    late = apply(pipeline, "delete", 1)
    pipeline.unanswered.note(late.deletes)
    back = {"_id": 1, "body": "back again", "title": "t1"}
    source.collections["docs"] = [*source.collections["docs"], back]
    apply(pipeline, "insert", 1, back)
    land_late(sink, late)
    assert "i:1" not in sink.records

    clock.now += 10
    pipeline.recheck_unanswered()
    assert sink.records["i:1"]["document"] == "back again"
    assert checker.verify().consistent


def test_records_that_match_mongodb_are_not_written_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _source, sink, checker, pipeline, clock = live()
    pipeline.unanswered.note(["i:0", "i:4", "i:99"])  # 99: never existed anywhere
    clock.now += 10
    with caplog.at_level(logging.WARNING):
        pipeline.recheck_unanswered()
    assert sink.written == [] and "re-applied" not in caplog.text
    assert len(pipeline.unanswered) == 0 and checker.verify().consistent


def test_a_recheck_that_fails_keeps_its_ids_for_the_next_one() -> None:
    source, sink, _checker, pipeline, clock = live()
    source.collections["docs"][0] = {"_id": 0, "body": "changed", "title": "t0"}
    pipeline.unanswered.note(["i:0"])
    clock.now += 10
    sink.fail_writes = 1
    with pytest.raises(TransientError):
        pipeline.recheck_unanswered()
    assert pipeline.unanswered.due()
    pipeline.recheck_unanswered()
    assert sink.records["i:0"]["document"] == "changed"


# --- the sink notes what went unanswered ------------------------------------------------


class _Slow:
    """A collection proxy whose upserts and deletes time out while ``slow`` is set."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.slow = True

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name in ("upsert", "delete") and self.slow:

            def timed_out(**_kwargs: Any) -> Any:
                raise httpx.ReadTimeout("timed out", request=httpx.Request("POST", "http://x"))

            return timed_out
        return value


class _Client:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.collection: _Slow | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_or_create_collection(self, *args: Any, **kwargs: Any) -> _Slow:
        self.collection = _Slow(self._inner.get_or_create_collection(*args, **kwargs))
        return self.collection


def test_the_sink_notes_the_records_of_every_write_that_timed_out(
    chroma_persistent_client: Any,
) -> None:
    client = _Client(chroma_persistent_client)
    noted: list[str] = []
    sink = ChromaSink(lambda: client, "coll", dimensions=4, pipeline="p", unanswered=noted.extend)
    sink.collection_id(create=True)
    upserts = [Upsert(k, "a text", {ID_KEY: k}, [0.1, 0.2, 0.3, 0.4]) for k in ("1", "2")]
    with pytest.raises(SinkUnavailableError):
        sink.write(WritePlan(upserts=upserts))
    with pytest.raises(SinkUnavailableError):
        sink.write(WritePlan(deletes=["3"]))
    assert noted == ["1", "2", "3"]
    assert client.collection is not None
    client.collection.slow = False
    sink.write(WritePlan(upserts=upserts, deletes=["3"]))  # answered: nothing noted
    assert noted == ["1", "2", "3"]
