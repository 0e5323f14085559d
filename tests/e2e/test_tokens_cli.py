"""`syncd tokens` end to end: decoding published tokens, and moving a pipeline back in
time so that a real daemon replays exactly the changes since then."""

from __future__ import annotations

import json
import re
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bson.timestamp import Timestamp

from syncd import switching
from syncd.checkpoint import Checkpoint, open_store
from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from . import oracle
from .helpers import caught_up, chroma_records, load_checkpoint, wait_until

# From tests/unit/test_tokens.py, where each vector's source is cited.
DOCS_EVENT = (
    "82635019A0000000012B042C0100296E5A1004AB1154ACACD849A48C61756D70D3B21F463C6F706572"
    "6174696F6E54797065003C696E736572740046646F63756D656E744B65790046645F69640064635019"
    "A078BE67426D7CF4D2000004"
)
NPM_V1_HWM = "82612F653E000000022B0229296E04"
SNIPPET_V1_EVENT = (
    "82612F617F000000012B022C0100296E5A100492EF51FC540B4ED5AC1D50BA2C9C519C46645F696400"
    "64612F617F37A5DD163BA238230004"
)

VECTORS = [
    (
        DOCS_EVENT,
        {
            "clusterTime": {"t": 1666193824, "i": 1, "iso": "2022-10-19T15:37:04Z"},
            "version": 2,
            "tokenType": "event",
            "txnOpIndex": 0,
            "fromInvalidate": False,
            "uuid": "ab1154ac-acd8-49a4-8c61-756d70d3b21f",
            "documentKey": {"_id": {"$oid": "635019a078be67426d7cf4d2"}},
            "eventIdentifier": {
                "operationType": "insert",
                "documentKey": {"_id": {"$oid": "635019a078be67426d7cf4d2"}},
            },
            "fragmentNum": None,
        },
    ),
    (
        NPM_V1_HWM,
        {
            "clusterTime": {"t": 1630496062, "i": 2, "iso": "2021-09-01T11:34:22Z"},
            "version": 1,
            "tokenType": "highWaterMark",
            "txnOpIndex": 0,
            "fromInvalidate": False,
            "uuid": None,
            "documentKey": None,
            "eventIdentifier": None,
            "fragmentNum": None,
        },
    ),
    (
        SNIPPET_V1_EVENT,
        {
            # The driver made the ObjectId in the second the insert committed: 0x612F617F.
            "clusterTime": {"t": 0x612F617F, "i": 1, "iso": "2021-09-01T11:18:23Z"},
            "version": 1,
            "tokenType": "event",
            "txnOpIndex": 0,
            "fromInvalidate": False,
            "uuid": "92ef51fc-540b-4ed5-ac1d-50ba2c9c519c",
            "documentKey": {"_id": {"$oid": "612f617f37a5dd163ba23823"}},
            "eventIdentifier": None,
            "fragmentNum": None,
        },
    ),
]


@pytest.mark.parametrize(("token", "fields"), VECTORS, ids=["docs-v2", "npm-v1-hwm", "v1-event"])
def test_decode_published_tokens(token, fields):
    result = run_syncd(["tokens", "decode", token.lower(), "--json"], timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"token": token, **fields}


def test_decode_takes_config_like_every_command_and_reads_none(tmp_path):
    token, fields = VECTORS[0]
    missing = tmp_path / "absent.toml"  # decode needs no config, so even a missing one
    result = run_syncd(["tokens", "decode", token, "--json", "-c", str(missing)], timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"token": token, **fields}


