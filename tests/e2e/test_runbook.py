"""Every hint can be followed: each error that tells the operator what to run is caused
here against the real servers, the command its hint names is run exactly as printed
(taken from the output, never retyped here), and MongoDB and Chroma are then seen to
converge, judged by the independent oracle in `oracle.py`.

To add a case: cause the error, take its commands with `hinted(output)`, run each with
`Runbook.follow(command)`, then assert `Runbook.converged()`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess, run_syncd

from . import oracle
from .helpers import (
    load_checkpoint,
    pipeline_table,
    settings_of,
    wait_caught_up,
    wait_until,
    write_config,
)

NAME = "book"
HINTED = re.compile(r"`(syncd [^`]*)`")


def hinted(output: str) -> list[str]:
    """The `syncd ...` commands the last hint in `output` (a log or stderr) names, in order."""
    for line in reversed(output.splitlines()):
        commands = HINTED.findall(line)
        if commands:
            return commands
    raise AssertionError(f"no hint names a command in:\n{output[-3000:]}")


@dataclasses.dataclass
class Runbook:
    """One pipeline, its servers and its config file; commands run as an operator's would,
    with the config found through SYNCD_CONFIG so a hinted command needs nothing added."""

    tmp_path: Path
    mongo_uri: str
    mongo: MongoClient[dict[str, Any]]
    chroma_server: Any
    syncd_factory: Callable[..., SyncdProcess]
    db: str = dataclasses.field(default_factory=lambda: f"book_{uuid.uuid4().hex[:8]}")
    chroma_name: str = dataclasses.field(default_factory=lambda: f"book-{uuid.uuid4().hex[:8]}")
    collection: str | None = None  # record ids carry "<collection>/" (multi-collection)
    metadata: tuple[str, ...] = oracle.METADATA

    flagged: bool = False  # the config named by `--config` from another directory instead
    old_name: str | None = None  # the collection `chroma_collection` named before a change

    def __post_init__(self) -> None:
        if self.flagged:
            # As `cd /tmp/x; syncd run --config t5/syncd.toml`: nothing but the flag (no
            # SYNCD_CONFIG, no ./syncd.toml) finds the file, so a hinted command must name it.
            self.config = self.tmp_path / "t5" / "syncd.toml"
            self.config.parent.mkdir()
            self.env: dict[str, str] = {}
            self.flags: tuple[str, ...] = ("--config", "t5/syncd.toml")
        else:
            self.config = self.tmp_path / "syncd.toml"
            self.env = {"SYNCD_CONFIG": str(self.config)}
            self.flags = ()

    def configure(
        self, *, leases: bool = True, checkpoint: dict[str, Any] | None = None, **pipeline: Any
    ) -> None:
        overrides: dict[str, Any] = {
            "mapping": {"text": "body", "metadata": list(self.metadata)},
            "embedder": oracle.EMBEDDER,
            **pipeline,
        }
        extra: dict[str, Any] = {"lease": {"enabled": leases, "ttl_s": 3, "renew_every_s": 1}}
        if checkpoint:
            extra["checkpoint"] = checkpoint
        write_config(
            self.config,
            mongo_uri=self.mongo_uri,
            chroma={
                "mode": "http",
                "host": self.chroma_server.host,
                "port": self.chroma_server.port,
            },
            checkpoint_db=f"{self.db}_syncd",
            pipelines=[
                pipeline_table(NAME, self.db, chroma_collection=self.chroma_name, **overrides)
            ],
            extra=extra,
        )

    @property
    def settings(self) -> Any:
        return settings_of(self.config)

    @property
    def docs(self) -> Any:
        return self.mongo[self.db]["docs"]

    @property
    def chroma(self) -> Any:
        return self.chroma_server.client().get_collection(self.chroma_name)

    def start(self, *args: str) -> SyncdProcess:
        return self._start(*args, *self.flags)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(*args, *self.flags)

    def _start(self, *args: str) -> SyncdProcess:
        return self.syncd_factory(["run", *args], env=self.env, cwd=self.tmp_path)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_syncd(list(args), env=self.env, timeout=120, cwd=self.tmp_path)

    def follow(self, command: str) -> SyncdProcess | subprocess.CompletedProcess[str]:
        """Run a hinted command as printed (nothing added): `syncd run` keeps running,
        others must succeed."""
        argv = shlex.split(command)
        assert argv[0] == "syncd", command
        if argv[1] == "run":
            return self._start(*argv[2:])
        done = self._run(*argv[1:])
        assert done.returncode == 0, f"`{command}` failed:\n{done.stdout}\n{done.stderr}"
        return done

    def caught_up(self, daemon: SyncdProcess, what: str, timeout: float = 90) -> None:
        try:
            wait_caught_up(self.mongo, self.db, self.settings, NAME, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nsyncd output:\n{daemon.output()[-4000:]}") from None

    def converged(self) -> str:
        """ "" when Chroma mirrors the pipeline's MongoDB collection exactly."""
        return oracle.mismatch(
            self.docs.find(),
            self.chroma,
            collection=self.collection,
            metadata_fields=self.metadata,
        )

    def tamper_with_chroma(self) -> None:
        """Lose one record and add one whose document does not exist: only a re-copy that
        removes orphans repairs both."""
        victim = oracle.record_id(1, self.collection)
        self.chroma.delete(ids=[victim])
        orphan = oracle.expected([oracle.document(999)], collection=self.collection)
        for rid, record in orphan.items():
            self.chroma.upsert(
                ids=[rid],
                documents=[record["document"]],
                metadatas=[record["metadata"]],
                embeddings=[record["embedding"]],
            )


