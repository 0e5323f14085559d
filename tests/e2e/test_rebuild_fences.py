"""A daemon on the old mapping, quiet at the instant a `syncd rebuild` switches its
collection's name to vectors of another size, is fenced out and waits: it never stops
with the new collection's size as a fatal sink error, and never writes the old mapping
into it. Under `on_mapping_change = "refuse"` and `"rebuild"`; each part of the hint it
shows, run as printed, brings the stores together."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import embedding_api

from .helpers import settings_of, wait_caught_up, wait_until
from .oracle import document, mismatch
from .test_rebuild import _configs, _names, _Writes, assert_new_mapping, remote_embedder
from .test_rebuild_on_start import _status
from .test_rebuild_waits import _waiting

DOCS = 60  # and the write load reaches keys up to 350: new keys below start at 1000
# The daemon looks its collection up by name whenever it has been quiet this long, and
# finds its lease taken only at its next renewal. The switch (the rebuild's last
# catch-up under the lease it took, then two renames: well under a second) mostly falls
# between two looks, and the first look after it mostly comes before that renewal: the
# daemon then finds the name serving the new collection while it still streams.
QUIET_S = 3
LEASE = {"ttl_s": 180, "renew_every_s": 60}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("on_mapping_change", ["refuse", "rebuild"])
def test_a_quiet_daemon_switched_to_vectors_of_another_size_waits(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, on_mapping_change
):
    db, coll = _names()
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    with embedding_api() as api:  # the new mapping's vectors: 32 numbers, the old ones 4
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}
        old_cfg, new_cfg = _configs(
            tmp_path, mongo_uri, chroma_server, db, coll,
            new_embedder=remote_embedder(api, timeout_s=300), lease=LEASE,
            on_mapping_change=on_mapping_change, retry_max_backoff_s=1,
            idle_checkpoint_interval_s=QUIET_S,
        )  # fmt: skip
        settings = settings_of(old_cfg)
        daemon = syncd_factory(["run"], old_cfg, env, log_path=tmp_path / "old.log")
        wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
        chroma = chroma_server.client()
        old_id = str(chroma.get_collection(coll).id)

        # The rebuild builds under a write load the daemon streams; held in its build
        # until the load is over and the daemon has applied all of it.
        api.hold(2)
        rebuild = syncd_factory(["rebuild", "p"], new_cfg, env, log_path=tmp_path / "rb.log")
        with _Writes(mongo_uri, db) as writes:
            wait_until(lambda: api.held() > 0 and writes.count > 50, 60, "writes during the build")
        wait_caught_up(mongo_client, db, settings, "p", 60, "the daemon to apply the writes")
        api.release()
        assert rebuild.wait(240) == ExitCode.OK, rebuild.output()

        # The daemon waits, alive, and says why and what to do.
        def waiting() -> dict[str, Any] | None:
            assert daemon.is_running(), daemon.output()  # never stopped by the switch
            return _waiting(_status(old_cfg, env, "p"))

        # (It may be told it lost the lease before it waits: then once it took it back.)
        row = wait_until(waiting, 150, "the daemon to wait")
        assert "SinkFatalError" not in daemon.output(), daemon.output()
        assert "dimensional vectors" not in daemon.output(), daemon.output()
        assert "rebuilt with another mapping" in row["error"], row
        hint = row["hint"]
        assert hint.startswith("restart syncd with the configuration the rebuild used"), hint

        # Nothing of the old mapping in the switched collection: it mirrors MongoDB under
        # the new mapping, and the one switched away from is kept.
        assert str(chroma.get_collection(coll).id) != old_id
        assert_new_mapping(chroma, coll, docs)
        names = {c.name: str(c.id) for c in chroma.list_collections()}
        assert names.get(f"{coll}--v1") == old_id, names

        if on_mapping_change == "refuse":
            # The hint's first part: restart with the rebuild's configuration.
            daemon.terminate()
            assert daemon.wait(30) == ExitCode.OK, daemon.output()
            again = syncd_factory(["run"], new_cfg, env, log_path=tmp_path / "new.log")
            docs.replace_one({"_id": 1}, document(1, version=2))
            docs.insert_one(document(1000))
            wait_caught_up(mongo_client, db, settings, "p", 90, "the new configuration")
            assert_new_mapping(chroma, coll, docs)
            again.terminate()
            assert again.wait(30) == ExitCode.OK, again.output()
        else:
            # Its other part, as printed: roll back; the waiting daemon streams on into
            # the collection it wrote before.
            commands = [shlex.split(c) for c in re.findall(r"`(syncd [^`]+)`", hint)]
            assert commands and commands[0][:4] == ["syncd", "rebuild", "p", "--rollback"], hint
            done = run_syncd(commands[0][1:], env=env, timeout=120)
            assert done.returncode == ExitCode.OK, done.stdout + done.stderr
            docs.replace_one({"_id": 1}, document(1, version=3))
            docs.insert_one(document(1001))
            wait_caught_up(mongo_client, db, settings, "p", 120, "the rolled-back pipeline")
            live = chroma.get_collection(coll)
            assert str(live.id) == old_id
            problem = mismatch(docs.find(), live)
            assert not problem, problem
            assert daemon.is_running(), daemon.output()
            daemon.terminate()
            assert daemon.wait(30) == ExitCode.OK, daemon.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
