"""`on_mapping_change = "rebuild"`: however the rebuild inside `syncd run` ends, `syncd
status` tells the truth afterwards. A daemon that refuses to rebuild (a previous
collection is still kept) exits, and shows `failed` with the error and its hint, exit 1;
the hint, run as printed, lets the next start rebuild. A document the new mapping cannot
apply halts the rebuild: `syncd status` shows the halt (`_id`, reason, what to do), and
the fix is picked up without a restart, as the hint says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.ports import free_port

from .helpers import (
    Poller,
    copy_and_stop,
    diff,
    http_get,
    metric_sample,
    wait_caught_up,
    wait_until,
)
from .mirror import Mirror
from .oracle import actual, document, embedded_by_the_api
from .test_halts import _hinted_commands, _run_hinted, _set_pipeline_option

HASHING = {"kind": "hashing", "dimensions": 32}


def _status(cfg: Any) -> tuple[int, dict[str, Any]]:
    done = run_syncd(["status", "--json"], cfg)
    return done.returncode, next(row for row in json.loads(done.stdout) if row["pipeline"] == "p")


@pytest.mark.timeout(300)
def test_a_daemon_that_refuses_to_rebuild_is_failed_in_status_until_its_hint_is_run(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old = mirror("rbends")
    first = mirror("rbends", db=old.db, coll=old.coll, metadata=["title", "n"])
    again = mirror("rbends", db=old.db, coll=old.coll, metadata=["title"],
                   on_mapping_change="rebuild")  # fmt: skip
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(30)])
    copy_and_stop(syncd_factory, mongo_client, old.cfg, old.settings, old.db,
                  log_path=tmp_path / "old.log")  # fmt: skip
    done = run_syncd(["rebuild", "p"], first.cfg, timeout=180)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr  # keeps NAME--v1

    # The mapping changed again: the daemon refuses to rebuild while --v1 is kept.
    daemon = syncd_factory(["run"], again.cfg, log_path=tmp_path / "again.log")
    assert daemon.wait(60) == ExitCode.CONFIG, daemon.output()
    assert "is still kept" in daemon.output()
    code, row = _status(again.cfg)
    assert code == ExitCode.DRIFT_OR_FAILURE, row
    assert row["state"] == "failed", row
    error = row["last_error"]
    assert error["error_class"] == "ConfigError" and "is still kept" in error["error"], row
    text = run_syncd(["status", "p"], again.cfg).stdout
    assert "p: failed" in text and f"what to do     {error['hint']}" in text, text

    # The hint, as printed (its first command; the other one goes back instead).
    command = _hinted_commands(error["hint"])[0]
    assert command == ["syncd", "rebuild", "p", "--drop-previous", "--config", str(again.cfg)], (
        error["hint"]
    )
    done = _run_hinted(command, again.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    daemon = syncd_factory(["run"], again.cfg, log_path=tmp_path / "rebuilt.log")
    daemon.wait_for_output("rebuild of p switched", 180)
    docs.replace_one({"_id": 4}, document(4, version=2))
    wait_caught_up(mongo_client, old.db, again.settings, "p", 90, "the new mapping to stream")
    problem = again.mismatch(docs.find())
    assert not problem, problem
    code, row = _status(again.cfg)
    assert code == ExitCode.OK and row["state"] == "streaming", row
    assert "last_error" not in row, row
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def _copied_with_a_long_text(
    tmp_path: Path, mongo_client: Any, syncd_factory: Any, old: Mirror, count: int
) -> Any:
    """`count` documents and one, `long`, whose text is over 30 characters, copied by
    `syncd run` with `old`; returns their MongoDB collection."""
    docs = mongo_client[old.db]["docs"]
    long = dict(document("long"), body="a body far too long for the new mapping")
    docs.insert_many([document(i) for i in range(count)] + [long])
    copy_and_stop(syncd_factory, mongo_client, old.cfg, old.settings, old.db,
                  log_path=tmp_path / "old.log")  # fmt: skip
    return docs


@pytest.mark.timeout(300)
def test_a_halt_of_the_rebuild_shows_in_status_and_a_fix_is_picked_up_without_a_restart(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old = mirror("rbhalt", embedder=HASHING)
    # A metadata change with the same embedder (its vectors are reused), and texts held
    # to 30 characters: one document's is longer.
    new = mirror("rbhalt", db=old.db, coll=old.coll, metadata=["title", "n"], embedder=HASHING,
                 mapping={"max_text_chars": 30}, on_mapping_change="rebuild",
                 halt_recheck_s=1, snapshot_batch_size=10)  # fmt: skip
    docs = _copied_with_a_long_text(tmp_path, mongo_client, syncd_factory, old, 25)

    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "new.log")

    def halted() -> dict[str, Any] | None:
        code, row = _status(new.cfg)
        return row if code == ExitCode.DRIFT_OR_FAILURE and "halt" in row else None

    row = wait_until(halted, 120, "syncd status to show the rebuild's halt")
    assert row["state"] == "halted", row
    halt = row["halt"]
    assert halt["document_id"] == "'long'" and halt["key"] == "s:long", halt
    assert halt["rebuild"] is True and halt["error_class"] == "OversizedError", halt
    assert halt["hint"].startswith(
        "fix or delete the document in MongoDB: syncd tries the rebuild again every 1 s and "
        "continues by itself"
    ), halt
    assert "resume" not in halt["hint"], halt  # `syncd resume` lifts the pipeline's own
    text = run_syncd(["status", "p"], new.cfg).stdout
    assert "p: halted" in text and "_id 'long' (s:long)" in text and "in its rebuild" in text
    assert f"what to do     {halt['hint']}" in text, text
    assert daemon.is_running(), daemon.output()

    # Fixed in MongoDB: the next try picks it up, with no restart.
    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    daemon.wait_for_output("rebuild of p switched", 120)
    # The try that switched continued from where the halt stopped the one before.
    assert "embedded by this run of the rebuild (not counting what was done before it " \
        "continued)" in daemon.output()  # fmt: skip
    wait_caught_up(mongo_client, old.db, new.settings, "p", 90, "the new mapping to stream")
    want = embedded_by_the_api(docs.find(), dimensions=32, metadata_fields=["title", "n"])
    problem = diff(want, actual(new.collection()))
    assert not problem, problem
    code, row = _status(new.cfg)
    assert code == ExitCode.OK and row["state"] == "streaming" and "halt" not in row, row
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


def _readiness(listen: str) -> tuple[int, str | None, float | None]:
    """/readyz's status, the state it gives for `p`, and `syncd_pipeline_state` for
    `p` halted."""
    status, body = http_get(f"http://{listen}/readyz")
    try:
        state = (json.loads(body).get("pipelines") or {}).get("p", {}).get("state")
    except ValueError:
        state = None
    metrics = http_get(f"http://{listen}/metrics")[1]
    return status, state, metric_sample(metrics, "syncd_pipeline_state", pipeline="p",
                                        state="halted")  # fmt: skip


class _Readiness(Poller):
    """Every /readyz answer (status, `p`'s state, the halted state series) while it runs."""

    def __init__(self, listen: str) -> None:
        super().__init__()
        self.listen = listen
        self.samples: list[tuple[int, str | None, float | None]] = []

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(_readiness(self.listen))
            self.stop.wait(0.05)


@pytest.mark.timeout(300)
def test_a_halted_rebuild_stays_halted_and_not_ready_through_every_try_until_the_fix(
    tmp_path, mirror, mongo_client, syncd_factory
):
    listen = f"127.0.0.1:{free_port()}"
    old = mirror("rbflap", embedder=HASHING)
    new = mirror("rbflap", db=old.db, coll=old.coll, metadata=["title", "n"], embedder=HASHING,
                 mapping={"max_text_chars": 30}, on_mapping_change="rebuild",
                 halt_recheck_s=2, snapshot_batch_size=10,
                 extra={"telemetry": {"listen": listen}})  # fmt: skip
    docs = _copied_with_a_long_text(tmp_path, mongo_client, syncd_factory, old, 25)

    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "new.log")
    wait_until(lambda: _readiness(listen)[1] == "halted", 120, "/readyz to say p halted")
    tries = daemon.output().count("the rebuild halted")
    with _Readiness(listen) as probe:
        # Through at least two tries again at the same document.
        wait_until(lambda: daemon.output().count("the rebuild halted") >= tries + 2, 60,
                   "two more tries of the halted rebuild")  # fmt: skip
    assert probe.samples, "no /readyz answer"
    flaps = [s for s in probe.samples if s != (503, "halted", 1.0)]
    assert not flaps, f"{len(flaps)} of {len(probe.samples)} answers not halted: {flaps[:5]}"
    assert daemon.output().count("building its collection beside") == 1, daemon.output()

    # Fixed in MongoDB: the next try moves past it, ready again, and the switch.
    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    daemon.wait_for_output("rebuild of p switched", 120)
    wait_until(lambda: _readiness(listen)[0] == 200, 30, "/readyz to answer 200")
    wait_caught_up(mongo_client, old.db, new.settings, "p", 90, "the new mapping to stream")
    want = embedded_by_the_api(docs.find(), dimensions=32, metadata_fields=["title", "n"])
    problem = diff(want, actual(new.collection()))
    assert not problem, problem
    assert _readiness(listen)[:2] == (200, "streaming")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


