"""Throughput of the MongoDB stand-in with a large collection.

Starts a stand-in, loads 100,000 documents into one collection, then measures
single-document insert_one, update_one and delete_one (by _id) and how fast one
watch() cursor drains a backlog of change events. Prints each figure next to the
floor it must meet and exits non-zero if one is missed.

    .venv/bin/python bench/standin_perf.py [--docs 100000] [--ops 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.mongo import MongoServer
from tests.harness.ports import free_port

FLOOR_OPS = 500.0
FLOOR_EVENTS = 10_000.0


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--ops", type=int, default=2_000)
    args = parser.parse_args()
    results: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="standin-perf-") as tmp:
        server = MongoServer("standin", Path(tmp) / "data", free_port(),
                             history_size=args.docs + 4 * args.ops)
        server.start()
        try:
            with pymongo.MongoClient(server.uri) as client:
                coll = client.perf.docs
                start_time = client.admin.command("ping")["operationTime"]
                began = time.perf_counter()
                for base in range(0, args.docs, 10_000):
                    coll.insert_many([{"_id": i, "n": i, "text": f"document {i}"}
                                      for i in range(base, min(base + 10_000, args.docs))])
                load = time.perf_counter() - began
                print(f"load      {args.docs} docs in {load:.1f}s "
                      f"({rate(args.docs, load):,.0f} docs/s)")
                ids = range(args.docs, args.docs + args.ops)
                for name, op in (
                    ("insert_one", lambda i: coll.insert_one({"_id": i, "n": i})),
                    ("update_one", lambda i: coll.update_one({"_id": i}, {"$set": {"u": 1}})),
                    ("delete_one", lambda i: coll.delete_one({"_id": i})),
                ):
                    began = time.perf_counter()
                    for i in ids:
                        op(i)
                    results.append((name, rate(args.ops, time.perf_counter() - began),
                                    FLOOR_OPS))
                backlog = args.docs + 3 * args.ops
                began = time.perf_counter()
                with coll.watch(start_at_operation_time=start_time, batch_size=10_000) as stream:
                    for _ in range(backlog):
                        stream.next()
                results.append(("watch backlog", rate(backlog, time.perf_counter() - began),
                                FLOOR_EVENTS))
        finally:
            server.stop()
    failed = False
    for name, value, floor in results:
        unit = "events/s" if "watch" in name else "ops/s"
        ok = value >= floor
        failed |= not ok
        print(f"{name:14} {value:10,.0f} {unit:8} (floor {floor:,.0f}) {'ok' if ok else 'BELOW'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
