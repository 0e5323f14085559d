"""`syncd rebuild`: a changed embedder and mapping built beside the live collection under
a steady write load, queries answered from one collection throughout, a switch, and a
rollback; and kill -9 at random points of a rebuild, resumed by running it again."""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess, run_syncd
from tests.harness.embedding_api import embedding_api

from .helpers import (
    Poller,
    copy_and_stop,
    diff,
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)
from .oracle import EMBEDDER, METADATA, actual, document, embedded_by_the_api, mismatch

DOCS = 300
CRASH_DOCS = 120
NEW_METADATA = ("title", "n")  # the new mapping drops tags and nested
NEW_DIMENSIONS = 32
SHORT_LEASE: Mapping[str, Any] = {"ttl_s": 4, "renew_every_s": 1}


def remote_embedder(api: Any, **more: Any) -> dict[str, Any]:
    """The new mapping's embedder: the test embedding API `api`, its key in the
    environment variable SYNCD_TEST_EMBED_KEY; `more` adds to the table."""
    return {
        "kind": "openai",
        "base_url": api.base_url,
        "model": "test-embed",
        "dimensions": NEW_DIMENSIONS,
        "api_key_env": "SYNCD_TEST_EMBED_KEY",
        **more,
    }


def _configs(
    tmp_path: Path,
    mongo_uri: str,
    chroma_server: Any,
    db: str,
    coll: str,
    page: int = 50,
    new_embedder: dict[str, Any] | None = None,
    *,
    lease: Mapping[str, Any] | None = SHORT_LEASE,
    extra: Mapping[str, Any] | None = None,
    **both: Any,
) -> Any:
    """The configurations before and after the rebuild; `lease` is their lease table
    (None: the default lease), `extra` adds top-level tables, `both` adds to both
    pipelines."""
    more = dict(extra or {})
    if lease is not None:
        more["lease"] = dict(lease)

    def make(path: str, **table: Any) -> Path:
        return write_config(
            tmp_path / path,
            mongo_uri=mongo_uri,
            chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
            checkpoint_db=f"{db}_syncd",
            extra=more,
            pipelines=[
                pipeline_table(
                    "p", db, chroma_collection=coll, snapshot_batch_size=page, **table, **both
                )
            ],
        )

    old = make("old.toml", mapping={"text": "body", "metadata": list(METADATA)}, embedder=EMBEDDER)
    new = make(
        "new.toml",
        mapping={"text": "body", "metadata": list(NEW_METADATA)},
        embedder=new_embedder or {"kind": "hashing", "dimensions": NEW_DIMENSIONS},
    )
    return old, new


class _Writes(Poller):
    """A steady write load: updates, inserts and deletes, until stopped."""

    def __init__(self, mongo_uri: str, db: str) -> None:
        super().__init__()
        self.client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
        self.docs = self.client[db]["docs"]
        self.count = 0

    def _run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            key = rng.randrange(DOCS + 50)
            version = rng.randrange(1, 5)  # the oracle's vectors stay within [-1, 1]
            if rng.random() < 0.1:
                self.docs.delete_one({"_id": key})
            else:
                self.docs.replace_one({"_id": key}, document(key, version=version), upsert=True)
            self.count += 1
            time.sleep(0.02)

    def __exit__(self, *_: Any) -> None:
        super().__exit__()
        self.client.close()


class _Queries(Poller):
    """Reads the collection by its name again and again; each answer must come from one
    collection: every record with the old mapping (4-dimensional field vectors, tags in
    the metadata) or every record with the new one (32 dimensions, no tags)."""

    def __init__(self, chroma: Any, name: str) -> None:
        super().__init__()
        self.chroma = chroma
        self.name = name
        self.seen: list[str] = []
        self.mixed: list[str] = []
        self.failed = 0

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.chroma.get_collection(self.name).get(
                    limit=40, include=["embeddings", "metadatas"]
                )
            except Exception:  # the instant between the two renames
                self.failed += 1
                continue
            kinds = {
                (len(vector), "tags.0" in (meta or {}) or "tags" in (meta or {}))
                for vector, meta in zip(got["embeddings"], got["metadatas"], strict=True)
            }
            if kinds <= {(4, True)}:
                kind = "old"
            elif kinds <= {(NEW_DIMENSIONS, False)}:
                kind = "new"
            else:
                self.mixed.append(repr(kinds))
                continue
            if kinds and (not self.seen or self.seen[-1] != kind):
                self.seen.append(kind)
            time.sleep(0.05)


def _names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"rebuild_{suffix}", f"rebuild-{suffix}"