@pytest.mark.timeout(300)
def test_a_halted_rebuild_sets_the_document_aside_under_dead_letter_as_its_hint_says(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old = mirror("rbdead")
    new = mirror("rbdead", db=old.db, coll=old.coll, metadata=["title", "n"],
                 mapping={"max_text_chars": 30}, on_mapping_change="rebuild")  # fmt: skip
    docs = _copied_with_a_long_text(tmp_path, mongo_client, syncd_factory, old, 20)

    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "new.log")
    halt = wait_until(lambda: _status(new.cfg)[1].get("halt"), 120, "the rebuild's halt")
    assert 'or set on_error = "dead_letter" and restart' in halt["hint"], halt
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
    assert _status(new.cfg)[1]["state"] == "halted"  # held with no daemon running

    _set_pipeline_option(new.cfg, on_error="dead_letter")
    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "dead.log")
    daemon.wait_for_output("rebuild of p switched", 120)
    wait_caught_up(mongo_client, old.db, new.settings, "p", 90, "the new mapping to stream")
    listed = run_syncd(["dlq", "list", "p", "--json"], new.cfg)
    assert [e["key"] for e in json.loads(listed.stdout)] == ["s:long"], listed.stdout
    problem = new.mismatch(docs.find({"_id": {"$ne": "long"}}))
    assert not problem, problem
    code, row = _status(new.cfg)
    assert code == ExitCode.OK and row["state"] == "streaming" and "halt" not in row, row
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()


