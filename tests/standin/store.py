"""In-memory, journaled document store with an oplog-like change history.

Documents are held in mongoeco's value types (so its query, update and projection
code can run on them) in one dict per collection keyed by ``_id``: lookups, inserts,
updates and deletes by ``_id`` cost O(1) whatever the collection size. Every change
appends one event to the history, which is what change streams read.
"""

from __future__ import annotations

import copy
import datetime as dt
import time
import uuid
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import codec
import tokens
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.raw_bson import RawBSONDocument
from journal import Journal
from mongoeco.core.bson_scalars import BsonDecimal128, BsonDouble, BsonInt32, BsonInt64
from mongoeco.types import Decimal128, ObjectId, Timestamp

INTERNAL_DBS = frozenset({"admin", "config", "local"})


class CommandError(Exception):
    def __init__(self, code: int, code_name: str, message: str, labels: tuple[str, ...] = ()):
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.labels = labels


def id_key(value: Any) -> Any:
    """Hashable key with BSON equality semantics (1 == 1.0 == Int64(1) == Decimal128("1"))."""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return ("b", value)
    if isinstance(value, BsonInt32 | BsonInt64 | BsonDouble | BsonDecimal128):
        value = value.value
    elif isinstance(value, Decimal128):
        value = value.to_decimal()
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        if value != value:
            return ("n", "nan")  # every NaN equals every other NaN in BSON comparisons
        if isinstance(value, Decimal):
            # Python hashes equal int, float and Decimal values alike, so a key of any of
            # them finds the others; infinities become floats to meet float('inf').
            return ("n", float(value) if value.is_infinite() else value)
        return ("n", int(value) if float(value).is_integer() else float(value))
    if isinstance(value, ObjectId):
        return ("o", str(value))
    if isinstance(value, dict):
        return ("d", tuple((k, id_key(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("a", tuple(id_key(v) for v in value))
    if value is None:
        return ("z",)
    if isinstance(value, uuid.UUID):
        return ("x", 4, value.bytes)
    if isinstance(value, bytes):
        return ("x", getattr(value, "subtype", 0), bytes(value))
    if isinstance(value, dt.datetime):
        return ("t", value)
    return ("r", type(value).__name__, repr(value))


# Canonical BSON type ranks, in MongoDB's comparison order; a value's order key starts with one.
(
    MIN_KEY,
    NULL,
    NUMBER,
    STRING,
    OBJECT,
    ARRAY,
    BINARY,
    OBJECT_ID,
    BOOL,
    DATE,
    TIMESTAMP,
    REGEX,
    MAX_KEY,
) = range(13)
NAN = (NUMBER, 0)  # NaN sorts below every other number


def order_key(value: Any) -> tuple[Any, ...] | None:
    """A native sort key that follows BSON comparison order, or None for the few types left
    to mongoeco (regular expressions, code, deprecated types) which no ``_id`` index serves.

    Numbers compare numerically whatever their type, strings by UTF-8 bytes (the same order
    as code points), objects field by field (type, then name, then value), binary data by
    length then subtype then bytes.
    """
    kind = type(value)
    if kind is str:
        return (STRING, value)
    if kind is int:
        return (NUMBER, 1, value)
    if kind is float:
        return NAN if value != value else (NUMBER, 1, value)
    if kind is ObjectId:
        return (OBJECT_ID, value.binary)
    if kind is BsonInt32 or kind is BsonInt64 or kind is BsonDouble:
        return order_key(value.value)
    if kind is bool:
        return (BOOL, value)
    if value is None:
        return (NULL,)
    if kind is dict:
        fields = []
        for name, item in value.items():
            key = order_key(item)
            if key is None:
                return None
            fields.append((key[0], name, key))
        return (OBJECT, tuple(fields))
    if kind is list:
        items = []
        for i, item in enumerate(value):
            key = order_key(item)
            if key is None:
                return None
            items.append((key[0], str(i), key))
        return (ARRAY, tuple(items))
    if kind is BsonDecimal128 or kind is Decimal128:
        number = value.value if kind is BsonDecimal128 else value.to_decimal()
        if number.is_nan():
            return NAN
        return (NUMBER, 1, float(number) if number.is_infinite() else number)
    if kind is uuid.UUID:
        return (BINARY, 16, 4, value.bytes)
    if isinstance(value, bytes):
        return (BINARY, len(value), getattr(value, "subtype", 0), bytes(value))
    if kind is dt.datetime:
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return (DATE, value)
    if kind is Timestamp:
        return (TIMESTAMP, value.time, value.inc)
    if kind is MinKey:
        return (MIN_KEY,)
    if kind is MaxKey:
        return (MAX_KEY,)
    return None


_EXACT = frozenset({str, int, float, bool, type(None)})


def same_value(a: Any, b: Any) -> bool:
    """BSON equality including types (1 and 1.0 differ, as they do in an update's effect)."""
    kind = type(a)
    if kind is type(b) and kind in _EXACT and a == a:
        return bool(a == b)
    return codec.encode({"v": a}) == codec.encode({"v": b})


@dataclass
class Collection:
    db: str
    name: str
    uuid: uuid.UUID
    options: dict[str, Any] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(default_factory=list)
    docs: dict[Any, dict[str, Any]] = field(default_factory=dict)
    # (order key, id key) of every document in _id order, built on the first query that needs
    # it and kept up to date from then on; inserts wait in id_pending until the next read.
    id_order: list[tuple[Any, Any]] | None = None
    id_pending: list[tuple[Any, Any]] = field(default_factory=list)

    def index_insert(self, doc_id: Any) -> None:
        if self.id_order is not None:
            key = order_key(doc_id)
            if key is None:
                self.index_reset()
            else:
                self.id_pending.append((key, id_key(doc_id)))

    def index_delete(self, doc_id: Any) -> None:
        order = self.ordered_ids() if self.id_order is not None else None
        if order is None:
            return
        key = order_key(doc_id)
        entry = (key, id_key(doc_id))
        i = bisect_left(order, entry) if key is not None else -1
        if 0 <= i < len(order) and order[i][1] == entry[1]:
            del order[i]
        else:
            self.index_reset()

    def index_reset(self) -> None:
        self.id_order = None
        self.id_pending = []

    def ordered_ids(self) -> list[tuple[Any, Any]] | None:
        """(order key, id key) of every document in _id order, or None when some ``_id`` has
        no order key."""
        order = self.id_order
        if order is None:
            entries = []
            for k, doc in self.docs.items():
                key = order_key(doc["_id"])
                if key is None:
                    return None
                entries.append((key, k))
            entries.sort()
            self.id_order, self.id_pending = entries, []
            return entries
        if self.id_pending:
            pending, self.id_pending = self.id_pending, []
            pending.sort()
            if not order or pending[0] > order[-1]:
                order.extend(pending)  # ascending _ids, the usual case: nothing to move
            elif len(pending) <= 16:
                for entry in pending:
                    insort(order, entry)
            else:
                order.extend(pending)
                order.sort()  # two sorted runs: a linear merge
        return order

    @property
    def images(self) -> bool:
        opt = self.options.get("changeStreamPreAndPostImages") or {}
        return bool(opt.get("enabled"))


@dataclass
class Event:
    seq: int
    ts: tuple[int, int]
    op: str
    db: str
    coll: str | None
    token: str
    encoded: bytes  # the event as clients see it with default options, as BSON
    coll_uuid: uuid.UUID | None = None
    pre: dict[str, Any] | None = None  # point-in-time images, only when the collection asks
    post: dict[str, Any] | None = None
    _doc: dict[str, Any] | None = None

    @property
    def doc(self) -> dict[str, Any]:
        # Decoded on demand: most history is only ever sent as the bytes it was stored as.
        if self._doc is None:
            self._doc = codec.decode(self.encoded)
        return self._doc

    def raw(self) -> RawBSONDocument:
        return RawBSONDocument(self.encoded)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "k": "ev",
            "ts": Timestamp(*self.ts),
            "op": self.op,
            "db": self.db,
            "coll": self.coll,
            "tok": self.token,
            "raw": self.encoded,
        }
        if self.coll_uuid is not None:
            rec["uuid"] = self.coll_uuid.bytes
        if self.pre is not None:
            rec["pre"] = self.pre
        if self.post is not None:
            rec["post"] = self.post
        return rec


def _wall_time() -> dt.datetime:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def update_description(pre: dict[str, Any], post: dict[str, Any]) -> dict[str, Any]:
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a:
                if key not in b:
                    removed.append(f"{path}{key}")
            for key, val in b.items():
                if key not in a:
                    updated[f"{path}{key}"] = val
                elif not same_value(a[key], val):
                    walk(a[key], val, f"{path}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and path:
            if len(b) < len(a):
                truncated.append({"field": path[:-1], "newSize": len(b)})
            for i, val in enumerate(b):
                if i >= len(a):
                    updated[f"{path}{i}"] = val
                elif not same_value(a[i], val):
                    walk(a[i], val, f"{path}{i}.")
        else:
            updated[path[:-1]] = b

    walk(pre, post, "")
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": truncated}


class Store:
    def __init__(self, journal: Journal, history_size: int) -> None:
        self.journal = journal
        self.history_size = max(1, history_size)
        self.dbs: dict[str, dict[str, Collection]] = {}
        self.history: list[Event] = []
        self.history_ts: list[tuple[int, int]] = []
        self.base_seq = 0  # seq of history[0]
        self.next_seq = 0
        self.last_ts = (0, 0)
        self.floor_ts = (0, 0)  # the earliest cluster time a stream can still start from
        self.sessions: dict[bytes, tuple[int, dict[str, Any]]] = {}
        self._pending: list[dict[str, Any]] = []
        self._record_seq = 0
        self.listeners: list[Callable[[], None]] = []
        self._uuids: dict[bytes, uuid.UUID] = {}

    # -- time ---------------------------------------------------------------
    def next_ts(self) -> tuple[int, int]:
        now = int(time.time())
        ts = (now, 1) if now > self.last_ts[0] else (self.last_ts[0], self.last_ts[1] + 1)
        self.last_ts = ts
        return ts

    def hwm_ts(self) -> tuple[int, int]:
        """The earliest cluster time any future event can have."""
        now = int(time.time())
        return (now, 0) if now > self.last_ts[0] else (self.last_ts[0], self.last_ts[1] + 1)

    # -- catalog ------------------------------------------------------------
    def get(self, db: str, name: str) -> Collection | None:
        return self.dbs.get(db, {}).get(name)

    def ensure(self, db: str, name: str, options: dict[str, Any] | None = None) -> Collection:
        coll = self.get(db, name)
        if coll is None:
            coll = Collection(db, name, uuid.uuid4(), options or {})
            coll.indexes = [{"v": 2, "key": {"_id": 1}, "name": "_id_"}]
            self.dbs.setdefault(db, {})[name] = coll
            self._record(
                {
                    "k": "create",
                    "ns": [db, name],
                    "uuid": coll.uuid.bytes,
                    "options": coll.options,
                    "indexes": coll.indexes,
                }
            )
        return coll

    def save_meta(self, coll: Collection) -> None:
        self._record(
            {
                "k": "create",
                "ns": [coll.db, coll.name],
                "uuid": coll.uuid.bytes,
                "options": coll.options,
                "indexes": coll.indexes,
            }
        )

    # -- writes -------------------------------------------------------------
    def _record(self, rec: dict[str, Any]) -> None:
        self._record_seq += 1
        rec["s"] = self._record_seq
        self._pending.append(rec)

    def _event(
        self,
        op: str,
        db: str,
        coll: Collection | None,
        body: dict[str, Any],
        event_id: dict[str, Any],
        coll_name: str | None = None,
        **extra: Any,
    ) -> Event:
        ts = self.next_ts()
        token = tokens.encode(ts, collection_uuid=coll.uuid if coll else None, event_id=event_id)
        doc: dict[str, Any] = {
            "_id": {"_data": token},
            "operationType": op,
            "clusterTime": Timestamp(*ts),
            "wallTime": _wall_time(),
        }
        doc.update(body)
        ev = Event(
            self.next_seq,
            ts,
            op,
            db,
            coll_name or (coll.name if coll else None),
            token,
            codec.encode(doc),
            coll.uuid if coll else None,
            **extra,
        )
        self._append_history(ev)
        self._record(ev.record())
        return ev

    def _append_history(self, ev: Event) -> None:
        self.history.append(ev)
        self.history_ts.append(ev.ts)
        self.next_seq = ev.seq + 1
        excess = len(self.history) - self.history_size
        # Prune in chunks so steady-state writes do not shift the list every time.
        if excess >= max(1, self.history_size // 10):
            last_pruned = self.history_ts[excess - 1]
            self.floor_ts = (last_pruned[0], last_pruned[1] + 1)
            del self.history[:excess]
            del self.history_ts[:excess]
            self.base_seq += excess

    def insert(self, coll: Collection, doc: dict[str, Any]) -> Event:
        coll.docs[id_key(doc["_id"])] = doc
        coll.index_insert(doc["_id"])
        key = {"_id": doc["_id"]}
        return self._event(
            "insert",
            coll.db,
            coll,
            {"fullDocument": doc, "ns": {"db": coll.db, "coll": coll.name}, "documentKey": key},
            {"operationType": "insert", "documentKey": key},
            post=None,
        )

    def replace(
        self, coll: Collection, pre: dict[str, Any], post: dict[str, Any], as_update: bool
    ) -> Event | None:
        """Store ``post`` in place of ``pre``; None if nothing changed (no event, as in MongoDB)."""
        description = update_description(pre, post) if as_update else None
        if description is not None and not any(description.values()):
            return None
        if description is None and same_value(pre, post):
            return None
        coll.docs[id_key(post["_id"])] = post
        key = {"_id": post["_id"]}
        body: dict[str, Any] = {"ns": {"db": coll.db, "coll": coll.name}, "documentKey": key}
        op = "update" if as_update else "replace"
        if description is not None:
            body["updateDescription"] = description
        else:
            body = {"fullDocument": post, **body}
        return self._event(
            op,
            coll.db,
            coll,
            body,
            {"operationType": op, "documentKey": key},
            pre=pre if coll.images else None,
            post=post if as_update else None,
        )

    def delete(self, coll: Collection, doc: dict[str, Any]) -> Event:
        del coll.docs[id_key(doc["_id"])]
        coll.index_delete(doc["_id"])
        key = {"_id": doc["_id"]}
        return self._event(
            "delete",
            coll.db,
            coll,
            {"ns": {"db": coll.db, "coll": coll.name}, "documentKey": key},
            {"operationType": "delete", "documentKey": key},
            pre=doc if coll.images else None,
        )

    def drop(self, coll: Collection) -> Event:
        del self.dbs[coll.db][coll.name]
        if not self.dbs[coll.db]:
            del self.dbs[coll.db]
        return self._event(
            "drop",
            coll.db,
            coll,
            {"ns": {"db": coll.db, "coll": coll.name}},
            {"operationType": "drop"},
        )

    def drop_database(self, db: str) -> Event | None:
        if db not in self.dbs:
            return None
        for coll in list(self.dbs.get(db, {}).values()):
            self.drop(coll)
        return self._event(
            "dropDatabase", db, None, {"ns": {"db": db}}, {"operationType": "dropDatabase"}
        )

    def rename(self, coll: Collection, db: str, name: str) -> Event:
        src_db, src_name = coll.db, coll.name
        del self.dbs[src_db][src_name]
        if not self.dbs[src_db]:
            del self.dbs[src_db]
        coll.db, coll.name = db, name
        self.dbs.setdefault(db, {})[name] = coll
        return self._event(
            "rename",
            src_db,
            coll,
            {"ns": {"db": src_db, "coll": src_name}, "to": {"db": db, "coll": name}},
            {"operationType": "rename"},
            coll_name=src_name,
        )

    def remember_reply(self, lsid: bytes, txn: int, reply: dict[str, Any]) -> None:
        self.sessions[lsid] = (txn, reply)
        self._record({"k": "txn", "lsid": lsid, "n": txn, "reply": reply})

    def flush(self, *, sync: bool = False) -> None:
        """Make the pending records durable, then wake change stream waiters."""
        if not self._pending:
            return
        self.journal.append(self._pending, sync=sync)
        self._pending = []
        for notify in self.listeners:
            notify()

    # -- history ------------------------------------------------------------
    def event_at(self, seq: int) -> Event:
        return self.history[seq - self.base_seq]

    def seq_after(self, ts: tuple[int, int]) -> int:
        return self.base_seq + bisect_right(self.history_ts, ts)

    def seq_at_or_after(self, ts: tuple[int, int]) -> int:
        return self.base_seq + bisect_left(self.history_ts, ts)

    def has_event_at(self, ts: tuple[int, int]) -> bool:
        i = bisect_left(self.history_ts, ts)
        return i < len(self.history_ts) and self.history_ts[i] == ts

    # -- persistence --------------------------------------------------------
    def load(self) -> None:
        snapshot, journal = self.journal.load()
        snap_seq = 0
        for rec in snapshot:
            self._apply(rec, state=rec.get("k") != "ev")
            snap_seq = max(snap_seq, rec.get("s", 0))
        for rec in journal:
            if rec.get("s", 0) > snap_seq:
                self._apply(rec, state=True)
        self._record_seq = max([snap_seq] + [r.get("s", 0) for r in journal])
        if not snapshot and not journal:
            self.last_ts = self.floor_ts = (int(time.time()), 0)
        self.journal.open()
        if journal or not snapshot:
            self.journal.write_snapshot(self._snapshot_records())

    def _apply(self, rec: dict[str, Any], *, state: bool) -> None:
        kind = rec["k"]
        if kind == "head":
            self.last_ts = (rec["ts"].time, rec["ts"].inc)
            self.floor_ts = (rec["floor"].time, rec["floor"].inc)
            self.base_seq = self.next_seq = rec["seq"]
        elif kind == "create":
            db, name = rec["ns"]
            coll = self.get(db, name) or Collection(db, name, uuid.UUID(bytes=bytes(rec["uuid"])))
            coll.options, coll.indexes = rec["options"], rec["indexes"]
            self.dbs.setdefault(db, {})[name] = coll
        elif kind == "doc":
            coll = self.dbs[rec["ns"][0]][rec["ns"][1]]
            coll.docs[id_key(rec["d"]["_id"])] = rec["d"]
            coll.index_reset()
        elif kind == "txn":
            self.sessions[bytes(rec["lsid"])] = (int(rec["n"]), rec["reply"])
        elif kind == "ev":
            self._replay_event(rec, state=state)

    def _replay_event(self, rec: dict[str, Any], *, state: bool) -> None:
        ts = (rec["ts"].time, rec["ts"].inc)
        coll_uuid = None
        if "uuid" in rec:
            raw_uuid = bytes(rec["uuid"])
            coll_uuid = self._uuids.get(raw_uuid) or self._uuids.setdefault(
                raw_uuid, uuid.UUID(bytes=raw_uuid)
            )
        ev = Event(
            self.next_seq,
            ts,
            rec["op"],
            rec["db"],
            rec["coll"],
            rec["tok"],
            rec["raw"],
            coll_uuid,
            rec.get("pre"),
            rec.get("post"),
        )
        self.last_ts = max(self.last_ts, ts)
        self._append_history(ev)
        if state:
            self._replay_state(ev)

    def _replay_state(self, ev: Event) -> None:
        doc = ev.doc
        coll = self.get(ev.db, ev.coll) if ev.coll else None
        if coll is not None:
            coll.index_reset()
        if ev.op in ("insert", "replace"):
            coll.docs[id_key(doc["documentKey"]["_id"])] = doc["fullDocument"]  # type: ignore[union-attr]
        elif ev.op == "update":
            coll.docs[id_key(doc["documentKey"]["_id"])] = ev.post  # type: ignore[union-attr]
        elif ev.op == "delete":
            coll.docs.pop(id_key(doc["documentKey"]["_id"]), None)  # type: ignore[union-attr]
        elif ev.op == "drop" and coll is not None:
            del self.dbs[ev.db][ev.coll]  # type: ignore[arg-type]
            if not self.dbs[ev.db]:
                del self.dbs[ev.db]
        elif ev.op == "rename" and coll is not None:
            del self.dbs[ev.db][ev.coll]  # type: ignore[arg-type]
            if not self.dbs[ev.db]:
                del self.dbs[ev.db]
            coll.db, coll.name = doc["to"]["db"], doc["to"]["coll"]
            self.dbs.setdefault(coll.db, {})[coll.name] = coll

    def _snapshot_records(self) -> Iterator[dict[str, Any]]:
        yield {
            "k": "head",
            "s": self._record_seq,
            "ts": Timestamp(*self.last_ts),
            "floor": Timestamp(*self.floor_ts),
            "seq": self.base_seq,
        }
        for db, colls in self.dbs.items():
            for coll in colls.values():
                yield {
                    "k": "create",
                    "ns": [db, coll.name],
                    "uuid": coll.uuid.bytes,
                    "options": coll.options,
                    "indexes": coll.indexes,
                }
                for doc in coll.docs.values():
                    yield {"k": "doc", "ns": [db, coll.name], "d": doc}
        for ev in self.history:
            yield ev.record()
        for lsid, (txn, reply) in self.sessions.items():
            yield {"k": "txn", "lsid": lsid, "n": txn, "reply": reply}


def deep_copy(value: Any) -> Any:
    """Copy the containers of a document; its scalar values are immutable and shared."""
    kind = type(value)
    if kind is dict:
        return {k: deep_copy(v) for k, v in value.items()}
    if kind is list:
        return [deep_copy(v) for v in value]
    if kind in _SCALARS:
        return value
    return copy.deepcopy(value)


_SCALARS = frozenset(
    {str, int, float, bool, type(None), bytes, dt.datetime, uuid.UUID, ObjectId, Timestamp}
)
