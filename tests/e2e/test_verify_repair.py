"""Drift injected straight into a real Chroma server: `verify` names exactly those
records, `repair --dry-run` changes nothing, `repair` fixes them, and a second
`verify` exits 0 with Chroma equal to MongoDB mapped. Repair run again and again while
the daemon streams a mixed load leaves nothing older than MongoDB behind."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from typing import Any

import pytest
from pymongo import MongoClient

from tests.harness.daemon import run_syncd

from . import oracle
from .helpers import wait_caught_up
from .oracle import DIMENSIONS, vector

PUBLIC = {"kind": {"$ne": "private"}}  # the pipeline's filter
# Enough keys that a record repair got wrong is rarely rewritten by a later change
# before the load stops.
KEYS = 200
REPAIRS = 3


def test_verify_reports_injected_drift_and_repair_fixes_it(mirror, mongo_client):
    m = mirror("verify", name="v", lease=None, filter=PUBLIC)
    cfg = m.cfg
    docs = mongo_client[m.db]["docs"]
    docs.insert_many(
        [
            {"_id": f"d{i:02}", "body": f"body {i}", "title": f"t{i}", "n": i, "vec": vector(i)}
            for i in range(40)
        ]
    )
    docs.insert_one(
        {"_id": "secret", "body": "not for Chroma", "kind": "private", "vec": vector(99)}
    )
    snap = run_syncd(["snapshot", "v"], cfg)
    assert snap.returncode == 0, snap.stderr

    collection = m.collection()
    zero = [0.0] * DIMENSIONS
    collection.delete(ids=["s:d01", "s:d02"])  # missing
    collection.update(ids=["s:d03"], metadatas=[{"title": "tampered", "extra": 1}])  # stale
    collection.update(ids=["s:d04"], documents=["tampered"], embeddings=[zero])  # stale
    collection.add(  # orphans: an unknown document, and an id syncd never writes
        ids=["s:ghost", "not-a-syncd-id"],
        documents=["boo", "boo"],
        embeddings=[zero, zero],
        metadatas=[{"syncd_id": "s:ghost"}, {"a": 1}],
    )
    docs.delete_one({"_id": "d05"})  # deleted while no daemon ran: its record is an orphan
    docs.update_one({"_id": "d06"}, {"$set": {"kind": "private"}})  # left the filter: orphan
    docs.update_one({"_id": "d07"}, {"$set": {"title": "new"}})  # changed: stale

    found = run_syncd(["verify", "v", "--json"], cfg)
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert sorted(report["missing"]["sample"]) == ["s:d01", "s:d02"]
    assert sorted(report["stale"]["sample"]) == ["s:d03", "s:d04", "s:d07"]
    assert sorted(report["orphaned"]["sample"]) == ["not-a-syncd-id", "s:d05", "s:d06", "s:ghost"]
    assert report["documents"] == 38

    verbose = run_syncd(["repair", "v", "--dry-run", "--verbose"], cfg)
    assert verbose.returncode == 1, verbose.stdout + verbose.stderr
    assert "would re-apply 5 document(s) from MongoDB and delete 4 orphaned record(s)" in (
        verbose.stdout
    )
    assert "  would re-apply s:d01" in verbose.stdout and "  would delete s:ghost" in verbose.stdout
    dry = run_syncd(["repair", "v", "--dry-run", "--json"], cfg)
    assert dry.returncode == 1, dry.stdout + dry.stderr
    plan = json.loads(dry.stdout)
    assert sorted(plan["reapply"]["sample"]) == ["s:d01", "s:d02", "s:d03", "s:d04", "s:d07"]
    assert sorted(plan["delete"]["sample"]) == sorted(report["orphaned"]["sample"])
    untouched = collection.get(ids=["s:d01", "s:ghost", "s:d03"], include=["metadatas"])
    assert sorted(untouched["ids"]) == ["s:d03", "s:ghost"], "--dry-run changed Chroma"
    assert untouched["metadatas"][untouched["ids"].index("s:d03")]["title"] == "tampered"

    fixed = run_syncd(["repair", "v"], cfg)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    # A summary; the ids only with --verbose.
    assert (
        "re-applied 5 document(s) from MongoDB, deleted 4 orphaned record(s), "
        "0 document(s) could not be repaired"
    ) in fixed.stdout, fixed.stdout
    assert "--verbose lists the ids" in fixed.stdout
    assert not [line for line in fixed.stdout.splitlines() if line.startswith("  re-apply")]
    again = run_syncd(["verify", "v"], cfg)
    assert again.returncode == 0, again.stdout + again.stderr
    sampled = run_syncd(["verify", "v", "--sample", "20", "--json"], cfg)
    assert sampled.returncode == 0, sampled.stdout + sampled.stderr
    sample = json.loads(sampled.stdout)
    assert sample["sampled"] and 1 <= sample["documents"] <= 20
    assert sample["records"] == sample["documents"], sample  # one record per document
    sampled_text = run_syncd(["verify", "v", "--sample", "20"], cfg)
    assert re.search(r"(\d+) sampled documents, \1 Chroma records", sampled_text.stdout), (
        sampled_text.stdout
    )
    problem = m.mismatch(docs.find(PUBLIC))
    assert not problem, problem


class MixedLoad(threading.Thread):
    """Inserts, $set/$unset updates, replaces, deletes, re-inserts and filter flips on a
    few keys, so that documents change while repair reads and writes them."""

    def __init__(self, uri: str, db: str, keys: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.client: MongoClient[dict[str, Any]] = MongoClient(uri)
        self.docs = self.client[db]["docs"]
        self.rng = random.Random(seed)
        self.keys = keys
        self.version = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def step(self) -> None:
        rng, docs = self.rng, self.docs
        self.version += 1
        key = rng.randrange(self.keys)
        roll = rng.random()
        if roll < 0.2:
            docs.delete_one({"_id": key})
        elif roll < 0.4 or docs.count_documents({"_id": key}) == 0:
            docs.replace_one(
                {"_id": key}, oracle.document(key, version=self.version % 5), upsert=True
            )
        elif roll < 0.6:
            docs.update_one({"_id": key}, {"$set": {"body": f"set {self.version}"}})
        elif roll < 0.7:
            docs.update_one({"_id": key}, {"$unset": {"tags": ""}, "$set": {"n": self.version}})
        elif roll < 0.85:
            docs.update_one({"_id": key}, {"$set": {"kind": "private"}})  # leaves the filter
        else:
            docs.update_one({"_id": key}, {"$unset": {"kind": ""}})  # comes back

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                time.sleep(0.003)
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.client.close()


@pytest.mark.slow
def test_repair_on_a_live_pipeline_never_leaves_an_older_state_behind(
    mirror, mongo_uri, mongo_client, syncd_factory
):
    m = mirror("live_repair", name="live", lease=None, filter=PUBLIC, snapshot_batch_size=50)
    mongo_client[m.db]["docs"].insert_many([oracle.document(k) for k in range(KEYS)])
    daemon = syncd_factory(["run"], m.cfg)
    daemon.wait_for_output(r"-> streaming", timeout=120)
    load = MixedLoad(mongo_uri, m.db, KEYS, seed=11)
    load.start()
    repairs = []
    try:
        for _ in range(REPAIRS):
            # Drift that is not in flight: a record the daemon will never touch.
            m.collection().upsert(ids=["s:ghost"], documents=["boo"], embeddings=[[0.0] * 4])
            run = run_syncd(["repair", "live", "--json"], m.cfg, timeout=180)
            assert run.returncode == 0, run.stdout + run.stderr
            repairs.append(json.loads(run.stdout))
    finally:
        load.stop.set()
        load.join(10)
    assert load.error is None, load.error
    assert load.version > 200, "the load did too little to mean anything"
    assert all(r["delete"]["count"] >= 1 for r in repairs), repairs  # each repair did work

    wait_caught_up(mongo_client, m.db, m.settings, "live", 120, "syncd to catch up")
    live = [d for d in mongo_client[m.db]["docs"].find() if d.get("kind") != "private"]
    problem = m.mismatch(live)
    assert not problem, f"repair left drift behind on a live pipeline:\n{problem}"
    verified = run_syncd(["verify", "live"], m.cfg)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