@pytest.mark.timeout(300)
def test_a_halted_rebuild_says_it_continues_once_per_start_not_at_every_try(
    tmp_path, mirror, mongo_client, syncd_factory
):
    old = mirror("rbonce", embedder=HASHING)
    new = mirror("rbonce", db=old.db, coll=old.coll, metadata=["title", "n"], embedder=HASHING,
                 mapping={"max_text_chars": 30}, on_mapping_change="rebuild",
                 halt_recheck_s=1, snapshot_batch_size=10)  # fmt: skip
    docs = _copied_with_a_long_text(tmp_path, mongo_client, syncd_factory, old, 25)
    continuing = "continuing the rebuild of p"

    def halted_tries(daemon: Any, since: int, count: int) -> str:
        wait_until(lambda: daemon.output(since).count("the rebuild halted") >= count, 90,
                   f"{count} tries of the halted rebuild")  # fmt: skip
        return str(daemon.output(since))

    # The process that began the build: it continues nothing, however often it tries.
    daemon = syncd_factory(["run"], new.cfg, log_path=tmp_path / "new.log")
    output = halted_tries(daemon, 0, 4)
    assert continuing not in output, output
    # Each try again says it is the same halt, and where.
    again = [x for x in output.splitlines() if "the rebuild halted again at the same document" in x]
    assert len(again) >= 3 and all("_id 'long'" in x for x in again), output
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()

    # The next start continues the build: it says so once, then tries again silently.
    since = len(daemon.output().encode())
    daemon.start()
    output = halted_tries(daemon, since, 4)
    assert output.count(continuing) == 1, output
    assert output.index(continuing) < output.index("the rebuild halted"), output

    docs.update_one({"_id": "long"}, {"$set": {"body": "short now"}})
    daemon.wait_for_output("rebuild of p switched", 120)
    assert daemon.output(since).count(continuing) == 1, daemon.output(since)
    wait_caught_up(mongo_client, old.db, new.settings, "p", 90, "the new mapping to stream")
    want = embedded_by_the_api(docs.find(), dimensions=32, metadata_fields=["title", "n"])
    problem = diff(want, actual(new.collection()))
    assert not problem, problem
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK, daemon.output()
