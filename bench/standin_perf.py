"""Throughput of the MongoDB stand-in with a large collection.

Starts a stand-in, loads 200,000 documents into one collection, then measures
single-document insert_one, update_one and delete_one (by _id), how fast one
watch() cursor drains a backlog of change events, and the reads MongoDB answers
from the ``_id`` index: ``$in`` of 1,000 ids, a full ``_id``-ordered scan in pages
of 1,000 (bare, behind a user filter, and with the snapshot's ``$type`` condition on
``_id``, whose last pages must cost what its first did), one page of an ``_id`` range
at the start and at the end of the collection (ascending and descending, each of
``$gt``/``$gte``/``$lt``/``$lte``, with and without ``$type``: an index walk costs the
same at either end), counts, a lookup by ``_id`` and ``$sample``. Prints each figure
next to the floor or ceiling it must meet and exits non-zero if one is missed.

    .venv/bin/python bench/standin_perf.py [--docs 200000] [--ops 2000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from syncd.source import ID_BRACKETS
from tests.harness.mongo import MongoServer
from tests.harness.ports import free_port

FLOOR_OPS = 500.0
FLOOR_EVENTS = 10_000.0
CEILING_IN_1000 = 0.2  # seconds for find({_id: {$in: [1000 ids]}})
CEILING_PAGED_SCAN = 15.0  # seconds for every document, _id-ordered, in pages of 1000
CEILING_COUNT = 0.2  # seconds for count_documents({}) / estimated_document_count()
CEILING_POINT = 0.01  # seconds per find_one({_id: x})
CEILING_SAMPLE = 0.5  # seconds for aggregate([{$sample: {size: 100}}])
CEILING_PAGE_GROWTH = 2.0  # the last pages of a scan over the first (an index walk: flat)
CEILING_PAGE = 1.0  # seconds for one page of 1000 by an _id range (a full scan at 200k: many)
PAGE = 1_000
NUMBERS = ["double", "int", "long", "decimal"]  # the snapshot's $type bracket for numbers


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    value = fn()
    return time.perf_counter() - began, value


def paged_scan(coll: Any, user_filter: dict[str, Any] | None = None, *,
               types: list[str] | None = None, page_s: list[float] | None = None) -> int:
    """Read the collection in _id order, PAGE documents at a time, as a snapshot does
    (with ``types``, its query exactly: ``{_id: {$gt: last, $type: types}}``); each
    page's seconds go to ``page_s``."""
    seen, last = 0, None
    while True:
        bound: dict[str, Any] = {} if last is None else {"$gt": last}
        if types:
            bound["$type"] = types
        flt: dict[str, Any] = {"_id": bound} if bound else {}
        if user_filter:
            flt = {"$and": [user_filter, flt]} if flt else user_filter
        began = time.perf_counter()
        page = list(coll.find(flt).sort("_id", 1).limit(PAGE))
        if page_s is not None:
            page_s.append(time.perf_counter() - began)
        if not page:
            return seen
        seen += len(page)
        last = page[-1]["_id"]


def page_growth(coll: Any, docs: int) -> list[tuple[str, float, float]]:
    """The snapshot's page query: what its first and last 10 pages cost, and the ratio."""
    pages: list[float] = []
    seconds, seen = timed(lambda: paged_scan(coll, types=NUMBERS, page_s=pages))
    assert seen == docs, (seen, docs)
    first, last = pages[:10], pages[-11:-1]  # the very last page finds nothing
    first_ms, last_ms = sum(first) / len(first) * 1e3, sum(last) / len(last) * 1e3
    print(f"$type scan pages: first 10 {first_ms:.1f} ms, last 10 {last_ms:.1f} ms per page "
          f"of {PAGE} ({len(pages)} pages)")
    return [("$type paged scan", seconds, CEILING_PAGED_SCAN),
            ("$type last/first", last_ms / first_ms, CEILING_PAGE_GROWTH)]


# One page of an _id range as a snapshot or a reverse pager reads it: (name, direction,
# operator, the bound near the start of the collection, the bound near its end).
RANGE_PAGES = [
    ("asc  $gt", 1, "$gt", lambda n: -1, lambda n: n - PAGE - 1),
    ("asc  $gte", 1, "$gte", lambda n: 0, lambda n: n - PAGE),
    ("desc $lt", -1, "$lt", lambda n: PAGE, lambda n: n),
    ("desc $lte", -1, "$lte", lambda n: PAGE - 1, lambda n: n - 1),
]


