"""Every hint of a Chroma-side error (exit 5) can be followed.

Each test causes the error, checks the exit code and the hint, does what the hint says
(a command it names is taken from the output and run exactly as printed), and sees
Chroma converge to MongoDB, judged by the independent oracle. Built on the runbook of
`test_runbook.py`, with a Chroma server of the test's own where it must go down.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import SyncdProcess
from tests.harness.ports import free_port

from . import oracle
from .test_runbook import NAME, Runbook, _first_run, _stopped, hinted


@pytest.fixture
def book(tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory) -> Runbook:
    """A runbook on a Chroma server of this test's own, free to stop."""
    return Runbook(tmp_path, mongo_uri, mongo_client, chroma_server_factory(), syncd_factory)


def _stopped_by(daemon: SyncdProcess, code: int) -> str:
    """The line the daemon logged when a pipeline's fatal error stopped it with ``code``."""
    assert daemon.wait(60) == code, daemon.output()[-4000:]
    match = re.search(r"pipeline stopped: (.*)", daemon.output())
    assert match is not None, daemon.output()[-4000:]
    assert "Traceback" not in daemon.output()
    return match.group(1)


def _error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("syncd: error:")]
    return line


@pytest.mark.timeout(180)
def test_chroma_unreachable_for_a_one_shot_command(book):
    book.configure()
    _stopped(_first_run(book))
    book.chroma_server.stop()

    failed = book.run("verify", NAME)
    assert failed.returncode == ExitCode.SINK, failed.stdout + failed.stderr
    line = _error_line(failed.stderr)
    assert line.startswith("syncd: error: Chroma unavailable: ConnectError"), line
    assert "start Chroma (or correct chroma.host and chroma.port) and run the command again" in line

    book.chroma_server.start()
    again = book.run("verify", NAME)
    assert again.returncode == ExitCode.OK, again.stdout + again.stderr
    assert not book.converged(), book.converged()


@pytest.mark.timeout(180)
def test_retry_deadline_passed_while_chroma_is_down(book):
    book.chroma_server.stop()
    book.configure(retry_deadline_s=3)
    book.docs.insert_many([oracle.document(i) for i in range(6)])
    daemon = book.start()
    line = _stopped_by(daemon, ExitCode.SINK)
    assert "still failing after 3 s of retries: Chroma unavailable" in line, line
    assert "fix the cause and start `syncd run` again" in line, line

    book.chroma_server.start()  # the cause
    (command,) = hinted(daemon.output())
    again = book.follow(command)
    assert isinstance(again, SyncdProcess)
    book.caught_up(again, "the run after the outage")
    assert not book.converged(), book.converged()
    _stopped(again)


@pytest.mark.timeout(180)
def test_collection_not_created_yet(book):
    book.configure()
    book.docs.insert_many([oracle.document(i) for i in range(6)])
    failed = book.run("verify", NAME)
    assert failed.returncode == ExitCode.SINK, failed.stdout + failed.stderr
    line = _error_line(failed.stderr)
    assert "the pipeline has not created it yet: `syncd run` does on its first run" in line

    (command,) = hinted(failed.stderr)
    daemon = book.follow(command)
    assert isinstance(daemon, SyncdProcess)
    book.caught_up(daemon, "the first run")
    _stopped(daemon)
    assert book.run("verify", NAME).returncode == ExitCode.OK
    assert not book.converged(), book.converged()


@pytest.mark.timeout(180)
def test_collection_with_vectors_of_another_dimension(book):
    foreign = book.chroma_server.client().create_collection(
        book.chroma_name, embedding_function=None, metadata={"hnsw:space": "cosine"}
    )
    foreign.add(ids=["someone-else"], embeddings=[[0.5] * 8], documents=["not ours"])
    book.configure()  # the oracle's vectors have 4 dimensions
    book.docs.insert_many([oracle.document(i) for i in range(6)])
    daemon = book.start()
    line = _stopped_by(daemon, ExitCode.SINK)
    assert "holds 8-dimensional vectors, but the pipeline's embedder makes 4" in line, line
    assert "set chroma_collection to a new name and run `syncd snapshot book`" in line, line
    assert foreign.count() == 1, "the other collection was written to"

    book.chroma_name = f"{book.chroma_name}-new"
    book.configure()
    (command,) = hinted(daemon.output())
    book.follow(command)
    assert not book.converged(), book.converged()
    daemon = book.start()
    book.docs.insert_one(oracle.document(100))
    book.caught_up(daemon, "streaming into the new collection")
    assert not book.converged(), book.converged()
    _stopped(daemon)


@pytest.mark.timeout(180)
def test_collection_with_another_distance(book):
    book.chroma_server.client().create_collection(
        book.chroma_name, embedding_function=None, metadata={"hnsw:space": "l2"}
    )
    book.configure()  # distance defaults to cosine
    book.docs.insert_many([oracle.document(i) for i in range(6)])
    line = _stopped_by(book.start(), ExitCode.SINK)
    assert "exists with distance 'l2', but the pipeline says distance = 'cosine'" in line, line
    assert 'set distance = "l2" to keep it' in line, line

    book.configure(distance="l2")
    daemon = book.start()
    book.caught_up(daemon, "the run with the collection's distance")
    assert not book.converged(), book.converged()
    _stopped(daemon)
    assert book.chroma.configuration_json["hnsw"]["space"] == "l2"


@dataclasses.dataclass
class _Address:
    host: str
    port: int


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[_Address]:
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
    yield _Address("127.0.0.1", server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.timeout(180)
def test_chroma_port_pointing_at_a_web_server(book, web_server):
    chroma = book.chroma_server
    book.chroma_server = web_server
    book.configure()
    book.docs.insert_many([oracle.document(i) for i in range(6)])
    check = book.run("check")
    assert check.returncode == ExitCode.SINK, check.stdout + check.stderr
    line = _stopped_by(book.start(), ExitCode.SINK)
    assert "<" not in line and "DOCTYPE" not in line, line
    assert "HTTP 404" in line and len(line) < 600, line
    assert "check chroma.host, chroma.port and chroma.ssl" in line, line

    book.chroma_server = chroma  # chroma.port set to where Chroma listens
    book.configure()
    daemon = book.start()
    book.caught_up(daemon, "the run against Chroma")
    assert not book.converged(), book.converged()
    _stopped(daemon)
