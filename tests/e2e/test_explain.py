"""`syncd explain PIPELINE ID` against a real daemon's result: a synced document, one
whose Chroma record was changed behind syncd's back, a deleted one, and a bad id."""

from __future__ import annotations

import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up


def test_explain_shows_verdicts_and_recent_syncs(mongo_client, mirror, syncd_factory):
    m = mirror("explain", name="ex", embedder={"kind": "hashing", "dimensions": 32})
    db, cfg, settings = m.db, m.cfg, m.settings
    docs = mongo_client[db]["docs"]
    docs.insert_many(
        [{"_id": i, "body": f"body {i}", "title": f"title {i}", "n": i} for i in (1, 2, 3, 4)]
    )
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "ex", 60, "snapshot")
    docs.update_one({"_id": 1}, {"$set": {"title": "renamed"}})  # a streamed change
    docs.delete_one({"_id": 3})
    wait_caught_up(mongo_client, db, settings, "ex", 60, "changes")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # Change two records directly in Chroma, keeping syncd's hash: the text of one, a
    # metadata value of the other. (Embeddings passed along: no client-side model.)
    chroma = m.collection()
    vectors = chroma.get(ids=["i:2", "i:4"], include=["embeddings"])["embeddings"]
    chroma.update(ids=["i:2"], documents=["edited by hand"], embeddings=[vectors[0]])
    chroma.update(ids=["i:4"], metadatas=[{"title": "not the title"}], embeddings=[vectors[1]])

    commands = {
        "synced": ["i:1"],
        "synced_json": ["i:1", "--json"],
        "text_edited": ["i:2"],
        "metadata_edited": ["i:4", "--json"],
        "deleted": ["i:3"],
        "bad_id": ["nonsense"],
    }
    with ThreadPoolExecutor(len(commands)) as pool:  # independent reads: save start-up time
        futures = {
            k: pool.submit(run_syncd, ["explain", "ex", *a], cfg) for k, a in commands.items()
        }
        out = {k: f.result() for k, f in futures.items()}

    # In sync: exit 0, the record matches, and the span log shows the streamed update
    # (with tracing off, it has no trace id).
    synced = out["synced"]
    assert synced.returncode == ExitCode.OK, synced.stdout + synced.stderr
    assert "i:1  matches" in synced.stdout
    assert "verdict:  consistent" in synced.stdout
    assert '"title": "renamed"' in synced.stdout
    assert re.search(
        r"recent syncs \(1\):\n\s+\S+Z\s+update\s+applied\s+trace -\n", synced.stdout
    ), synced.stdout

    assert out["synced_json"].returncode == ExitCode.OK
    story = json.loads(out["synced_json"].stdout)
    assert set(story) == {
        "pipeline", "id", "collection", "source_id", "mongodb", "matches_filter",
        "mapping_error", "chroma", "missing_in_chroma", "consistent", "recent_syncs",
        "dead_letter", "halt", "records_match",
    }  # fmt: skip
    assert story["pipeline"] == "ex" and story["id"] == "i:1" and story["collection"] == "docs"
    assert json.loads(story["source_id"]) == 1
    assert story["mongodb"] == {"_id": 1, "body": "body 1", "title": "renamed", "n": 1}
    assert story["matches_filter"] is True and story["mapping_error"] is None
    assert story["consistent"] is True
    assert story["missing_in_chroma"] == [] and story["dead_letter"] is None
    assert story["halt"] is None
    (record,) = story["chroma"]
    assert record["id"] == "i:1" and record["document"] == "body 1"
    assert record["metadata"]["title"] == "renamed" and record["metadata"]["syncd_id"] == "i:1"
    assert record["hash_matches"] is True and record["matches"] is True
    (sync,) = story["recent_syncs"]
    assert sync["pipeline"] == "ex" and sync["document_id"] == "i:1"
    assert sync["operation"] == "update" and sync["outcome"] == "applied"

    # Edited in Chroma: exit 1 and STALE, although the stored hash still matches.
    stale = out["text_edited"]
    assert stale.returncode == ExitCode.DRIFT_OR_FAILURE, stale.stdout + stale.stderr
    assert "i:2  STALE (text in Chroma differs from what syncd wrote" in stale.stdout
    (hinted,) = re.findall(r"verdict:  drift; `(syncd repair [^`]+)` fixes it", stale.stdout)
    edited = out["metadata_edited"]
    assert edited.returncode == ExitCode.DRIFT_OR_FAILURE, edited.stdout + edited.stderr
    story = json.loads(edited.stdout)
    assert story["consistent"] is False
    assert story["chroma"][0]["matches"] is False and story["chroma"][0]["hash_matches"] is True
    assert story["chroma"][0]["differing_keys"] == ["title"]
    assert story["chroma"][0]["text_matches"] is True

    # Deleted: absent from MongoDB, no records left, which is consistent.
    deleted = out["deleted"]
    assert deleted.returncode == ExitCode.OK, deleted.stdout + deleted.stderr
    assert "MongoDB:  absent" in deleted.stdout and "Chroma:   no records" in deleted.stdout
    assert re.search(r"delete\s+applied", deleted.stdout), deleted.stdout  # from the span log

    # Not an id syncd writes: one line on stderr, usage exit code, no traceback.
    bad = out["bad_id"]
    assert bad.returncode == ExitCode.CONFIG, bad.stdout + bad.stderr
    assert bad.stdout == ""
    (line,) = bad.stderr.splitlines()
    assert line.startswith("syncd: error: ") and "not a syncd record id: 'nonsense'" in line
    assert "was not written by syncd" in line and "`syncd repair` deletes it" in line, line

    # The command the drift verdict names, run as printed, fixes both edited records.
    assert shlex.split(hinted)[:3] == ["syncd", "repair", "ex"], hinted
    repaired = run_syncd(shlex.split(hinted)[1:])
    assert repaired.returncode == ExitCode.OK, repaired.stdout + repaired.stderr
    for record_id in ("i:2", "i:4"):
        again = run_syncd(["explain", "ex", record_id], cfg)
        assert again.returncode == ExitCode.OK and "verdict:  consistent\n" in again.stdout