@pytest.fixture
def runbook(tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory) -> Runbook:
    return Runbook(tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory)


@pytest.fixture
def flagged_runbook(tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory) -> Runbook:
    return Runbook(tmp_path, mongo_uri, mongo_client, chroma_server, syncd_factory, flagged=True)


def _stopped(daemon: SyncdProcess) -> None:
    daemon.terminate()
    assert daemon.wait(30) == 0, daemon.output()[-4000:]


def _stream_a_change(runbook: Runbook, daemon: SyncdProcess, key: int | str) -> None:
    """After recovery the daemon streams again: a fresh change reaches Chroma."""
    runbook.docs.insert_one(oracle.document(key, version=3))
    runbook.docs.update_one({"_id": 2}, {"$set": {"title": f"after {key}"}})
    runbook.caught_up(daemon, f"change {key} after recovery")
    assert not runbook.converged(), runbook.converged()


def _first_run(runbook: Runbook, count: int = 8) -> SyncdProcess:
    runbook.docs.insert_many([oracle.document(i) for i in range(count)])
    daemon = runbook.start()
    runbook.caught_up(daemon, "the first run")
    assert not runbook.converged(), runbook.converged()
    return daemon


# --- the documented recovery command works on a pipeline a daemon ran -----------------


@pytest.mark.timeout(240)
def test_every_one_shot_command_works_on_a_pipeline_a_daemon_ran(runbook):
    """Leases on, then off, then on again: each command that writes the checkpoint takes
    the pipeline with a fresh epoch instead of being fenced off by the daemon's."""
    runbook.configure(leases=True)
    _stopped(_first_run(runbook))

    runbook.configure(leases=False)
    runbook.tamper_with_chroma()
    runbook.docs.delete_one({"_id": 3})
    snap = runbook.run("snapshot", NAME)
    assert snap.returncode == 0, snap.stderr
    assert not runbook.converged(), runbook.converged()
    for args in (("repair", NAME), ("dlq", "retry", NAME)):
        done = runbook.run(*args)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    moved = runbook.run("tokens", "set", NAME, "--at", at, "--yes")
    assert moved.returncode == 0, moved.stderr
    daemon = runbook.start()  # without leases, after a daemon that held them
    _stream_a_change(runbook, daemon, 100)
    _stopped(daemon)
    reset = runbook.run("tokens", "reset", NAME, "--yes")
    assert reset.returncode == 0, reset.stderr

    runbook.configure(leases=True)  # the lease's epoch must jump past the commands' epochs
    runbook.tamper_with_chroma()
    daemon = runbook.start()
    _stream_a_change(runbook, daemon, 101)
    _stopped(daemon)


