"""Invariant 9: every lookup by `_id` goes through the record id, never Python equality.

NaN is not equal to itself, Python has `True == 1 == 1.0` where BSON tells a boolean
from a number, and Decimal128 cannot be hashed. Documents with such `_id`s must be
copied, streamed, verified, explained and dead-lettered like any other."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from bson import Decimal128, Int64
from pymongo.errors import DuplicateKeyError

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up
from .oracle import DIMENSIONS, vector

NAN = float("nan")


def _doc(source_id: Any, n: int, body: str | None = None) -> dict[str, Any]:
    return {"_id": source_id, "body": body or f"document {n}", "title": f"t{n}", "vec": vector(n)}


def test_ids_python_cannot_compare_are_copied_verified_and_explained(
    mirror, mongo_client, chroma_server, syncd_factory
):
    # One document per scan page: the scan resumes after each of these ids in turn.
    m = mirror("ids", metadata=["title"], snapshot_batch_size=1)
    cfg, settings, db, coll_name = m.cfg, m.settings, m.db, m.coll
    docs = mongo_client[db]["docs"]
    ids = [NAN, True, 1, -0.0, Decimal128("2.5"), Int64(7), 3.0, "s"]
    docs.insert_many([_doc(source_id, n) for n, source_id in enumerate(ids)])
    # A record left from a document whose _id was the integer 3: MongoDB finds the double
    # 3.0 when asked for 3, but 3.0 is another document with another record id.
    chroma = chroma_server.client()
    stale = chroma.create_collection(
        coll_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    stale.add(
        ids=["i:3"], documents=["old"], embeddings=[[0.5] * DIMENSIONS],
        metadatas=[{"syncd_id": "i:3"}],
    )  # fmt: skip

    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    collection = chroma.get_collection(coll_name)
    assert sorted(collection.get()["ids"]) == sorted(
        ["f:nan", "b:true", "i:1", "f:-0.0", "dec:2.5", "i:7", "f:3.0", "s:s"]
    )
    problem = m.mismatch(docs.find())
    assert not problem, problem

    verified = run_syncd(["verify", "p", "--json"], cfg)
    assert verified.returncode == ExitCode.OK, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["documents"] == len(ids)
    for record_id in ("f:nan", "dec:2.5", "b:true"):
        explained = run_syncd(["explain", "p", record_id, "--json"], cfg)
        assert explained.returncode == ExitCode.OK, explained.stdout + explained.stderr
        story = json.loads(explained.stdout)
        assert story["mongodb"] is not None and story["consistent"], story
        assert [r["id"] for r in story["chroma"]] == [record_id]


def test_poison_changes_are_looked_up_by_record_id(tmp_path, mirror, mongo_client, syncd_factory):
    # Two changes per batch: True and 1 come back from one lookup and must not collide.
    m = mirror("ids", metadata=["title"], on_error="dead_letter", batch_size=2)
    cfg, settings, db = m.cfg, m.settings, m.db
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(True, 0), _doc(1, 1), _doc(NAN, 2), _doc("other", 3)])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # While syncd is stopped: True and 1 are replaced by documents without text and then
    # fixed, so their replace events carry poison that a lookup finds fixed. NaN's
    # document stays without text: it is a dead letter, and its old record must go.
    for source_id in (True, 1):
        docs.replace_one({"_id": source_id}, {"title": "no text yet", "vec": vector(9)})
    docs.replace_one({"_id": NAN}, {"title": "no text", "vec": vector(9)})
    docs.update_one({"_id": True}, {"$set": {"body": "fixed true"}})
    docs.update_one({"_id": 1}, {"$set": {"body": "fixed one"}})

    daemon = syncd_factory(["run"], cfg, log_path=tmp_path / "second.log")
    wait_caught_up(mongo_client, db, settings, "p", 60, "the replayed changes")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    problem = m.mismatch(docs.find({"body": {"$exists": True}}))
    assert not problem, problem

    listed = run_syncd(["dlq", "list", "p", "--json"], cfg)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert [e["key"] for e in json.loads(listed.stdout)] == ["f:nan"]
    verified = run_syncd(["verify", "p", "--json"], cfg)
    assert verified.returncode == ExitCode.OK, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["unmappable"]["sample"] == ["f:nan"]


def test_the_readme_says_which_ids_mongodb_tells_apart(mongo_client) -> None:
    """`true` and `1` are two documents; `1` and `1.0` (equal in value) are one `_id`."""
    coll = mongo_client[f"ids_{uuid.uuid4().hex[:8]}"]["docs"]
    coll.insert_one({"_id": 1})
    coll.insert_one({"_id": True})
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 1.0})
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    assert "three `_id`s" not in readme
    assert "`true` and `1` are two `_id`s to MongoDB" in readme
    assert "`1` and `1.0`, are one `_id`" in readme