def test_a_record_id_is_taken_as_syncd_writes_it(mongo_client, mirror, syncd_factory):
    """`i:03`, `i:+3` and `i: 3` name the `_id` 3, whose record is `i:3`: explain, map
    --id and dlq find what syncd wrote under `i:3`. A chunk suffix must be a number."""
    m = mirror(
        "explain",
        name="ex",
        lease=None,
        on_error="dead_letter",
        embedder={"kind": "hashing", "dimensions": 32},
    )
    docs = mongo_client[m.db]["docs"]
    docs.insert_many([{"_id": 3, "body": "body 3"}, {"_id": 5, "title": "no body"}])
    daemon = syncd_factory(["run"], m.cfg)
    wait_caught_up(mongo_client, m.db, m.settings, "ex", 60, "snapshot")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    typed = ["i:03", "i:+3", "i: 3", "i:03#0"]
    commands = {t: ["explain", "ex", t] for t in typed}
    commands |= {f"map {t}": ["map", "ex", "--id", t, "--json"] for t in typed}
    commands |= {
        "dlq show": ["dlq", "show", "ex", "i:05"],
        "dlq list": ["dlq", "list", "ex", "i:+5", "--json"],
        **{f"bad {b}": ["explain", "ex", b] for b in ("i:3#abc", "s:n0#x", "i:3#-1")},
        "bad map": ["map", "ex", "--id", "i:3#x"],
        "bad dlq": ["dlq", "show", "ex", "i:5#x"],
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {k: pool.submit(run_syncd, a, m.cfg) for k, a in commands.items()}
        out = {k: f.result() for k, f in futures.items()}

    for t in typed:
        story = out[t]
        assert story.returncode == ExitCode.OK, (t, story.stdout + story.stderr)
        assert story.stdout.startswith("ex / i:3 ") and "i:3  matches" in story.stdout, t
        assert "verdict:  consistent\n" in story.stdout, story.stdout
        mapped = out[f"map {t}"]
        assert mapped.returncode == ExitCode.OK, (t, mapped.stderr)
        assert [r["id"] for r in json.loads(mapped.stdout)["records"]] == ["i:3"]
    assert out["dlq show"].returncode == ExitCode.OK, out["dlq show"].stderr
    assert json.loads(out["dlq show"].stdout)["key"] == "i:5"
    assert [e["key"] for e in json.loads(out["dlq list"].stdout)] == ["i:5"]
    for name in ("bad i:3#abc", "bad s:n0#x", "bad i:3#-1", "bad map", "bad dlq"):
        bad = out[name]
        assert bad.returncode == ExitCode.CONFIG, (name, bad.stdout + bad.stderr)
        assert bad.stdout == "" and "Traceback" not in bad.stderr
        (line,) = bad.stderr.splitlines()
        assert "not a syncd record id" in line and "after '#' comes a chunk number" in line

    # The dead letter, retried by a spelling of its own, is applied once its document is fixed.
    docs.update_one({"_id": 5}, {"$set": {"body": "fixed"}})
    retried = run_syncd(["dlq", "retry", "ex", "i:005"], m.cfg)
    assert retried.returncode == ExitCode.OK, retried.stdout + retried.stderr
    assert "1 applied and removed" in retried.stdout, retried.stdout
    assert m.collection().get(ids=["i:5"])["documents"] == ["fixed"]
