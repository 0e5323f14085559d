"""`syncd rebuild` with the file checkpoint store (`checkpoint.store = "file"`): the
build's position, the rebuild's record and the switch live in files; a rebuild, the
switch and a rollback end with the live collection mirroring MongoDB each time."""

from __future__ import annotations

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd

from .helpers import wait_caught_up
from .oracle import document

NEW_METADATA = ["title", "n"]


def test_rebuild_switch_and_rollback_with_the_file_store(
    tmp_path, mirror, mongo_client, syncd_factory
):
    store = {"checkpoint": {"store": "file", "path": str(tmp_path / "checkpoints")}}
    old = mirror("rbfile", extra=store)
    new = mirror("rbfile", db=old.db, coll=old.coll, metadata=NEW_METADATA, extra=store)
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(40)])

    def run(m, what):
        daemon = syncd_factory(["run"], m.cfg, log_path=tmp_path / f"{what}.log")
        wait_caught_up(mongo_client, m.db, m.settings, "p", 90, what)
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()

    run(old, "the first copy")
    old_id = str(old.collection().id)

    done = run_syncd(["rebuild", "p"], new.cfg, timeout=180)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert (tmp_path / "checkpoints").is_dir()
    assert str(new.collection().id) != old_id
    for key in range(5):  # changes after the switch, streamed into the new collection
        docs.replace_one({"_id": key}, document(key, version=3))
    run(new, "the new mapping to catch up")
    problem = new.mismatch(docs.find())
    assert not problem, problem

    back = run_syncd(["rebuild", "p", "--rollback"], new.cfg, timeout=120)
    assert back.returncode == ExitCode.OK, back.stdout + back.stderr
    assert str(old.collection().id) == old_id
    run(old, "the rolled-back pipeline to replay the changes since the switch")
    problem = old.mismatch(docs.find())
    assert not problem, problem

    drop = run_syncd(["rebuild", "p", "--drop-previous"], old.cfg, timeout=120)
    assert drop.returncode == ExitCode.OK, drop.stdout + drop.stderr
    names = {c.name for c in old.chroma.client().list_collections()}
    assert old.coll in names and f"{old.coll}--v2" not in names, names
