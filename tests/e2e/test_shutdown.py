"""How `syncd run` starts and stops, with real processes and signals.

A SIGTERM at any moment of the start drains and exits 0; a draining process takes no
lease and starts no pipeline; when the process stops, no pipeline is cut off by a
client closed under it ("Cannot use MongoClient after close")."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    log_records,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

CLOSED_CLIENT = "Cannot use MongoClient after close"


def _config(
    path: Path,
    mongo_uri: str,
    chroma: tuple[str, int],
    db: str,
    names: tuple[str, ...],
    **extra: Any,
) -> Path:
    host, port = chroma
    return write_config(
        path,
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": host, "port": port, "timeout_s": 30},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table(
                n, db, collection=n, chroma_collection=f"{db}-{n}", retry_max_backoff_s=0.05
            )
            for n in names
        ],
        extra={"lease": {"ttl_s": 3.0, "renew_every_s": 1.0}, "log": {"format": "json"}},
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2, 1.5])
def test_a_sigterm_while_starting_drains_and_exits_0(
    delay, tmp_path, mongo_uri, chroma_server, syncd_factory
):
    db = f"stop_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, (chroma_server.host, chroma_server.port),
                  db, ("p",))  # fmt: skip
    daemon = syncd_factory(["run"], cfg)
    time.sleep(delay)  # not a timing assertion: where in the start the signal lands
    daemon.terminate()
    code = daemon.wait(60)
    assert code == 0, f"SIGTERM {delay} s after start: exit {code}\n{daemon.output()}"
    assert "Traceback" not in daemon.output()


@pytest.mark.timeout(240)
def test_a_draining_process_takes_no_lease_and_starts_no_pipeline(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, tcp_proxy_factory
):
    # Every Chroma round trip is slow, so starting a pipeline takes seconds: the
    # signal lands while the process is still taking pipelines on.
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    proxy.set_latency(0.5)
    db = f"stop_{uuid.uuid4().hex[:8]}"
    names = ("p1", "p2", "p3")
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, ("127.0.0.1", proxy.port), db, names)
    daemon = syncd_factory(["run"], cfg)
    daemon.wait_for_output(r"took the lease of pipeline p1", timeout=60)
    daemon.terminate()
    assert daemon.wait(60) == 0, daemon.output()

    lines = log_records(daemon.output())
    drain = next(i for i, line in enumerate(lines) if line.get("msg", "").endswith(": draining"))
    after = lines[drain + 1 :]
    # A lease being taken when the signal came is given back at once; no other is taken.
    taken = [line["msg"].split()[5] for line in after if line["msg"].startswith("took the lease")]
    given = [line["msg"].split()[-1] for line in after if "giving back the lease" in line["msg"]]
    assert taken == given and len(taken) <= 1, f"took leases while draining: {after}"
    started = [line for line in after if line.get("state") in ("snapshotting", "streaming")]
    assert not started, f"started pipelines while draining: {started}"
    held = mongo_client[f"{db}_syncd"]["leases"].count_documents(
        {"kind": {"$ne": "process"}, "$expr": {"$gt": ["$expires_at", "$$NOW"]}}
    )
    assert held == 0, "a lease outlived the process"
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


@pytest.mark.timeout(240)
def test_a_pipeline_that_fails_does_not_cut_the_others_off_their_client(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, tcp_proxy_factory
):
    proxy = tcp_proxy_factory(chroma_server.host, chroma_server.port)
    db = f"stop_{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp_path / "syncd.toml", mongo_uri, ("127.0.0.1", proxy.port), db, ("p", "q"))
    settings = settings_of(cfg)
    daemon = syncd_factory(["run"], cfg)
    wait_caught_up(mongo_client, db, settings, "p", 60, "p to stream")
    wait_caught_up(mongo_client, db, settings, "q", 60, "q to stream")

    # Chroma goes away: q, with changes to apply, retries against MongoDB and Chroma.
    proxy.refuse(True)
    proxy.cut()
    mongo_client[db]["q"].insert_many([{"_id": i, "body": f"q {i}"} for i in range(5)])
    daemon.wait_for_output(r"retrying in [\d.]+s after transient error", timeout=30)

    # Someone takes p's lease and lets it lapse: the process stops p, then takes it back
    # and starts it again while Chroma is down.
    leases = mongo_client[f"{db}_syncd"]["leases"]
    mark = daemon.mark()
    lapse = {"owner": "elsewhere", "epoch": {"$add": ["$epoch", 1]}, "expires_at": "$$NOW"}
    leases.update_one({"_id": "p"}, [{"$set": lapse}])
    daemon.wait_for_output(r"took the lease of pipeline p", timeout=60, since=mark)
    wait_until(
        lambda: not daemon.is_running() or _retrying(daemon.output(mark), "p"),
        60,
        "p to start again and meet the outage, or the process to stop",
    )
    out = daemon.output()
    assert CLOSED_CLIENT not in out, out
    q_states = [line.get("state") for line in log_records(out) if line.get("pipeline") == "q"]
    assert "halted" not in q_states, q_states

    proxy.heal()
    if daemon.is_running():
        wait_caught_up(mongo_client, db, settings, "q", 90, "q to recover")
        daemon.terminate()
        assert daemon.wait(30) == 0, daemon.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def _retrying(output: str, name: str) -> bool:
    return any(
        line.get("pipeline") == name and line.get("msg", "").startswith("retrying in")
        for line in log_records(output)
    )