@pytest.mark.parametrize("garbage", ["zz12", "82FF", ""])
def test_decode_garbage_is_one_line_and_exit_2(garbage):
    result = run_syncd(["tokens", "decode", garbage], timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncd: error: not a resume token"), lines
    assert "***" not in lines[0], "the reason was masked"


def _insert(client: Any, coll: Any, doc: dict[str, Any]) -> Any:
    with client.start_session(causal_consistency=True) as session:
        coll.insert_one(doc, session=session)
        return session.operation_time


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_keys(command: str) -> set[str]:
    """The top-level keys the README's "Operating: tokens" table gives `command`'s --json."""
    rows = re.findall(rf"^\| `{re.escape(command)}` \| `(\{{.*?\}})`", README.read_text(), re.M)
    assert len(rows) == 1, f"the README documents no --json shape for `tokens {command}`"
    return set(re.findall(r'"(\w+)":', rows[0]))


def test_tokens_help_points_at_the_readme_that_documents_the_json_shape() -> None:
    """--help names a README section, and that section (not the source) holds the shapes."""
    for verb in ("set", "reset", "show", "history", "decode"):
        shown = run_syncd(["tokens", verb, "--help"], timeout=30)
        assert 'README, "Operating: tokens"' in " ".join(shown.stdout.split()), shown.stdout
    section = README.read_text().split("## Operating: tokens", 1)[1].split("\n## ", 1)[0]
    assert "syncd/cli/tokens.py" not in section
    assert _readme_keys("reset PIPELINE") == {"pipeline", "deleted", "epoch"}


def _wait(daemon: Any, predicate: Any, what: str, timeout: float = 60) -> None:
    try:
        wait_until(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nsyncd output:\n{daemon.output()[-4000:]}") from None


def _next_second() -> None:
    time.sleep(1.05 - (time.time() % 1))


@pytest.mark.timeout(120)
def test_set_at_replays_changes_since_then(mirror, mongo_client, syncd_factory):
    m = mirror("tok", name="tok", lease={"ttl_s": 3, "renew_every_s": 1})
    cfg, settings, db = m.cfg, m.settings, m.db
    coll = mongo_client[db]["docs"]
    daemon = syncd_factory(["run"], cfg)

    before = {"_id": "z-before", "body": "written before the rewind point", "vec": oracle.vector(0)}
    _insert(mongo_client, coll, before)
    _next_second()
    doc_a = {"_id": "a", "body": "first after the rewind point", "vec": oracle.vector(1)}
    t1 = _insert(mongo_client, coll, doc_a)
    doc_b = {"_id": "b", "body": "second after the rewind point", "vec": oracle.vector(2)}
    t2 = _insert(mongo_client, coll, doc_b)
    _wait(daemon, lambda: caught_up(settings, "tok", t2), "the first run to catch up")

    at = datetime.fromtimestamp(t1.time, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    busy = run_syncd(["tokens", "set", "tok", "--at", at, "--yes"], cfg, timeout=60)
    assert busy.returncode == 7, busy.stderr
    assert "is running in" in busy.stderr and "--force" in busy.stderr

    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    unconfirmed = run_syncd(["tokens", "set", "tok", "--at", at], cfg, timeout=60)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr

    moved = run_syncd(["tokens", "set", "tok", "--at", at, "--yes", "--json"], cfg, timeout=60)
    assert moved.returncode == 0, moved.stderr
    result = json.loads(moved.stdout)
    assert set(result) == _readme_keys("set PIPELINE"), result
    assert result["position"]["kind"] == "start_at"
    assert result["position"]["start_at"]["t"] == t1.time
    assert result["previous"]["kind"] == "token"
    cp = load_checkpoint(settings, "tok")
    assert cp is not None and cp.token is None and cp.start_at is not None
    assert cp.start_at.time == t1.time and cp.phase == "streaming"

    # Chroma loses A, B and the earlier document; only the changes since t1 may come back.
    collection = m.collection()
    expected = oracle.expected([before, doc_a, doc_b])
    assert len(expected) == 3
    collection.delete(ids=list(expected))
    assert collection.count() == 0

    daemon.start()
    (earlier,) = set(expected) - set(oracle.expected([doc_a, doc_b]))
    _wait(daemon, lambda: not oracle.mismatch([doc_a, doc_b], collection), "A and B to return")
    doc_c = {"_id": "c", "body": "after the restart", "vec": oracle.vector(3)}
    t3 = _insert(mongo_client, coll, doc_c)
    _wait(daemon, lambda: caught_up(settings, "tok", t3), "the second run to catch up")
    assert earlier not in chroma_records(collection), "replayed from before the --at time"
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    shown = run_syncd(["tokens", "history", "tok", "--json"], cfg, timeout=60)
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)["entries"]
    moves = [e for e in entries if e["reason"].startswith("tokens set by ")]
    assert len(moves) == 1, entries
    assert moves[0]["position"]["start_at"]["t"] == t1.time
    assert moves[0]["set_by"] == moves[0]["reason"].removeprefix("tokens set by ")

    status = run_syncd(["tokens", "show", "tok", "--json"], cfg, timeout=60)
    assert status.returncode == 0, status.stderr
    (entry,) = json.loads(status.stdout)["pipelines"]
    assert entry["phase"] == "streaming" and entry["cluster_time"]["t"] >= t3.time
    assert entry["lease"] is not None and entry["lease"]["live"] is False
    assert entry["lag_s"] is not None and entry["lag_s"] >= 0

    # status names the position as tokens show does (a high-water mark at T reads T.0).
    shown_text = run_syncd(["tokens", "show", "tok"], cfg, timeout=60)
    status_text = run_syncd(["status", "tok"], cfg, timeout=60)
    assert status_text.returncode == 0, status_text.stdout + status_text.stderr
    (where,) = re.findall(r"^  position  (.+)$", shown_text.stdout, re.M)
    assert where.startswith("resume after "), shown_text.stdout
    assert f"  position       {where}, checkpointed " in status_text.stdout, status_text.stdout


@pytest.mark.timeout(180)
def test_the_busy_hint_of_set_and_reset_runs_as_printed(mirror, mongo_client, syncd_factory):
    """Without a terminal and without --yes, beside a running daemon: the refusal names the
    command with --yes and --force added and --config last; run as printed (stdin no
    terminal), it fences the daemon out and does its work."""
    m = mirror("tok", name="tok", lease={"ttl_s": 3, "renew_every_s": 1})
    cfg, settings, db = m.cfg, m.settings, m.db
    coll = mongo_client[db]["docs"]
    daemon = syncd_factory(["run"], cfg)
    last = _insert(mongo_client, coll, {"_id": "a", "body": "one", "vec": oracle.vector(1)})
    _wait(daemon, lambda: caught_up(settings, "tok", last), "the first run to catch up")
    at = datetime.fromtimestamp(last.time, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def held_by_the_daemon() -> bool:
        shown = run_syncd(["tokens", "show", "tok", "--json"], cfg, timeout=60)
        (entry,) = json.loads(shown.stdout)["pipelines"]
        lease = entry["lease"]
        return bool(lease and lease["live"] and not lease["owner"].startswith("syncd-tokens"))

    for args in (["tokens", "set", "tok", "--at", at], ["tokens", "reset", "tok"]):
        _wait(daemon, held_by_the_daemon, "the daemon to take its pipeline (back)")
        busy = run_syncd(args, cfg, timeout=60)
        assert busy.returncode == ExitCode.LEASE, busy.stderr
        (hinted,) = re.findall(r"run `(syncd [^`]+)` to fence it out", busy.stderr)
        assert shlex.split(hinted) == [
            "syncd", *args, "--yes", "--force", "--config", str(cfg)
        ], hinted  # fmt: skip
        followed = run_syncd(shlex.split(hinted)[1:], timeout=60)  # stdin: /dev/null
        assert followed.returncode == ExitCode.OK, followed.stdout + followed.stderr
        assert "tok: " in followed.stdout, followed.stdout
    _wait(daemon, held_by_the_daemon, "the daemon to take its pipeline back")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()


def test_a_rebuilds_own_records_are_labelled_and_cannot_be_moved(mirror, mongo_client):
    """What an interrupted `syncd rebuild p` leaves in the checkpoint store: the build's
    position (`p~rebuild`) is shown as the rebuild's, its record (`p~switch`) is not a
    position, and neither can be moved or reset by mistake."""
    m = mirror("tokrb")
    store = open_store(m.settings.checkpoint, mongo_client)
    build = Checkpoint(pipeline="p~rebuild", fingerprint="new", phase="streaming")
    build.start_at = build.cluster_time = Timestamp(1_700_000_000, 1)
    store.save(build)
    switching.save_record(store, "p", {"state": "building", "generation": 1, "fingerprint": "new"})

    shown = run_syncd(["tokens", "show", "--json"], m.cfg, timeout=60)
    assert shown.returncode == 0, shown.stderr
    entries = {e["pipeline"]: e for e in json.loads(shown.stdout)["pipelines"]}
    assert sorted(entries) == ["p", "p~rebuild"], entries
    assert entries["p~rebuild"]["rebuild_of"] == "p" and entries["p"]["rebuild_of"] is None
    text = run_syncd(["tokens", "show"], m.cfg, timeout=60)
    assert "p~switch" not in text.stdout, text.stdout
    built_by = f"`syncd rebuild p --config {m.cfg}` builds"
    assert f"not a pipeline: the new collection {built_by}" in text.stdout, text.stdout

    at = "2024-01-01T00:00:00Z"
    for args in (
        ["tokens", "set", "p~rebuild", "--at", at, "--yes"],
        ["tokens", "set", "p~switch", "--at", at, "--yes", "--force"],
        ["tokens", "reset", "p~rebuild", "--yes"],
        ["tokens", "reset", "p~switch", "--yes"],
        ["tokens", "show", "p~switch"],
    ):
        refused = run_syncd(args, m.cfg, timeout=60)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "for pipeline 'p', not a pipeline" in lines[0], lines
        assert f"`syncd rebuild p --config {m.cfg}`" in lines[0], lines
    after = store.load("p~rebuild")
    assert after is not None and after.start_at == build.start_at
    assert switching.load_record(store, "p")["state"] == "building"
