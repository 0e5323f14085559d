"""Dead letters across `syncd rebuild`: those the build records become the pipeline's at
the switch (and `syncd dlq retry` applies them once fixed), the previous collection's
come back with it on `--rollback`."""

from __future__ import annotations

import json
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up
from .oracle import document

OLD_MAX, NEW_MAX = 30, 40  # characters of text each mapping takes (`max_text_chars`)


def _keys(cfg: Any) -> list[str]:
    listed = run_syncd(["dlq", "list", "p", "--json"], cfg)
    assert listed.returncode == ExitCode.OK, listed.stdout + listed.stderr
    return sorted(entry["key"] for entry in json.loads(listed.stdout))


def test_dead_letters_follow_their_collection_through_switch_and_rollback(
    mirror, mongo_client, syncd_factory
):
    old = mirror("rbdlq", on_error="dead_letter", mapping={"max_text_chars": OLD_MAX})
    new = mirror(
        "rbdlq",
        db=old.db,
        coll=old.coll,
        metadata=["n"],
        on_error="dead_letter",
        mapping={"max_text_chars": NEW_MAX},
    )
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(20)])
    # Too long for the old mapping only, and for both.
    docs.insert_one(dict(document("long-old"), body="o" * (OLD_MAX + 5)))
    docs.insert_one(dict(document("long-new"), body="n" * (NEW_MAX + 5)))
    daemon = syncd_factory(["run"], old.cfg)
    wait_caught_up(mongo_client, old.db, old.settings, "p", 90, "the first copy")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    assert _keys(old.cfg) == ["s:long-new", "s:long-old"]

    done = run_syncd(["rebuild", "p"], new.cfg, timeout=180)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    # What the new collection lacks, and only that, is listed as the pipeline's.
    assert _keys(new.cfg) == ["s:long-new"]
    problem = new.mismatch(docs.find({"_id": {"$ne": "long-new"}}))
    assert not problem, problem

    docs.update_one({"_id": "long-new"}, {"$set": {"body": "fixed"}})
    retried = run_syncd(["dlq", "retry", "p"], new.cfg)
    assert retried.returncode == ExitCode.OK, retried.stdout + retried.stderr
    assert _keys(new.cfg) == []
    problem = new.mismatch(docs.find())
    assert not problem, problem

    # A rollback brings back the previous collection's dead letters; the daemon with the
    # old mapping replays the fix since the switch and settles that one.
    back = run_syncd(["rebuild", "p", "--rollback"], new.cfg, timeout=120)
    assert back.returncode == ExitCode.OK, back.stdout + back.stderr
    assert _keys(old.cfg) == ["s:long-new", "s:long-old"]
    daemon = syncd_factory(["run"], old.cfg)
    wait_caught_up(mongo_client, old.db, old.settings, "p", 90, "the rolled-back pipeline")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    assert _keys(old.cfg) == ["s:long-old"]
    problem = old.mismatch(docs.find({"_id": {"$ne": "long-old"}}))
    assert not problem, problem

    # Going forward again and dropping the previous collection leaves no dead letter of
    # it behind.
    forward = run_syncd(["rebuild", "p", "--rollback"], new.cfg, timeout=120)
    assert forward.returncode == ExitCode.OK, forward.stdout + forward.stderr
    assert _keys(new.cfg) == []
    drop = run_syncd(["rebuild", "p", "--drop-previous"], new.cfg, timeout=120)
    assert drop.returncode == ExitCode.OK, drop.stdout + drop.stderr
    left = mongo_client[f"{old.db}_syncd"]["dead_letters"].distinct("pipeline")
    assert left == [], left
