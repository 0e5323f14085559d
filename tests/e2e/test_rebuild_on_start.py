"""`on_mapping_change = "rebuild"`: `syncd run` started with a changed mapping builds the
new collection beside the live one by itself, under a steady write load, while another
pipeline of the same process streams on; ready throughout; a SIGTERM in the middle is
continued by the next start; then the switch, and the new mapping streams."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import embedding_api
from tests.harness.ports import free_port

from .helpers import (
    Poller,
    copy_and_stop,
    http_get,
    metric_at,
    metric_sample,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)
from .oracle import EMBEDDER, METADATA, document, mismatch
from .test_rebuild import (
    DOCS,
    NEW_DIMENSIONS,
    NEW_METADATA,
    _configs,
    _Queries,
    _Writes,
    assert_switched,
    remote_embedder,
)

PHASES = ("snapshot", "catching_up", "switching", "switched", "stopped")


def _running(body: str) -> set[str]:
    """The pipelines a /readyz answer says this process runs."""
    try:
        pipelines = json.loads(body).get("pipelines") or {}
    except ValueError:
        return set()
    return {name for name, s in pipelines.items() if s.get("state") != "stopped"}


def _entries(body: str) -> set[str]:
    """Every pipeline a /readyz answer lists."""
    try:
        return set(json.loads(body).get("pipelines") or {})
    except ValueError:
        return set()


class _Probe(Poller):
    """Polls /readyz and /metrics: every answer once ready, and each rebuild phase seen."""

    def __init__(self, listen: str) -> None:
        super().__init__()
        self.base = f"http://{listen}"
        self.not_ready: list[str] = []
        self.phases: list[str] = []
        self.scanned = 0.0
        self.estimated = 0.0
        self.lag_exported = False
        self.entries: set[str] = set()  # every pipeline /readyz or a pipeline metric named

    def _run(self) -> None:
        ready = False
        while not self.stop.is_set():
            status, body = http_get(f"{self.base}/readyz")
            self.entries |= _entries(body)
            if status == 200 and _running(body) >= {"p", "q"}:
                # Ready once the process runs both pipelines: under leases it takes them
                # one at a time, and one not yet taken does not count until it is.
                ready = True
            elif ready and status != 200 and not self.stop.is_set():
                self.not_ready.append(f"{status}: {body[:300]}")
            metrics = http_get(f"{self.base}/metrics")[1]
            self.entries |= {
                line.split('pipeline="', 1)[1].split('"', 1)[0]
                for line in metrics.splitlines()
                if line.startswith("syncd_pipeline_") and 'pipeline="' in line
            }
            for phase in PHASES:
                value = metric_sample(metrics, "syncd_rebuild_phase", pipeline="p", phase=phase)
                if value == 1 and (not self.phases or self.phases[-1] != phase):
                    self.phases.append(phase)
            scanned = metric_sample(metrics, "syncd_rebuild_documents_scanned", pipeline="p")
            estimated = metric_sample(metrics, "syncd_rebuild_documents_estimated", pipeline="p")
            lag = metric_sample(metrics, "syncd_rebuild_lag_seconds", pipeline="p")
            self.lag_exported = self.lag_exported or lag is not None
            self.scanned = max(self.scanned, scanned or 0.0)
            self.estimated = max(self.estimated, estimated or 0.0)
            self.stop.wait(0.1)


def test_run_rebuilds_a_changed_mapping_beside_the_live_collection(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    suffix = uuid.uuid4().hex[:8]
    db, coll, other = f"onchange_{suffix}", f"onchange-{suffix}", f"other-{suffix}"
    listen = f"127.0.0.1:{free_port()}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    mongo_client[db]["others"].insert_many([document(i) for i in range(20)])
    with embedding_api(dimensions=NEW_DIMENSIONS) as api:
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}

        def config(path: str, **p: Any) -> Path:
            q = pipeline_table(
                "q", db, collection="others", chroma_collection=other,
                mapping={"text": "body", "metadata": list(METADATA)}, embedder=EMBEDDER,
            )  # fmt: skip
            return write_config(
                tmp_path / path,
                mongo_uri=mongo_uri,
                chroma={"mode": "http", "host": chroma_server.host, "port": chroma_server.port},
                checkpoint_db=f"{db}_syncd",
                extra={"lease": {"ttl_s": 4, "renew_every_s": 1}, "telemetry": {"listen": listen}},
                pipelines=[
                    pipeline_table("p", db, chroma_collection=coll, snapshot_batch_size=50, **p),
                    q,
                ],
            )

        old_cfg = config("old.toml", mapping={"text": "body", "metadata": list(METADATA)},
                         embedder=EMBEDDER)  # fmt: skip
        new_cfg = config(
            "new.toml",
            on_mapping_change="rebuild",
            mapping={"text": "body", "metadata": list(NEW_METADATA)},
            # timeout_s: held on purpose below; an answer that late is not an outage
            embedder=remote_embedder(api, timeout_s=300),
        )
        settings = settings_of(old_cfg)
        daemon = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
        wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
        wait_caught_up(mongo_client, db, settings, "q", 90, "the other pipeline's first copy")
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
        chroma = chroma_server.client()
        old_id = str(chroma.get_collection(coll).id)

        with _Queries(chroma, coll) as queries, _Writes(mongo_uri, db) as writes:
            # First start: the embedding service answers the sample that compares the
            # embedders and one request of the snapshot, then holds the next one.
            api.hold(2)
            with _Probe(listen) as probe:
                daemon = syncd_factory(["run"], new_cfg, env, log_path=tmp_path / "new1.log")
                wait_until(lambda: api.held() > 0, 120, "the rebuild's snapshot to embed")
                wait_until(lambda: "snapshot" in probe.phases or None, 30, "the snapshot phase")
                # The other pipeline streams on meanwhile.
                others = mongo_client[db]["others"]
                others.replace_one({"_id": 3}, document(3, version=2))
                wait_caught_up(mongo_client, db, settings, "q", 60, "the other pipeline")
                problem = mismatch(others.find(), chroma.get_collection(other))
                assert not problem, problem
                row = _status(new_cfg, env, "p")
                assert row["state"] == "rebuilding", row
                assert row["rebuild"]["state"] == "building", row
                assert row["rebuild"]["collection"] == f"{coll}--v2", row
                assert str(chroma.get_collection(coll).id) == old_id
            # SIGTERM while a request of the build is in flight: the daemon drains (and
            # is not ready from then on).
            daemon.terminate()
            api.release()
            assert daemon.wait(60) == ExitCode.OK, daemon.output()
            assert not probe.not_ready, probe.not_ready[:3]
            assert probe.phases[0] == "snapshot", probe.phases
            # The build is a part of p: one entry per configured pipeline.
            assert probe.entries == {"p", "q"}, probe.entries
            assert str(chroma.get_collection(coll).id) == old_id

            # The next start continues the build, and switches.
            with _Probe(listen) as probe:
                daemon = syncd_factory(["run"], new_cfg, env, log_path=tmp_path / "new2.log")
                daemon.wait_for_output(f"continuing the rebuild of p into {coll}--v2", 120)
                wait_until(lambda: "switched" in probe.phases or None, 240, "the switch")
                count = writes.count
                wait_until(lambda: writes.count > count + 20, 60, "writes after the switch")
                wait_caught_up(mongo_client, db, settings, "p", 90, "the new mapping to stream")
            assert not probe.not_ready, probe.not_ready[:3]
            assert probe.entries == {"p", "q"}, probe.entries
            assert probe.phases[0] in ("snapshot", "catching_up"), probe.phases
            assert probe.phases[-1] == "switched", probe.phases
            # The estimate is the collection's size when the scan began: the write load
            # inserts and deletes documents, so it is DOCS give or take what was written.
            low, high = DOCS - writes.count, DOCS + writes.count
            assert probe.scanned > 0, probe.scanned
            assert low <= probe.estimated <= high, (probe.estimated, low, high)
            assert probe.lag_exported
        assert not queries.mixed, queries.mixed[:5]
        assert queries.seen == ["old", "new"], queries.seen

        wait_caught_up(mongo_client, db, settings, "p", 90, "the new mapping to stream")
        assert_switched(chroma, coll, old_id, docs)
        row = _status(new_cfg, env, "p")
        assert row["state"] == "streaming", row
        assert row["rebuild"] == {"state": "switched", "previous_collection": f"{coll}--v1"}, row
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def _status(cfg: Path, env: dict[str, str], name: str) -> dict[str, Any]:
    done = run_syncd(["status", "--json"], cfg, env)
    return next(dict(row) for row in json.loads(done.stdout) if row["pipeline"] == name)


def test_run_rebuilds_beside_a_process_that_streams_the_old_mapping(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    """A process with the old configuration holds the pipeline and streams it on; one
    started with the new mapping and on_mapping_change = "rebuild" builds beside it, as
    `syncd rebuild` does, fences it out at the switch, and streams the new mapping."""
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"beside_{suffix}", f"beside-{suffix}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])

    old_cfg, new_cfg = _configs(
        tmp_path, mongo_uri, chroma_server, db, coll, on_mapping_change="rebuild"
    )
    settings = settings_of(old_cfg)
    old = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
    chroma = chroma_server.client()
    old_id = str(chroma.get_collection(coll).id)
    with _Queries(chroma, coll) as queries, _Writes(mongo_uri, db) as writes:
        new = syncd_factory(["run"], new_cfg, log_path=tmp_path / "new.log")
        new.wait_for_output("rebuilding it beside that process", 60)
        new.wait_for_output("rebuild of p switched", 240)
        count = writes.count
        wait_until(lambda: writes.count > count + 20, 60, "writes after the switch")
        wait_caught_up(mongo_client, db, settings, "p", 90, "the new mapping to stream")
    assert not queries.mixed, queries.mixed[:5]
    assert queries.seen == ["old", "new"], queries.seen
    wait_caught_up(mongo_client, db, settings, "p", 90, "the last writes")
    assert_switched(chroma, coll, old_id, docs)
    # The old process was fenced out, lives on, and neither takes the pipeline back nor
    # rebuilds it back to its own mapping.
    assert old.is_running(), old.output()
    assert "rebuilding it beside" not in old.output()
    old.terminate()
    assert old.wait(30) == ExitCode.OK, old.output()
    new.terminate()
    assert new.wait(30) == ExitCode.OK, new.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_run_after_a_kill_9_says_the_lease_beside_it_may_be_left_by_a_process_that_stopped(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    """The process of the old mapping is killed (-9) and leaves its lease until it
    expires: one started with the new mapping rebuilds beside that lease, says it may be
    left by a process that stopped and when it expires, and switches."""
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"besidek_{suffix}", f"besidek-{suffix}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    old_cfg, new_cfg = _configs(
        tmp_path, mongo_uri, chroma_server, db, coll, on_mapping_change="rebuild",
        lease={"ttl_s": 60, "renew_every_s": 2},
    )  # fmt: skip
    settings = settings_of(old_cfg)
    old = syncd_factory(["run"], old_cfg, log_path=tmp_path / "old.log")
    wait_caught_up(mongo_client, db, settings, "p", 90, "the first copy")
    old_id = str(chroma_server.client().get_collection(coll).id)
    old.kill()
    new = syncd_factory(["run"], new_cfg, log_path=tmp_path / "new.log")
    new.wait_for_output(
        r"pipeline p has another mapping than its lease's holder, \S+: another process, or "
        r"one that stopped and left it \(it expires in \d+ s unless renewed\): rebuilding "
        "it beside that process",
        60,
    )
    new.wait_for_output("rebuild of p switched", 240)
    wait_caught_up(mongo_client, db, settings, "p", 90, "the new mapping to stream")
    assert_switched(chroma_server.client(), coll, old_id, docs)
    new.terminate()
    assert new.wait(30) == ExitCode.OK, new.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def test_syncd_rebuild_serves_the_rebuild_metrics_with_listen(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"listen_{suffix}", f"listen-{suffix}"
    listen = f"127.0.0.1:{free_port()}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(60)])
    with embedding_api(dimensions=NEW_DIMENSIONS) as api:
        env = {"SYNCD_TEST_EMBED_KEY": api.api_key}
        old_cfg, new_cfg = _configs(
            tmp_path, mongo_uri, chroma_server, db, coll, page=1000, lease=None,
            new_embedder=remote_embedder(api, timeout_s=300),
        )  # fmt: skip
        copy_and_stop(syncd_factory, mongo_client, old_cfg, settings_of(old_cfg), db,
                      log_path=tmp_path / "old.log")  # fmt: skip
        api.hold(0)
        rebuild = syncd_factory(["rebuild", "p", "--listen", listen], new_cfg, env)
        wait_until(lambda: api.held() > 0, 120, "the rebuild to embed")
        assert wait_until(
            lambda: (
                metric_at(listen, "syncd_rebuild_phase", pipeline="p", phase="snapshot") == 1
                or None
            ),
            30,
            "the snapshot phase on /metrics",
        )
        api.release()
        assert rebuild.wait(180) == ExitCode.OK, rebuild.output()
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")
