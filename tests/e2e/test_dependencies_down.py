"""Dependencies that are down are transient, never poison.

Chroma or MongoDB unreachable when `syncd run` starts, or Chroma down when a process
takes a pipeline over from a dead one, is an outage like one in mid-stream: the
pipeline retries (not ready, `syncd status` says retrying) and converges once the
server answers, without the process exiting. One-shot commands exit 4 (MongoDB) or 5
(Chroma) with one line. An embedding API that refuses every input is the API's fault,
not the documents': nothing is dead-lettered, the pipeline waits for the API.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess, run_syncd
from tests.harness.embedding_api import embedding_api
from tests.harness.ports import free_port

from . import oracle
from .helpers import (
    caught_up,
    http_get,
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)
from .test_ha import holders, me
from .test_runbook import hinted

DOCS = [oracle.document(i) for i in range(12)]
# The mapping the oracle knows: Chroma's contents are judged without syncd's own mapping.
MAPPING = {
    "mapping": {"text": "body", "metadata": list(oracle.METADATA)},
    "embedder": oracle.EMBEDDER,
}


def _names(prefix: str) -> tuple[str, str]:
    """A database and a Chroma collection no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}", f"{prefix}-{uuid.uuid4().hex[:8]}"


def _config(
    tmp_path: Path,
    *,
    mongo_uri: str,
    chroma_port: int,
    db: str,
    coll: str,
    listen: str = "",
    extra: dict[str, Any] | None = None,
    **pipeline: Any,
) -> Path:
    return write_config(
        tmp_path / f"syncd-{uuid.uuid4().hex[:6]}.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": "127.0.0.1", "port": chroma_port, "timeout_s": 5},
        checkpoint_db=f"{db}_syncd",
        pipelines=[pipeline_table("dn", db, chroma_collection=coll, **_oracles(pipeline))],
        extra={"telemetry": {"listen": listen}, **(extra or {})},
    )


def _oracles(pipeline: dict[str, Any]) -> dict[str, Any]:
    """``pipeline`` over the oracle's mapping; a ``mapping`` table adds to it."""
    mapping = {**MAPPING["mapping"], **pipeline.get("mapping", {})}
    return {**MAPPING, **pipeline, "mapping": mapping}


def _readiness(listen: str) -> tuple[int, dict[str, Any]]:
    status, body = http_get(f"http://{listen}/readyz")
    return status, json.loads(body) if status else {}


def _retrying_because(listen: str, words: str, attempts: int = 2) -> dict[str, Any] | None:
    """The readiness report once it is 503 with the pipeline retrying for ``words``."""
    status, report = _readiness(listen)
    pipeline = report.get("pipelines", {}).get("dn", {})
    reason = report.get("not_ready", {}).get("dn", "")
    if status == 503 and pipeline.get("state") == "retrying" and words in reason:
        return report if pipeline.get("attempts", 0) >= attempts else None
    return None


def _alive(daemon: SyncdProcess) -> bool:
    """For waits: fail at once, with the output, if the process exited meanwhile."""
    assert daemon.is_running(), f"exited with {daemon.returncode}:\n{daemon.output()[-3000:]}"
    return True


def _status_row(cfg: Path, name: str = "dn") -> dict[str, Any]:
    """The pipeline's `syncd status --json` row; exit 0, or 1 while it is down (its
    process gone, its lease expired, and no process has taken it yet)."""
    result = run_syncd(["status", "--json", name], cfg)
    (row,) = json.loads(result.stdout)
    assert isinstance(row, dict)
    expected = ExitCode.DRIFT_OR_FAILURE if row["state"] == "down" else ExitCode.OK
    assert result.returncode == expected, result.stdout + result.stderr
    return row


def _converged(
    client: MongoClient[Any], chroma: Any, db: str, coll: str, name: str = "docs"
) -> None:
    stored = chroma.client().get_collection(coll, embedding_function=None)
    problem = oracle.mismatch(client[db][name].find(), stored)
    assert not problem, problem


def _mongodb_down_with_documents(
    factory: Any, prefix: str
) -> tuple[Any, MongoClient[Any], str, str]:
    """A MongoDB of the test's own holding DOCS, killed: its server, a client, db, coll."""
    server = factory()
    client: MongoClient[Any] = MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    db, coll = _names(prefix)
    client[db]["docs"].insert_many(DOCS)
    server.kill()
    return server, client, db, coll


def _stop_cleanly(daemon: SyncdProcess) -> None:
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()[-3000:]
    assert "Traceback" not in daemon.output()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["stopped", "refusing"])
