"""A daemon with `on_mapping_change = "rebuild"` whose mapping a `syncd rebuild` switched
away from waits, alive, through everything that follows: the previous collection
dropped, another rebuild (to a third mapping) under way, and its switch. It never
rebuilds back and never stops with the refusal (exit 2, which a supervisor does not
restart); restarted with the configuration the last rebuild used, it streams on."""

from __future__ import annotations

from typing import Any

from syncd.errors import ExitCode
from tests.harness.embedding_api import embedding_api

from .helpers import diff, settings_of, wait_caught_up, wait_until
from .oracle import actual, document, embedded_by_the_api
from .test_rebuild import (
    NEW_DIMENSIONS,
    NEW_METADATA,
    _configs,
    _names,
    assert_new_mapping,
    remote_embedder,
)
from .test_rebuild_on_start import _status

DOCS = 60


def _waiting(row: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's wait, if `syncd status` shows the pipeline waiting on a rebuild."""
    error = row.get("last_error") or {}
    if row.get("state") != "retrying" or error.get("error_class") != "MappingSwitchedError":
        return None
    return dict(error)


def _hint(row: dict[str, Any]) -> str:
    """The hint of the daemon's wait ("--rollback" until it waits)."""
    error = _waiting(row)
    return str(error.get("hint", "")) if error is not None else "--rollback"


def test_a_daemon_switched_away_waits_through_another_rebuild(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = _names()
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    # A (the daemon's) and B: the first rebuild's mapping.
    a_cfg, b_cfg = _configs(
        tmp_path, mongo_uri, chroma_server, db, coll,
        on_mapping_change="rebuild", retry_max_backoff_s=1,
    )  # fmt: skip
    settings = settings_of(a_cfg)
    with embedding_api(dimensions=NEW_DIMENSIONS) as api:
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}
        (tmp_path / "d").mkdir()
        # D: a third mapping (B's, with another embedder), held below while it builds.
        _, d_cfg = _configs(
            tmp_path / "d", mongo_uri, chroma_server, db, coll,
            new_embedder=remote_embedder(api, timeout_s=300),
            on_mapping_change="rebuild", retry_max_backoff_s=1,
        )  # fmt: skip
        daemon = syncd_factory(["run"], a_cfg, env, log_path=tmp_path / "a.log")
        wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
        chroma = chroma_server.client()
        a_id = str(chroma.get_collection(coll).id)

        # 2. Switched to B: the daemon waits, and may roll back to A's collection.
        b = syncd_factory(["rebuild", "p"], b_cfg, env, log_path=tmp_path / "b.log")
        assert b.wait(240) == ExitCode.OK, b.output()
        b_id = str(chroma.get_collection(coll).id)
        assert b_id != a_id
        wait_until(lambda: _waiting(_status(a_cfg, env, "p")), 60, "the daemon to wait")
        error = _waiting(_status(a_cfg, env, "p")) or {}
        assert "syncd rebuild p --rollback" in error.get("hint", ""), error

        # 3. The previous collection dropped: no rollback is offered any more.
        drop = syncd_factory(["rebuild", "p", "--drop-previous"], b_cfg, env,
                             log_path=tmp_path / "drop.log")  # fmt: skip
        assert drop.wait(60) == ExitCode.OK, drop.output()
        wait_until(
            lambda: "--rollback" not in _hint(_status(a_cfg, env, "p")),
            60,
            "the daemon's hint without a rollback",
        )
        assert daemon.is_running(), daemon.output()

        # 4. A rebuild to D, held in its build: the daemon waits for it, alive.
        api.hold(0)
        d = syncd_factory(["rebuild", "p"], d_cfg, env, log_path=tmp_path / "d.log")
        wait_until(lambda: api.held() > 0, 120, "D's build to embed")
        daemon.wait_for_output("another rebuild of this pipeline", 60)
        assert daemon.is_running(), daemon.output()
        row = _status(a_cfg, env, "p")
        assert row["state"] != "failed", row
        error = _waiting(row) or {}
        assert "another rebuild of this pipeline" in error.get("error", ""), row
        assert "--rollback" not in error.get("hint", "") and "snapshot" not in error.get(
            "hint", ""
        ), row
        assert "FingerprintMismatchError" not in daemon.output()

        # D switches (B's collection is kept for a rollback now); the daemon, fenced out
        # for the switch, takes the pipeline back and waits again: no rebuild back to A.
        api.release()
        assert d.wait(240) == ExitCode.OK, d.output()
        d_id = str(chroma.get_collection(coll).id)
        wait_until(
            lambda: "--rollback" in (_waiting(_status(a_cfg, env, "p")) or {}).get("hint", ""),
            60,
            "the daemon to wait after D's switch",
        )
        assert daemon.is_running(), daemon.output()
        assert "the mapping of p changed" not in daemon.output()  # it never rebuilt back

        # The stores: `coll` serves D's collection, B's is kept as version 2, A's is gone.
        names = {c.name: str(c.id) for c in chroma.list_collections()}
        assert d_id not in (a_id, b_id)
        assert names.get(f"{coll}--v2") == b_id, names
        assert f"{coll}--v1" not in names and a_id not in names.values(), names
        assert_new_mapping(chroma, coll, docs)
        want = embedded_by_the_api(
            docs.find(), dimensions=NEW_DIMENSIONS, metadata_fields=list(NEW_METADATA)
        )
        problem = diff(want, actual(chroma.get_collection(f"{coll}--v2")))
        assert not problem, problem

        # The hint: restart syncd with the configuration the rebuild used; it streams on.
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
        docs.replace_one({"_id": 1}, document(1, version=2))
        docs.insert_one(document(DOCS + 1))
        again = syncd_factory(["run"], d_cfg, env, log_path=tmp_path / "d-run.log")
        wait_caught_up(mongo_client, db, settings, "p", 90, "D's configuration to stream")
        assert str(chroma.get_collection(coll).id) == d_id
        assert_new_mapping(chroma, coll, docs)
        again.terminate()
        assert again.wait(30) == ExitCode.OK, again.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
