"""Drift injected straight into a real Chroma server: `verify` names exactly those
records, `repair --dry-run` changes nothing, `repair` fixes them, and a second
`verify` exits 0 with Chroma equal to MongoDB mapped."""

from __future__ import annotations

import json
import re

from tests.harness.daemon import run_syncd

from .oracle import DIMENSIONS, vector

PUBLIC = {"kind": {"$ne": "private"}}  # the pipeline's filter


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
