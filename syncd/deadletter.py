"""Where poison events are parked under ``on_error = "dead_letter"``.

A dead letter is written *before* the checkpoint moves past its event, so an event
is always either applied to Chroma or visible here. One entry per document key:
a later poison event on the same key updates the entry (attempts, last seen), and a
later change that applies (the document was fixed, deleted or filtered out) removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from pymongo import MongoClient
from pymongo.write_concern import WriteConcern

from syncd.errors import translate_mongo_errors

if TYPE_CHECKING:
    from syncd.plan import Poisoned

log = logging.getLogger(__name__)


KEYS_HELD = 100_000  # keys of one pipeline's dead letters kept in memory, at most


class DeadLetters(Protocol):
    """What applying changes needs of a dead-letter store: park poison, settle what
    applied, and say which keys are parked (verify's sampling, while the daemon runs)."""

    def put_many(self, pipeline: str, poisoned: Sequence[Poisoned]) -> None: ...

    def settle(self, pipeline: str, applied: Sequence[str]) -> int: ...

    def parked(self, pipeline: str, keys: Sequence[str]) -> set[str]: ...


class RetryableDeadLetters(Protocol):
    """What ``syncd dlq retry`` needs of a dead-letter store: read, count, re-park, remove."""

    def put_many(self, pipeline: str, poisoned: Sequence[Poisoned]) -> None: ...

    def list(self, pipeline: str, *, limit: int = 0) -> Iterator[dict[str, Any]]: ...

    def get(self, pipeline: str, key: str) -> dict[str, Any] | None: ...

    def count(self, pipeline: str) -> int: ...

    def remove(self, pipeline: str, keys: Sequence[str]) -> int: ...


class DeadLetterStore:
    def __init__(self, client: MongoClient[dict[str, Any]], database: str, collection: str) -> None:
        self._coll = client[database].get_collection(
            collection, write_concern=WriteConcern(w="majority", j=True)
        )
        # pipeline -> keys of its dead letters (None: more than KEYS_HELD), read once
        self._keys: dict[str, set[str] | None] = {}

    def put_many(self, pipeline: str, poisoned: Sequence[Poisoned]) -> None:
        now = datetime.now(UTC)
        with translate_mongo_errors(pipeline=pipeline):
            for item in poisoned:
                change = item.change
                event = dict(change.event) if change.event is not None else None
                self._coll.update_one(
                    {"_id": {"pipeline": pipeline, "key": change.key}},
                    {
                        "$set": {
                            "pipeline": pipeline,
                            "key": change.key,
                            "collection": change.collection,
                            "source_id": change.source_id,
                            "operation": change.operation,
                            "event": event,
                            "error_class": type(item.error).__name__,
                            "error_kind": item.error.kind.value,
                            "message": item.error.message,
                            "last_seen": now,
                        },
                        "$setOnInsert": {"first_seen": now},
                        "$inc": {"attempts": 1},
                    },
                    upsert=True,
                )
        known = self._keys.get(pipeline)
        if known is not None:
            known.update(item.change.key for item in poisoned)

    def list(self, pipeline: str, *, limit: int = 0) -> Iterator[dict[str, Any]]:
        """The pipeline's entries, oldest first; ones syncd did not write are left out."""
        with translate_mongo_errors(pipeline=pipeline):
            cursor = self._coll.find({"pipeline": pipeline}).sort("first_seen", 1)
            if limit:
                cursor = cursor.limit(limit)
            for entry in cursor:
                if _written_by_syncd(entry):
                    yield entry
                else:
                    log.warning(
                        "skipping an entry of %s that syncd did not write (_id %r): it has no "
                        "key and collection; delete it in MongoDB",
                        self._coll.full_name, entry.get("_id"), extra={"pipeline": pipeline},
                    )  # fmt: skip

    def settle(self, pipeline: str, applied: Sequence[str]) -> int:
        """Remove the dead letters of these keys, whose documents were just applied;
        return how many there were.

        The pipeline's keys are read once and kept, so applying a batch costs no round
        trip unless one of its documents has a dead letter (past KEYS_HELD entries, each
        batch asks the store).
        """
        if pipeline not in self._keys:
            with translate_mongo_errors(pipeline=pipeline):
                cursor = self._coll.find({"pipeline": pipeline}, {"key": 1}).limit(KEYS_HELD + 1)
                keys = {str(doc["key"]) for doc in cursor}
            self._keys[pipeline] = keys if len(keys) <= KEYS_HELD else None
        known = self._keys[pipeline]
        settled = applied if known is None else [k for k in applied if k in known]
        return self.remove(pipeline, settled) if settled else 0

    def get(self, pipeline: str, key: str) -> dict[str, Any] | None:
        with translate_mongo_errors(pipeline=pipeline):
            return self._coll.find_one({"_id": {"pipeline": pipeline, "key": key}})

    def remove(self, pipeline: str, keys: Sequence[str]) -> int:
        with translate_mongo_errors(pipeline=pipeline):
            result = self._coll.delete_many(
                {"_id": {"$in": [{"pipeline": pipeline, "key": k} for k in keys]}}
            )
        known = self._keys.get(pipeline)
        if known is not None:
            known.difference_update(keys)
        return int(result.deleted_count)

    def purge(self, pipeline: str) -> int:
        self._keys.pop(pipeline, None)
        with translate_mongo_errors(pipeline=pipeline):
            return int(self._coll.delete_many({"pipeline": pipeline}).deleted_count)

    def move(self, source: str, target: str) -> int:
        """Make ``source``'s dead letters ``target``'s (a rebuild's switch); return how
        many moved. Each entry is written under ``target`` before it is removed from
        ``source``: run again after a crash, it moves what is left."""
        moved = 0
        with translate_mongo_errors(pipeline=target):
            for entry in self._coll.find({"pipeline": source, "key": {"$type": "string"}}):
                old_id = entry["_id"]
                entry.update(_id={"pipeline": target, "key": entry.get("key")}, pipeline=target)
                self._coll.replace_one({"_id": entry["_id"]}, entry, upsert=True)
                self._coll.delete_one({"_id": old_id})
                moved += 1
        self._keys.pop(source, None)
        self._keys.pop(target, None)
        return moved

    def count(self, pipeline: str) -> int:
        with translate_mongo_errors(pipeline=pipeline):
            return int(self._coll.count_documents({"pipeline": pipeline}))

    def parked(self, pipeline: str, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` have a dead letter."""
        if not keys:
            return set()
        with translate_mongo_errors(pipeline=pipeline):
            found = self._coll.find(
                {"pipeline": pipeline, "key": {"$in": list(keys)}}, {"key": 1, "_id": 0}
            )
            return {str(entry["key"]) for entry in found if isinstance(entry.get("key"), str)}


def _written_by_syncd(entry: dict[str, Any]) -> bool:
    key = entry.get("_id")
    return (
        isinstance(key, dict)
        and isinstance(entry.get("key"), str)
        and isinstance(entry.get("collection"), str)
    )
