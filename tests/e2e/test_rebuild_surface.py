"""What a rebuild shows outside: `syncd check` agrees with what `syncd run` will do with a
changed mapping; the progress of a snapshot page being embedded moves before the page is
done (in-daemon rebuild, `syncd rebuild`, `syncd snapshot`); and the build is a part of
its pipeline in `/readyz` and the pipeline metrics: one entry, `rebuilding`, and
`retrying` while the build cannot reach Chroma."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.embedding_api import EmbeddingAPI, embedding_api
from tests.harness.ports import free_port

from .helpers import (
    Poller,
    copy_and_stop,
    diff,
    http_get,
    log_records,
    metric_at,
    settings_of,
    wait_caught_up,
    wait_until,
)
from .mirror import Mirror
from .oracle import actual, document, embedded_by_the_api
from .test_halts import _hinted_commands, _run_hinted
from .test_rebuild import (
    NEW_DIMENSIONS,
    _configs,
    assert_new_mapping,
    assert_switched,
    remote_embedder,
)
from .test_rebuild_on_start_ends import HASHING

DOCS = 200
PAGE = 1000  # snapshot_batch_size: the documents are one snapshot page
PER_REQUEST = 10  # embedder.batch_size: the page takes 20 embedding requests


def _remote(api: EmbeddingAPI) -> dict[str, Any]:
    # timeout_s: held on purpose; an answer that late is not an outage
    return remote_embedder(api, batch_size=PER_REQUEST, embed_concurrency=1, timeout_s=300)


@dataclass
class _Page:
    """DOCS documents in `db.docs`, copied to `coll` with the old mapping; `new` rebuilds
    them with the new one, embedding through `api` (its key in `env`)."""

    db: str
    coll: str
    docs: Any
    api: EmbeddingAPI
    env: dict[str, str]
    new: Path


@contextmanager
def _page_copied(
    tmp_path: Path,
    mongo_uri: str,
    mongo_client: Any,
    chroma_server: Any,
    syncd_factory: Any,
    prefix: str,
    **options: Any,
) -> Iterator[_Page]:
    """One snapshot page copied by `syncd run` with the old mapping (`options` go to
    `_configs`), the embedding API of the new one up while the block runs; the databases
    are dropped after it."""
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"{prefix}_{suffix}", f"{prefix}-{suffix}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(DOCS)])
    with embedding_api(dimensions=NEW_DIMENSIONS) as api:
        old, new = _configs(
            tmp_path, mongo_uri, chroma_server, db, coll, page=PAGE, new_embedder=_remote(api),
            **options,
        )  # fmt: skip
        copy_and_stop(syncd_factory, mongo_client, old, settings_of(old), db,
                      log_path=tmp_path / "old.log")  # fmt: skip
        yield _Page(db, coll, docs, api, {"SYNCD_TEST_EMBED_KEY": api.api_key}, new)
    mongo_client.drop_database(db)
    mongo_client.drop_database(f"{db}_syncd")


def _status(cfg: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = run_syncd(["status", "--json"], cfg, env)
    return next(dict(row) for row in json.loads(done.stdout) if row["pipeline"] == "p")


def _within_the_page(value: float | None) -> bool:
    return value is not None and 0 < value < DOCS


@pytest.mark.timeout(300)
def test_check_says_that_run_rebuilds_a_changed_dimension(
    tmp_path, mirror, mongo_client, chroma_server, syncd_factory
):
    suffix = uuid.uuid4().hex[:8]
    db, coll = f"chkrb_{suffix}", f"chkrb-{suffix}"
    docs = mongo_client[db]["docs"]
    docs.insert_many([document(i) for i in range(40)])

    def config(dimensions: int, policy: str) -> Mirror:
        return mirror("chkrb", db=db, coll=coll, lease=None, on_mapping_change=policy,
                      embedder={"kind": "hashing", "dimensions": dimensions})  # fmt: skip

    def collection_line(cfg: Path) -> tuple[int, str]:
        done = run_syncd(["check"], cfg, timeout=90)
        assert "Traceback" not in done.stdout + done.stderr, done.stderr
        (line,) = [x for x in done.stdout.splitlines() if f"Chroma collection {coll}" in x]
        return done.returncode, line

    old = config(32, "refuse")
    copy_and_stop(syncd_factory, mongo_client, old.cfg, old.settings, db,
                  log_path=tmp_path / "old.log")  # fmt: skip

    # Refusing a changed mapping, the collection of other vectors stays an error; the
    # changed mapping comes first, as `syncd run` stops on it (exit 2) before Chroma.
    code, line = collection_line(config(64, "refuse").cfg)
    assert code == ExitCode.CONFIG, line
    assert line.startswith("FAIL") and "holds 32-dimensional vectors" in line, line

    # Rebuilding it, the live collection's vectors are no reason to refuse: `syncd run`
    # builds a new collection for the new ones.
    new = config(64, "rebuild")
    code, line = collection_line(new.cfg)
    assert code == ExitCode.OK, line
    assert line.startswith("ok    ") and "32-dimensional vectors" in line, line
    assert "`syncd run` will rebuild the pipeline beside the live collection" in line, line

    # What the line says: `syncd run` rebuilds, and the stores converge.
    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "new.log")
    daemon.wait_for_output("rebuild of p switched", 180)
    wait_caught_up(mongo_client, db, new.settings, "p", 90, "the new mapping to stream")
    live = chroma_server.client().get_collection(coll)
    problem = diff(embedded_by_the_api(docs.find(), dimensions=64), actual(live))
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    code, line = collection_line(new.cfg)
    assert code == ExitCode.OK and "64-dimensional vectors" in line, line
    assert "will rebuild" not in line, line


def test_check_refuses_as_run_does_while_the_previous_collection_is_still_kept(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old = mirror("chkkept", embedder=HASHING)
    first = mirror("chkkept", db=old.db, coll=old.coll, metadata=["title", "n"],
                   embedder=HASHING)  # fmt: skip
    again = mirror("chkkept", db=old.db, coll=old.coll, metadata=["title"],
                   embedder=HASHING, on_mapping_change="rebuild")  # fmt: skip
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(30)])
    copy_and_stop(syncd_factory, mongo_client, old.cfg, old.settings, old.db,
                  log_path=tmp_path / "old.log")  # fmt: skip
    done = run_syncd(["rebuild", "p"], first.cfg, timeout=180)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr  # keeps the previous

    # The mapping changed again: `syncd run` would refuse, and so does the check.
    done = run_syncd(["check"], again.cfg, timeout=90)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert done.returncode == ExitCode.CONFIG, done.stdout
    (line,) = [x for x in done.stdout.splitlines() if f"Chroma collection {old.coll}" in x]
    assert line.startswith("FAIL") and "is still kept from the last rebuild" in line, line
    assert "will rebuild" not in line, line
    daemon = syncd_factory(["run"], again.cfg, log_path=tmp_path / "refused.log")
    assert daemon.wait(60) == ExitCode.CONFIG, daemon.output()
    assert "is still kept" in daemon.output()

    # The hint, as the check printed it (its first command; the other one goes back).
    command = _hinted_commands(line)[0]
    assert command == ["syncd", "rebuild", "p", "--drop-previous", "--config", str(again.cfg)]
    done = _run_hinted(command, again.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    done = run_syncd(["check"], again.cfg, timeout=90)
    assert done.returncode == ExitCode.OK, done.stdout
    assert "`syncd run` will rebuild the pipeline beside the live collection" in done.stdout

    # What the check says now: `syncd run` rebuilds, and the stores converge.
    daemon = syncd_factory(["run"], again.cfg, log_path=tmp_path / "rebuilt.log")
    daemon.wait_for_output("rebuild of p switched", 180)
    wait_caught_up(mongo_client, old.db, again.settings, "p", 90, "the new mapping to stream")
    want = embedded_by_the_api(docs.find(), dimensions=32, metadata_fields=["title"])
    problem = diff(want, actual(again.collection()))
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


class _Watch(Poller):
    """Polls /readyz and /metrics: every pipeline name either answer carries."""

    def __init__(self, listen: str) -> None:
        super().__init__()
        self.listen, self.base = listen, f"http://{listen}"
        self.names: set[str] = set()

    def readiness(self) -> tuple[int, dict[str, Any]]:
        status, body = http_get(f"{self.base}/readyz")
        return status, (json.loads(body) if body.startswith("{") else {})

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_at(self.listen, name, **labels)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.names |= set(self.readiness()[1].get("pipelines") or {})
            metrics = http_get(f"{self.base}/metrics")[1]
            self.names |= {
                line.split('pipeline="', 1)[1].split('"', 1)[0]
                for line in metrics.splitlines()
                if 'pipeline="' in line and not line.startswith("#")
            }
            self.stop.wait(0.2)


@pytest.mark.timeout(400)
def test_in_daemon_rebuild_progress_moves_within_a_page_and_its_outage_is_the_pipelines(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    chroma_server = chroma_server_factory()
    listen = f"127.0.0.1:{free_port()}"
    with _page_copied(
        tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, "rbsurf",
        extra={"telemetry": {"listen": listen}}, on_mapping_change="rebuild",
        retry_max_backoff_s=1,
    ) as page:  # fmt: skip
        db, coll, docs, api, env, new = page.db, page.coll, page.docs, page.api, page.env, page.new
        old_id = str(chroma_server.client().get_collection(coll).id)

        # The embedding service answers the sample that compares the embedders and a few
        # requests of the page, then holds the next one: the page is not done.
        api.hold(4)
        with _Watch(listen) as watch:
            daemon = syncd_factory(["run"], new, env, log_path=tmp_path / "new.log")
            wait_until(lambda: api.held() > 0, 120, "the rebuild to embed the page")
            scanned = wait_until(
                lambda: (
                    _within_the_page(watch.metric("syncd_rebuild_documents_scanned", pipeline="p"))
                    or None
                ),
                60,
                "the rebuild's progress to move within the page",
            )
            assert scanned
            copied = _status(new, env)["rebuild"].get("snapshot_scanned")
            assert _within_the_page(copied), copied
            assert api.held() > 0  # the page is still being embedded
            status, report = watch.readiness()
            assert status == 200, report
            assert set(report["pipelines"]) == {"p"}, report
            assert report["pipelines"]["p"]["state"] == "rebuilding", report
            assert watch.metric("syncd_pipeline_state", pipeline="p", state="rebuilding") == 1

            # Chroma goes down under the build: the pipeline is retrying, not ready.
            chroma_server.kill()
            api.release()

            def retrying() -> dict[str, Any] | None:
                status, report = watch.readiness()
                return report if status == 503 and "p" in report.get("not_ready", {}) else None

            report = wait_until(retrying, 60, "/readyz to say the pipeline is retrying")
            assert set(report["pipelines"]) == {"p"}, report
            assert report["pipelines"]["p"]["state"] == "retrying", report
            assert watch.metric("syncd_pipeline_state", pipeline="p", state="retrying") == 1
            assert http_get(f"http://{listen}/healthz")[0] == 200

            chroma_server.start()
            daemon.wait_for_output("rebuild of p switched", 180)
            settings = settings_of(new, env)
            wait_caught_up(mongo_client, db, settings, "p", 90, "the new mapping to stream")
            wait_until(lambda: watch.readiness()[0] == 200, 30, "/readyz 200 again")
            assert watch.readiness()[1]["pipelines"]["p"]["state"] == "streaming"
        assert watch.names == {"p"}, watch.names
        assert_switched(chroma_server.client(), coll, old_id, docs)
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()


@pytest.mark.timeout(400)
def test_syncd_rebuild_and_syncd_snapshot_progress_move_within_a_page(
    tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory
):
    listen = f"127.0.0.1:{free_port()}"
    with _page_copied(
        tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, "rbprog",
        lease=None, extra={"log": {"progress_every_s": 0}},
    ) as page:  # fmt: skip
        coll, docs, api, env, new = page.coll, page.docs, page.api, page.env, page.new
        api.hold(4)
        rebuild = syncd_factory(["rebuild", "p", "--listen", listen], new, env)
        wait_until(lambda: api.held() > 0, 120, "the rebuild to embed the page")
        wait_until(
            lambda: (
                _within_the_page(metric_at(listen, "syncd_rebuild_documents_scanned", pipeline="p"))
                or None
            ),
            60,
            "progress within the page",
        )
        assert api.held() > 0
        copied = _status(new, env)["rebuild"].get("snapshot_scanned")
        assert _within_the_page(copied), copied
        api.release()
        assert rebuild.wait(180) == ExitCode.OK, rebuild.output()

        # `syncd snapshot` copies the same page with the same embedder: its progress lines
        # count the documents written before the page is done.
        snapshot = run_syncd(["snapshot", "p", "--log-format", "json"], new, env, timeout=180)
        assert snapshot.returncode == ExitCode.OK, snapshot.stdout + snapshot.stderr
        done = [r["done"] for r in log_records(snapshot.stderr) if "done" in r]
        assert done and done[-1] == DOCS, done
        assert any(_within_the_page(d) for d in done), done
        assert_new_mapping(chroma_server.client(), coll, docs)
