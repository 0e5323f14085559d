"""Invariant 3 where it was easy to lose: nothing is removed that still exists, nothing
stays searchable that cannot be mirrored, and verify, explain and the span log say the
same thing about it.

* An update without its document (`full_document = "whenAvailable"`, no post-images)
  is looked up, not taken for a deletion.
* An update that turns a document into poison under `dead_letter` removes its record
  and keeps the dead letter; a later change that applies removes the dead letter.
* Floats are compared as Chroma stores them, so verify comes back clean after repair."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import pipeline_table, settings_of, wait_caught_up, write_config
from .oracle import EMBEDDER, mismatch


def _vec(n: float) -> list[float]:
    return [1.0, n / 8, 0.25, -0.5]


def _setup(
    tmp_path: Path, mongo_uri: str, chroma_server: Any, metadata: list[str], **pipeline: Any
):
    db, coll = f"mirror_{uuid.uuid4().hex[:8]}", f"mirror-{uuid.uuid4().hex[:8]}"
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        extra={"lease": {"enabled": False}},
        pipelines=[
            pipeline_table(
                "p",
                db,
                chroma_collection=coll,
                mapping={"text": "body", "metadata": metadata},
                embedder=EMBEDDER,
                **pipeline,
            )
        ],
    )
    return cfg, settings_of(cfg), db, coll


def _doc(key: str, n: int, **fields: Any) -> dict[str, Any]:
    return {"_id": key, "body": f"text of {key}", "title": f"title {key}", "vec": _vec(n), **fields}


def _json(args: list[str], cfg: Path, code: int = ExitCode.OK) -> Any:
    done = run_syncd([*args, "--json"], cfg)
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_updates_without_their_document_are_looked_up(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    cfg, settings, db, coll_name = _setup(
        tmp_path, mongo_uri, chroma_server, ["title"], full_document="whenAvailable"
    )
    docs = mongo_client[db]["docs"]  # no changeStreamPreAndPostImages: updates come bare
    docs.insert_many([_doc(k, n) for n, k in enumerate("abcd")])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")

    docs.update_one({"_id": "a"}, {"$set": {"title": "renamed"}})
    docs.update_one({"_id": "b"}, {"$set": {"body": "rewritten"}})
    docs.update_one({"_id": "c"}, {"$set": {"title": "short-lived"}})
    docs.delete_one({"_id": "c"})  # its update finds nothing: gone, like the delete says
    docs.delete_one({"_id": "d"})
    wait_caught_up(mongo_client, db, settings, "p", 60, "the updates")
    collection = chroma_server.client().get_collection(coll_name)
    problem = mismatch(docs.find(), collection, metadata_fields=["title"])
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_an_update_into_poison_removes_the_record_and_keeps_the_dead_letter(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    cfg, settings, db, coll_name = _setup(
        tmp_path, mongo_uri, chroma_server, ["title"], on_error="dead_letter"
    )
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc("a", 0), _doc("b", 1)])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")
    collection = chroma_server.client().get_collection(coll_name)

    docs.update_one({"_id": "a"}, {"$unset": {"body": ""}})  # valid -> no text: poison
    wait_caught_up(mongo_client, db, settings, "p", 60, "the poison update")
    problem = mismatch(
        docs.find({"body": {"$exists": True}}), collection, metadata_fields=["title"]
    )
    assert not problem, problem  # s:a is gone: its text is gone
    assert [e["key"] for e in _json(["dlq", "list", "p"], cfg)] == ["s:a"]
    report = _json(["verify", "p"], cfg)
    assert report["consistent"] and report["unmappable"]["sample"] == ["s:a"], report
    story = _json(["explain", "p", "s:a"], cfg)
    assert story["consistent"] and story["chroma"] == [], story
    assert story["mapping_error"] and story["dead_letter"]["key"] == "s:a", story
    assert [s["outcome"] for s in story["recent_syncs"]] == ["dead-lettered: MappingError"], story

    docs.update_one({"_id": "a"}, {"$set": {"body": "text again"}})
    wait_caught_up(mongo_client, db, settings, "p", 60, "the fix")
    problem = mismatch(docs.find(), collection, metadata_fields=["title"])
    assert not problem, problem
    assert _json(["dlq", "list", "p"], cfg) == [], "an applied document keeps no dead letter"
    story = _json(["explain", "p", "s:a"], cfg)
    assert story["consistent"] and story["dead_letter"] is None, story
    outcomes = [s["outcome"] for s in story["recent_syncs"]]
    assert outcomes == ["dead-lettered: MappingError", "applied"], story
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_verify_and_explain_agree_on_the_record_of_an_unmappable_document(
    tmp_path, mongo_uri, mongo_client, chroma_server
):
    cfg, _, db, coll_name = _setup(tmp_path, mongo_uri, chroma_server, ["title"])
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc("a", 0), _doc("b", 1)])
    snap = run_syncd(["snapshot", "p"], cfg)
    assert snap.returncode == ExitCode.OK, snap.stdout + snap.stderr
    # Broken while nothing streams (as a halted pipeline would leave it): s:a's record
    # no longer mirrors anything.
    docs.update_one({"_id": "a"}, {"$set": {"body": {"not": "text"}}})

    report = _json(["verify", "p"], cfg, ExitCode.DRIFT_OR_FAILURE)
    assert report["orphaned"]["sample"] == ["s:a"] and report["unmappable"]["sample"] == ["s:a"]
    story = _json(["explain", "p", "s:a"], cfg, ExitCode.DRIFT_OR_FAILURE)
    assert not story["consistent"] and story["chroma"][0]["orphaned"], story
    text = run_syncd(["explain", "p", "s:a"], cfg)
    assert "s:a  ORPHANED" in text.stdout, text.stdout

    fixed = run_syncd(["repair", "p"], cfg)
    assert fixed.returncode == ExitCode.OK, fixed.stdout + fixed.stderr
    assert _json(["verify", "p"], cfg)["consistent"]
    assert _json(["explain", "p", "s:a"], cfg)["consistent"]
    collection = chroma_server.client().get_collection(coll_name)
    problem = mismatch(docs.find({"_id": "b"}), collection, metadata_fields=["title"])
    assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


# Values Chroma 1.5 gives back a unit or a few in the last place off (measured against
# the real server), and ones it keeps exactly.
ROUNDED = [-943305.0469559873, 443080.06468156516, 9.443133249767594e-76, 97597.52277630591]
EXACT = [0.1, 2.5, 1e300]


def test_floats_chroma_rounds_verify_clean_and_real_changes_still_show(
    tmp_path, mongo_uri, mongo_client, chroma_server
):
    cfg, _, db, coll_name = _setup(tmp_path, mongo_uri, chroma_server, ["title", "score", "scores"])
    docs = mongo_client[db]["docs"]
    values = ROUNDED + EXACT
    docs.insert_many(
        [_doc(f"d{i}", i, score=v, scores=[v, -109225.61189039715]) for i, v in enumerate(values)]
    )
    snap = run_syncd(["snapshot", "p"], cfg)
    assert snap.returncode == ExitCode.OK, snap.stdout + snap.stderr
    collection = chroma_server.client().get_collection(coll_name)
    got = collection.get(include=["metadatas"])
    stored = {rid: meta["score"] for rid, meta in zip(got["ids"], got["metadatas"], strict=True)}
    assert any(stored[f"s:d{i}"] != v for i, v in enumerate(ROUNDED)), "Chroma kept them all"

    report = _json(["verify", "p"], cfg)
    assert report["consistent"] and report["stale"]["count"] == 0, report
    problem = mismatch(docs.find(), collection, metadata_fields=["title", "score", "scores"])
    assert not problem, problem

    # A value changed in Chroma by hand (its hash kept) is still drift, and repair fixes it.
    collection.update(ids=["s:d0"], metadatas=[{"score": -943305.5}])
    report = _json(["verify", "p"], cfg, ExitCode.DRIFT_OR_FAILURE)
    assert report["stale"]["sample"] == ["s:d0"], report
    fixed = run_syncd(["repair", "p"], cfg)
    assert fixed.returncode == ExitCode.OK, fixed.stdout + fixed.stderr
    assert _json(["verify", "p"], cfg)["consistent"]
    problem = mismatch(docs.find(), collection, metadata_fields=["title", "score", "scores"])
    assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
