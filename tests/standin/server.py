"""A MongoDB wire-protocol server for tests: a one-node replica set primary with change streams.

Run with the stand-in's own interpreter (Python 3.13, mongoeco, pymongo's bson):

    .venv-standin/bin/python tests/standin/server.py --port 27017 --data-dir /tmp/standin

It prints ``standin ready port=P`` once it accepts connections. Data, change history and
retryable-write outcomes live in the data directory and survive ``kill -9``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import os
import random
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import admin
import bson
import codec
import crud
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from codec import CODEC
from journal import Journal
from mongoeco.errors import OperationFailure
from mongoeco.types import ObjectId, Timestamp
from store import CommandError, Store
from streams import ChangeStream

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
MORE_TO_COME = 1 << 1
CHECKSUM = 1 << 0
MAX_BSON = 16 * 1024 * 1024
MAX_MESSAGE = 48_000_000
DEFAULT_BATCH = 101
INSERT_CHUNK = 500
_CODEC = CODEC
WRITE_COMMANDS = {
    "insert": crud.cmd_insert,
    "update": crud.cmd_update,
    "delete": crud.cmd_delete,
    "findandmodify": crud.cmd_find_and_modify,
}
SIMPLE_COMMANDS: dict[str, Callable[[Store, str, dict[str, Any]], dict[str, Any]]] = {
    "count": crud.cmd_count,
    "distinct": crud.cmd_distinct,
    "create": admin.cmd_create,
    "collmod": admin.cmd_coll_mod,
    "drop": admin.cmd_drop,
    "dropdatabase": admin.cmd_drop_database,
    "renamecollection": admin.cmd_rename,
    "createindexes": admin.cmd_create_indexes,
    "dropindexes": admin.cmd_drop_indexes,
    "listdatabases": admin.cmd_list_databases,
}


def as_int(value: Any) -> int:
    return int(getattr(value, "value", value))


@dataclass
class Cursor:
    ns: str
    docs: list[Any] | None = None
    stream: ChangeStream | None = None


class Server:
    def __init__(self, store: Store, host: str, port: int) -> None:
        self.store = store
        self.host, self.port = host, port
        self.me = f"{host}:{port}"
        self.cursors: dict[int, Cursor] = {}
        self._cursor_ids = itertools.count(random.randint(1 << 40, 1 << 50))
        self._conn_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._changed = asyncio.Event()
        self.election_id = ObjectId("7fffffff0000000000000001")
        store.listeners.append(self._notify)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_for_change(self, timeout: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    # -- connections --------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._conn_ids)
        try:
            while True:
                header = await reader.readexactly(16)
                length, request_id, _, opcode = struct.unpack("<iiii", header)
                if not 16 < length <= MAX_MESSAGE:
                    break
                payload = await reader.readexactly(length - 16)
                if opcode == OP_MSG:
                    flags, body = parse_op_msg(payload)
                    reply = await self.dispatch(body, conn_id)
                    if not flags & MORE_TO_COME:
                        writer.write(self._op_msg(request_id, reply))
                elif opcode == OP_QUERY:
                    db, body = parse_op_query(payload)
                    body.setdefault("$db", db)
                    reply = await self.dispatch(body, conn_id)
                    writer.write(self._op_reply(request_id, reply))
                else:
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _op_msg(self, response_to: int, reply: dict[str, Any]) -> bytes:
        body = bson.encode(reply, codec_options=_CODEC)
        payload = struct.pack("<IB", 0, 0) + body
        return (
            struct.pack("<iiii", 16 + len(payload), next(self._request_ids), response_to, OP_MSG)
            + payload
        )

    def _op_reply(self, response_to: int, reply: dict[str, Any]) -> bytes:
        body = bson.encode(reply, codec_options=_CODEC)
        payload = struct.pack("<iqii", 8, 0, 0, 1) + body
        return (
            struct.pack("<iiii", 16 + len(payload), next(self._request_ids), response_to, OP_REPLY)
            + payload
        )

    # -- commands -----------------------------------------------------------
    async def dispatch(self, raw_body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        body = raw_body
        db = body.pop("$db", "admin")
        name = next(iter(body), "").lower()
        try:
            reply = await self.run(name, db, body, conn_id)
            reply["ok"] = 1.0
        except CommandError as exc:
            reply = {"ok": 0.0, "errmsg": str(exc), "code": exc.code, "codeName": exc.code_name}
            if exc.labels:
                reply["errorLabels"] = list(exc.labels)
        except OperationFailure as exc:
            reply = {
                "ok": 0.0,
                "errmsg": str(exc),
                "code": getattr(exc, "code", None) or 2,
                "codeName": "BadValue",
            }
        except Exception as exc:  # keep serving: report the bug to the client and on stderr
            traceback.print_exc(file=sys.stderr)
            reply = {
                "ok": 0.0,
                "errmsg": f"{type(exc).__name__}: {exc}",
                "code": 1,
                "codeName": "InternalError",
            }
        finally:
            self.store.flush()
        ts = Timestamp(*self.store.last_ts)
        reply["operationTime"] = ts
        reply["$clusterTime"] = {
            "clusterTime": ts,
            "signature": {"hash": bson.Binary(bytes(20)), "keyId": Int64(0)},
        }
        return reply

    async def run(self, name: str, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        if body.get("startTransaction") or body.get("autocommit") is False:
            raise CommandError(
                20,
                "IllegalOperation",
                "multi-document transactions are not supported by this server",
            )
        if name in ("hello", "ismaster"):
            return self.hello(name, body, conn_id)
        if name in WRITE_COMMANDS:
            return await self.write(name, db, body)
        if name in SIMPLE_COMMANDS:
            return SIMPLE_COMMANDS[name](self.store, db, body)
        if name == "find":
            coll = self.store.get(db, body["find"])
            docs = crud.query(coll, body)
            return self.open_cursor(
                f"{db}.{body['find']}",
                docs,
                body.get("batchSize"),
                single=bool(body.get("singleBatch")),
            )
        if name == "aggregate":
            return self.aggregate(db, body)
        if name == "getmore":
            return await self.get_more(db, body)
        if name == "killcursors":
            ids = [as_int(c) for c in body.get("cursors", [])]
            killed = [Int64(c) for c in ids if self.cursors.pop(c, None) is not None]
            return {
                "cursorsKilled": killed,
                "cursorsNotFound": [Int64(c) for c in ids if Int64(c) not in killed],
                "cursorsAlive": [],
                "cursorsUnknown": [],
            }
        if name == "listcollections":
            colls = admin.list_collections(self.store, db, body)
            return self.open_cursor(f"{db}.$cmd.listCollections", colls, None)
        if name == "listindexes":
            indexes = admin.list_indexes(self.store, db, body)
            return self.open_cursor(f"{db}.{body['listIndexes']}", indexes, None)
        return self.misc(name, body)

    def misc(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        if name in ("ping", "endsessions", "refreshsessions", "killsessions", "logout"):
            return {}
        if name == "buildinfo":
            return {
                "version": "7.0.0",
                "versionArray": [7, 0, 0, 0],
                "gitVersion": "standin",
                "bits": 64,
                "maxBsonObjectSize": MAX_BSON,
                "storageEngines": ["standin"],
            }
        if name == "serverstatus":
            return {
                "host": self.me,
                "version": "7.0.0",
                "process": "mongod",
                "pid": os.getpid(),
                "uptime": time.monotonic(),
                "localTime": dt.datetime.now(dt.UTC),
            }
        if name == "replsetgetstatus":
            return {
                "set": "rs0",
                "myState": 1,
                "members": [
                    {
                        "_id": 0,
                        "name": self.me,
                        "health": 1,
                        "state": 1,
                        "stateStr": "PRIMARY",
                        "self": True,
                    }
                ],
            }
        if name == "getparameter":
            return {}
        if name in ("connectionstatus", "whatsmyuri", "hostinfo", "getcmdlineopts"):
            return {"authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}}
        raise CommandError(59, "CommandNotFound", f"no such command: '{name}'")

    def hello(self, name: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        now = dt.datetime.now(dt.UTC)
        op_time = {"ts": Timestamp(*self.store.last_ts), "t": Int64(1)}
        reply = {
            "isWritablePrimary" if name == "hello" else "ismaster": True,
            "hosts": [self.me],
            "setName": "rs0",
            "setVersion": 1,
            "primary": self.me,
            "me": self.me,
            "secondary": False,
            "electionId": self.election_id,
            "lastWrite": {
                "opTime": op_time,
                "lastWriteDate": now,
                "majorityOpTime": op_time,
                "majorityWriteDate": now,
            },
            "maxBsonObjectSize": MAX_BSON,
            "maxMessageSizeBytes": MAX_MESSAGE,
            "maxWriteBatchSize": 100_000,
            "localTime": now,
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn_id,
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "readOnly": False,
        }
        if body.get("helloOk"):
            reply["helloOk"] = True
        return reply

    async def write(self, name: str, db: str, body: dict[str, Any]) -> dict[str, Any]:
        store = self.store
        lsid, txn = body.get("lsid"), body.get("txnNumber")
        key = None
        if lsid is not None and txn is not None:
            key = getattr(lsid["id"], "bytes", None) or bytes(lsid["id"])
            previous = store.sessions.get(key)
            if previous is not None and previous[0] == as_int(txn):
                return dict(previous[1])
            if previous is not None and previous[0] > as_int(txn):
                raise CommandError(
                    225,
                    "TransactionTooOld",
                    f"Cannot start transaction {as_int(txn)} on session because a "
                    f"newer transaction {previous[0]} has already started",
                )
        if name == "insert" and len(body.get("documents", [])) > INSERT_CHUNK:
            reply = await self._chunked_insert(db, body)
        else:
            reply = WRITE_COMMANDS[name](store, db, body)
        if key is not None:
            store.remember_reply(key, as_int(txn), reply)
        concern = body.get("writeConcern") or {}
        store.flush(sync=bool(concern.get("j")))
        return reply

    async def _chunked_insert(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Insert a large batch in slices, letting other connections (heartbeats) in between."""
        docs, errors, n = body["documents"], [], 0
        for start in range(0, len(docs), INSERT_CHUNK):
            part = crud.cmd_insert(
                self.store, db, {**body, "documents": docs[start : start + INSERT_CHUNK]}
            )
            n += part["n"]
            errors += [{**e, "index": e["index"] + start} for e in part.get("writeErrors", [])]
            if errors and body.get("ordered", True):
                break
            self.store.flush()
            await asyncio.sleep(0)
        return {"n": n, "writeErrors": errors} if errors else {"n": n}

    # -- cursors ------------------------------------------------------------
    def open_cursor(
        self, ns: str, docs: list[Any], batch_size: Any, *, single: bool = False
    ) -> dict[str, Any]:
        first, rest = take_batch(docs, DEFAULT_BATCH if batch_size is None else as_int(batch_size))
        cursor_id = 0
        if rest and not single:
            cursor_id = next(self._cursor_ids)
            self.cursors[cursor_id] = Cursor(ns, docs=rest)
        return {"cursor": {"firstBatch": first, "id": Int64(cursor_id), "ns": ns}}

    def aggregate(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        pipeline = body.get("pipeline") or []
        target = body["aggregate"]
        batch_size = (body.get("cursor") or {}).get("batchSize")
        if not (pipeline and "$changeStream" in pipeline[0]):
            coll = self.store.get(db, target) if isinstance(target, str) else None
            docs = crud.run_pipeline(self.store, coll, pipeline)
            return self.open_cursor(f"{db}.{target}", docs, batch_size)
        spec = pipeline[0]["$changeStream"] or {}
        if isinstance(target, str):
            stream_db, stream_coll, ns = db, target, f"{db}.{target}"
        elif spec.get("allChangesForCluster"):
            if db != "admin":
                raise CommandError(
                    ErrorCodes.INVALID_NAMESPACE,
                    "InvalidNamespace",
                    "$changeStream with allChangesForCluster must run on admin",
                )
            stream_db, stream_coll, ns = None, None, "admin.$cmd.aggregate"
        else:
            if db in ("admin", "config", "local"):
                raise CommandError(
                    ErrorCodes.INVALID_NAMESPACE,
                    "InvalidNamespace",
                    f"$changeStream may not be opened on the internal {db} database",
                )
            stream_db, stream_coll, ns = db, None, f"{db}.$cmd.aggregate"
        stream = ChangeStream(self.store, stream_db, stream_coll, spec, pipeline[1:])
        events = stream.read(DEFAULT_BATCH if batch_size is None else as_int(batch_size))
        cursor_id = 0
        if not stream.closed:
            cursor_id = next(self._cursor_ids)
            self.cursors[cursor_id] = Cursor(ns, stream=stream)
        return {
            "cursor": {
                "firstBatch": events,
                "postBatchResumeToken": stream.post_batch_token(),
                "id": Int64(cursor_id),
                "ns": ns,
            }
        }

    async def get_more(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        cursor_id = as_int(body["getMore"])
        cursor = self.cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(43, "CursorNotFound", f"cursor id {cursor_id} not found")
        limit = as_int(body["batchSize"]) if body.get("batchSize") else None
        if cursor.stream is None:
            assert cursor.docs is not None
            batch, cursor.docs = take_batch(cursor.docs, limit)
            if not cursor.docs:
                del self.cursors[cursor_id]
            return {
                "cursor": {
                    "nextBatch": batch,
                    "id": Int64(cursor_id if cursor.docs else 0),
                    "ns": cursor.ns,
                }
            }
        stream = cursor.stream
        deadline = time.monotonic() + as_int(body.get("maxTimeMS") or 1000) / 1000
        try:
            while True:
                events = stream.read(limit)
                remaining = deadline - time.monotonic()
                if events or stream.closed or remaining <= 0:
                    break
                await self._wait_for_change(remaining)
        except CommandError:
            self.cursors.pop(cursor_id, None)
            raise
        if stream.closed:
            self.cursors.pop(cursor_id, None)
        return {
            "cursor": {
                "nextBatch": events,
                "postBatchResumeToken": stream.post_batch_token(),
                "id": Int64(0 if stream.closed else cursor_id),
                "ns": cursor.ns,
            }
        }


def take_batch(docs: list[Any], limit: int | None) -> tuple[list[Any], list[Any]]:
    """Split off the next batch: at most `limit` documents and, like MongoDB, about 16 MB."""
    batch: list[Any] = []
    size = 0
    for doc in docs[:limit] if limit else docs:
        raw = RawBSONDocument(codec.encode(doc)) if not isinstance(doc, RawBSONDocument) else doc
        if batch and size + len(raw.raw) > MAX_BSON:
            break
        batch.append(raw)
        size += len(raw.raw)
    return batch, docs[len(batch) :]


class ErrorCodes:
    INVALID_NAMESPACE = 73


def parse_op_msg(payload: bytes) -> tuple[int, dict[str, Any]]:
    (flags,) = struct.unpack_from("<I", payload)
    end = len(payload) - (4 if flags & CHECKSUM else 0)
    pos, body, sequences = 4, None, {}
    while pos < end:
        kind = payload[pos]
        pos += 1
        (size,) = struct.unpack_from("<i", payload, pos)
        if kind == 0:
            body = bson.decode(payload[pos : pos + size], _CODEC)
        else:
            nul = payload.index(b"\x00", pos + 4)
            ident = payload[pos + 4 : nul].decode()
            sequences[ident] = bson.decode_all(payload[nul + 1 : pos + size], _CODEC)
        pos += size
    assert body is not None
    body.update(sequences)
    return flags, body


def parse_op_query(payload: bytes) -> tuple[str, dict[str, Any]]:
    nul = payload.index(b"\x00", 4)
    full_name = payload[4:nul].decode()
    pos = nul + 1 + 8
    (size,) = struct.unpack_from("<i", payload, pos)
    query = bson.decode(payload[pos : pos + size], _CODEC)
    if "$query" in query:
        query = query["$query"]
    return full_name.split(".", 1)[0], query


async def serve(args: argparse.Namespace) -> None:
    store = Store(Journal(Path(args.data_dir), fsync=args.fsync), args.history_size)
    # Documents and history hold no reference cycles; keep the cyclic collector from
    # walking millions of them over and over (it stalls every connection while it runs).
    gc.set_threshold(100_000, 50, 100)
    store.load()
    gc.freeze()
    server = Server(store, args.host, args.port)
    tcp = await asyncio.start_server(server.handle, args.host, args.port, reuse_address=True)
    print(f"standin ready port={args.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with tcp:
        await stop.wait()
    store.flush()
    store.journal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument(
        "--history-size",
        type=int,
        default=200_000,
        help="change events retained for resuming (the oplog window)",
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="fsync every write (survives an OS crash, not just kill -9)",
    )
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
