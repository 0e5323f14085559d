"""A halt stops one pipeline, not the service, against real servers and processes.

Under ``on_error = "halt"`` a document that cannot be applied halts its pipeline just
before that change: the process keeps running and its other pipelines keep
streaming. The halt is recorded next to the checkpoint (``_id``, reason, error class,
resume token), shown by `syncd status`, `/readyz` and ``syncd_pipeline_state``, and
holds across restarts and replicas: nobody retries the change in a loop. It lifts by
itself once the document is fixed (re-checked every ``halt_recheck_s``), with
`syncd resume`, or under ``on_error = "dead_letter"``; each hint it prints is run here
exactly as printed, and the stores converge.

Chroma's contents are judged by an oracle written from the README's rules (record id
``s:<_id>``, text from the ``text`` field, the listed metadata fields), not by
``syncd.mapping``.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from bson.timestamp import Timestamp
from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.ports import free_port

from .helpers import (
    http_get,
    load_checkpoint,
    log_records,
    metric_sample,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

MAX_TEXT = 100
POISON = {"_id": "bad", "body": {"not": "text"}, "title": "a body that is not text"}


def _config(
    path: Path,
    mongo_uri: str,
    chroma: Any,
    db: str,
    *,
    names: tuple[str, ...] = ("p", "q"),
    listen: str = "",
    **pipeline: Any,
) -> Path:
    tables = [
        pipeline_table(
            name,
            db,
            collection=name,
            chroma_collection=f"{db}-{name}",
            mapping={"max_text_chars": MAX_TEXT},
            **pipeline,
        )
        for name in names
    ]
    return write_config(
        path,
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=tables,
        extra={
            "lease": {"ttl_s": 3.0, "renew_every_s": 1.0},
            "telemetry": {"listen": listen},
            "log": {"format": "json"},
        },
    )


def _set_pipeline_option(cfg: Path, **values: Any) -> None:
    import tomllib

    data = tomllib.loads(cfg.read_text())
    for table in data["pipelines"]:
        table.update(values)
    cfg.write_text(tomli_w.dumps(data))


# --- the oracle: what Chroma must hold, from the README's rules ---------------------


def _expected(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """String ``_id`` -> ``s:<id>``; text is ``body`` (a string of at most MAX_TEXT
    characters, else the document is not mirrored); metadata: the listed fields that
    are present and not null."""
    out = {}
    for doc in docs:
        body = doc.get("body")
        if not isinstance(body, str) or not body or len(body) > MAX_TEXT:
            continue
        fields = ("title", "tags", "n", "seq", "nested")
        meta = {k: doc[k] for k in fields if doc.get(k) is not None}
        out[f"s:{doc['_id']}"] = {"document": body, "metadata": meta}
    return out


def _actual(chroma: Any, name: str) -> dict[str, dict[str, Any]]:
    got = chroma.get_collection(name, embedding_function=None).get(
        include=["documents", "metadatas"]
    )
    return {
        rid: {
            "document": got["documents"][i],
            "metadata": {
                k: v for k, v in (got["metadatas"][i] or {}).items() if not k.startswith("syncd_")
            },
        }
        for i, rid in enumerate(got["ids"])
    }


def _converged(client: MongoClient[Any], chroma: Any, db: str, name: str) -> None:
    want = _expected(list(client[db][name].find()))
    got = _actual(chroma, f"{db}-{name}")
    assert got == want, f"Chroma differs from MongoDB for {name}:\nwant {want}\ngot  {got}"


# --- small steps -------------------------------------------------------------------


def _streaming(settings: Any, *names: str) -> bool:
    cps = [load_checkpoint(settings, name) for name in names]
    return all(cp is not None and cp.phase == "streaming" for cp in cps)


def _insert(client: MongoClient[Any], coll: Any, *docs: dict[str, Any]) -> Timestamp:
    with client.start_session(causal_consistency=True) as session:
        for doc in docs:
            coll.insert_one(doc, session=session)
        assert session.operation_time is not None
        return session.operation_time


def _halt(settings: Any, name: str = "p") -> dict[str, Any] | None:
    cp = load_checkpoint(settings, name)
    return cp.halt if cp is not None else None


def _status(cfg: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    done = run_syncd(["status", "--json"], cfg)
    return done.returncode, {row["pipeline"]: row for row in json.loads(done.stdout)}


def _hinted_commands(hint: str) -> list[list[str]]:
    """The `syncd ...` commands a hint names, as argv lists."""
    return [shlex.split(cmd) for cmd in re.findall(r"`(syncd [^`]+)`", hint)]


def _run_hinted(command: list[str], cfg: Path) -> Any:
    """Run a command exactly as a hint prints it; the config comes as an operator's
    would, from $SYNCD_CONFIG."""
    assert command[0] == "syncd", command
    return run_syncd(command[1:], env={"SYNCD_CONFIG": str(cfg)})


def _cleanup(client: MongoClient[Any], db: str) -> None:
    client.drop_database(db)
    client.drop_database(f"{db}_syncd")


# --- tests ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_poison_document_halts_only_its_pipeline_until_it_is_fixed(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, listen=listen,
                  halt_recheck_s=1.0)  # fmt: skip
    settings = settings_of(cfg)
    p, q = mongo_client[db]["p"], mongo_client[db]["q"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, "p", "q"), 60, "both pipelines to stream")

    _insert(mongo_client, p, {"_id": "a", "body": "first", "n": 1})
    poison_time = _insert(mongo_client, p, POISON)
    _insert(mongo_client, p, {"_id": "c", "body": "after the poison", "n": 3})
    halt = wait_until(lambda: _halt(settings), 60, "the halt to be recorded")

    # Recorded next to the checkpoint, which stays just before the change.
    cp = load_checkpoint(settings, "p")
    assert cp is not None and cp.cluster_time is not None and cp.cluster_time < poison_time
    assert halt["document_id"] == "bad" and halt["key"] == "s:bad"
    assert halt["error_class"] == "MappingError"
    assert "not text" in halt["reason"] or "string" in halt["reason"], halt["reason"]
    assert halt["token"] == cp.token
    assert f"`syncd resume p --config {cfg}`" in halt["hint"], halt["hint"]
    chroma = chroma_server.client()
    assert set(_actual(chroma, f"{db}-p")) == {"s:a"}, "nothing after the poison is written"

    # The process runs on, and so does the other pipeline.
    assert daemon.is_running(), daemon.output()
    _insert(mongo_client, q, {"_id": "x", "body": "q keeps streaming", "n": 9})
    wait_caught_up(mongo_client, db, settings, "q", 60, "q to stream past the halt of p")

    code, rows = _status(cfg)
    assert code == ExitCode.DRIFT_OR_FAILURE
    assert rows["p"]["state"] == "halted" and rows["q"]["state"] == "streaming", rows
    assert rows["p"]["halt"]["document_id"] == "'bad'"
    assert rows["p"]["halt"]["resume_token"] == cp.token["_data"]  # type: ignore[index]
    text = run_syncd(["status", "p"], cfg).stdout
    assert "p: halted" in text and "_id 'bad' (s:bad)" in text and "syncd resume p" in text

    status, body = http_get(f"http://{listen}/readyz")
    report = json.loads(body)
    assert status == 503 and list(report["not_ready"]) == ["p"], report
    assert "'bad'" in report["not_ready"]["p"]
    _, metrics = http_get(f"http://{listen}/metrics")
    assert metric_sample(metrics, "syncd_pipeline_state", pipeline="p", state="halted") == 1
    assert metric_sample(metrics, "syncd_pipeline_state", pipeline="q", state="streaming") == 1

    # Fixed in MongoDB: the re-check notices and the pipeline continues by itself.
    p.update_one({"_id": "bad"}, {"$set": {"body": "fixed"}})
    wait_caught_up(mongo_client, db, settings, "p", 60, "p to continue after the fix")
    assert _halt(settings) is None
    wait_until(lambda: http_get(f"http://{listen}/readyz")[0] == 200, 30, "/readyz 200")
    _converged(mongo_client, chroma, db, "p")
    _converged(mongo_client, chroma, db, "q")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    _cleanup(mongo_client, db)


@pytest.mark.timeout(180)
def test_deleting_the_halted_document_lets_the_pipeline_continue(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, names=("p",),
                  halt_recheck_s=1.0)  # fmt: skip
    settings = settings_of(cfg)
    p = mongo_client[db]["p"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, "p"), 60, "the pipeline to stream")
    _insert(mongo_client, p, {"_id": "a", "body": "first"}, POISON, {"_id": "c", "body": "c"})
    wait_until(lambda: _halt(settings), 60, "the halt to be recorded")
    p.delete_one({"_id": "bad"})
    wait_caught_up(mongo_client, db, settings, "p", 60, "p to continue after the delete")
    assert _halt(settings) is None
    _converged(mongo_client, chroma_server.client(), db, "p")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    _cleanup(mongo_client, db)


@pytest.mark.timeout(300)
def test_a_halt_holds_across_replicas_and_restarts_until_resumed(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, names=("p",),
                  halt_recheck_s=0)  # fmt: skip
    settings = settings_of(cfg)
    p = mongo_client[db]["p"]
    first = syncd_factory(["run"], cfg)
    second = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, "p"), 60, "the pipeline to stream")
    _insert(mongo_client, p, {"_id": "a", "body": "first"})
    _insert(mongo_client, p, POISON)
    _insert(mongo_client, p, {"_id": "c", "body": "after the poison"})
    halt = wait_until(lambda: _halt(settings), 60, "the halt to be recorded")
    assert first.is_running() and second.is_running(), first.output() + second.output()

    # kill -9 the holder: the other replica takes the lease and finds the halt.
    holder, other = (first, second) if halt["by"].endswith(f":{first.pid}") else (second, first)
    mark = other.mark()
    holder.kill()
    other.wait_for_output(r"pipeline p halted \(since", timeout=60, since=mark)
    assert _halt(settings) == halt, "the change was tried again instead of staying halted"
    runs = [
        line for line in log_records(other.output(mark))
        if line.get("pipeline") == "p" and line.get("state") in ("snapshotting", "streaming")
    ]  # fmt: skip
    assert not runs, runs

    # Stop it too; the halt holds with no daemon at all, and across a restart.
    other.terminate()
    assert other.wait(30) == 0, other.output()
    code, rows = _status(cfg)
    assert code == ExitCode.DRIFT_OR_FAILURE and rows["p"]["state"] == "halted", rows
    hint = rows["p"]["halt"]["hint"]
    assert "re-checks" not in hint, "halt_recheck_s = 0 turns the re-check off"
    # explain says the pipeline is halted at the document, with the halt's way out; verify
    # points to the halt, not to dead letters this pipeline has not.
    # (Chroma holds none of its records, as none is expected of a document that cannot be
    # mapped: consistent, exit 0.)
    story = run_syncd(["explain", "p", "s:bad"], cfg)
    assert story.returncode == ExitCode.OK, story.stdout + story.stderr
    assert (
        "verdict:  consistent with what it maps to now, but the pipeline is halted at this "
        "document" in story.stdout
    ), story.stdout
    assert f"`syncd status p --config {cfg}`" in story.stdout and hint in story.stdout
    assert run_syncd(["explain", "p", "s:a"], cfg).returncode == ExitCode.OK
    checked = run_syncd(["verify", "p"], cfg)
    assert "unmappable           1  e.g. s:bad" in checked.stdout, checked.stdout
    assert (
        f"see `syncd status p --config {cfg}` (the pipeline halts at such a change)"
        in checked.stdout
    ), checked.stdout
    assert "dlq" not in checked.stdout, checked.stdout
    restarted = syncd_factory(["run"], cfg)
    restarted.wait_for_output(r"pipeline p halted \(since", timeout=60)
    assert _halt(settings) == halt
    restarted.terminate()
    assert restarted.wait(30) == 0, restarted.output()

    # The runbook: fix the document, then exactly the command the hint names.
    p.update_one({"_id": "bad"}, {"$set": {"body": "fixed"}})
    commands = _hinted_commands(hint)
    assert commands == [["syncd", "resume", "p", "--config", str(cfg)]], hint
    for command in commands:
        done = _run_hinted(command, cfg)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "lifted" in done.stdout
    assert _status(cfg)[1]["p"]["state"] == "resumed"
    final = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "the next run to apply the fix")
    _converged(mongo_client, chroma_server.client(), db, "p")
    final.terminate()
    assert final.wait(30) == 0, final.output()
    _cleanup(mongo_client, db)


@pytest.mark.timeout(240)
def test_resume_lifts_the_halt_of_a_running_daemon(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, names=("p",),
                  halt_recheck_s=3600)  # fmt: skip
    settings = settings_of(cfg)
    p = mongo_client[db]["p"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, "p"), 60, "the pipeline to stream")
    _insert(mongo_client, p, POISON, {"_id": "c", "body": "after"})
    halt = wait_until(lambda: _halt(settings), 60, "the halt to be recorded")
    assert "every 3600 s" in halt["hint"]

    # Not fixed: resuming retries the change, which halts again, once.
    mark = daemon.mark()
    resumed = run_syncd(["resume", "p"], cfg)
    assert resumed.returncode == 0, resumed.stderr
    assert "a running `syncd run` tries the change again within seconds" in resumed.stdout
    again = wait_until(lambda: _halt(settings), 60, "the pipeline to halt again")
    assert again["since"] > halt["since"] and again["document_id"] == "bad"
    daemon.wait_for_output(r"pipeline p halted \(since", timeout=30, since=mark)

    p.update_one({"_id": "bad"}, {"$set": {"body": "fixed at last"}})
    (command,) = _hinted_commands(again["hint"])
    done = _run_hinted(command, cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_caught_up(mongo_client, db, settings, "p", 60, "the daemon to apply the fix")
    assert daemon.is_running()
    _converged(mongo_client, chroma_server.client(), db, "p")
    assert run_syncd(["resume", "p"], cfg).stdout.strip() == "p: not halted; nothing to resume"
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    _cleanup(mongo_client, db)


@pytest.mark.timeout(240)
def test_switching_to_dead_letter_as_the_hint_says_sets_the_change_aside(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, names=("p",))
    settings = settings_of(cfg)
    p = mongo_client[db]["p"]
    daemon = syncd_factory(["run"], cfg)
    wait_until(lambda: _streaming(settings, "p"), 60, "the pipeline to stream")
    _insert(mongo_client, p, {"_id": "a", "body": "first"}, POISON, {"_id": "c", "body": "c"})
    halt = wait_until(lambda: _halt(settings), 60, "the halt to be recorded")
    assert 'set on_error = "dead_letter" and restart' in halt["hint"]

    _set_pipeline_option(cfg, on_error="dead_letter")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    daemon.start()
    wait_caught_up(mongo_client, db, settings, "p", 60, "the restart to go past the poison")
    listed = run_syncd(["dlq", "list", "p", "--json"], cfg)
    assert [e["key"] for e in json.loads(listed.stdout)] == ["s:bad"], listed.stdout
    assert _halt(settings) is None
    _converged(mongo_client, chroma_server.client(), db, "p")
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()
    _cleanup(mongo_client, db)


@pytest.mark.timeout(180)
def test_a_standby_replica_is_ready_and_says_so(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db = f"halt_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, chroma_server, db, names=("p",))
    settings = settings_of(cfg)
    ports = [free_port(), free_port()]
    for port in ports:
        syncd_factory(["run"], cfg, {"SYNCD_TELEMETRY__LISTEN": f"127.0.0.1:{port}"})
    wait_until(lambda: _streaming(settings, "p"), 60, "the pipeline to stream")

    def probes() -> list[tuple[int, str]] | None:
        answers = [http_get(f"http://127.0.0.1:{port}/readyz") for port in ports]
        return answers if all(status == 200 for status, _ in answers) else None

    answers = wait_until(probes, 60, "both replicas to be ready")
    standby = [json.loads(body) for _, body in answers if "standby" in body]
    assert len(standby) == 1, answers
    assert standby[0]["ready"] is True and standby[0]["standby"] is True
    _cleanup(mongo_client, db)


def test_a_replica_that_cannot_reach_mongodb_is_not_a_ready_standby(
    tmp_path, chroma_server, syncd_factory
):
    """With MongoDB unreachable nobody can read the leases: a replica holding nothing is
    then not known to be a standby, and two such replicas must not both look ready."""
    unreachable = f"mongodb://127.0.0.1:{free_port()}/?replicaSet=rs0&serverSelectionTimeoutMS=500"
    cfg = _config(tmp_path / "syncd.toml", unreachable, chroma_server, "nomongo", names=("p",))
    port = free_port()
    proc = syncd_factory(["run"], cfg, {"SYNCD_TELEMETRY__LISTEN": f"127.0.0.1:{port}"})

    def blind() -> dict[str, Any] | None:
        status, body = http_get(f"http://127.0.0.1:{port}/readyz")
        return json.loads(body) if status == 503 and "leases" in body else None

    report = wait_until(blind, 60, "/readyz to say it cannot read the leases")
    assert report["ready"] is False and "standby" not in report
    assert "cannot read the leases" in report["reason"] and "not_ready" not in report
    assert proc.is_running(), "MongoDB being down is transient: the process keeps running"