def _scanned(runbook: Runbook) -> int:
    cp = load_checkpoint(runbook.settings, NAME)
    return cp.snapshot.scanned if cp is not None and cp.snapshot is not None else 0


def test_an_interrupted_snapshot_hint_continues_it(runbook):
    runbook.configure(snapshot_batch_size=50)
    runbook.docs.insert_many([oracle.document(i) for i in range(2000)])
    snapshot = runbook.syncd_factory(["snapshot", NAME], env=runbook.env)
    wait_until(lambda: _scanned(runbook) > 0, 60, "the scan to start", step=0.05)
    snapshot.pause()  # SIGTERM arrives mid-scan, however fast the scan is
    snapshot.terminate()
    assert snapshot.wait(60) == ExitCode.DRIFT_OR_FAILURE, snapshot.output()[-4000:]
    assert 0 < _scanned(runbook) < 2000
    (command,) = hinted(snapshot.output())
    runbook.follow(command)
    assert not runbook.converged(), runbook.converged()


# --- exit 7: a live daemon holds the pipeline ---------------------------------------------


@pytest.mark.parametrize(
    "command", [("snapshot", NAME), ("tokens", "reset", NAME, "--yes")], ids=["snapshot", "reset"]
)
def test_a_busy_pipeline_hint_fences_the_daemon_out_and_it_takes_the_pipeline_back(
    runbook, command
):
    runbook.configure(leases=True)
    daemon = _first_run(runbook)
    runbook.tamper_with_chroma()

    before = load_checkpoint(runbook.settings, NAME)
    busy = runbook.run(*command)
    assert busy.returncode == ExitCode.LEASE, busy.stderr
    assert busy.stderr.count("\n") == 1, busy.stderr
    after = load_checkpoint(runbook.settings, NAME)
    assert before is not None and after is not None
    assert after.epoch == before.epoch, "the refused command fenced the daemon off"
    (command_line,) = hinted(busy.stderr)
    runbook.follow(command_line)
    if command[0] == "snapshot":
        assert not runbook.converged(), runbook.converged()

    # The daemon was fenced out, not stopped: it takes the pipeline back and streams.
    _stream_a_change(runbook, daemon, 100)
    assert daemon.is_running(), daemon.output()[-4000:]
    _stopped(daemon)


# --- exit 3: the position left the oplog ----------------------------------------------


@pytest.mark.timeout(240)
def test_history_lost_hint(tmp_path, mongo_server_factory, chroma_server, syncd_factory):
    server = mongo_server_factory(history_size=30)
    client: MongoClient[dict[str, Any]] = MongoClient(server.uri)
    runbook = Runbook(tmp_path, server.uri, client, chroma_server, syncd_factory)
    runbook.configure()
    _stopped(_first_run(runbook))
    for i in range(10, 60):  # more changes than the server keeps, while syncd is down
        runbook.docs.insert_one(oracle.document(i))
    runbook.docs.delete_one({"_id": 4})
    runbook.docs.replace_one({"_id": 5}, oracle.document(5, version=1))

    daemon = runbook.start()
    assert daemon.wait(60) == ExitCode.HISTORY_LOST, daemon.output()[-4000:]
    (command,) = hinted(daemon.output())
    runbook.follow(command)
    assert not runbook.converged(), runbook.converged()
    shown = runbook.run("status", "--json")
    (status,) = json.loads(shown.stdout)
    assert status["state"] == "stopped" and "last_error" not in status, status

    daemon = runbook.start()
    _stream_a_change(runbook, daemon, 100)
    _stopped(daemon)
    client.close()


# --- a halt at a dropped, renamed or dropped-database collection ---------------------------


def _drop(runbook: Runbook) -> None:
    runbook.docs.drop()


def _rename(runbook: Runbook) -> None:
    runbook.docs.rename("docs_renamed")


def _drop_database(runbook: Runbook) -> None:
    runbook.mongo.drop_database(runbook.db)


