"""Invariant 4: a snapshot killed midway resumes its scan, writes racing it are kept,
and `syncd snapshot` removes records whose documents are gone."""

from __future__ import annotations

import random
import threading
from typing import Any

from pymongo import MongoClient

from syncd.embedder import HashingEmbedder
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


HASHED_DIMENSIONS = 16
HASHING = {"kind": "hashing", "dimensions": HASHED_DIMENSIONS}
MANY = 2500  # two and a half pages of Chroma's scan (1,000 records a page)


def _hashed(text: str) -> list[float]:
    """The vector the hashing embedder makes of a text (what the test embedding API serves)."""
    return HashingEmbedder(HASHED_DIMENSIONS).embed([text])[0]


def _mirrors(m: Any, docs: Any) -> str:
    return m.mismatch(docs.find(), embed=_hashed)


def _verify_clean(m: Any) -> None:
    result = run_syncd(["verify", m.name], config=m.cfg, timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "consistent" in result.stdout.splitlines()[-1], result.stdout


def test_snapshot_removes_orphans_interleaved_over_many_pages(mirror, mongo_client):
    # Every other record is an orphan, more than a page of them: deleting one page's
    # orphans before reading the next must not make the scan skip records.
    m = mirror("orph", name="orph", metadata=(), embedder=HASHING)
    docs = mongo_client[m.db]["docs"]
    docs.insert_many([{"_id": i, "body": f"doc {i}"} for i in range(MANY)])
    first = run_syncd(["snapshot", "orph"], config=m.cfg, timeout=300)
    assert first.returncode == 0, first.stderr + first.stdout
    assert m.collection().count() == MANY

    gone = docs.delete_many({"_id": {"$mod": [2, 1]}}).deleted_count
    assert gone == MANY // 2
    again = run_syncd(["snapshot", "orph"], config=m.cfg, timeout=300)
    assert again.returncode == 0, again.stderr + again.stdout
    problem = _mirrors(m, docs)
    assert not problem, problem
    assert f"snapshot removed {gone} orphaned records" in again.stdout + again.stderr
    _verify_clean(m)


def test_resync_removes_orphans_interleaved_over_many_pages(mirror, mongo_client, syncd_factory):
    # `syncd run --resync` (a changed mapping) re-snapshots through the same orphan check.
    m = mirror("orph", name="orph", metadata=(), embedder=HASHING)
    docs = mongo_client[m.db]["docs"]
    docs.insert_many([{"_id": i, "body": f"doc {i}", "n": i} for i in range(MANY)])
    first = run_syncd(["snapshot", "orph"], config=m.cfg, timeout=300)
    assert first.returncode == 0, first.stderr + first.stdout

    # Deleted while nothing streams: only the re-snapshot can find these records.
    gone = docs.delete_many({"_id": {"$mod": [2, 0]}}).deleted_count
    assert gone > 1000
    changed = mirror("orph", name="orph", metadata=["n"], embedder=HASHING, db=m.db, coll=m.coll)
    resync = syncd_factory(["run", "--resync"], changed.cfg)
    wait_caught_up(mongo_client, m.db, changed.settings, "orph", 300, "the re-snapshot")
    resync.terminate()
    assert resync.wait(30) == ExitCode.OK, resync.output()
    problem = _mirrors(changed, docs)
    assert not problem, problem
    assert f"snapshot removed {gone} orphaned records" in resync.output()
    _verify_clean(changed)
