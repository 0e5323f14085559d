"""What `syncd run` and `syncd check` promise operators: refusing a changed mapping,
`--resync`, connectivity checks, and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.ports import free_port

from .helpers import chroma_records, wait_caught_up
from .mirror import make_mirror
from .oracle import vector


def test_changed_mapping_is_refused_until_resync(mirror, mongo_client, syncd_factory):
    m = mirror("fp", name="contract", metadata=["n"])
    db = m.db
    docs = mongo_client[db]["docs"]
    docs.insert_many(
        [{"_id": i, "body": f"doc {i}", "title": f"t{i}", "vec": vector(i)} for i in range(10)]
    )
    daemon = syncd_factory(["run"], m.cfg)
    wait_caught_up(mongo_client, db, m.settings, "contract", 60, "sync")
    daemon.terminate()
    assert daemon.wait(30) == ExitCode.OK

    now = mirror("fp", name="contract", metadata=["title"], db=db, coll=m.coll)
    changed = now.cfg
    refused = syncd_factory(["run"], changed)
    assert refused.wait(60) == ExitCode.CONFIG
    out = refused.output()
    assert "mapping changed" in out and "syncd snapshot contract" in out and "--resync" in out

    resync = syncd_factory(["run", "--resync"], changed)
    wait_caught_up(mongo_client, db, now.settings, "contract", 90, "resync")
    resync.terminate()
    assert resync.wait(30) == ExitCode.OK
    problem = now.mismatch(docs.find())
    assert not problem, problem
    assert all(r["metadata"].get("title") for r in chroma_records(now.collection()).values())


def test_check_reaches_every_server_and_names_the_one_that_fails(
    tmp_path, mongo_uri, chroma_server
):
    good = make_mirror(tmp_path, mongo_uri, chroma_server, "chk", name="contract")
    result = run_syncd(["check"], config=good.cfg, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok    ") >= 4, result.stdout

    class Closed:
        host = "127.0.0.1"
        port = free_port()

    bad = make_mirror(
        tmp_path, mongo_uri, Closed, "chk", name="contract", db=good.db, coll=good.coll
    )
    result = run_syncd(["check"], config=bad.cfg, timeout=120)
    assert result.returncode == ExitCode.SINK, result.stdout + result.stderr
    assert "FAIL  Chroma" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("answer", [{}, [1, 2], "ok"], ids=["object", "list", "string"])
def test_check_names_a_server_that_answers_but_not_as_chroma(
    tmp_path, mongo_uri, answer: Any
) -> None:
    """A port that answers every request with 200 and JSON of another shape: the client
    fails deep inside (a TypeError); the user is told what is wrong, not the type."""
    raw = json.dumps(answer).encode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    class NotChroma:
        host = "127.0.0.1"
        port = server.server_address[1]

    try:
        m = make_mirror(tmp_path, mongo_uri, NotChroma, "nc", name="contract")
        result = run_syncd(["check"], config=m.cfg, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    out = result.stdout + result.stderr
    assert result.returncode == ExitCode.SINK, out
    assert "FAIL  Chroma" in result.stdout, out
    assert "does not answer like a Chroma server" in result.stdout, out
    assert "Traceback" not in out
