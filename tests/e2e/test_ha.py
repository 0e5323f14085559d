"""Invariant 6 end to end: two `syncd run` processes on one config share three pipelines
by lease. One writer per pipeline at a time, `kill -9` moves a process's pipelines
within the TTL, checkpoints never move backwards, and a holder frozen past its lease
(SIGSTOP) cannot write when it wakes up."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo import MongoClient

from . import oracle
from .helpers import caught_up, settings_of, wait_until, write_config
from .mirror import make_mirror

TTL, RENEW = 3.0, 1.0
NAMES = ("ha1", "ha2", "ha3")
METADATA = ("seq",)
LOST_LEASE = r"lost its lease|no longer holds the pipeline's lease|checkpoint write refused"


@dataclass
class Write:
    epoch: int
    by: str | None
    cluster_time: Timestamp | None


class Monitor(threading.Thread):
    """Polls every checkpoint and lease; records every checkpoint write it sees."""

    def __init__(self, uri: str, database: str) -> None:
        super().__init__(daemon=True)
        self.uri, self.database = uri, database
        self.writes: dict[str, list[Write]] = {}
        self.lease_owner: dict[tuple[str, int], str] = {}  # (pipeline, epoch) -> owner
        self.regressions: list[str] = []
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        client: MongoClient[dict[str, Any]] = MongoClient(self.uri)
        last: dict[str, tuple[Any, Any]] = {}
        try:
            while not self.stopping.is_set():
                db = client[self.database]
                for lease in db.leases.find({"kind": {"$ne": "process"}}):
                    self.lease_owner[(lease["_id"], lease["epoch"])] = lease["owner"]
                for doc in db.checkpoints.find({"fingerprint": {"$exists": True}}):
                    self._observe(doc, last)
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            client.close()

    def _observe(self, doc: dict[str, Any], last: dict[str, tuple[Any, Any]]) -> None:
        name, ct, by = doc["_id"], doc.get("cluster_time"), doc.get("updated_by")
        before = last.get(name)
        if before is not None and before[0] is not None and ct is not None and ct < before[0]:
            self.regressions.append(f"{name}: cluster time {before[0]} -> {ct} (by {by})")
        if before != (ct, by):
            self.writes.setdefault(name, []).append(Write(doc["epoch"], by, ct))
            last[name] = (ct, by)


def holders(client: Any, database: str) -> dict[str, str]:
    """pipeline -> host:pid of its live lease holder (liveness by the server's clock)."""
    live = client[database].leases.find(
        {"kind": {"$ne": "process"}, "$expr": {"$gt": ["$expires_at", "$$NOW"]}}
    )
    return {doc["_id"]: doc["owner"].rsplit(":", 1)[0] for doc in live}


def me(process: Any) -> str:
    return f"{socket.gethostname()}:{process.pid}"


class Writer(threading.Thread):
    def __init__(self, uri: str, database: str) -> None:
        super().__init__(daemon=True)
        self.client: MongoClient[dict[str, Any]] = MongoClient(uri)
        self.db = self.client[database]
        self.stop = threading.Event()
        self.last: dict[str, Timestamp] = {}
        self.count = 0
        self.error: BaseException | None = None
        self.rng = random.Random(6)

    def insert(self, name: str) -> Timestamp:
        self.count += 1
        doc = {
            "_id": f"{name}-{self.count}",
            "body": f"document {self.count}",
            "seq": self.count,
            "vec": oracle.vector(self.count),
        }
        with self.client.start_session(causal_consistency=True) as session:
            self.db[name].insert_one(doc, session=session)
            op_time = session.operation_time
        assert op_time is not None
        self.last[name] = op_time
        return op_time

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.insert(self.rng.choice(NAMES))
                time.sleep(0.03)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.mark.timeout(180)
def test_two_daemons_share_pipelines_and_fence_a_stale_holder(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"ha_{uuid.uuid4().hex[:8]}"
    cp_db = f"{db}_syncd"
    suffix = uuid.uuid4().hex[:6]
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=cp_db,
        pipelines=[
            oracle.pipeline(
                n, db, metadata=METADATA, collection=n, chroma_collection=f"{n}-{suffix}"
            )
            for n in NAMES
        ],
        extra={"lease": {"ttl_s": TTL, "renew_every_s": RENEW}},
    )
    settings = settings_of(cfg)
    writer = Writer(mongo_uri, db)
    for name in NAMES:
        writer.insert(name)
    monitor = Monitor(mongo_uri, cp_db)
    monitor.start()
    first = syncd_factory(["run"], cfg)
    second = syncd_factory(["run"], cfg)

    def spread() -> bool:
        owners = holders(mongo_client, cp_db)
        return len(owners) == 3 and set(owners.values()) == {me(first), me(second)}

    wait_until(spread, 40, "both daemons to hold a share of the pipelines")
    writer.start()
    time.sleep(1.5)

    # kill -9 the holder of two pipelines: the other takes them within TTL + a round.
    owners = holders(mongo_client, cp_db)
    victim, survivor = (first, second)
    if sum(1 for o in owners.values() if o == me(first)) < 2:
        victim, survivor = second, first
    moved = sorted(n for n, o in owners.items() if o == me(victim))
    victim_id = me(victim)
    victim.kill()
    killed_at = time.monotonic()
    markers = {n: writer.insert(n) for n in moved}
    wait_until(
        lambda: all(holders(mongo_client, cp_db).get(n) == me(survivor) for n in moved),
        TTL + 10,
        f"{me(survivor)} to take {moved}",
        step=0.05,
    )
    taken_after = time.monotonic() - killed_at
    assert taken_after <= TTL + RENEW + 1.0, f"leases moved after {taken_after:.1f} s"
    wait_until(
        lambda: all(caught_up(settings, n, markers[n]) for n in moved), 20, "the takeover to apply"
    )
    applied_after = time.monotonic() - killed_at
    assert applied_after <= TTL + RENEW + 4.0, f"first batch applied after {applied_after:.1f} s"

    # A new process gets a share back; then it is frozen past its lease and thawed.
    third = syncd_factory(["run"], cfg)
    wait_until(
        lambda: me(third) in holders(mongo_client, cp_db).values(), 40, "a hand-over to the new one"
    )
    frozen = next(n for n, o in holders(mongo_client, cp_db).items() if o == me(third))
    running = writer.insert(frozen)
    wait_until(lambda: caught_up(settings, frozen, running), 30, f"{frozen} to run in third")
    stale_epoch = mongo_client[cp_db].leases.find_one({"_id": frozen})["epoch"]
    third.pause()
    paused_at = time.monotonic()
    marker = writer.insert(frozen)
    wait_until(
        lambda: holders(mongo_client, cp_db).get(frozen) == me(survivor), TTL + 10, "a takeover"
    )
    wait_until(lambda: caught_up(settings, frozen, marker), 20, "the takeover of the frozen one")
    assert time.monotonic() - paused_at <= TTL + RENEW + 4.0
    time.sleep(1.0)  # the survivor advances further while the frozen holder sleeps
    mark = third.mark()
    third.resume()
    third.wait_for_output(LOST_LEASE, timeout=15, since=mark)
    time.sleep(RENEW * 2)  # room for any stale write to land, if fencing failed

    writer.stop.set()
    writer.join(10)
    assert writer.error is None, writer.error
    for name in NAMES:
        wait_until(partial(caught_up, settings, name, writer.last[name]), 30, f"{name} to catch up")
    monitor.stopping.set()
    monitor.join(10)
    assert monitor.error is None, monitor.error

    assert not monitor.regressions, monitor.regressions
    for name in NAMES:
        writes = monitor.writes[name]
        for before, after in itertools.pairwise(writes):
            assert after.epoch >= before.epoch, f"{name}: epoch went back: {before} -> {after}"
            if after.by != before.by:
                assert after.epoch > before.epoch, f"{name}: two writers in one epoch: {after}"
        for write in writes:
            owner = monitor.lease_owner.get((name, write.epoch))
            writer_id = write.by or ""  # a write by no one matches no owner
            assert owner is None or owner.startswith(writer_id + ":"), (name, write, owner)
    for name in moved:
        late = [w for w in monitor.writes[name] if w.by == victim_id]
        assert all(w.epoch < monitor.writes[name][-1].epoch for w in late)
    writes = monitor.writes[frozen]
    takeover = next(
        i for i, w in enumerate(writes) if w.by == me(survivor) and w.epoch > stale_epoch
    )
    stale = [w for w in writes[takeover:] if w.by == me(third) and w.epoch <= stale_epoch]
    assert not stale, f"the thawed holder wrote with its old epoch: {stale}"

    for name in NAMES:
        docs = mongo_client[db][name].find()
        collection = chroma_server.client().get_collection(f"{name}-{suffix}")
        problem = oracle.mismatch(docs, collection, metadata_fields=METADATA)
        assert not problem, f"{name}: {problem}"

    for process in (survivor, third):
        process.terminate()
        assert process.wait(30) == 0, process.output()[-3000:]
    assert writer.count > 50
    mongo_client.drop_database(db)
    mongo_client.drop_database(cp_db)


@pytest.mark.timeout(120)
def test_a_replica_with_a_changed_mapping_stops_before_taking_a_pipeline(
    tmp_path, mongo_uri, mongo_client, chroma_server, mirror, syncd_factory
):
    # A second `syncd run` whose config changed the mapping (on_mapping_change =
    # "refuse") would be handed the pipeline by the healthy process, spreading the load,
    # and then stop with exit 2: the pipeline down until the first took it back, and again
    # on every restart of the bad replica. It stops before it joins instead.
    lease = {"ttl_s": TTL, "renew_every_s": RENEW}
    good = mirror("hamap", lease=lease)
    mongo_client[good.db]["docs"].insert_many([oracle.document(k) for k in range(3)])
    first = syncd_factory(["run"], good.cfg)
    wait_until(
        lambda: caught_up(good.settings, "p", mongo_client.admin.command("ping")["operationTime"]),
        60, "the first process to stream",
    )  # fmt: skip
    changed = make_mirror(tmp_path, mongo_uri, chroma_server, "hamap", lease=lease,
                          db=good.db, coll=good.coll, metadata=("title",))  # fmt: skip
    mark = first.mark()
    second = syncd_factory(["run"], changed.cfg)
    assert second.wait(60) == 2, second.output()
    assert "the pipeline's mapping changed since its records were written" in second.output()
    assert "Traceback" not in second.output()
    time.sleep(3 * RENEW)  # a hand-over, had the second process joined, happens by now
    assert "handing it over" not in first.output(mark), first.output(mark)
    assert first.is_running()
    mongo_client[good.db]["docs"].insert_one(oracle.document(3))
    wait_until(
        lambda: caught_up(good.settings, "p", mongo_client.admin.command("ping")["operationTime"]),
        60, "the first process to stream on",
    )  # fmt: skip
    problem = good.mismatch(mongo_client[good.db]["docs"].find())
    assert not problem, problem
