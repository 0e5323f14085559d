"""Repair and dead-letter retries on a live pipeline: the daemon applies a change between
the read of a document and the write based on it, deterministically, by landing the
daemon's write just before the other's. Neither may leave the older state behind.

The same race, with real servers and timing, runs in ``tests/e2e/test_verify_repair.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from syncd import plan as planning
from syncd import repair as repair_mod
from syncd.sink import WritePlan
from tests.doubles import MemoryDeadLetters, MemorySink
from tests.unit.test_consistency import (
    _changes,
    _event,
    docs_of,
    make_pipeline,
    settings,
    synced,
)

Race = Callable[[WritePlan], bool]


class RacingSink(MemorySink):
    """Chroma where the running pipeline's write lands just before one of repair's.

    Each race sees every plan repair writes; when it returns True it has done its
    part (changed MongoDB, applied the change as the daemon would) and is dropped.
    """

    def __init__(self, records: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.records = records
        self.races: list[Race] = []
        self.written: list[WritePlan] = []

    def write(self, plan: WritePlan) -> None:
        self.written.append(plan)
        for race in list(self.races):
            if race(plan):
                self.races.remove(race)
        super().write(plan)


def live(docs: list[dict[str, Any]]) -> tuple[Any, RacingSink, Any, Any]:
    """A synced source and Chroma, a daemon on them, and the repair pipeline's sink."""
    ps = settings()
    source, synced_sink, checker = synced(ps, {"docs": docs})
    daemon_sink = MemorySink()
    daemon_sink.records = synced_sink.records  # the same Chroma, written directly
    daemon = make_pipeline(ps, source, daemon_sink)
    racing = RacingSink(synced_sink.records)
    checker.sink = racing
    return source, racing, checker, daemon


def apply(daemon: Any, op: str, _id: int, doc: dict[str, Any] | None = None) -> None:
    """The daemon applies one change event, as its loop does."""
    daemon.write_changes(planning.coalesce([_event(op, _id, 300, doc)], prefixed=False))


def touches(plan: WritePlan, rid: str) -> bool:
    return rid in plan.deletes or any(u.id == rid for u in plan.upserts + plan.updates)


def repair(source: Any, sink: RacingSink, checker: Any) -> repair_mod.RepairReport:
    return repair_mod.repair(make_pipeline(checker.settings, source, sink), checker)


def test_a_delete_applied_while_repair_writes_the_document_stays_deleted() -> None:
    docs = docs_of(6)
    source, sink, checker, daemon = live(docs)
    sink.records["i:3"]["document"] = "tampered"  # stale: repair re-applies document 3

    def deleted_meanwhile(plan: WritePlan) -> bool:
        if not touches(plan, "i:3"):
            return False
        source.collections["docs"] = [d for d in docs if d["_id"] != 3]
        apply(daemon, "delete", 3)
        return True

    sink.races.append(deleted_meanwhile)
    result = repair(source, sink, checker)

    assert not sink.races, "the race did not run"
    assert "i:3" not in sink.records, "repair brought a deleted document back"
    assert checker.verify().consistent
    assert result.changed.sample == ["i:3"] and result.unsettled.count == 0


def test_an_update_applied_while_repair_writes_the_document_is_kept() -> None:
    docs = docs_of(6)
    source, sink, checker, daemon = live(docs)
    del sink.records["i:2"]  # missing: repair re-applies document 2
    sink.records["i:4"]["metadata"]["title"] = "tampered"  # stale
    flips: list[tuple[int, dict[str, Any]]] = [
        (2, {"title": "newer title"}),  # a $set
        (4, {"kind": "skip"}),  # leaves the filter: its record must go
    ]

    def changed_meanwhile(_id: int, change: dict[str, Any]) -> Race:
        def race(plan: WritePlan) -> bool:
            if not touches(plan, f"i:{_id}"):
                return False
            docs[_id] = {**docs[_id], **change}
            source.collections["docs"] = list(docs)
            apply(daemon, "update", _id, docs[_id])
            return True

        return race

    sink.races.extend(changed_meanwhile(_id, change) for _id, change in flips)
    result = repair(source, sink, checker)

    assert not sink.races, "a race did not run"
    assert sink.records["i:2"]["metadata"]["title"] == "newer title", "repair wrote an old state"
    assert "i:4" not in sink.records, "repair put back a document that left the filter"
    assert checker.verify().consistent
    assert sorted(result.changed.sample) == ["i:2", "i:4"]


