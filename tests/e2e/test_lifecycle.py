"""Invariant 5 and collection lifecycle: history lost, drop, rename, invalidate."""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import caught_up, load_checkpoint, op_time_now, wait_caught_up, wait_until
from .mirror import make_mirror
from .oracle import mismatch, vector


def _setup(
    tmp_path: Path,
    mongo_uri: str,
    chroma_server: Any,
    *,
    names: tuple[str, str] | None = None,
    **pipeline: Any,
) -> tuple[Path, Any, str, str]:
    db, coll = names or (None, None)
    m = make_mirror(
        tmp_path, mongo_uri, chroma_server, "life", name="life", db=db, coll=coll, **pipeline
    )
    return m.cfg, m.settings, m.db, m.coll


def _doc(key: Any, body: str) -> dict[str, Any]:
    return {"_id": key, "body": body, "vec": vector(key if isinstance(key, int) else len(key))}


def _synced(client: MongoClient[dict[str, Any]], db: str, coll: Any) -> str:
    return mismatch(client[db]["docs"].find(), coll)


def test_drop_purges_and_stream_continues_after_invalidate(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    cfg, settings, db, coll_name = _setup(tmp_path, mongo_uri, chroma_server, on_drop="purge")
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i, f"doc {i}") for i in range(20)])
    daemon = syncd_factory(["run"], cfg)
    chroma = chroma_server.client()
    coll = wait_until(lambda: _get(chroma, coll_name), 60, "collection")
    wait_until(lambda: _streaming(settings), 60, "snapshot to finish")
    assert coll.count() == 20

    docs.drop()
    wait_until(lambda: coll.count() == 0, 30, "records purged after drop")
    # After the invalidate, the pipeline continues with startAfter: a re-created
    # collection is mirrored again.
    docs.insert_one(_doc("again", "back after the drop"))
    wait_until(lambda: coll.get(ids=["s:again"])["ids"] == ["s:again"], 30, "re-created doc")
    assert daemon.is_running(), daemon.output()
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    assert not _synced(mongo_client, db, coll)


def _halted(cfg: Path, name: str = "life") -> dict[str, Any] | None:
    """The pipeline's `syncd status --json` row once it shows the halt, else None."""
    result = run_syncd(["status", "--json", name], cfg)
    (row,) = json.loads(result.stdout)
    if row["state"] != "halted":
        return None
    assert result.returncode == 1, result.stdout + result.stderr
    return dict(row)


def test_drop_under_halt_halts_the_pipeline_alone(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    cfg, settings, db, coll_name = _setup(tmp_path, mongo_uri, chroma_server, on_drop="halt")
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i, f"doc {i}") for i in range(5)])
    daemon = syncd_factory(["run"], cfg)
    chroma = chroma_server.client()
    coll = wait_until(lambda: _get(chroma, coll_name), 60, "collection")
    wait_until(lambda: _streaming(settings), 60, "snapshot to finish")
    assert coll.count() == 5
    docs.insert_one(_doc(99, "just before the drop"))
    docs.drop()
    row = wait_until(lambda: _halted(cfg), 60, "the pipeline to halt")
    assert 'on_drop = "halt"' in row["halt"]["reason"], row
    assert "syncd snapshot life" in row["halt"]["hint"], row
    assert daemon.is_running(), "a halt stops its pipeline, not the process"
    # What came before the drop was applied, and the records were left alone.
    assert coll.get(ids=["i:99"])["ids"] == ["i:99"]
    assert coll.count() == 6
    cp = load_checkpoint(settings, "life")
    assert cp is not None and cp.token is not None
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # verify says the drift comes from the halt; repair will not delete the records the
    # halt keeps for the operator to decide on, unless told to; each hinted command works.
    checked = run_syncd(["verify", "life"], cfg)
    assert checked.returncode == ExitCode.DRIFT_OR_FAILURE, checked.stdout + checked.stderr
    assert "orphaned             6" in checked.stdout, checked.stdout
    assert "the pipeline is halted (CollectionGoneHalt: " in checked.stdout, checked.stdout
    assert f"see `syncd status life --config {cfg}`" in checked.stdout, checked.stdout
    assert "drift found while the pipeline is halted: lift the halt first" in checked.stdout
    # explain of one of its documents names the halt too, not drift that repair fixes.
    story = run_syncd(["explain", "life", "i:1"], cfg)
    assert story.returncode == ExitCode.DRIFT_OR_FAILURE, story.stdout + story.stderr
    assert "verdict:  drift, or not synced yet: the pipeline is halted (below)" in story.stdout
    assert f"`syncd status life --config {cfg}`" in story.stdout, story.stdout
    assert "halt:     CollectionGoneHalt: " in story.stdout, story.stdout
    refused = run_syncd(["repair", "life"], cfg)
    assert refused.returncode == ExitCode.CONFIG, refused.stdout + refused.stderr
    assert "refusing to repair life: it is halted" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert coll.count() == 6
    commands = [shlex.split(c) for c in re.findall(r"`(syncd [^`]+)`", refused.stderr)]
    assert [c[1:3] + c[3:4] for c in commands] == [
        ["status", "life", "--config"], ["repair", "life", "--dry-run"],
        ["repair", "life", "--force"],
    ], commands  # fmt: skip
    status = run_syncd(commands[0][1:])
    assert "halted" in status.stdout, status.stdout
    planned = run_syncd(commands[1][1:])
    assert planned.returncode == ExitCode.DRIFT_OR_FAILURE, planned.stdout + planned.stderr
    assert "would re-apply 0 document(s) from MongoDB and delete 6" in planned.stdout
    assert coll.count() == 6
    forced = run_syncd(commands[2][1:])
    assert forced.returncode == ExitCode.OK, forced.stdout + forced.stderr
    assert coll.count() == 0