def test_rebuild_switches_under_load_and_rolls_back(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = _names()
    old_cfg, new_cfg = _configs(tmp_path, mongo_uri, chroma_server, db, coll)
    settings = settings_of(old_cfg)
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    daemon = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
    chroma = chroma_server.client()
    old_id = str(chroma.get_collection(coll).id)

    with _Queries(chroma, coll) as queries, _Writes(mongo_uri, db) as writes:
        wait_until(lambda: writes.count > 20, 30, "writes under way")
        rebuild = syncd_factory(["rebuild", "p"], new_cfg, log_path=tmp_path / "rebuild.log")
        assert rebuild.wait(240) == ExitCode.OK, rebuild.output()
        # The daemon with the old mapping is fenced out for the switch and then waits,
        # alive, without writing the old mapping into the new collection.
        wait_until(
            lambda: "rebuilt with another mapping" in daemon.output(), 60, "the old daemon to wait"
        )
        assert daemon.is_running(), daemon.output()
        row = _status(new_cfg)
        assert row["last_error"]["error_class"] == "MappingSwitchedError", row
        assert row["rebuild"] == {"state": "switched", "previous_collection": f"{coll}--v1"}, row
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
        new_daemon = syncd_factory(["run"], new_cfg, log_path=tmp_path / "new.log")
        wait_until(lambda: writes.count > 200 + 20, 120, "more writes after the switch")
    assert not queries.mixed, queries.mixed[:5]
    assert queries.seen == ["old", "new"], queries.seen

    wait_caught_up(mongo_client, db, settings, "p", 90, "the new daemon to catch up")
    assert_switched(chroma, coll, old_id, docs)

    # Changes after the switch reach the previous collection once it is rolled back.
    for key in range(5):
        docs.replace_one({"_id": key}, document(key, version=4), upsert=True)
    new_daemon.terminate()
    assert new_daemon.wait(30) == ExitCode.OK, new_daemon.output()
    back = syncd_factory(["rebuild", "p", "--rollback"], new_cfg, log_path=tmp_path / "rb.log")
    assert back.wait(120) == ExitCode.OK, back.output()
    daemon = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old-again.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the rolled-back pipeline")
    live = chroma.get_collection(coll)
    assert str(live.id) == old_id
    problem = mismatch(docs.find(), live)
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    drop = syncd_factory(["rebuild", "p", "--drop-previous"], old_cfg, log_path=tmp_path / "d.log")
    assert drop.wait(60) == ExitCode.OK, drop.output()
    left = {c.name for c in chroma.list_collections()}
    assert f"{coll}--v2" not in left and coll in left, left
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def assert_new_mapping(chroma: Any, coll: str, docs: Any) -> None:
    """The collection named `coll` mirrors the MongoDB collection `docs` under the new
    mapping: NEW_METADATA, and vectors of NEW_DIMENSIONS as the test embedding API (or
    the hashing embedder) makes them."""
    want = embedded_by_the_api(
        docs.find(), dimensions=NEW_DIMENSIONS, metadata_fields=list(NEW_METADATA)
    )
    problem = diff(want, actual(chroma.get_collection(coll)))
    assert not problem, problem


def assert_switched(chroma: Any, coll: str, old_id: str, docs: Any) -> None:
    """The rebuild switched: the name `coll` serves a collection other than `old_id`,
    under the new mapping, and `old_id` is kept as `<coll>--v1` for a rollback."""
    assert str(chroma.get_collection(coll).id) != old_id
    assert_new_mapping(chroma, coll, docs)
    names = {c.name: str(c.id) for c in chroma.list_collections()}
    assert names.get(f"{coll}--v1") == old_id, names


def _status(cfg: Path) -> dict[str, Any]:
    done = run_syncd(["status", "--json"], cfg)
    rows = json.loads(done.stdout)
    return dict(rows[0])


def test_rebuild_killed_at_random_points_ends_with_one_live_collection(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    """kill -9 of `syncd rebuild` at random instants (snapshot, catch-up, switch), each
    time run again, while a daemon with the old mapping streams; in the end the
    collection's name serves MongoDB under the new mapping and one previous is kept."""
    with embedding_api(dimensions=NEW_DIMENSIONS, delay_s=EMBED_DELAY_S) as api:
        _killed_at_random_points(
            tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, api
        )


# The new mapping embeds through the test API, answering each request this late: every
# page of the snapshot and every batch of the catch-up takes at least this long, so a
# kill drawn within a window shorter than it lands before the step it follows is done,
# whatever the machine's speed (a run that outlived its window would finish the whole
# rebuild and leave later runs nothing to interrupt).
EMBED_DELAY_S = 0.5


def _killed_at_random_points(
    tmp_path: Path,
    mongo_uri: str,
    mongo_client: Any,
    chroma_server: Any,
    syncd_factory: Any,
    api: Any,
) -> None:
    db, coll = _names()
    # Small pages of few documents: each run is cheap, and the snapshot still spans
    # several pages for the random kills to fall between.
    embedder = {
        "kind": "openai",
        "base_url": api.base_url,
        "model": "test-embed",
        "dimensions": NEW_DIMENSIONS,
        "api_key": api.api_key,
    }
    old_cfg, new_cfg = _configs(
        tmp_path, mongo_uri, chroma_server, db, coll, page=15, new_embedder=embedder
    )
    settings = settings_of(old_cfg)
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(CRASH_DOCS)])
    daemon = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
    rng = random.Random(int(os.environ.get("SYNCD_REBUILD_CRASH_SEED", "11")))
    # Random instants of the snapshot first (each run resumes the one killed before it),
    # then of the build's streaming (its catch-up, the live lease, the catch-up under it,
    # the switch), then just after each later step is logged: the end of the snapshot,
    # the catch-up under the live lease, and between the renames. The windows are short:
    # a run that outlives its window finishes the whole rebuild, and later runs have
    # nothing to do.
    random_runs = int(os.environ.get("SYNCD_REBUILD_CRASH_RUNS", "7"))
    in_snapshot = (random_runs + 1) // 2
    window = EMBED_DELAY_S * 0.8
    plan: list[tuple[str, float]] = [("state=snapshotting", window)] * in_snapshot
    plan += [("snapshot complete", window)]
    plan += [("state=streaming", window)] * (random_runs - in_snapshot)
    plan += [
        (r"took the lease of pipeline p \(", 0.1),
        ("renamed Chroma collection", 0.0),
    ]
    # The killed run's lease is live for a few seconds more: the re-run takes it over
    # with --force, as the refusal's hint says.
    args = ["rebuild", "p"]
    kills = 0
    log = tmp_path / "rebuild.log"
    for attempt, (marker, delay) in enumerate(plan):
        rebuild = SyncdProcess(args, new_cfg, log_path=log).start()
        args = ["rebuild", "p", "--force"]
        try:
            if marker:
                rebuild.wait_for_output(marker, 120)
            # A new text once the run is under way: it must embed it (EMBED_DELAY_S)
            # before it can switch. A change made before the run starts can be copied by
            # its snapshot already, and then its catch-up had nothing to embed and ran
            # past the window to the switch (and later runs had nothing to interrupt).
            docs.replace_one({"_id": attempt}, document(attempt, version=attempt % 4 + 1))
            time.sleep(rng.uniform(0, delay))
        except AssertionError:
            pass  # it finished first
        if rebuild.returncode is not None:
            assert rebuild.returncode == ExitCode.OK, rebuild.output()
            continue
        rebuild.kill()
        kills += 1
    rebuild = SyncdProcess(args, new_cfg, log_path=log).start()
    assert rebuild.wait(240) == ExitCode.OK, rebuild.output()
    assert len(plan) >= 10 or random_runs < 7
    # Every run killed within a window shorter than the embedding delay is killed; the
    # two just after a logged step may see the rebuild finish first.
    assert kills >= random_runs + 1, (kills, rebuild.output())
    # A last run after the switch finds nothing left to do.
    final = SyncdProcess(args, new_cfg, log_path=tmp_path / "rebuild.log").start()
    assert final.wait(120) == ExitCode.OK, final.output()
    assert "nothing to rebuild" in final.output(), final.output()
    daemon.terminate()
    daemon.wait(30)
    new_daemon = syncd_factory(["run"], new_cfg, log_path=tmp_path / "new.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the new daemon")
    chroma = chroma_server.client()
    assert_new_mapping(chroma, coll, docs)
    ours = sorted(c.name for c in chroma.list_collections() if c.name.startswith(coll))
    assert ours == [coll, f"{coll}--v1"], ours
    cp = load_checkpoint(settings, "p")
    assert cp is not None and cp.chroma_collection_id == str(chroma.get_collection(coll).id)
    new_daemon.terminate()
    new_daemon.wait(30)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_a_metadata_only_rebuild_reuses_every_vector(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    db, coll = _names()
    with embedding_api(dimensions=NEW_DIMENSIONS) as api:
        embedder = remote_embedder(api)
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}

        def config(path: str, metadata: list[str]) -> Path:
            return write_config(
                tmp_path / path,
                mongo_uri=mongo_uri,
                chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
                checkpoint_db=f"{db}_syncd",
                pipelines=[
                    pipeline_table(
                        "p",
                        db,
                        chroma_collection=coll,
                        mapping={"text": "body", "metadata": metadata},
                        embedder=embedder,
                    )
                ],
            )

        old_cfg, new_cfg = config("old.toml", ["n"]), config("new.toml", ["n", "title"])
        settings = settings_of(old_cfg, env)
        docs = mongo_client[db]["docs"]
        docs.insert_many([document(i) for i in range(60)])
        copy_and_stop(syncd_factory, mongo_client, old_cfg, settings, db, env=env)
        before = len(api.inputs)
        done = run_syncd(["rebuild", "p"], new_cfg, env, timeout=180)
        assert done.returncode == ExitCode.OK, done.stdout + done.stderr
        # Only the sample that shows the embedder is the live collection's is embedded.
        assert len(api.inputs) - before == 3, api.inputs[before:]
        assert (
            "60 vectors reused from the live collection and 0 texts embedded by this run of "
            "the rebuild\n" in done.stdout
        ), done.stdout
        chroma = chroma_server.client()
        want = embedded_by_the_api(
            docs.find(), dimensions=NEW_DIMENSIONS, metadata_fields=["n", "title"]
        )
        problem = diff(want, actual(chroma.get_collection(coll)))
        assert not problem, problem
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