@pytest.mark.parametrize(
    ("policy", "cause", "pipeline"),
    [
        ("on_drop", _drop, {}),
        ("on_rename", _rename, {}),
        # dropDatabase reaches a database-level stream; a collection's own stream sees a drop.
        ("on_drop_database", _drop_database, {"collection": None, "collections": ["docs"]}),
    ],
    ids=["drop", "rename", "dropDatabase"],
)
def test_lifecycle_halt_hint(runbook, policy, cause, pipeline):
    if "collections" in pipeline:
        runbook.collection = "docs"
    runbook.configure(**{policy: "halt"}, **pipeline)
    daemon = _first_run(runbook)
    cause(runbook)

    def halted() -> dict[str, Any] | None:
        result = runbook.run("status", "--json", NAME)
        (row,) = json.loads(result.stdout)
        return dict(row) if row["state"] == "halted" else None

    row = wait_until(halted, 60, "the pipeline to halt")
    assert f'{policy} = "halt"' in row["halt"]["reason"], row
    assert daemon.is_running(), "a halt stops its pipeline, not the process"
    if policy != "on_drop_database":  # there, each collection's drop comes first (purge)
        assert runbook.chroma.count() == 8, "a halt must leave the records alone"

    # The hinted command, run while the daemon still holds the halted pipeline.
    (command,) = hinted(row["halt"]["hint"])
    runbook.follow(command)
    assert runbook.chroma.count() == 0
    assert not runbook.converged(), runbook.converged()

    # The same process takes the pipeline up again and streams.
    runbook.docs.insert_many([oracle.document(i) for i in range(3)])
    _stream_a_change(runbook, daemon, 100)
    _stopped(daemon)


# --- exit 4: the checkpoint cannot be read ---------------------------------------------


def _corrupt_mongo_checkpoint(runbook: Runbook) -> None:
    settings = runbook.settings.checkpoint
    runbook.mongo[settings.database][settings.collection].update_one(
        {"_id": NAME}, {"$set": {"snapshot": {"scanned": "many", "by_hand": True}}}
    )


def _corrupt_mongo_epoch(runbook: Runbook) -> None:
    settings = runbook.settings.checkpoint
    runbook.mongo[settings.database][settings.collection].update_one(
        {"_id": NAME}, {"$set": {"epoch": "seven"}}
    )


def _damage_token(data: str) -> Callable[[Runbook], None]:
    def damage(runbook: Runbook) -> None:
        settings = runbook.settings.checkpoint
        runbook.mongo[settings.database][settings.collection].update_one(
            {"_id": NAME}, {"$set": {"token._data": data}}
        )

    return damage


# A cluster time, then bytes no token holds: only MongoDB, opening the stream, refuses it.
DAMAGED_TAIL = _damage_token("8265A1B2C300000001FF04")


def _corrupt_checkpoint_file(runbook: Runbook) -> None:
    (Path(runbook.settings.checkpoint.path) / f"{NAME}.json").write_text('{"_id": "book", "ep')


@pytest.mark.parametrize(
    ("store", "corrupt"),
    [
        ("mongodb", _corrupt_mongo_checkpoint),
        ("mongodb", _corrupt_mongo_epoch),
        ("mongodb", _damage_token("zz")),
        ("mongodb", _damage_token("8200")),
        ("mongodb", DAMAGED_TAIL),
        ("file", _corrupt_checkpoint_file),
    ],
    ids=[
        "mongodb",
        "mongodb-epoch",
        "mongodb-token-not-hex",
        "mongodb-token-cut",
        "mongodb-token-tail",
        "file",
    ],
)
def test_unreadable_checkpoint_hint(runbook, store, corrupt):
    checkpoint = {"store": store}
    if store == "file":
        checkpoint["path"] = str(runbook.tmp_path / "checkpoints")
    runbook.configure(checkpoint=checkpoint, leases=store == "mongodb")  # leases need MongoDB
    _stopped(_first_run(runbook))
    corrupt(runbook)
    runbook.tamper_with_chroma()
    if corrupt is not DAMAGED_TAIL:
        shown = runbook.run("tokens", "show")  # never "fine" for a checkpoint run cannot use
        assert shown.returncode == ExitCode.DRIFT_OR_FAILURE, shown.stdout + shown.stderr
        assert "syncd tokens reset" in shown.stdout + shown.stderr, shown.stdout + shown.stderr

    daemon = runbook.start()
    assert daemon.wait(60) == ExitCode.SOURCE, daemon.output()[-4000:]
    commands = hinted(daemon.output())
    assert commands[-1] == "syncd run", commands  # reset, then run: followed in order
    for command in commands:
        daemon = runbook.follow(command)
    assert isinstance(daemon, SyncdProcess)
    _stream_a_change(runbook, daemon, 100)
    _stopped(daemon)


