"""Invariant 9: the checkpoint knows which Chroma collection it describes.

A collection deleted or replaced behind syncd's back took the records synced so far
with it. `syncd run` must not create an empty namesake and stream on from the old
position. Stopping with exit 5 and following its hint is in `test_runbook.py`; here,
`on_sink_lost = "resnapshot"` (into a replacement, and noticed by a quiet pipeline),
and checkpoints written before syncd recorded the collection's id."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import (
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)
from .oracle import DIMENSIONS, EMBEDDER, mismatch


def _vec(n: float) -> list[float]:
    return [1.0, n / 8, 0.25, -0.5]


def _config(tmp_path: Path, mongo_uri: str, chroma_server: Any, db: str, coll: str, **extra: Any):
    return write_config(
        tmp_path / f"syncd-{uuid.uuid4().hex[:6]}.toml",
        mongo_uri=mongo_uri,
        chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
        checkpoint_db=f"{db}_syncd",
        pipelines=[
            pipeline_table(
                "p",
                db,
                chroma_collection=coll,
                mapping={"text": "body", "metadata": ["title"]},
                embedder=EMBEDDER,
                **extra,
            )
        ],
    )


def _doc(i: int) -> dict[str, Any]:
    return {"_id": i, "body": f"document {i}", "title": f"title {i}", "vec": _vec(i)}


def _names() -> tuple[str, str]:
    return f"lost_{uuid.uuid4().hex[:8]}", f"lost-{uuid.uuid4().hex[:8]}"


def _synced(tmp_path, mongo_client, syncd_factory, cfg, db):
    settings = settings_of(cfg)
    daemon = syncd_factory(["run"], cfg, log_path=tmp_path / f"run-{uuid.uuid4().hex[:6]}.log")
    wait_caught_up(mongo_client, db, settings, "p", 60, "the pipeline to catch up")
    return settings, daemon


def _stopped(daemon: Any) -> None:
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def test_a_replaced_collection_is_resnapshotted_by_policy(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll_name = _names()
    cfg = _config(tmp_path, mongo_uri, chroma_server, db, coll_name, on_sink_lost="resnapshot")
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i) for i in range(4)])
    settings, daemon = _synced(tmp_path, mongo_client, syncd_factory, cfg, db)
    _stopped(daemon)

    chroma = chroma_server.client()
    chroma.delete_collection(coll_name)
    other = chroma.create_collection(
        coll_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    other.add(ids=["theirs"], embeddings=[[0.0] * DIMENSIONS], documents=["not ours"])
    docs.insert_one(_doc(4))
    docs.delete_one({"_id": 0})

    _, daemon = _synced(tmp_path, mongo_client, syncd_factory, cfg, db)
    assert "re-snapshotting as configured" in daemon.output()
    problem = mismatch(docs.find(), other, metadata_fields=["title"])
    assert not problem, problem  # every document copied again, their record gone
    cp = load_checkpoint(settings, "p")
    assert cp is not None and cp.chroma_collection_id == str(other.id)
    _stopped(daemon)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_a_quiet_pipeline_notices_and_resnapshots_by_policy(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll_name = _names()
    cfg = _config(tmp_path, mongo_uri, chroma_server, db, coll_name, on_sink_lost="resnapshot")
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i) for i in range(3)])
    settings, daemon = _synced(tmp_path, mongo_client, syncd_factory, cfg, db)
    chroma = chroma_server.client()
    first_id = str(chroma.get_collection(coll_name).id)
    mark = daemon.mark()
    chroma.delete_collection(coll_name)  # nothing is written: only the idle check can see it
    daemon.wait_for_output("re-snapshotting as configured", 60, since=mark)

    def rebuilt() -> bool:
        cp = load_checkpoint(settings, "p")
        return bool(cp and cp.phase == "streaming" and cp.chroma_collection_id != first_id)

    wait_until(rebuilt, 60, "the re-snapshot")
    docs.insert_one(_doc(3))
    wait_caught_up(mongo_client, db, settings, "p", 60, "the change after the re-snapshot")
    problem = mismatch(docs.find(), chroma.get_collection(coll_name), metadata_fields=["title"])
    assert not problem, problem
    assert daemon.is_running(), daemon.output()
    _stopped(daemon)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_a_checkpoint_without_the_id_adopts_the_collection_or_refuses_when_it_is_gone(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll_name = _names()
    cfg = _config(tmp_path, mongo_uri, chroma_server, db, coll_name)
    docs = mongo_client[db]["docs"]
    docs.insert_many([_doc(i) for i in range(3)])
    _, daemon = _synced(tmp_path, mongo_client, syncd_factory, cfg, db)
    _stopped(daemon)
    checkpoints = mongo_client[f"{db}_syncd"]["checkpoints"]

    def forget_the_id() -> None:  # as a checkpoint written before syncd recorded it
        checkpoints.update_one({"_id": "p"}, {"$unset": {"chroma_collection_id": ""}})
        assert "chroma_collection_id" not in checkpoints.find_one({"_id": "p"})

    forget_the_id()
    docs.insert_one(_doc(3))
    _, daemon = _synced(tmp_path, mongo_client, syncd_factory, cfg, db)
    chroma = chroma_server.client()
    current = str(chroma.get_collection(coll_name).id)
    assert checkpoints.find_one({"_id": "p"}).get("chroma_collection_id") == current
    shown = run_syncd(["tokens", "show", "p", "--json"], cfg)
    assert json.loads(shown.stdout)["pipelines"][0]["chroma_collection_id"] == current
    problem = mismatch(docs.find(), chroma.get_collection(coll_name), metadata_fields=["title"])
    assert not problem, problem
    _stopped(daemon)

    forget_the_id()
    chroma.delete_collection(coll_name)
    refused = syncd_factory(["run"], cfg, log_path=tmp_path / "refused.log")
    assert refused.wait(60) == ExitCode.SINK, refused.output()
    said = refused.output()
    assert f"there is no Chroma collection named {coll_name!r}" in said, said
    assert "Traceback" not in said, said
    assert coll_name not in {c.name for c in chroma.list_collections()}
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