def test_chroma_down_at_start_is_retried_until_it_answers(
    how, tmp_path, mongo_uri, mongo_client, chroma_server_factory, tcp_proxy_factory, syncd_factory
):
    db, coll = _names("cdown")
    chroma = chroma_server_factory()
    port = chroma.port
    proxy = None
    if how == "stopped":
        chroma.stop()  # nothing listens: connections are refused
    else:
        proxy = tcp_proxy_factory(chroma.host, chroma.port)
        proxy.refuse(True)  # connections are accepted, then reset
        port = proxy.port
    mongo_client[db]["docs"].insert_many(DOCS)
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path, mongo_uri=mongo_uri, chroma_port=port, db=db, coll=coll, listen=listen)
    daemon = syncd_factory(["run"], cfg)

    report = wait_until(
        lambda: _alive(daemon) and _retrying_because(listen, "Chroma unavailable"),
        60,
        "retrying, not ready",
    )
    assert "rejected" not in report["not_ready"]["dn"]
    row = _status_row(cfg)
    assert row["state"] == "retrying", row
    assert "Chroma unavailable" in row["last_error"]["error"]
    assert "start Chroma (or correct chroma.host and chroma.port)" in row["last_error"]["hint"]

    if proxy is not None:
        proxy.heal()
    else:
        chroma.start()
    wait_caught_up(mongo_client, db, settings_of(cfg), "dn", 60, "the pipeline to catch up")
    wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
    _converged(mongo_client, chroma, db, coll)
    _stop_cleanly(daemon)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(240)
def test_a_hung_chroma_times_out_and_is_retried(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    """A server that accepts connections and never answers (SIGSTOP) is an outage."""
    db, coll = _names("chung")
    chroma = chroma_server_factory()
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(
        tmp_path, mongo_uri=mongo_uri, chroma_port=chroma.port, db=db, coll=coll, listen=listen
    )  # chroma.timeout_s = 5
    mongo_client[db]["docs"].insert_many(DOCS[:3])
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings_of(cfg), "dn", 60, "the first copy")
    assert chroma.pid is not None
    os.kill(chroma.pid, signal.SIGSTOP)
    try:
        mongo_client[db]["docs"].insert_many(DOCS[3:])
        wait_until(
            lambda: _alive(daemon) and _retrying_because(listen, "Chroma unavailable"),
            90,
            "retrying, not ready, while Chroma hangs",
        )
        # A hung one-shot command would raise TimeoutExpired here.
        verify = run_syncd(["verify", "dn"], cfg, timeout=60)
        assert verify.returncode == ExitCode.SINK, verify.stdout + verify.stderr
        assert "Chroma unavailable" in verify.stderr or "did not answer" in verify.stderr
        assert "run the command again" in verify.stderr, verify.stderr
        assert "Traceback" not in verify.stderr
    finally:
        os.kill(chroma.pid, signal.SIGCONT)
    wait_caught_up(mongo_client, db, settings_of(cfg), "dn", 90, "the pipeline to catch up")
    wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
    _converged(mongo_client, chroma, db, coll)
    _stop_cleanly(daemon)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("leases", [True, False], ids=["leases", "no-leases"])
