"""In-memory stand-ins for the sink (syncd.sink), the checkpoint store
(syncd.checkpoint.CheckpointStore) and the dead-letter store (syncd.deadletter), shared
by the unit tests.

They behave like the real parts where the tests depend on it: the sink merges metadata
on upsert and update (``None`` deletes a key), as Chroma does, and pages its scan; the
store hands back the last checkpoint saved. Tests that need a part to misbehave set a
switch (``fail_writes``, ``lie_on_read``, ``phantoms``) or subclass these in the test.
The same behaviours run against real servers in tests/e2e.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from syncd.checkpoint import Checkpoint
from syncd.errors import CheckpointCorruptError, TransientError
from syncd.identity import ID_KEY
from syncd.plan import Poisoned
from syncd.sink import StoredRecord, WritePlan


class Log:
    """Shared record of what happened, in order, across the doubles."""

    def __init__(self) -> None:
        self.calls: list[str] = []


class MemorySink:
    """A Chroma collection in a dict: id -> {document, metadata, embedding}."""

    max_batch = 1000

    def __init__(self, log: Log | None = None) -> None:
        self.log = log or Log()
        self.records: dict[str, dict[str, Any]] = {}
        self.writes = 0  # write calls that were applied
        self.fail_writes = 0  # the next n writes fail as a transient Chroma outage
        self.lie_on_read = False  # reads return another syncd_hash than was written
        # Metadata a new record id inherits, as Chroma's rows left by a deleted collection
        # do; `stubborn`: an update does not remove them either.
        self.phantoms: dict[str, Any] = {}
        self.stubborn = False
        self.id: str | None = "coll-1"  # the collection's id; None: there is none

    def collection_id(self, *, create: bool = False) -> str | None:
        if self.id is None and create:
            self.id = "coll-2"
        return self.id

    def open(self) -> None:
        pass

    def existing(self, keys: Sequence[str]) -> dict[str, dict[str, Mapping[str, Any]]]:
        wanted = set(keys)
        found: dict[str, dict[str, Mapping[str, Any]]] = {}
        for rid, rec in self.records.items():
            key = rec["metadata"].get(ID_KEY)
            if key in wanted:
                found.setdefault(key, {})[rid] = dict(rec["metadata"])
        return found

    def write(self, plan: WritePlan) -> None:
        if self.fail_writes:
            self.fail_writes -= 1
            raise TransientError("chroma down")
        self.writes += 1
        self.log.calls.append(f"write {len(plan)}")
        for rid in plan.deletes:
            self.records.pop(rid, None)
        for u in plan.upserts:
            old = self.records[u.id]["metadata"] if u.id in self.records else self.phantoms
            self.records[u.id] = {
                "document": u.text,
                "metadata": merge(old, u.metadata),
                "embedding": list(u.embedding),
            }
        for m in plan.updates:
            rec = self.records[m.id]
            rec["metadata"] = merge(rec["metadata"], m.metadata)
            if self.stubborn:
                rec["metadata"].update(self.phantoms)

    def get(self, ids: Sequence[str], *, include_embeddings: bool = False) -> list[StoredRecord]:
        return [self._stored(rid) for rid in ids if rid in self.records]

    def scan(self, page: int = 1000) -> Iterator[list[StoredRecord]]:
        ids = sorted(self.records)
        for start in range(0, len(ids), page):
            yield [self._stored(rid) for rid in ids[start : start + page]]

    def delete_all(self) -> int:
        count = len(self.records)
        self.records.clear()
        return count

    def delete_where(self, where: Mapping[str, Any]) -> None:
        raise NotImplementedError("no test here deletes by filter")

    def count(self) -> int:
        return len(self.records)

    def close(self) -> None:
        pass

    def _stored(self, rid: str) -> StoredRecord:
        rec = self.records[rid]
        metadata = dict(rec["metadata"])
        if self.lie_on_read:
            metadata["syncd_hash"] = "not what was written"
        return StoredRecord(rid, metadata, rec["document"])


def merge(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Chroma's metadata update: new keys win, a ``None`` value deletes the key."""
    merged = dict(old)
    for key, value in new.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


