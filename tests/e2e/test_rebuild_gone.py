"""A rollback whose kept collection was deleted behind syncd's back: a clear error,
and the pipeline is not left stuck in a switch it cannot finish."""

from __future__ import annotations

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import settings_of, wait_caught_up
from .oracle import document
from .test_rebuild import _configs, _names, _status, assert_new_mapping


def test_a_rollback_to_a_deleted_collection_says_so_and_leaves_the_pipeline_streaming(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = _names()
    old_cfg, new_cfg = _configs(tmp_path, mongo_uri, chroma_server, db, coll)
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(40)])
    first = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
    wait_caught_up(mongo_client, db, settings_of(old_cfg), "p", 90, "the first copy")
    first.terminate()
    assert first.wait(30) == ExitCode.OK, first.output()
    built = run_syncd(["rebuild", "p"], new_cfg, timeout=180)
    assert built.returncode == ExitCode.OK, built.stdout + built.stderr
    chroma = chroma_server.client()
    chroma.delete_collection(f"{coll}--v1")  # the collection kept for a rollback

    back = run_syncd(["rebuild", "p", "--rollback"], new_cfg, timeout=120)

    assert back.returncode == ExitCode.SINK, back.stdout + back.stderr
    assert "is gone: there is nothing to roll back to" in back.stderr, back.stderr
    assert "run syncd with it" in back.stderr, back.stderr  # the hint, followed below
    assert "Traceback" not in back.stderr
    row = _status(new_cfg)
    assert row["rebuild"] == {"state": "switched"}, row
    daemon = syncd_factory(["run"], new_cfg, log_path=tmp_path / "new.log")
    docs.insert_many([document(i) for i in range(40, 50)])
    docs.delete_one({"_id": 3})
    wait_caught_up(mongo_client, db, settings_of(new_cfg), "p", 90, "the switched pipeline")
    assert_new_mapping(chroma, coll, docs)
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    again = run_syncd(["rebuild", "p", "--rollback"], new_cfg, timeout=60)
    assert again.returncode == ExitCode.CONFIG, again.stdout + again.stderr
    assert "no previous collection to roll back to" in again.stderr
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
