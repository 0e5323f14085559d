"""Every hint of a Chroma-side error (exit 5) can be followed.

Each test causes the error, checks the exit code and the hint, does exactly what the
hint says, and sees Chroma converge to MongoDB mapped.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess, run_syncd
from tests.harness.ports import free_port

from .helpers import (
    chroma_records,
    diff,
    expected_records,
    pipeline_table,
    settings_of,
    wait_caught_up,
    write_config,
)

NAME = "rb"
DOCS = [{"_id": i, "body": f"runbook document {i}", "title": f"t{i}"} for i in range(10)]


class _Setup:
    """A database with documents, and a config for one pipeline that can be rewritten."""

    def __init__(self, tmp_path: Path, mongo_uri: str, client: MongoClient[Any]) -> None:
        self.tmp_path, self.mongo_uri, self.client = tmp_path, mongo_uri, client
        self.db = f"runbook_{uuid.uuid4().hex[:8]}"
        self.coll = f"runbook-{uuid.uuid4().hex[:8]}"
        self.cfg = tmp_path / "syncd.toml"
        client[self.db]["docs"].insert_many(DOCS)

    def write(self, chroma_port: int, **pipeline: Any) -> Path:
        pipeline.setdefault("chroma_collection", self.coll)
        return write_config(
            self.cfg,
            mongo_uri=self.mongo_uri,
            chroma={"mode": "http", "host": "127.0.0.1", "port": chroma_port, "timeout_s": 5},
            checkpoint_db=f"{self.db}_syncd",
            pipelines=[pipeline_table(NAME, self.db, **pipeline)],
        )

    def stream_until_caught_up(self, daemon: SyncdProcess) -> None:
        wait_caught_up(self.client, self.db, settings_of(self.cfg), NAME, 90, "catching up")
        daemon.terminate()
        assert daemon.wait(30) == ExitCode.OK, daemon.output()[-3000:]

    def assert_converged(self, chroma: Any, collection: str | None = None) -> None:
        settings = settings_of(self.cfg)
        docs = list(self.client[self.db]["docs"].find())
        stored = chroma.client().get_collection(collection or self.coll, embedding_function=None)
        problem = diff(expected_records(settings, NAME, docs), chroma_records(stored))
        assert not problem, problem

    def drop(self) -> None:
        self.client.drop_database(self.db)
        self.client.drop_database(f"{self.db}_syncd")


@pytest.fixture
def setup(tmp_path: Path, mongo_uri: str, mongo_client: MongoClient[Any]) -> Iterator[_Setup]:
    made = _Setup(tmp_path, mongo_uri, mongo_client)
    yield made
    made.drop()


def _fatal_line(output: str) -> str:
    """The line the daemon logs when a pipeline stops the process."""
    match = re.search(r"pipeline stopped: (.*)", output)
    assert match is not None, output[-3000:]
    return match.group(1)


@pytest.mark.timeout(180)
def test_chroma_unreachable_for_a_one_shot_command(setup, chroma_server_factory, syncd_factory):
    chroma = chroma_server_factory()
    setup.write(chroma.port)
    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    chroma.stop()

    command = ["verify", NAME]
    failed = run_syncd(command, setup.cfg)
    assert failed.returncode == ExitCode.SINK, failed.stdout + failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert line.startswith("syncd: error: Chroma unavailable: ConnectError"), line
    assert "run other commands again once it answers" in line

    chroma.start()
    again = run_syncd(command, setup.cfg)
    assert again.returncode == ExitCode.OK, again.stdout + again.stderr
    assert again.stdout.strip().endswith("consistent")
    setup.assert_converged(chroma)


@pytest.mark.timeout(180)
def test_retry_deadline_passed_while_chroma_is_down(setup, chroma_server_factory, syncd_factory):
    chroma = chroma_server_factory()
    chroma.stop()
    setup.write(chroma.port, retry_deadline_s=3)
    daemon = syncd_factory(["run"], setup.cfg)
    assert daemon.wait(60) == ExitCode.SINK, daemon.output()[-3000:]
    line = _fatal_line(daemon.output())
    assert "still failing after 3 s of retries: Chroma unavailable" in line, line
    assert "fix the cause and start `syncd run` again" in line, line

    chroma.start()  # the cause
    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    setup.assert_converged(chroma)


@pytest.mark.timeout(180)
def test_collection_not_created_yet(setup, chroma_server, syncd_factory):
    setup.write(chroma_server.port)
    failed = run_syncd(["verify", NAME], setup.cfg)
    assert failed.returncode == ExitCode.SINK, failed.stdout + failed.stderr
    (line,) = failed.stderr.strip().splitlines()
    assert "the pipeline has not created it yet: `syncd run` does on its first run" in line

    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    verified = run_syncd(["verify", NAME], setup.cfg)
    assert verified.returncode == ExitCode.OK, verified.stdout + verified.stderr
    setup.assert_converged(chroma_server)


@pytest.mark.timeout(180)
def test_collection_with_vectors_of_another_dimension(setup, chroma_server, syncd_factory):
    foreign = chroma_server.client().create_collection(
        setup.coll, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    foreign.add(ids=["someone-else"], embeddings=[[0.5] * 64], documents=["not ours"])
    setup.write(chroma_server.port)  # the pipeline's hashing embedder makes 32 dimensions
    daemon = syncd_factory(["run"], setup.cfg)
    assert daemon.wait(60) == ExitCode.SINK, daemon.output()[-3000:]
    line = _fatal_line(daemon.output())
    assert "holds 64-dimensional vectors, but the pipeline's embedder makes 32" in line, line
    hint = f"set chroma_collection to a new name and run `syncd snapshot {NAME}`"
    assert hint in line, line
    assert foreign.count() == 1, "the other collection was written to"

    fresh = f"{setup.coll}-new"
    setup.write(chroma_server.port, chroma_collection=fresh)
    snapshot = run_syncd(["snapshot", NAME], setup.cfg)
    assert snapshot.returncode == ExitCode.OK, snapshot.stdout + snapshot.stderr
    setup.assert_converged(chroma_server, fresh)
    setup.client[setup.db]["docs"].insert_one({"_id": 99, "body": "after the move"})
    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    setup.assert_converged(chroma_server, fresh)


@pytest.mark.timeout(180)
def test_collection_with_another_distance(setup, chroma_server, syncd_factory):
    chroma_server.client().create_collection(
        setup.coll, embedding_function=None, metadata={"hnsw:space": "l2"}
    )
    setup.write(chroma_server.port)  # distance defaults to cosine
    daemon = syncd_factory(["run"], setup.cfg)
    assert daemon.wait(60) == ExitCode.SINK, daemon.output()[-3000:]
    line = _fatal_line(daemon.output())
    assert "exists with distance 'l2', but the pipeline says distance = 'cosine'" in line, line
    assert 'set distance = "l2" to keep it' in line, line

    setup.write(chroma_server.port, distance="l2")
    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    setup.assert_converged(chroma_server)
    stored = chroma_server.client().get_collection(setup.coll, embedding_function=None)
    assert stored.configuration_json["hnsw"]["space"] == "l2"


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[int]:
    """A plain web server, as a wrong chroma.port might find: HTML error pages."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.timeout(180)
def test_chroma_port_pointing_at_a_web_server(setup, chroma_server, web_server, syncd_factory):
    setup.write(web_server)
    check = run_syncd(["check"], setup.cfg)
    assert check.returncode == ExitCode.SINK, check.stdout + check.stderr
    daemon = syncd_factory(["run"], setup.cfg)
    assert daemon.wait(60) == ExitCode.SINK, daemon.output()[-3000:]
    line = _fatal_line(daemon.output())
    assert "<" not in line and "DOCTYPE" not in line, line
    assert "HTTP 404" in line and len(line) < 600, line
    assert "check chroma.host, chroma.port and chroma.ssl" in line, line

    setup.write(chroma_server.port)  # the port Chroma really listens on
    setup.stream_until_caught_up(syncd_factory(["run"], setup.cfg))
    setup.assert_converged(chroma_server)
