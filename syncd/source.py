"""MongoDB, behind the narrow interface the pipeline needs: change streams and scans.

Knows nothing about Chroma. Every driver error leaves this module translated into a
syncd error (see :mod:`syncd.errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pymongo
from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from syncd.config import MongoSettings, PipelineSettings
from syncd.errors import SourceFatalError, translate_mongo_errors
from syncd.identity import encode_id

if TYPE_CHECKING:
    from syncd.checkpoint import Checkpoint

DOCUMENT_OPS = frozenset({"insert", "update", "replace", "delete"})

# How long a best-effort bookkeeping call to MongoDB may take (a status record, a lease
# release, closing a cursor or the client): when MongoDB is down, each would otherwise
# wait the full server-selection timeout, and a stop makes several in a row.
BOOKKEEPING_S = 1.0


def bookkeeping() -> contextlib.AbstractContextManager[None]:
    """Bound the MongoDB calls inside to :data:`BOOKKEEPING_S` in all."""
    return pymongo.timeout(BOOKKEEPING_S)


def make_client(settings: MongoSettings, **options: Any) -> MongoClient[dict[str, Any]]:
    uri = settings.uri.get_secret_value()
    if uri.startswith("mongodb+srv://"):
        # Look the host up at the first operation, not here: an operation's failure is
        # an outage that is retried, like a host that does not answer, and the lookup
        # is tried again at the next operation.
        options.setdefault("connect", False)
    with translate_mongo_errors():
        return MongoClient(
            uri,
            serverSelectionTimeoutMS=settings.server_selection_timeout_ms,
            appname="syncd",
            tz_aware=True,
            **options,
        )


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a stream (re)starts. At most one field is set; none means 'now'."""

    resume_after: Mapping[str, Any] | None = None
    start_after: Mapping[str, Any] | None = None
    start_at: Timestamp | None = None


def _position_options(position: Position) -> dict[str, Any]:
    """``watch()`` keyword arguments that start a stream at ``position``."""
    if position.resume_after is not None:
        return {"resume_after": position.resume_after}
    if position.start_after is not None:
        return {"start_after": position.start_after}
    if position.start_at is not None:
        return {"start_at_operation_time": position.start_at}
    return {}


def position_of(cp: Checkpoint) -> Position:
    """Where a pipeline's stream resumes from its checkpoint."""
    if cp.token is not None:
        if cp.token_is_invalidate:
            return Position(start_after=cp.token)
        return Position(resume_after=cp.token)
    return Position(start_at=cp.start_at)


@dataclasses.dataclass
class Batch:
    events: list[dict[str, Any]]
    token: Mapping[str, Any] | None  # position after the last event (or the idle high-water mark)
    invalidated: bool = False


def oplog_start(client: MongoClient[dict[str, Any]]) -> Timestamp | None:
    """The time of the oldest entry in the replica set's oplog, or None if it cannot be read.

    Reading ``local.oplog.rs`` needs a role that allows it, and sharded clusters, Atlas
    serverless and servers without an oplog have none to read: then headroom is unknown.
    """
    try:
        entry = client.local["oplog.rs"].find_one({}, {"ts": 1}, sort=[("$natural", 1)])
    except PyMongoError:
        return None
    ts = entry.get("ts") if entry else None
    return ts if isinstance(ts, Timestamp) else None


class Source(Protocol):
    def open(self, position: Position, *, max_await_ms: int) -> None: ...
    def read_batch(self, max_events: int, max_wait_s: float) -> Batch: ...
    def current_token(self) -> Mapping[str, Any] | None: ...
    def server_time(self) -> Any: ...
    def scan(
        self,
        collection: str,
        *,
        after_id: Any = None,
        has_after: bool = False,
        batch_size: int = 1000,
        query: Mapping[str, Any] | None = None,
    ) -> Iterator[list[dict[str, Any]]]: ...
    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]: ...
    def close(self) -> None: ...