def test_mongodb_down_at_start_is_retried_until_it_answers(
    leases, tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    server, client, db, coll = _mongodb_down_with_documents(mongo_server_factory, "mdown")
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(
        tmp_path,
        mongo_uri=server.uri,
        chroma_port=chroma_server.port,
        db=db,
        coll=coll,
        listen=listen,
        extra={"lease": {"enabled": leases, "ttl_s": 3, "renew_every_s": 1}},
    )
    daemon = syncd_factory(["run"], cfg)
    if leases:
        # No lease can be read or taken: nothing runs, and the process says it is not ready.
        daemon.wait_for_output(r"cannot read the leases: MongoDB unavailable", timeout=60)
        wait_until(
            lambda: (
                _readiness(listen)[1]
                .get("reason", "")
                .startswith("cannot read the leases: MongoDB unavailable")
            ),
            30,
            "/readyz to say why this process is not even a standby",
        )
        daemon.wait_for_output(r"(?s)cannot read the leases.*cannot read the leases", timeout=60)
    else:
        wait_until(
            lambda: _alive(daemon) and _retrying_because(listen, "MongoDB unavailable"),
            60,
            "retrying, not ready",
        )
    assert _alive(daemon) and _readiness(listen)[0] == 503

    server.start()
    try:
        wait_caught_up(client, db, settings_of(cfg), "dn", 90, "the pipeline to catch up")
        wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
        _converged(client, chroma_server, db, coll)
        _stop_cleanly(daemon)
    finally:
        client.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("leases", [True, False], ids=["leases", "no-leases"])
def test_mongodb_down_past_the_retry_deadline_at_start_stops_with_a_hint_that_works(
    leases, tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    server, client, db, coll = _mongodb_down_with_documents(mongo_server_factory, "mdeadline")
    cfg = _config(
        tmp_path,
        mongo_uri=server.uri,
        chroma_port=chroma_server.port,
        db=db,
        coll=coll,
        retry_deadline_s=3,
        extra={"lease": {"enabled": leases, "ttl_s": 3, "renew_every_s": 1}},
    )
    daemon = syncd_factory(["run"], cfg)
    assert daemon.wait(90) == ExitCode.SOURCE, daemon.output()[-4000:]
    output = daemon.output()
    assert "still failing after 3 s of retries: MongoDB unavailable" in output, output[-4000:]
    assert "Traceback" not in output

    server.start()  # the cause, fixed
    try:
        (command,) = hinted(output)
        assert command == f"syncd run --config {cfg}", command
        again = syncd_factory(["run"], cfg)
        wait_caught_up(client, db, settings_of(cfg), "dn", 90, "the run after the outage")
        _converged(client, chroma_server, db, coll)
        _stop_cleanly(again)
    finally:
        client.close()


@pytest.mark.timeout(240)
def test_taking_a_pipeline_over_while_chroma_is_down_waits_for_chroma(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    """The survivor takes the dead process's pipeline while Chroma is down and retries it."""
    db = f"takeover_{uuid.uuid4().hex[:8]}"
    cp_db, suffix = f"{db}_syncd", uuid.uuid4().hex[:6]
    names = ("tk1", "tk2")
    chroma = chroma_server_factory()
    cfg = write_config(
        tmp_path / "syncd.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port, "timeout_s": 5},
        checkpoint_db=cp_db,
        pipelines=[
            pipeline_table(n, db, collection=n, chroma_collection=f"{n}-{suffix}", **MAPPING)
            for n in names
        ],
        extra={"lease": {"ttl_s": 3, "renew_every_s": 1}},
    )
    settings = settings_of(cfg)
    for name in names:
        mongo_client[db][name].insert_many(DOCS)
    first, second = syncd_factory(["run"], cfg), syncd_factory(["run"], cfg)

    def spread() -> bool:
        owners = holders(mongo_client, cp_db)
        return len(owners) == 2 and set(owners.values()) == {me(first), me(second)}

    wait_until(spread, 60, "each process to hold one pipeline")
    for name in names:
        wait_caught_up(mongo_client, db, settings, name, 60, f"{name} to stream")

    chroma.kill()
    victim, survivor = first, second
    (moved,) = [n for n, owner in holders(mongo_client, cp_db).items() if owner == me(victim)]
    victim.kill()
    for name in names:
        mongo_client[db][name].insert_one(oracle.document("during"))

    def retried_by_survivor() -> bool:
        _alive(survivor)
        row = _status_row(cfg, moved)
        return row["state"] == "retrying" and row.get("process") == me(survivor)

    wait_until(retried_by_survivor, 60, f"{me(survivor)} to take {moved} and retry it")
    assert survivor.is_running(), survivor.output()[-3000:]
    assert "Chroma unavailable" in _status_row(cfg, moved)["last_error"]["error"]

    chroma.start()
    for name in names:
        wait_caught_up(mongo_client, db, settings, name, 90, f"{name} to catch up")
        _converged(mongo_client, chroma, db, f"{name}-{suffix}", name)
    _stop_cleanly(survivor)
    mongo_client.drop_database(db)
    mongo_client.drop_database(cp_db)


# --- one-shot commands ------------------------------------------------------------------

POISON = {**oracle.document("long"), "body": "x" * 200}  # over max_text_chars: dead-lettered


@pytest.fixture(scope="module")
def ran_once(
    tmp_path_factory: pytest.TempPathFactory, mongo_server: Any, chroma_server: Any
) -> Any:
    """A pipeline that has run (collection, checkpoint and one dead letter exist), stopped."""
    tmp = tmp_path_factory.mktemp("oneshot")
    db, coll = _names("oneshot")
    client: MongoClient[Any] = MongoClient(mongo_server.uri)
    client[db]["docs"].insert_many([*DOCS, POISON])
    common: dict[str, Any] = {
        "db": db, "coll": coll, "on_error": "dead_letter", "mapping": {"max_text_chars": 50}
    }  # fmt: skip
    cfg = _config(tmp, mongo_uri=mongo_server.uri, chroma_port=chroma_server.port, **common)
    daemon = SyncdProcess(["run"], cfg, log_path=tmp / "run.log").start()
    try:
        wait_caught_up(client, db, settings_of(cfg), "dn", 60, "the first run to catch up")
        assert client[f"{db}_syncd"]["dead_letters"].count_documents({"pipeline": "dn"}) == 1
    finally:
        daemon.stop()
    nowhere = free_port()
    down = {
        "chroma": _config(tmp, mongo_uri=mongo_server.uri, chroma_port=nowhere, **common),
        "mongodb": _config(
            tmp,
            mongo_uri=f"mongodb://127.0.0.1:{nowhere}/?directConnection=true",
            chroma_port=chroma_server.port,
            extra={"mongodb": {"server_selection_timeout_ms": 1000}},
            **common,
        ),
    }
    yield down
    client.drop_database(db)
    client.drop_database(f"{db}_syncd")
    client.close()


ONE_SHOT = [
    ["verify", "dn"],
    ["explain", "dn", "i:1"],
    ["repair", "dn"],
    ["snapshot", "dn"],
    ["dlq", "retry", "dn"],
    ["status"],
    ["check"],
]


@pytest.mark.timeout(120)
@pytest.mark.xdist_group("one-shot")  # one worker runs the pipeline of `ran_once` once
@pytest.mark.parametrize("server", ["chroma", "mongodb"])
@pytest.mark.parametrize("command", ONE_SHOT, ids=[" ".join(c[:2]) for c in ONE_SHOT])
def test_one_shot_commands_exit_with_the_code_of_the_unreachable_server(ran_once, server, command):
    result = run_syncd(command, ran_once[server])
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    if server == "chroma" and command == ["status"]:
        assert result.returncode == ExitCode.OK, output  # status needs MongoDB only
        return
    expected = ExitCode.SINK if server == "chroma" else ExitCode.SOURCE
    assert result.returncode == expected, output
    words = "Chroma unavailable" if server == "chroma" else "MongoDB unavailable"
    if command == ["check"]:
        assert any(line.startswith("FAIL") and words in line for line in result.stdout.splitlines())
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("syncd: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"syncd: error: {words}"), output
    assert result.stderr.strip().endswith(errors[0]), output  # the last word is the error


# --- an embedding API that refuses everything ---------------------------------------------


@pytest.mark.timeout(180)
def test_an_embedding_api_refusing_every_input_is_waited_for_not_dead_lettered(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = _names("refuse")
    letters = mongo_client[f"{db}_syncd"]["dead_letters"]
    mongo_client[db]["docs"].insert_many(DOCS)
    listen = f"127.0.0.1:{free_port()}"
    with embedding_api(dimensions=32) as api:
        api.refuse = lambda _text: True
        cfg = _config(
            tmp_path,
            mongo_uri=mongo_uri,
            chroma_port=chroma_server.port,
            db=db,
            coll=coll,
            listen=listen,
            on_error="dead_letter",
            embedder={"kind": "openai", "base_url": api.base_url, "model": "m", "dimensions": 32},
        )
        env = {"OPENAI_API_KEY": api.api_key}
        daemon = syncd_factory(["run"], cfg, env)
        wait_until(
            lambda: _alive(daemon) and _retrying_because(listen, "refused", attempts=2),
            90,
            "retrying, not ready",
        )
        row = _status_row(cfg)
        assert row["state"] == "retrying", row
        assert "not the documents" in row["last_error"]["hint"]
        assert letters.count_documents({}) == 0, list(letters.find())
        assert row["dead_letters"] == 0

        # The API is fixed: everything applies by itself, and nothing was dead-lettered.
        api.refuse = None
        settings = settings_of(cfg, env)
        wait_caught_up(mongo_client, db, settings, "dn", 60, "the pipeline to catch up")
        wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
        assert letters.count_documents({}) == 0, list(letters.find())

        # One input the API refuses, among good ones, is still that document's poison.
        api.refuse = lambda text: "refuse me" in text
        with mongo_client.start_session(causal_consistency=True) as session:
            refused = {**oracle.document(100), "body": "please refuse me"}
            mongo_client[db]["docs"].insert_many([refused, oracle.document(101)], session=session)
            last = session.operation_time
        assert last is not None
        wait_until(lambda: caught_up(settings, "dn", last), 60, "the batch to be applied")
        assert [d["key"] for d in letters.find()] == ["i:100"]
        assert _readiness(listen)[0] == 200
        api.refuse = None
        docs = [d for d in mongo_client[db]["docs"].find() if d["_id"] != 100]
        stored = chroma_server.client().get_collection(coll, embedding_function=None)
        problem = oracle.mismatch(docs, stored, embed=api.vector)
        assert not problem, problem
        _stop_cleanly(daemon)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["killed", "mongodb-gone-past-deadline"])
def test_a_process_gone_without_recording_why_shows_as_down(
    how, tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    # A process that dies without writing `failed` (kill -9; MongoDB, where the state
    # lives, unreachable when it gave up) leaves its running state behind: once its lease
    # expires, `syncd status` says the pipeline is down (exit 1), with what it recorded
    # and a hint that brings it back.
    server = mongo_server_factory()
    client: MongoClient[Any] = MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    db, coll = _names("gone")
    client[db]["docs"].insert_many(DOCS)
    cfg = _config(
        tmp_path,
        mongo_uri=server.uri,
        chroma_port=chroma_server.port,
        db=db,
        coll=coll,
        retry_deadline_s=3,
        extra={"lease": {"ttl_s": 3, "renew_every_s": 1}},
    )
    try:
        daemon = syncd_factory(["run"], cfg)
        wait_caught_up(client, db, settings_of(cfg), "dn", 90, "the first run")
        assert _status_row(cfg)["state"] == "streaming"  # alive: not down
        if how == "killed":
            daemon.kill()
        else:
            server.kill()
            assert daemon.wait(90) == ExitCode.SOURCE, daemon.output()[-4000:]
            server.start()

        def down() -> dict[str, Any] | None:
            row = _status_row(cfg)
            return row if row["state"] == "down" else None

        row = wait_until(down, 30, "status to say the pipeline is down")
        assert row["down"]["recorded_state"] == "streaming", row
        assert row["down"]["lease_expired_age_s"] >= 0, row
        text = run_syncd(["status", "dn"], cfg)
        assert text.returncode == ExitCode.DRIFT_OR_FAILURE, text.stdout + text.stderr
        assert "dn: down" in text.stdout and "recorded       streaming" in text.stdout, text.stdout

        (command,) = hinted(text.stdout)  # the hint, followed
        assert command == f"syncd run --config {cfg}", command
        again = syncd_factory(["run"], cfg)
        client[db]["docs"].insert_one(oracle.document(99))
        wait_caught_up(client, db, settings_of(cfg), "dn", 90, "the run after it was down")
        _converged(client, chroma_server, db, coll)
        assert _status_row(cfg)["state"] == "streaming"
        _stop_cleanly(again)
        assert _status_row(cfg)["state"] == "stopped"  # a clean stop is not down
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_a_hung_mongodb_loses_the_lease_and_readiness_within_its_ttl(
    tmp_path, mongo_server_factory, chroma_server, syncd_factory
):
    """A MongoDB that takes requests and never answers (SIGSTOP): the lease cannot be
    renewed, so within about lease.ttl_s the pipeline is stopped, says why, and /readyz
    turns 503; once it answers again, the pipeline is taken back and converges."""
    server = mongo_server_factory()
    client: MongoClient[Any] = MongoClient(server.uri, serverSelectionTimeoutMS=10_000)
    db, coll = _names("mhung")
    client[db]["docs"].insert_many(DOCS[:3])
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(
        tmp_path, mongo_uri=server.uri, chroma_port=chroma_server.port, db=db, coll=coll,
        listen=listen, extra={"lease": {"ttl_s": 3.0, "renew_every_s": 1.0}},
    )  # fmt: skip
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(client, db, settings_of(cfg), "dn", 60, "the first copy")
    wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
    assert server.pid is not None
    mark = daemon.mark()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        wait_until(lambda: _readiness(listen)[0] == 503, 15, "/readyz 503 while MongoDB hangs")
        assert time.monotonic() - frozen < 12, "readiness lagged far behind the lease's ttl"
        daemon.wait_for_output(r"lease expired", timeout=15, since=mark)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    client[db]["docs"].insert_many(DOCS[3:])
    wait_caught_up(client, db, settings_of(cfg), "dn", 90, "the pipeline to catch up")
    wait_until(lambda: _readiness(listen)[0] == 200, 60, "/readyz to answer 200 again")
    _converged(client, chroma_server, db, coll)
    _stop_cleanly(daemon)


# --- an outage during a one-shot snapshot ------------------------------------------------


def _scanned(settings: Any) -> int:
    cp = load_checkpoint(settings, "dn")
    return cp.snapshot.scanned if cp is not None and cp.snapshot is not None else 0


@pytest.mark.timeout(240)
def test_a_snapshot_rides_out_a_chroma_blip_and_stops_with_a_hint_past_its_deadline(
    tmp_path, mongo_uri, mongo_client, chroma_server, tcp_proxy_factory, syncd_factory
):
    """A connection reset or a restart of Chroma in the middle of a long `syncd snapshot`
    is waited out: the copy goes on from its last checkpointed page and completes. An
    outage longer than `retry_deadline_s` stops it (exit 5) with the command that
    continues it; run, that command completes the copy."""
    db, coll = _names("snapblip")
    docs = [oracle.document(i) for i in range(600)]
    mongo_client[db]["docs"].insert_many(docs)
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    cfg = _config(
        tmp_path, mongo_uri=mongo_uri, chroma_port=proxy.port, db=db, coll=coll,
        snapshot_batch_size=20, retry_deadline_s=8, retry_max_backoff_s=1,
    )  # fmt: skip
    settings = settings_of(cfg)

    # A blip: every connection reset, new ones refused for 2 s.
    snapshot = syncd_factory(["snapshot", "dn"], cfg)
    wait_until(lambda: _scanned(settings) >= 100, 60, "the snapshot to copy a few pages")
    proxy.refuse(True)
    assert proxy.cut() > 0
    time.sleep(2)
    proxy.heal()
    assert snapshot.wait(120) == ExitCode.OK, snapshot.output()[-4000:]
    assert "retrying the snapshot" in snapshot.output(), snapshot.output()[-4000:]
    stored = chroma_server.client().get_collection(coll, embedding_function=None)
    problem = oracle.mismatch(mongo_client[db]["docs"].find(), stored)
    assert not problem, problem

    # Past the deadline: Chroma stays away for longer than retry_deadline_s.
    snapshot = syncd_factory(["snapshot", "dn"], cfg)
    wait_until(lambda: _scanned(settings) >= 100, 60, "the second snapshot to copy a few pages")
    proxy.refuse(True)
    proxy.cut()
    assert snapshot.wait(120) == ExitCode.SINK, snapshot.output()[-4000:]
    output = snapshot.output()
    assert "still failing after 8 s of retries: Chroma unavailable" in output, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    (command,) = hinted(output)
    assert shlex.split(command)[:3] == ["syncd", "snapshot", "dn"], command
    copied = _scanned(settings)
    assert copied >= 100, "the pages copied before the outage must be kept"
    proxy.heal()
    args = shlex.split(command)[1:]
    again = run_syncd(args, None if "--config" in args else cfg, timeout=120)
    assert again.returncode == ExitCode.OK, again.stdout + again.stderr
    assert "continuing the interrupted snapshot of dn" in again.stdout, again.stdout
    problem = oracle.mismatch(mongo_client[db]["docs"].find(), stored)
    assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(120)
def test_a_mongodb_srv_name_not_found_in_dns_is_an_outage_not_a_config_error(
    tmp_path, chroma_server, syncd_factory
):
    """The SRV lookup ran while the config was read: a DNS hiccup at boot exited 2, which
    the systemd unit does not restart. It is retried like a server that does not answer."""
    db, coll = _names("srv")
    uri = (
        "mongodb+srv://app:pw-in-uri@cluster0.not-there.invalid/"
        "?connectTimeoutMS=2000&serverSelectionTimeoutMS=2000"
    )
    listen = f"127.0.0.1:{free_port()}"
    cfg = _config(
        tmp_path,
        mongo_uri=uri,
        chroma_port=chroma_server.port,
        db=db,
        coll=coll,
        listen=listen,
        extra={"lease": {"enabled": False}},
    )
    check = run_syncd(["check"], cfg, timeout=60)
    assert check.returncode == ExitCode.SOURCE, check.stdout + check.stderr
    assert "config ok" in check.stdout
    assert "not found in DNS" in check.stdout + check.stderr
    assert "pw-in-uri" not in check.stdout + check.stderr

    daemon = syncd_factory(["run"], cfg)
    wait_until(
        lambda: _alive(daemon) and _retrying_because(listen, "MongoDB unavailable"),
        60,
        "retrying, not ready",
    )
    _stop_cleanly(daemon)
    assert "pw-in-uri" not in daemon.output()