def test_a_document_created_again_before_its_orphan_is_deleted_keeps_its_record() -> None:
    docs = docs_of(6)
    source, sink, checker, daemon = live(docs)
    gone = docs.pop(5)
    source.collections["docs"] = list(docs)  # deleted while no daemon ran: i:5 is an orphan

    def created_meanwhile(plan: WritePlan) -> bool:
        if "i:5" not in plan.deletes:
            return False
        recreated = {**gone, "title": "back again"}
        source.collections["docs"] = [*docs, recreated]
        apply(daemon, "insert", 5, recreated)
        return True

    sink.races.append(created_meanwhile)
    result = repair(source, sink, checker)

    assert not sink.races, "the race did not run"
    assert "i:5" in sink.records, "repair deleted the record of a document just inserted"
    assert sink.records["i:5"]["metadata"]["title"] == "back again"
    assert checker.verify().consistent
    assert result.deleted.sample == ["i:5"] and result.changed.sample == ["i:5"]


def test_a_document_that_keeps_changing_is_left_to_the_pipeline_after_bounded_tries() -> None:
    docs = docs_of(4)
    source, sink, checker, daemon = live(docs)
    sink.records["i:1"]["document"] = "tampered"
    version = iter(range(1000))

    def changes_every_time(plan: WritePlan) -> bool:
        if touches(plan, "i:1"):
            docs[1] = {**docs[1], "title": f"v{next(version)}"}
            source.collections["docs"] = list(docs)
            apply(daemon, "update", 1, docs[1])
        return False  # never done

    sink.races.append(changes_every_time)
    result = repair(source, sink, checker)

    writes = [p for p in sink.written if touches(p, "i:1")]
    assert len(writes) == repair_mod.SETTLE_TRIES
    assert result.unsettled.sample == ["i:1"] and result.changed.count == 1
    assert result.failed.count == 0


def test_repair_writes_a_document_that_holds_still_once() -> None:
    docs = docs_of(8)
    source, sink, checker, _ = live(docs)
    del sink.records["i:1"]
    sink.records["i:6"]["document"] = "tampered"
    before = {rid: dict(rec) for rid, rec in sink.records.items()}

    result = repair(source, sink, checker)

    for rid in ("i:1", "i:6"):
        assert len([p for p in sink.written if touches(p, rid)]) == 1, rid
    untouched = [rid for rid in before if rid not in ("i:1", "i:6")]
    assert not [p for p in sink.written if any(touches(p, rid) for rid in untouched)]
    assert result.changed.count == 0 and result.unsettled.count == 0
    assert checker.verify().consistent


# --- dead letters ----------------------------------------------------------------------


def test_a_retry_racing_the_daemon_keeps_the_daemon_s_newer_state() -> None:
    docs = docs_of(4)
    source, sink, checker, daemon = live(docs)
    letters = MemoryDeadLetters()
    poison = {**docs[2], "body": 5.5j}  # not a text: dead-lettered
    source.collections["docs"] = [poison if d["_id"] == 2 else d for d in docs]
    letters.put_many("p", daemon.write_changes(_changes([poison])).poisoned)
    assert list(letters.entries) == ["i:2"]
    fixed = {**docs[2], "body": "fixed by hand"}
    newer = {**docs[2], "body": "changed again", "title": "newer"}
    source.collections["docs"] = [fixed if d["_id"] == 2 else d for d in docs]

    def changed_meanwhile(plan: WritePlan) -> bool:
        if not touches(plan, "i:2"):
            return False
        source.collections["docs"] = [newer if d["_id"] == 2 else d for d in docs]
        apply(daemon, "update", 2, newer)
        return True

    sink.races.append(changed_meanwhile)
    result = repair_mod.retry_dead_letters(
        make_pipeline(checker.settings, source, sink),
        letters,
    )

    assert not sink.races, "the race did not run"
    assert sink.records["i:2"]["document"] == "changed again", "retry wrote an older state"
    assert sink.records["i:2"]["metadata"]["title"] == "newer"
    assert result.fixed.sample == ["i:2"] and not letters.entries
    assert checker.verify().consistent


def test_a_retry_racing_a_delete_leaves_the_document_deleted() -> None:
    docs = docs_of(4)
    source, sink, checker, daemon = live(docs)
    letters = MemoryDeadLetters()
    poison = {**docs[1], "body": 5.5j}
    source.collections["docs"] = [poison if d["_id"] == 1 else d for d in docs]
    letters.put_many("p", daemon.write_changes(_changes([poison])).poisoned)
    source.collections["docs"] = [{**d, "body": "fixed"} if d["_id"] == 1 else d for d in docs]

    def deleted_meanwhile(plan: WritePlan) -> bool:
        if not touches(plan, "i:1"):
            return False
        source.collections["docs"] = [d for d in docs if d["_id"] != 1]
        apply(daemon, "delete", 1)
        return True

    sink.races.append(deleted_meanwhile)
    repair_mod.retry_dead_letters(
        make_pipeline(checker.settings, source, sink),
        letters,
    )

    assert not sink.races, "the race did not run"
    assert "i:1" not in sink.records, "retry brought a deleted document back"
    assert checker.verify().consistent
