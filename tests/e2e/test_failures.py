"""Real faults under a steady workload: Chroma killed for a while, MongoDB killed and
restarted, connections to MongoDB cut and refused. In each case no event is lost,
the checkpoint does not move while syncd cannot apply, and the pipeline recovers by
itself: at the end Chroma equals MongoDB mapped."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from syncd.checkpoint import Checkpoint, open_store
from tests.harness.daemon import run_syncd

from . import oracle
from .helpers import caught_up, settings_of, wait_until, write_config

METADATA = ("title", "seq")
CHROMA_OUTAGE_S = 30.0  # the outage an operator would call long, as the design asks
MONGO_OUTAGE_S = 6.0


class Writer(threading.Thread):
    """Inserts, updates and deletes on one collection, rides out outages, and remembers
    the operation time of its last acknowledged write."""

    def __init__(self, uri: str, db: str) -> None:
        super().__init__(daemon=True)
        self.client: MongoClient[dict[str, Any]] = MongoClient(uri, serverSelectionTimeoutMS=1000)
        self.coll = self.client[db]["docs"]
        self.stop = threading.Event()
        self.count = 0
        self.failures = 0
        self.last_time: Timestamp | None = None

    def step(self, n: int) -> None:
        with self.client.start_session(causal_consistency=True) as session:
            kind = n % 5
            if kind <= 2:
                doc = {"_id": n, "body": f"body {n}", "seq": n, "vec": oracle.vector(n)}
                self.coll.insert_one(doc, session=session)
            elif kind == 3:
                update = {"$set": {"seq": n, "body": f"changed at {n}"}, "$unset": {"title": ""}}
                self.coll.update_one({"_id": n - 2}, update, session=session)
            else:
                self.coll.delete_one({"_id": n - 4}, session=session)
            op_time = session.operation_time
        if op_time is not None and (self.last_time is None or op_time > self.last_time):
            self.last_time = op_time

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                try:
                    self.step(n)
                    self.count += 1
                except PyMongoError:
                    self.failures += 1
                    self.stop.wait(0.2)
                self.stop.wait(0.02)
        finally:
            self.client.close()

    def finish(self) -> Timestamp:
        self.stop.set()
        self.join(30)
        assert self.last_time is not None and self.count > 50, "the workload did too little"
        return self.last_time


def _config(tmp_path: Path, mongo_uri: str, chroma_port: int, db: str, coll: str) -> Path:
    return write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": "127.0.0.1", "port": chroma_port, "timeout_s": 5},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            oracle.pipeline(
                "f", db, metadata=METADATA, chroma_collection=coll, retry_max_backoff_s=1.0
            )
        ],
    )


def _checkpoint(client: MongoClient[Any], cfg: Path) -> Checkpoint | None:
    return open_store(settings_of(cfg).checkpoint, client).load("f")


def _converged(client: MongoClient[Any], chroma: Any, db: str, coll: str) -> None:
    collection = chroma.client().get_collection(coll, embedding_function=None)
    problem = oracle.mismatch(client[db]["docs"].find(), collection, metadata_fields=METADATA)
    assert not problem, problem


def _hold_still(client: MongoClient[Any], cfg: Path, seconds: float, after: Timestamp) -> Any:
    """Poll the checkpoint for ``seconds``: it must not move, nor pass ``after``."""
    before = _checkpoint(client, cfg)
    assert before is not None and before.cluster_time is not None
    deadline = time.monotonic() + seconds
    polls = 0
    while time.monotonic() < deadline:
        cp = _checkpoint(client, cfg)
        assert cp is not None and cp.cluster_time == before.cluster_time, (
            f"checkpoint moved from {before.cluster_time} to {cp and cp.cluster_time} "
            "while syncd could not apply anything"
        )
        assert cp.cluster_time < after, "checkpoint passed a write made during the outage"
        polls += 1
        time.sleep(0.25)
    assert polls > 10
    return before


def _write_now(client: MongoClient[Any], db: str) -> Timestamp:
    with client.start_session(causal_consistency=True) as session:
        client[db]["docs"].insert_one(
            {"_id": f"marker-{uuid.uuid4().hex[:6]}", "body": "m", "vec": oracle.vector(0)},
            session=session,
        )
        assert session.operation_time is not None
        return session.operation_time


def _streaming_with_progress(client: MongoClient[Any], cfg: Path) -> bool:
    cp = _checkpoint(client, cfg)
    return cp is not None and cp.phase == "streaming" and cp.cluster_time is not None


@pytest.mark.timeout(240)
def test_chroma_outage_holds_the_checkpoint_and_recovers(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    db, coll = f"fail_{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    chroma = chroma_server_factory()
    cfg = _config(tmp_path, mongo_uri, chroma.port, db, coll)
    writer = Writer(mongo_uri, db)
    writer.start()
    daemon = syncd_factory(["run"], cfg)
    try:
        wait_until(lambda: _streaming_with_progress(mongo_client, cfg), 60, "streaming")
        time.sleep(2)
        chroma.kill()
        down_at = time.monotonic()
        daemon.wait_for_output(r"retrying in [\d.]+s after transient error", timeout=30)
        after = _write_now(mongo_client, db)
        status = run_syncd(["status", "--json"], cfg)  # also part of the outage
        (row,) = json.loads(status.stdout)
        assert row["state"] == "retrying", row
        assert "Chroma unavailable" in row["last_error"]["error"]
        remaining = CHROMA_OUTAGE_S - (time.monotonic() - down_at)
        _hold_still(mongo_client, cfg, max(remaining, 5.0), after)
        chroma.start()
        time.sleep(2)
        last = writer.finish()
        wait_until(lambda: caught_up(settings_of(cfg), "f", last), 90, "recovery")
        daemon.wait_for_output(r"recovered after \d+ attempts?", timeout=30)
        cp = _checkpoint(mongo_client, cfg)
        assert cp is not None and cp.status["state"] == "streaming", cp and cp.status
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
    finally:
        writer.stop.set()
    _converged(mongo_client, chroma, db, coll)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(240)
def test_mongodb_killed_and_restarted(tmp_path, mongo_server_factory, chroma_server, syncd_factory):
    server = mongo_server_factory()
    db, coll = f"fail_{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path, server.uri, chroma_server.port, db, coll)
    client: MongoClient[Any] = MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    writer = Writer(server.uri, db)
    writer.start()
    daemon = syncd_factory(["run"], cfg)
    try:
        wait_until(lambda: _streaming_with_progress(client, cfg), 60, "streaming")
        time.sleep(2)
        before = _checkpoint(client, cfg)
        server.kill()
        daemon.wait_for_output(r"retrying in [\d.]+s after transient error", timeout=30)
        time.sleep(MONGO_OUTAGE_S)
        assert daemon.is_running(), daemon.output()
        server.start()
        after_restart = _checkpoint(client, cfg)
        assert before is not None and after_restart is not None
        assert after_restart.cluster_time is not None and before.cluster_time is not None
        assert after_restart.cluster_time >= before.cluster_time
        time.sleep(3)
        last = writer.finish()
        assert writer.failures > 0, "the writer never noticed the outage"
        wait_until(lambda: caught_up(settings_of(cfg), "f", last), 90, "recovery")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
        _converged(client, chroma_server, db, coll)
    finally:
        writer.stop.set()
        client.close()


@pytest.mark.timeout(240)
def test_connections_to_mongodb_cut_and_refused(
    tmp_path,
    mongo_server,
    mongo_uri,
    mongo_client,
    chroma_server,
    syncd_factory,
    tcp_proxy_factory,
):
    if mongo_server.kind == "external":
        pytest.skip("the proxy needs a MongoDB reachable at one address")
    proxy = tcp_proxy_factory(mongo_server.host, mongo_server.port)
    db, coll = f"fail_{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    via_proxy = f"mongodb://{proxy.address}/?directConnection=true"
    cfg = _config(tmp_path, via_proxy, chroma_server.port, db, coll)
    writer = Writer(mongo_uri, db)  # the application reaches MongoDB directly
    writer.start()
    daemon = syncd_factory(["run"], cfg)
    try:
        wait_until(lambda: _streaming_with_progress(mongo_client, cfg), 60, "streaming")
        for _ in range(3):
            time.sleep(1.5)
            assert proxy.cut() > 0
        proxy.refuse(True)
        proxy.cut()
        daemon.wait_for_output(r"retrying in [\d.]+s after transient error", timeout=30)
        after = _write_now(mongo_client, db)
        _hold_still(mongo_client, cfg, 5.0, after)
        proxy.heal()
        time.sleep(2)
        last = writer.finish()
        wait_until(lambda: caught_up(settings_of(cfg), "f", last), 90, "recovery")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
    finally:
        writer.stop.set()
    _converged(mongo_client, chroma_server, db, coll)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


SIGTERM_BOUND_S = 15.0  # what a supervisor may wait: well inside shutdown_timeout_s (25)


@pytest.mark.timeout(180)
def test_a_sigterm_during_a_mongodb_outage_ends_the_process_promptly(
    tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    """With MongoDB gone, nothing is in flight to drain: the bookkeeping a stop does
    against MongoDB (the checkpoint, the leases) must not hold the process for each
    call's full server-selection wait."""
    server = mongo_server_factory()
    db, coll = f"fail_{uuid.uuid4().hex[:8]}", f"fail-{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path, server.uri, chroma_server.port, db, coll)
    client: MongoClient[Any] = MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    daemon = syncd_factory(["run"], cfg)
    try:
        client[db]["docs"].insert_one({"_id": 1, "body": "one", "seq": 1, "vec": oracle.vector(1)})
        wait_until(lambda: _streaming_with_progress(client, cfg), 60, "streaming")
        server.kill()
        daemon.wait_for_output(r"retrying in [\d.]+s after transient error", timeout=30)
        began = time.monotonic()
        daemon.terminate()
        code = daemon.wait(60)
        took = time.monotonic() - began
        assert code == 0, daemon.output()
        assert took < SIGTERM_BOUND_S, f"SIGTERM took {took:.1f} s\n{daemon.output()}"
    finally:
        client.close()
