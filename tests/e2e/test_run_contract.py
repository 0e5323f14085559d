"""What `syncd run` and `syncd check` promise operators: refusing a changed mapping,
`--resync`, connectivity checks, and a clean exit on SIGTERM."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.ports import free_port

from .helpers import (
    chroma_records,
    diff,
    expected_records,
    pipeline_table,
    settings_of,
    wait_caught_up,
    write_config,
)


def _config(
    tmp_path: Path, mongo_uri: str, chroma: Any, db: str, coll: str, **mapping: Any
) -> Path:
    return write_config(
        tmp_path / f"syncd-{uuid.uuid4().hex[:6]}.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma.host, "port": chroma.port},
        checkpoint_db=f"{db}_syncd",
        extra={"lease": {"enabled": False}},
        pipelines=[pipeline_table("contract", db, chroma_collection=coll, mapping=mapping)],
    )


def test_changed_mapping_is_refused_until_resync(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = f"fp_{uuid.uuid4().hex[:8]}", f"fp-{uuid.uuid4().hex[:8]}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([{"_id": i, "body": f"doc {i}", "title": f"t{i}"} for i in range(10)])
    first = _config(tmp_path, mongo_uri, chroma_server, db, coll, metadata=["n"])
    settings = settings_of(first)
    daemon = syncd_factory(["run"], first)
    wait_caught_up(mongo_client, db, settings, "contract", 60, "sync")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK

    changed = _config(tmp_path, mongo_uri, chroma_server, db, coll, metadata=["title"])
    refused = syncd_factory(["run"], changed)
    assert refused.wait(60) == ExitCode.CONFIG
    out = refused.output()
    assert "mapping changed" in out and "syncd snapshot contract" in out and "--resync" in out

    resync = syncd_factory(["run", "--resync"], changed)
    new_settings = settings_of(changed)
    wait_caught_up(mongo_client, db, new_settings, "contract", 90, "resync")
    resync.terminate()
    assert resync.wait(30) == ExitCode.OK
    chroma = chroma_server.client().get_collection(coll)
    expected = expected_records(new_settings, "contract", list(docs.find()))
    assert not diff(expected, chroma_records(chroma))
    assert all(r["metadata"].get("title") for r in chroma_records(chroma).values())


def test_check_reaches_every_server_and_names_the_one_that_fails(
    tmp_path, mongo_uri, chroma_server
):
    db, coll = f"chk_{uuid.uuid4().hex[:8]}", f"chk-{uuid.uuid4().hex[:8]}"
    good = _config(tmp_path, mongo_uri, chroma_server, db, coll)
    result = run_syncd(["check"], config=good, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok    ") >= 4, result.stdout

    class Closed:
        host = "127.0.0.1"
        port = free_port()

    bad = _config(tmp_path, mongo_uri, Closed, db, coll)
    result = run_syncd(["check"], config=bad, timeout=120)
    assert result.returncode == ExitCode.SINK, result.stdout + result.stderr
    assert "FAIL  Chroma" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