class MemoryStore:
    """A checkpoint store that keeps every checkpoint, status and halt it was given.

    It records epochs but fences no one: tests of fencing use the real stores.
    """

    def __init__(self, log: Log | None = None) -> None:
        self.log = log or Log()
        self.saved: list[Checkpoint] = []
        self.statuses: list[dict[str, Any]] = []
        self.halts: dict[str, dict[str, Any] | None] = {}
        self.epochs: dict[str, int] = {}

    def load(self, pipeline: str) -> Checkpoint | None:
        return self.saved[-1] if self.saved else None

    def save(self, checkpoint: Checkpoint, *, history_reason: str | None = None) -> None:
        self.log.calls.append(f"checkpoint {checkpoint.cluster_time}")
        self.saved.append(checkpoint)

    def set_status(self, pipeline: str, status: Mapping[str, Any]) -> None:
        self.statuses.append(dict(status))

    def set_halt(self, pipeline: str, halt: Mapping[str, Any] | None) -> None:
        self.halts[pipeline] = dict(halt) if halt is not None else None

    def claim_epoch(self, pipeline: str, epoch: int) -> None:
        self.epochs[pipeline] = epoch

    def next_epoch(self, pipeline: str) -> int:
        self.epochs[pipeline] = self.epochs.get(pipeline, 0) + 1
        return self.epochs[pipeline]

    def delete(self, pipeline: str) -> None:
        self.saved = [cp for cp in self.saved if cp.pipeline != pipeline]

    def clear(self, pipeline: str, epoch: int) -> None:
        self.delete(pipeline)
        self.epochs[pipeline] = epoch

    def list(
        self, *, unreadable: dict[str, CheckpointCorruptError] | None = None
    ) -> list[Checkpoint]:
        return list({cp.pipeline: cp for cp in self.saved}.values())

    def close(self) -> None:
        pass


class Clock:
    """Monotonic time that moves only when told: ``monotonic`` for a module's ``time``."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class Waits:
    """A stop event never set, whose ``wait`` moves ``clock`` by ``step`` seconds at once
    (whatever the backoff asked for), so a retry loop runs through hours of outages."""

    def __init__(self, clock: Clock, step: float) -> None:
        self.clock = clock
        self.step = step

    def is_set(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        self.clock.now += self.step
        return False


class MemoryDeadLetters:
    """The dead-letter store in a dict: key -> entry, the latest poisoned change of each
    key in ``items`` (what the pipeline parked), as ``DeadLetters`` and
    ``RetryableDeadLetters`` need. Parking is logged as ``dead-letter N`` in ``log``."""

    def __init__(self, log: Log | None = None) -> None:
        self.log = log
        self.entries: dict[str, dict[str, Any]] = {}
        self._poisoned: dict[str, Poisoned] = {}

    @property
    def items(self) -> list[Poisoned]:
        return list(self._poisoned.values())

    def put_many(self, pipeline: str, poisoned: Sequence[Poisoned]) -> None:
        if self.log is not None:
            self.log.calls.append(f"dead-letter {len(poisoned)}")
        for p in poisoned:
            self._poisoned[p.change.key] = p
            entry = self.entries.setdefault(p.change.key, {"attempts": 0})
            entry.update(
                key=p.change.key,
                collection=p.change.collection,
                source_id=p.change.source_id,
                operation=p.change.operation,
                message=p.error.message,
            )
            entry["attempts"] += 1

    def settle(self, pipeline: str, applied: Sequence[str]) -> int:
        return self.remove(pipeline, applied)

    def parked(self, pipeline: str, keys: Sequence[str]) -> set[str]:
        return set(keys) & set(self.entries)

    def list(self, pipeline: str, *, limit: int = 0) -> Iterator[dict[str, Any]]:
        yield from list(self.entries.values())

    def get(self, pipeline: str, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def remove(self, pipeline: str, keys: Sequence[str]) -> int:
        self._poisoned = {k: p for k, p in self._poisoned.items() if k not in set(keys)}
        return sum(self.entries.pop(k, None) is not None for k in keys)

    def count(self, pipeline: str) -> int:
        return len(self.entries)
