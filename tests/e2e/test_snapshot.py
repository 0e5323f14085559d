"""Invariant 4: a snapshot killed midway resumes its scan, writes racing it are kept,
and `syncd snapshot` removes records whose documents are gone."""

from __future__ import annotations

import random
import threading
from typing import Any

from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import load_checkpoint, wait_caught_up, wait_until
from .oracle import DIMENSIONS, vector

DOCS = 4000
VISIBLE = {"hidden": {"$ne": True}}  # the pipeline's filter


def _scanned(settings: Any) -> int:
    cp = load_checkpoint(settings, "snap")
    if cp is None or cp.snapshot is None:
        return 0
    return cp.snapshot.scanned


def test_killed_snapshot_resumes_and_racing_writes_survive(
    mirror, mongo_uri, mongo_client, syncd_factory
):
    m = mirror("snap", name="snap", snapshot_batch_size=50, filter=VISIBLE)
    cfg, settings, db = m.cfg, m.settings, m.db
    docs = mongo_client[db]["docs"]
    docs.insert_many(
        [{"_id": i, "body": f"document {i}", "n": i, "vec": vector(i)} for i in range(DOCS)]
    )

    stop = threading.Event()
    errors: list[BaseException] = []

    def race() -> None:
        rng = random.Random(5)
        client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
        try:
            while not stop.is_set():
                i = rng.randrange(DOCS + 500)
                roll = rng.random()
                if roll < 0.3:
                    client[db]["docs"].update_one(
                        {"_id": i}, {"$set": {"body": f"raced {rng.random()}"}}
                    )
                elif roll < 0.5:
                    client[db]["docs"].delete_one({"_id": i})
                elif roll < 0.7:
                    # Hide a document: it stops matching the filter.
                    client[db]["docs"].update_one({"_id": i}, {"$set": {"hidden": True}})
                else:
                    client[db]["docs"].replace_one(
                        {"_id": i},
                        {"body": f"upserted {i}", "n": -i, "vec": vector(-i)},
                        upsert=True,
                    )
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    racer = threading.Thread(target=race, daemon=True)
    racer.start()
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _scanned(settings) >= 600, 120, "the scan to get going")
    daemon.kill()
    at_kill = _scanned(settings)
    assert 0 < at_kill < DOCS, at_kill

    daemon.start()
    progress = [at_kill]

    def scan_moved_on() -> bool:
        cp = load_checkpoint(settings, "snap")
        if cp is None:
            return False
        if cp.snapshot is not None:
            progress.append(cp.snapshot.scanned)
        return cp.phase == "streaming"

    wait_until(scan_moved_on, 180, "the snapshot to finish")
    assert min(progress) >= at_kill, f"the scan restarted from zero: {progress}"
    stop.set()
    racer.join(10)
    assert not errors, errors
    wait_caught_up(mongo_client, db, settings, "snap", 120, "racing writes replayed")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    chroma = m.collection()
    problem = m.mismatch(docs.find(VISIBLE))
    assert not problem, problem

    # `syncd snapshot` on demand: orphans (records whose documents vanished while
    # nothing was streaming) are removed, and the pipeline is consistent again.
    chroma.upsert(
        ids=["i:999999"],
        documents=["an orphan"],
        embeddings=[[0.1] * DIMENSIONS],
        metadatas=[{"syncd_id": "i:999999"}],
    )
    result = run_syncd(["snapshot", "snap"], config=cfg, timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "complete" in result.stdout
    assert chroma.get(ids=["i:999999"])["ids"] == []
    problem = m.mismatch(docs.find(VISIBLE))
    assert not problem, problem
