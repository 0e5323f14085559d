"""Poison documents among good ones, against real servers.

Under ``dead_letter`` the store holds exactly the poison documents and everything else
is in Chroma; `syncd dlq` lists, shows, retries (from MongoDB's current state) and
purges them. What ``halt`` does is tested in test_halts.py."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import caught_up, load_checkpoint, wait_until
from .oracle import vector

MAX_TEXT = 100


def _streaming(settings: Any) -> bool:
    cp = load_checkpoint(settings, "p")
    return cp is not None and cp.phase == "streaming"


def _insert_each(client: MongoClient[Any], coll: Any, docs: list[dict[str, Any]]) -> Any:
    with client.start_session(causal_consistency=True) as session:
        for doc in docs:
            coll.insert_one(doc, session=session)
        return session.operation_time


GOOD: list[dict[str, Any]] = [
    {"_id": f"good{i}", "body": f"fine text {i}", "n": i, "vec": vector(i)} for i in range(6)
]
POISON: list[dict[str, Any]] = [
    {"_id": "no-body", "title": "the text field is missing", "vec": vector(10)},
    {"_id": "dict-body", "body": {"not": "text"}, "vec": vector(11)},
    {
        "_id": "too-long",
        "body": "x" * 5000,
        "vec": vector(12),
    },  # over max_text_chars, too big to show
]


def test_dead_letter_holds_exactly_the_poison_documents(mirror, mongo_client, syncd_factory):
    m = mirror("dlq", lease=None, on_error="dead_letter", mapping={"max_text_chars": MAX_TEXT})
    cfg, settings, db = m.cfg, m.settings, m.db
    coll = mongo_client[db]["docs"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings), 60, "the first checkpoint")
    mixed: list[dict[str, Any]] = [
        GOOD[0], POISON[0], GOOD[1], GOOD[2], POISON[1], GOOD[3], POISON[2], GOOD[4]
    ]  # fmt: skip
    last = _insert_each(mongo_client, coll, mixed)
    wait_until(lambda: caught_up(settings, "p", last), 60, "syncd to pass the poison")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    listed = run_syncd(["dlq", "list", "p", "--json"], cfg)
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert sorted(e["key"] for e in entries) == ["s:dict-body", "s:no-body", "s:too-long"]
    assert {e["error_class"] for e in entries} == {"MappingError", "OversizedError"}
    collection = m.collection()
    problem = m.mismatch([d for d in coll.find() if d["_id"].startswith("good")])
    assert not problem, problem

    # Text lines carry dates as ISO-8601, not as {'$date': ...} dictionaries.
    text = run_syncd(["dlq", "list", "p"], cfg)
    assert text.returncode == 0, text.stderr
    assert "$date" not in text.stdout and "{'" not in text.stdout, text.stdout
    assert re.search(r"s:too-long .* last=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", text.stdout), text.stdout

    shown = run_syncd(["dlq", "show", "p", "s:too-long"], cfg)
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(shown.stdout)
    assert "max_text_chars" in entry["message"]
    body = entry["event"]["fullDocument"]["body"]
    assert body.startswith("x" * 500) and body.endswith("(4500 more characters; --full shows all)")
    assert len(shown.stdout) < 3000
    whole = run_syncd(["dlq", "show", "p", "s:too-long", "--full"], cfg)
    assert json.loads(whole.stdout)["event"]["fullDocument"]["body"] == "x" * 5000
    # The options may come before or after the sub-command.
    after = run_syncd(["dlq", "list", "p", "--json", "--config", str(cfg)])
    assert after.returncode == 0, after.stderr
    assert sorted(e["key"] for e in json.loads(after.stdout)) == sorted(e["key"] for e in entries)

    # explain says why the document is not in Chroma and how to bring it there; verify
    # counts it unmappable and points to the dead letters.
    story = run_syncd(["explain", "p", "s:no-body"], cfg)
    assert story.returncode == ExitCode.OK, story.stdout + story.stderr  # none expected
    assert "consistent with what it maps to now, but its change is parked" in story.stdout
    assert f"`syncd dlq retry p s:no-body --config {cfg}`" in story.stdout, story.stdout
    assert "dead letter: MappingError" in story.stdout
    checked = run_syncd(["verify", "p"], cfg)
    assert checked.returncode == ExitCode.OK, checked.stdout + checked.stderr  # none expected
    assert "unmappable           3" in checked.stdout, checked.stdout
    assert f"see `syncd dlq list p --config {cfg}`" in checked.stdout, checked.stdout

    # Fixed while no daemon runs: only the retry can bring it to Chroma.
    coll.update_one({"_id": "no-body"}, {"$set": {"body": "fixed now"}})
    retried = run_syncd(["dlq", "retry", "p", "--json"], cfg)
    assert retried.returncode == 1, retried.stdout + retried.stderr  # two still fail
    outcome = json.loads(retried.stdout)
    assert outcome["fixed"]["sample"] == ["s:no-body"]
    assert sorted(outcome["failing"]["sample"]) == ["s:dict-body", "s:too-long"]
    assert collection.get(ids=["s:no-body"], include=["documents"])["documents"] == ["fixed now"]
    again = run_syncd(["dlq", "retry", "p"], cfg)  # as text: each with why it still fails
    assert again.returncode == 1, again.stdout + again.stderr
    failing = [line for line in again.stdout.splitlines() if "still failing: " in line]
    assert len(failing) == 2 and all("Error: " in line for line in failing), again.stdout

    # The command explain names, run as printed once the document is fixed.
    coll.update_one({"_id": "too-long"}, {"$set": {"body": "short now"}})
    (hinted,) = re.findall(
        r"`(syncd dlq retry [^`]+)`", run_syncd(["explain", "p", "s:too-long"], cfg).stdout
    )
    assert shlex.split(hinted)[:4] == ["syncd", "dlq", "retry", "p"], hinted
    done = run_syncd(shlex.split(hinted)[1:])
    assert done.returncode == 0, done.stdout + done.stderr
    fixed = run_syncd(["explain", "p", "s:too-long"], cfg)
    assert fixed.returncode == 0 and "verdict:  consistent" in fixed.stdout, fixed.stdout

    refused = run_syncd(["dlq", "purge", "p"], cfg)
    assert refused.returncode == ExitCode.CONFIG
    assert "--yes" in refused.stderr
    purged = run_syncd(["dlq", "purge", "p", "--yes"], cfg)
    assert purged.returncode == 0, purged.stderr
    assert "removed 1" in purged.stdout


def test_retrying_a_key_the_daemon_applied_meanwhile_says_so(mirror, mongo_client, syncd_factory):
    """explain's hint (`syncd dlq retry p KEY`) followed after the running daemon applied
    the fixed document: nothing is left to retry, which is said in one line, exit 0,
    with commands that show where the document stands; they are followed too."""
    m = mirror("dlq", lease=None, on_error="dead_letter")
    cfg, settings, db = m.cfg, m.settings, m.db
    coll = mongo_client[db]["docs"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings), 60, "the first checkpoint")
    last = _insert_each(mongo_client, coll, [GOOD[0], POISON[0]])
    wait_until(lambda: caught_up(settings, "p", last), 60, "syncd to park the poison")
    story = run_syncd(["explain", "p", "s:no-body"], cfg)
    (hinted,) = re.findall(r"`(syncd dlq retry [^`]+)`", story.stdout)

    with mongo_client.start_session(causal_consistency=True) as session:
        coll.update_one({"_id": "no-body"}, {"$set": {"body": "fixed"}}, session=session)
        fixed = session.operation_time
    wait_until(lambda: caught_up(settings, "p", fixed), 60, "the daemon to apply the fix")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    for args in (shlex.split(hinted)[1:], ["dlq", "retry", "p", "s:nobody", "--config", str(cfg)]):
        retried = run_syncd(args)
        assert retried.returncode == ExitCode.OK, retried.stdout + retried.stderr
        assert retried.stderr == "", retried.stderr
        (line,) = retried.stdout.splitlines()
        assert line.startswith(f"{args[3]} is not a dead letter of p, nothing to retry"), line
        assert "retried" not in line
    explain, listing = re.findall(r"`(syncd [^`]+)`", line)
    shown = run_syncd(shlex.split(explain)[1:])
    assert shown.returncode == ExitCode.OK, shown.stdout + shown.stderr  # s:nobody: absent
    assert "MongoDB:  absent" in shown.stdout and "Chroma:   no records" in shown.stdout
    listed = run_syncd(shlex.split(listing)[1:])
    assert listed.returncode == ExitCode.OK and listed.stdout == "no dead letters for p\n"
    story = run_syncd(["explain", "p", "s:no-body"], cfg)
    assert story.returncode == ExitCode.OK and "verdict:  consistent\n" in story.stdout
    as_json = run_syncd(["dlq", "retry", "p", "s:no-body", "--json"], cfg)
    assert as_json.returncode == ExitCode.OK, as_json.stderr
    assert json.loads(as_json.stdout)["retried"] == 0