def median_page_s(coll: Any, bound: dict[str, Any], direction: int, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        page = list(coll.find({"_id": bound}).sort("_id", direction).limit(PAGE))
        times.append(time.perf_counter() - began)
        assert len(page) == PAGE, (bound, direction, len(page))
    return sorted(times)[len(times) // 2]


def range_pages(coll: Any, docs: int) -> list[tuple[str, float, float]]:
    """A page at either end of the collection by each range operator and direction, with and
    without the snapshot's ``$type``: each must cost what the other does (O(log n + limit))."""
    results = []
    print(f"_id range pages of {PAGE} at {docs:,} documents (median of 7), start vs end:")
    for name, direction, op, near_start, near_end in RANGE_PAGES:
        for types in (None, NUMBERS):
            label = f"{name}{' $type' if types else ''}"
            costs = []
            for edge in (near_start(docs), near_end(docs)):
                bound: dict[str, Any] = {op: edge, **({"$type": types} if types else {})}
                costs.append(median_page_s(coll, bound, direction))
            start_s, end_s = costs
            print(f"  {label:16} start {start_s * 1e3:6.1f} ms  end {end_s * 1e3:6.1f} ms  "
                  f"end/start {end_s / start_s:.2f}")
            results.append((f"{label} page", max(costs), CEILING_PAGE))
            results.append((f"{label} end/start", end_s / start_s, CEILING_PAGE_GROWTH))
    return results


def empty_brackets(coll: Any) -> list[tuple[str, float, float]]:
    """The first query of each of the snapshot's type brackets that holds no ``_id`` here
    (all are numbers): an empty index range, whatever the collection holds."""
    results = []
    for types in (bracket for bracket in ID_BRACKETS if bracket != NUMBERS):
        seconds, page = timed(lambda types=types: list(coll.find({"_id": {"$type": types}})
                                                       .sort("_id", 1).limit(PAGE)))
        assert page == [], (types, len(page))
        print(f"  empty bracket {'+'.join(types):14} {seconds * 1e3:6.1f} ms")
        results.append((f"empty {'+'.join(types)}", seconds, CEILING_PAGE))
    return results


def index_reads(coll: Any, docs: int) -> list[tuple[str, float, float]]:
    results = []
    rng = random.Random(7)
    # A realistic repair batch: mostly present ids, some missing.
    ids = rng.sample(range(docs), 900) + list(range(docs + 10_000, docs + 10_100))
    seconds, found = timed(lambda: list(coll.find({"_id": {"$in": ids}})))
    assert len(found) == 900, len(found)
    results.append(("$in 1000 ids", seconds, CEILING_IN_1000))
    seconds, seen = timed(lambda: paged_scan(coll))
    assert seen == docs, (seen, docs)
    results.append((f"paged scan {docs // 1000}k", seconds, CEILING_PAGED_SCAN))
    seconds, seen = timed(lambda: paged_scan(coll, {"n": {"$mod": [2, 0]}}))
    assert seen == (docs + 1) // 2, (seen, docs)
    results.append(("filtered scan", seconds, CEILING_PAGED_SCAN))
    results += page_growth(coll, docs)
    results += range_pages(coll, docs)
    results += empty_brackets(coll)
    seconds, n = timed(lambda: coll.count_documents({}))
    assert n == docs, n
    results.append(("count_documents", seconds, CEILING_COUNT))
    seconds, n = timed(coll.estimated_document_count)
    assert n == docs, n
    results.append(("estimated count", seconds, CEILING_COUNT))
    probes = rng.sample(range(docs), 200)
    seconds, _ = timed(lambda: [coll.find_one({"_id": i}) for i in probes])
    results.append(("find_one by _id", seconds / len(probes), CEILING_POINT))
    seconds, sample = timed(lambda: list(coll.aggregate([{"$sample": {"size": 100}}])))
    assert len(sample) == 100, len(sample)
    results.append(("$sample 100", seconds, CEILING_SAMPLE))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--ops", type=int, default=2_000)
    args = parser.parse_args()
    results: list[tuple[str, float, float]] = []
    timings: list[tuple[str, float, float]] = []
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
                timings = index_reads(coll, args.docs)
        finally:
            server.stop()
    failed = False
    for name, value, floor in results:
        unit = "events/s" if "watch" in name else "ops/s"
        ok = value >= floor
        failed |= not ok
        print(f"{name:26} {value:10,.0f} {unit:8} (floor {floor:,.0f}) {'ok' if ok else 'BELOW'}")
    for name, seconds, ceiling in timings:
        ok = seconds <= ceiling
        failed |= not ok
        unit = "x" if "/" in name else "s"
        print(f"{name:26} {seconds:10.3f} {unit:8} (ceiling {ceiling:g} {unit}) "
              f"{'ok' if ok else 'ABOVE'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
