"""Invariant 4: a snapshot killed midway resumes its scan, writes racing it are kept,
and `syncd snapshot` removes records whose documents are gone."""

from __future__ import annotations

import random
import threading
import uuid
from typing import Any

from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import (
    chroma_records,
    diff,
    expected_records,
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

DOCS = 4000


def _scanned(settings: Any) -> int:
    cp = load_checkpoint(settings, "snap")
    if cp is None or cp.snapshot is None:
        return 0
    return cp.snapshot.scanned


def test_killed_snapshot_resumes_and_racing_writes_survive(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"snap_{uuid.uuid4().hex[:8]}"
    coll_name = f"snap-{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        extra={"lease": {"enabled": False}},
        pipelines=[
            pipeline_table(
                "snap",
                db,
                chroma_collection=coll_name,
                snapshot_batch_size=50,
                filter={"hidden": {"$ne": True}},
            )
        ],
    )
    settings = settings_of(cfg)
    docs = mongo_client[db]["docs"]
    docs.insert_many([{"_id": i, "body": f"document {i}", "n": i} for i in range(DOCS)])

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
                        {"_id": i}, {"body": f"upserted {i}", "n": -i}, upsert=True
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

    chroma = chroma_server.client().get_collection(coll_name)
    expected = expected_records(settings, "snap", list(docs.find()))
    problem = diff(expected, chroma_records(chroma))
    assert not problem, problem

    # `syncd snapshot` on demand: orphans (records whose documents vanished while
    # nothing was streaming) are removed, and the pipeline is consistent again.
    chroma.upsert(
        ids=["i:999999"],
        documents=["an orphan"],
        embeddings=[[0.1] * 32],
        metadatas=[{"syncd_id": "i:999999"}],
    )
    result = run_syncd(["snapshot", "snap"], config=cfg, timeout=180)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "complete" in result.stdout
    assert chroma.get(ids=["i:999999"])["ids"] == []
    problem = diff(expected, chroma_records(chroma))
    assert not problem, problem