class ChangeSource:
    """One pipeline's change stream and snapshot scan."""

    def __init__(self, client: MongoClient[dict[str, Any]], pipeline: PipelineSettings) -> None:
        self._client = client
        self._settings = pipeline
        self._db: Database[dict[str, Any]] = client[pipeline.database]
        self._stream: ChangeStream[dict[str, Any]] | None = None
        self._context: dict[str, Any] = {
            "pipeline": pipeline.name,
            "namespace": pipeline.namespace,
        }

    # --- streaming ----------------------------------------------------------

    def _stages(self) -> list[dict[str, Any]]:
        # syncd maps the document an event carries, never what an update changed: without
        # updateDescription an update of a large field is not carried twice, so its event
        # stays under the 16 MiB a change event may take (MongoDB fails the stream past
        # it, BSONObjectTooLarge), and the server sends half as much.
        unchanged = {"$project": {"updateDescription": 0}}
        if self._settings.collections:
            # Database-level stream: keep our collections and database-wide events.
            return [
                {
                    "$match": {
                        "$or": [
                            {"ns.coll": {"$in": self._settings.collections}},
                            {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
                        ]
                    }
                },
                unchanged,
            ]
        return [unchanged]

    def _target(self) -> Collection[dict[str, Any]] | Database[dict[str, Any]]:
        return self._db[self._settings.collection] if self._settings.collection else self._db

    def open(self, position: Position, *, max_await_ms: int) -> None:
        self.close()
        options: dict[str, Any] = {
            "full_document": self._settings.full_document,
            "max_await_time_ms": max(1, max_await_ms),
            "batch_size": self._settings.batch_size,
        }
        options.update(_position_options(position))
        with translate_mongo_errors(**self._context):
            self._stream = self._target().watch(self._stages(), **options)

    def check_reachable(self, position: Position) -> None:
        """Raise HistoryLostError if the stream cannot start at ``position`` any more
        (the oplog no longer reaches back to it); otherwise return, changing nothing."""
        options: dict[str, Any] = {"max_await_time_ms": 1, **_position_options(position)}
        with (
            translate_mongo_errors(**self._context),
            self._target().watch(self._stages(), **options) as stream,
        ):
            stream.try_next()

    def read_batch(self, max_events: int, max_wait_s: float) -> Batch:
        """Up to ``max_events`` events: what the server has ready, waiting at most about
        ``max_wait_s`` for the first one.

        Once events are in hand the batch ends where the driver's buffer does, rather
        than lingering for more: a quiet stream's changes are applied at once, and under
        load the events that arrive while a batch is being written make the next batch
        bigger by themselves (up to ``max_events``, one server reply). The returned token
        covers exactly the returned events (and, when idle, the server's high-water mark),
        so checkpointing it after applying them loses nothing.
        """
        stream = self._stream
        if stream is None:
            raise SourceFatalError("change stream is not open", **self._context)
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + max_wait_s
        with translate_mongo_errors(**self._context):
            while len(events) < max_events:
                if events and not _buffered(stream):
                    break
                event = stream.try_next()
                if event is None:
                    if not stream.alive or time.monotonic() >= deadline:
                        break
                    continue
                events.append(event)
                if event.get("operationType") == "invalidate":
                    return Batch(events, event["_id"], invalidated=True)
            token = stream.resume_token
        return Batch(events, token)

    def current_token(self) -> Mapping[str, Any] | None:
        """The stream's position right now (used before a snapshot scan starts)."""
        with (
            translate_mongo_errors(**self._context),
            self._target().watch(self._stages(), max_await_time_ms=1) as stream,
        ):
            stream.try_next()
            return stream.resume_token

    def first_pending(self, position: Position) -> Timestamp | None:
        """The cluster time of the first change after ``position`` in this pipeline's
        stream, or None when there is none: what a lag is measured from."""
        options: dict[str, Any] = {"max_await_time_ms": 1, "batch_size": 1}
        options.update(_position_options(position))
        with (
            translate_mongo_errors(**self._context),
            self._target().watch(self._stages(), **options) as stream,
        ):
            for _ in range(2):  # the first reply, then one getMore
                event = stream.try_next()
                if event is not None:
                    value = event.get("clusterTime")
                    return value if isinstance(value, Timestamp) else None
        return None

    def server_time(self) -> Timestamp | None:
        with translate_mongo_errors(**self._context):
            reply = self._client.admin.command("ping")
        cluster = reply.get("$clusterTime", {}).get("clusterTime")
        op_time = reply.get("operationTime")
        value = op_time or cluster
        return value if isinstance(value, Timestamp) else None

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with translate_mongo_errors(**self._context), bookkeeping():
                stream.close()

    # --- snapshot -------------------------------------------------------------

    def scan(
        self,
        collection: str,
        *,
        after_id: Any = None,
        has_after: bool = False,
        batch_size: int = 1000,
        query: Mapping[str, Any] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Documents in ``_id`` order after ``after_id``, a batch at a time.

        Each batch is a fresh, bounded query, so a scan interrupted at any point
        resumes from the last ``_id`` it handed out. ``$gt`` only compares values of
        one BSON type (``{"_id": {"$gt": 5}}`` never matches a string), so the scan
        walks the ``_id`` index one type bracket at a time, in MongoDB's sort order.
        """
        coll = self._db[collection]
        first = bracket_of(after_id) if has_after else 0
        for index in range(first, len(ID_BRACKETS)):
            types = {"$type": ID_BRACKETS[index]}
            last, paging = (after_id, True) if has_after and index == first else (None, False)
            while True:
                # The $type condition is redundant where $gt brackets by type (MongoDB)
                # and keeps the walk within one bracket where it might not.
                bound = {"_id": {**_after(last), **types}} if paging else {"_id": types}
                flt = {"$and": [dict(query), bound]} if query else bound
                with translate_mongo_errors(**self._context):
                    docs = list(coll.find(flt).sort("_id", 1).limit(batch_size))
                if paging:
                    docs = [d for d in docs if id_key(d["_id"]) != id_key(last)]
                if not docs:
                    break
                yield docs
                if index in SINGLE_VALUE_BRACKETS:
                    break  # _id is unique and the bracket holds one value
                last, paging = docs[-1]["_id"], True

    def fetch(self, collection: str, ids: list[Any]) -> dict[str, dict[str, Any]]:
        """Current documents by ``_id``, keyed by :func:`id_key` of each one's ``_id``.

        MongoDB matches ``_id`` values by its own rules (``1`` finds a document whose
        ``_id`` is ``1.0``); look the results up with ``id_key`` of the value you asked
        for, and a document stored under another type is, rightly, not found.
        """
        with translate_mongo_errors(**self._context):
            docs = list(self._db[collection].find({"_id": {"$in": ids}}))
        return {id_key(doc["_id"]): doc for doc in docs}

    def count(self, collection: str, query: Mapping[str, Any] | None = None) -> int:
        with translate_mongo_errors(**self._context):
            return int(self._db[collection].count_documents(dict(query or {})))


# BSON types an ``_id`` can have, grouped as MongoDB compares and sorts them
# (arrays and regular expressions cannot be ``_id`` values).
ID_BRACKETS: tuple[list[str], ...] = (
    ["minKey"],
    ["null"],
    ["double", "int", "long", "decimal"],
    ["string", "symbol"],
    ["object"],
    ["binData"],
    ["objectId"],
    ["bool"],
    ["date"],
    ["timestamp"],
    ["maxKey"],
)


SINGLE_VALUE_BRACKETS = frozenset({0, 1, 10})  # MinKey, null, MaxKey


def bracket_of(value: Any) -> int:
    """The index in ID_BRACKETS of the bracket ``value`` sorts in."""
    ordered: list[tuple[type | tuple[type, ...], int]] = [
        (MinKey, 0),
        (type(None), 1),
        (bool, 7),  # before int: bool is an int subclass in Python
        ((int, float, Int64, Decimal128), 2),
        (str, 3),
        (Mapping, 4),
        ((bytes, Binary, uuid.UUID), 5),
        (ObjectId, 6),
        (datetime.datetime, 8),
        (Timestamp, 9),
        (MaxKey, 10),
    ]
    for kinds, index in ordered:
        if isinstance(value, kinds):
            return index
    raise SourceFatalError(f"cannot resume a scan after an _id of type {type(value).__name__}")


def _buffered(stream: ChangeStream[dict[str, Any]]) -> bool:
    """Whether the driver already holds more events in memory (no round trip needed)."""
    cursor = getattr(stream, "_cursor", None)
    data = getattr(cursor, "_data", None)
    return bool(data)


def id_key(value: Any) -> str:
    """The key to find a document by ``_id`` with: its canonical record id.

    Every lookup by ``_id`` goes through this, never through the value's own equality
    or hash, which lie about BSON: NaN is not equal to itself, Python has ``True == 1
    == 1.0`` where BSON tells a boolean from a number, ``-0.0 == 0.0``, and Decimal128
    cannot be hashed at all. The record id is exact and unique per BSON value.
    """
    return encode_id(value)


def _after(last: Any) -> dict[str, Any]:
    """The bound for "``_id`` after ``last``" in a scan.

    MongoDB's matcher compares nothing greater than NaN (``$gt: NaN`` matches no
    document), although NaN sorts first among numbers: after NaN comes every other
    number, which ``$gte: -Infinity`` selects (NaN never compares equal to it).
    """
    if isinstance(last, float | Decimal128) and _is_nan(last):
        return {"$gte": float("-inf")}
    return {"$gt": last}


def _is_nan(value: float | Decimal128) -> bool:
    return value.to_decimal().is_nan() if isinstance(value, Decimal128) else math.isnan(value)