def test_rename_under_halt_and_purge(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    cfg, _settings, db, coll_name = _setup(tmp_path, mongo_uri, chroma_server)
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i, f"doc {i}") for i in range(3)])
    daemon = syncd_factory(["run"], cfg)
    chroma = chroma_server.client()
    coll = wait_until(lambda: _get(chroma, coll_name), 60, "collection")
    wait_until(lambda: _streaming(_settings), 60, "snapshot to finish")
    assert coll.count() == 3
    docs.rename("docs_old")
    row = wait_until(lambda: _halted(cfg), 60, "the pipeline to halt")
    assert 'on_rename = "halt"' in row["halt"]["reason"], row
    assert coll.count() == 3, "halt must not touch the records"
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # Same pipeline, now told to purge (the hint's other way out): the halt is lifted
    # and the restarted daemon replays the rename.
    cfg2, _s, _db, _c = _setup(
        tmp_path, mongo_uri, chroma_server, names=(db, coll_name), on_rename="purge"
    )
    daemon2 = syncd_factory(["run"], cfg2)
    wait_until(lambda: coll.count() == 0, 60, "purge after rename")
    daemon2.terminate()
    assert daemon2.wait(30) == 0, daemon2.output()


def test_history_lost_stops_then_resnapshot_converges(
    tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    server = mongo_server_factory(history_size=30)
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    cfg, settings, db, coll_name = _setup(tmp_path, server.uri, chroma_server)
    docs = client[db]["docs"]
    docs.insert_many([_doc(i, f"doc {i}") for i in range(10)])
    daemon = syncd_factory(["run"], cfg)
    chroma = chroma_server.client()
    coll = wait_until(lambda: _get(chroma, coll_name), 60, "collection")
    wait_caught_up(client, db, settings, "life", 60, "caught up")
    daemon.terminate()
    assert daemon.wait(30) == 0
    before = load_checkpoint(settings, "life")

    # While syncd is down, more changes happen than the server retains.
    for i in range(10, 80):
        docs.insert_one(_doc(i, f"doc {i}"))
    docs.delete_one({"_id": 3})

    daemon = syncd_factory(["run"], cfg)
    assert daemon.wait(60) == ExitCode.HISTORY_LOST, daemon.output()
    out = daemon.output()
    assert "syncd snapshot life" in out, out
    after = load_checkpoint(settings, "life")
    assert after is not None and before is not None
    assert after.token == before.token, "history lost must never fast-forward the checkpoint"
    assert coll.count() == 10, "nothing may change in Chroma when history is lost"

    cfg, settings, _db, _c = _setup(
        tmp_path, server.uri, chroma_server, names=(db, coll_name), on_history_lost="resnapshot"
    )
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(client, db, settings, "life", 90, "re-snapshot and catch up")
    daemon.terminate()
    assert daemon.wait(30) == 0
    assert "re-snapshotting as configured" in daemon.output()
    assert not _synced(client, db, coll)
    client.close()


def test_a_quiet_collection_keeps_its_position_inside_the_history(
    tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    server = mongo_server_factory(history_size=30)
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    cfg, settings, db, coll_name = _setup(tmp_path, server.uri, chroma_server)
    docs = client[db]["docs"]
    docs.insert_many([_doc(i, f"doc {i}") for i in range(5)])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(client, db, settings, "life", 60, "caught up")

    # Busy elsewhere: more changes than the server retains, none in this pipeline's
    # collection. The idle position (postBatchResumeToken) must follow them.
    noise = client[db]["noise"]
    for i in range(100):
        noise.insert_one({"_id": i})
    wait_caught_up(client, db, settings, "life", 30, "the quiet position to move on")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()

    # So a restart resumes inside the retained history instead of losing it.
    daemon = syncd_factory(["run"], cfg)
    docs.insert_one(_doc(99, "after the quiet spell"))
    op = op_time_now(client, db)
    wait_until(lambda: caught_up(settings, "life", op) or not daemon.is_running(), 60, "resume")
    assert daemon.is_running(), daemon.output()
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    assert "history" not in daemon.output().lower()
    assert not _synced(client, db, chroma_server.client().get_collection(coll_name))
    client.close()


def _streaming(settings: Any) -> bool:
    cp = load_checkpoint(settings, "life")
    return cp is not None and cp.phase == "streaming"


def _get(client: Any, name: str) -> Any:
    try:
        return client.get_collection(name)
    except Exception:
        return None


def test_tokens_set_refuses_a_time_the_oplog_no_longer_reaches(
    tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    # Accepted, such a position would stop the next `syncd run` with exit 3.
    server = mongo_server_factory(history_size=30)
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    cfg, settings, db, _coll = _setup(tmp_path, server.uri, chroma_server)
    docs = client[db]["docs"]
    docs.insert_one(_doc(0, "the first"))
    early = op_time_now(client, db)
    for i in range(1, 60):
        docs.insert_one(_doc(i, f"doc {i}"))
    at = datetime.fromtimestamp(early.time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    refused = run_syncd(["tokens", "set", "life", "--at", at, "--yes"], cfg)
    assert refused.returncode == ExitCode.CONFIG, refused.stdout + refused.stderr
    assert "its oplog does not reach back that far" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert load_checkpoint(settings, "life") is None, "nothing may be recorded"
    # The hint: a snapshot instead, after which the pipeline streams.
    (hinted,) = [c for c in re.findall(r"`(syncd [^`]+)`", refused.stderr)]
    done = run_syncd(shlex.split(hinted)[1:])
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    cp = load_checkpoint(settings, "life")
    assert cp is not None and cp.phase == "streaming"
    client.close()