# --- exit 5: the Chroma collection the checkpoint describes is gone -------------------------


def _collection_deleted(runbook: Runbook) -> None:
    runbook.chroma_server.client().delete_collection(runbook.chroma_name)


def _collection_replaced(runbook: Runbook) -> None:
    """Deleted and created again under the same name, with someone else's record in it."""
    client = runbook.chroma_server.client()
    client.delete_collection(runbook.chroma_name)
    theirs = client.create_collection(
        runbook.chroma_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    theirs.add(ids=["theirs"], documents=["not ours"], embeddings=[[0.0, 0.0, 0.0, 1.0]])


def _collection_renamed(runbook: Runbook) -> None:
    """`chroma_collection` changed in the configuration: the old collection stays."""
    runbook.old_name = runbook.chroma_name
    runbook.chroma_name = f"{runbook.chroma_name}-new"
    runbook.configure()


@pytest.mark.parametrize(
    ("cause", "running"),
    [
        (_collection_deleted, False),
        (_collection_replaced, False),
        (_collection_deleted, True),
        (_collection_renamed, False),
    ],
    ids=["deleted", "replaced", "deleted-while-running", "renamed-in-config"],
)
def test_lost_collection_hint(runbook, cause, running):
    _lost_collection_hint(runbook, cause, running)


def test_lost_collection_hint_names_the_config_the_daemon_was_given(flagged_runbook):
    """The hint logged and the one stored for `syncd status` name `--config`, and run as
    printed from the directory the daemon ran in."""
    _lost_collection_hint(flagged_runbook, _collection_deleted, running=False)


def _lost_collection_hint(
    runbook: Runbook, cause: Callable[[Runbook], None], running: bool
) -> None:
    runbook.configure()
    daemon = _first_run(runbook)
    if running:
        daemon.pause()  # so that the change below, not the idle check, finds it gone
    else:
        _stopped(daemon)
    cause(runbook)
    runbook.docs.insert_one(oracle.document(50))  # what streaming on would add to nothing
    if running:
        daemon.resume()
    else:
        daemon = runbook.start()
    assert daemon.wait(60) == ExitCode.SINK, daemon.output()[-4000:]
    names = {
        c if isinstance(c, str) else c.name
        for c in runbook.chroma_server.client().list_collections()
    }
    if cause is _collection_renamed:
        # The message names the collection configured now, and says why it is refused.
        said = f"there is no Chroma collection named {runbook.chroma_name!r}"
        assert said in daemon.output(), daemon.output()[-4000:]
        assert "`chroma_collection` no longer names it" in daemon.output()
        assert runbook.old_name in names, "the collection named before must be left alone"
    if cause is not _collection_replaced:
        assert runbook.chroma_name not in names, "refusing must not create an empty namesake"
    else:
        assert runbook.chroma.get()["ids"] == ["theirs"], "nothing may go into the replacement"
    # A fatal error is no halt: the pipeline shows as failed, with the error and the hint.
    assert "-> halted" not in daemon.output(), daemon.output()[-4000:]
    status = runbook.run("status", NAME)
    assert status.returncode == ExitCode.DRIFT_OR_FAILURE, status.stdout + status.stderr
    assert f"{NAME}: failed" in status.stdout, status.stdout
    assert "last error     SinkLostError: " in status.stdout, status.stdout
    assert hinted(status.stdout) == hinted(daemon.output()), status.stdout

    (command,) = hinted(daemon.output())
    assert ("--config" in shlex.split(command)) is runbook.flagged, command
    runbook.follow(command)
    assert not runbook.converged(), runbook.converged()
    daemon = runbook.start()
    _stream_a_change(runbook, daemon, 100)
    cp = load_checkpoint(runbook.settings, NAME)
    assert cp is not None and cp.chroma_collection_id == str(runbook.chroma.id)
    _stopped(daemon)


# --- exit 2: the mapping changed ------------------------------------------------------------


@pytest.mark.parametrize("choice", [0, 1, 2], ids=["snapshot", "run-resync", "rebuild"])
def test_changed_mapping_hint(runbook, choice):
    _changed_mapping_hint(runbook, choice)


@pytest.mark.parametrize("choice", [0, 1, 2], ids=["snapshot", "run-resync", "rebuild"])
def test_changed_mapping_hint_names_the_config_the_daemon_was_given(flagged_runbook, choice):
    _changed_mapping_hint(flagged_runbook, choice)


def _changed_mapping_hint(runbook: Runbook, choice: int) -> None:
    runbook.configure()
    _stopped(_first_run(runbook))
    runbook.metadata = oracle.METADATA[:-1]  # the last field leaves the metadata
    runbook.configure()
    refused = runbook.start()
    assert refused.wait(60) == ExitCode.CONFIG, refused.output()[-4000:]
    commands = hinted(refused.output())
    # three ways out: a snapshot, a run that re-copies, or a rebuild beside the live collection
    assert len(commands) == 3, commands
    assert all(("--config" in shlex.split(c)) is runbook.flagged for c in commands), commands
    followed = runbook.follow(commands[choice])
    daemon = followed if isinstance(followed, SyncdProcess) else runbook.start()
    _stream_a_change(runbook, daemon, 100)
    _stopped(daemon)


def test_a_changed_vector_size_is_rebuilt_and_a_resync_that_cannot_write_changes_nothing(
    runbook,
):
    """A new embedder makes vectors of another size: the collection cannot take them in
    place. `run --resync` says so and leaves the pipeline as it was (before, it replaced
    the checkpoint first, and then `syncd rebuild` found no live collection); the
    changed-mapping refusal's other hint, `syncd rebuild`, builds the new collection and
    the pipeline streams on."""
    runbook.configure()
    _stopped(_first_run(runbook))
    before = load_checkpoint(runbook.settings, NAME)
    runbook.configure(embedder={"kind": "hashing", "dimensions": 8})
    refused = runbook.start()
    assert refused.wait(60) == ExitCode.CONFIG, refused.output()[-4000:]
    resync = next(c for c in hinted(refused.output()) if "--resync" in c)
    failed = runbook.follow(resync)
    assert isinstance(failed, SyncdProcess)
    assert failed.wait(60) == ExitCode.SINK, failed.output()[-4000:]
    assert "4-dimensional" in failed.output(), failed.output()[-4000:]
    after = load_checkpoint(runbook.settings, NAME)
    assert before is not None and after is not None
    assert (after.phase, after.fingerprint, after.chroma_collection_id) == (
        before.phase,
        before.fingerprint,
        before.chroma_collection_id,
    ), "a --resync that could not write replaced the checkpoint"
    (rebuild,) = [c for c in hinted(refused.output()) if c.startswith("syncd rebuild")]
    runbook.follow(rebuild)
    daemon = runbook.start()
    runbook.docs.insert_one(oracle.document(100))
    wait_until(lambda: oracle.record_id(100) in runbook.chroma.get()["ids"], 60, "a new change")
    embeddings = runbook.chroma.get(ids=[oracle.record_id(100)], include=["embeddings"])
    assert len(embeddings["embeddings"][0]) == 8
    assert sorted(runbook.chroma.get()["ids"]) == sorted(
        oracle.record_id(d["_id"]) for d in runbook.docs.find()
    )
    _stopped(daemon)
