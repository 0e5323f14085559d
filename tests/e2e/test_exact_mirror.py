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
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up
from .oracle import vector


def _doc(key: str, n: int, **fields: Any) -> dict[str, Any]:
    doc = {"_id": key, "body": f"text of {key}", "title": f"title {key}", "vec": vector(n)}
    return {**doc, **fields}


def _json(args: list[str], cfg: Path, code: int = ExitCode.OK) -> Any:
    done = run_syncd([*args, "--json"], cfg)
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)


def test_updates_without_their_document_are_looked_up(mirror, mongo_client, syncd_factory):
    m = mirror("mirror", metadata=["title"], full_document="whenAvailable")
    cfg, settings, db = m.cfg, m.settings, m.db
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
    problem = m.mismatch(docs.find())
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def test_an_update_into_poison_removes_the_record_and_keeps_the_dead_letter(
    mirror, mongo_client, syncd_factory
):
    m = mirror("mirror", metadata=["title"], on_error="dead_letter")
    cfg, settings, db = m.cfg, m.settings, m.db
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc("a", 0), _doc("b", 1)])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the snapshot")

    docs.update_one({"_id": "a"}, {"$unset": {"body": ""}})  # valid -> no text: poison
    wait_caught_up(mongo_client, db, settings, "p", 60, "the poison update")
    problem = m.mismatch(docs.find({"body": {"$exists": True}}))
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
    problem = m.mismatch(docs.find())
    assert not problem, problem
    assert _json(["dlq", "list", "p"], cfg) == [], "an applied document keeps no dead letter"
    story = _json(["explain", "p", "s:a"], cfg)
    assert story["consistent"] and story["dead_letter"] is None, story
    outcomes = [s["outcome"] for s in story["recent_syncs"]]
    assert outcomes == ["dead-lettered: MappingError", "applied"], story
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def test_verify_and_explain_agree_on_the_record_of_an_unmappable_document(mirror, mongo_client):
    m = mirror("mirror", metadata=["title"])
    cfg, db = m.cfg, m.db
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
    problem = m.mismatch(docs.find({"_id": "b"}))
    assert not problem, problem


# Values Chroma 1.5 gives back a unit or a few in the last place off (measured against
# the real server), and ones it keeps exactly.
ROUNDED = [-943305.0469559873, 443080.06468156516, 9.443133249767594e-76, 97597.52277630591]
EXACT = [0.1, 2.5, 1e300]


def test_floats_chroma_rounds_verify_clean_and_real_changes_still_show(mirror, mongo_client):
    m = mirror("mirror", metadata=["title", "score", "scores"])
    cfg, db = m.cfg, m.db
    docs = mongo_client[db]["docs"]
    values = ROUNDED + EXACT
    docs.insert_many(
        [_doc(f"d{i}", i, score=v, scores=[v, -109225.61189039715]) for i, v in enumerate(values)]
    )
    snap = run_syncd(["snapshot", "p"], cfg)
    assert snap.returncode == ExitCode.OK, snap.stdout + snap.stderr
    collection = m.collection()
    got = collection.get(include=["metadatas"])
    stored = {rid: meta["score"] for rid, meta in zip(got["ids"], got["metadatas"], strict=True)}
    assert any(stored[f"s:d{i}"] != v for i, v in enumerate(ROUNDED)), "Chroma kept them all"

    report = _json(["verify", "p"], cfg)
    assert report["consistent"] and report["stale"]["count"] == 0, report
    problem = m.mismatch(docs.find())
    assert not problem, problem

    # A value changed in Chroma by hand (its hash kept) is still drift, and repair fixes it.
    collection.update(ids=["s:d0"], metadatas=[{"score": -943305.5}])
    report = _json(["verify", "p"], cfg, ExitCode.DRIFT_OR_FAILURE)
    assert report["stale"]["sample"] == ["s:d0"], report
    fixed = run_syncd(["repair", "p"], cfg)
    assert fixed.returncode == ExitCode.OK, fixed.stdout + fixed.stderr
    assert _json(["verify", "p"], cfg)["consistent"]
    problem = m.mismatch(docs.find())
    assert not problem, problem
