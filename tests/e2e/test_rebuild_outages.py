"""`syncd rebuild PIPELINE` started while Chroma is down is an outage like one under its
build: the command retries with backoff (`retry_deadline_s` 0: until Chroma answers),
`--listen`'s `/readyz` says the pipeline is retrying, and once Chroma is back the rebuild
runs to its switch and the live collection mirrors MongoDB under the new mapping.
(`syncd snapshot` stays a one-shot command: Chroma unreachable is exit 5, see
test_dependencies_down.py.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from syncd.errors import ExitCode
from tests.harness.daemon import run_syncd
from tests.harness.ports import free_port

from .helpers import copy_and_stop, http_get, wait_until
from .mirror import make_mirror
from .oracle import document
from .test_halts import _hinted_commands, _run_hinted


@dataclass
class _Via:
    """Chroma as syncd reaches it (through a proxy), read by the test directly."""

    host: str
    port: int
    server: Any

    def client(self) -> Any:
        return self.server.client()


def _retrying(listen: str) -> dict[str, Any] | None:
    status, body = http_get(f"http://{listen}/readyz")
    report = json.loads(body) if status else {}
    state = report.get("pipelines", {}).get("p", {}).get("state")
    return report if status == 503 and state == "retrying" else None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["stopped, --listen", "refusing"])
def test_a_rebuild_started_while_chroma_is_down_retries_until_it_answers_and_switches(
    how, tmp_path, mongo_uri, mongo_client, chroma_server_factory, tcp_proxy_factory,
    syncd_factory,
):  # fmt: skip
    chroma = chroma_server_factory()
    proxy = tcp_proxy_factory(chroma.host, chroma.port)
    via = _Via(proxy.host, proxy.port, chroma)
    old = make_mirror(tmp_path, mongo_uri, via, "rbout", retry_max_backoff_s=1)
    new = make_mirror(tmp_path, mongo_uri, via, "rbout", db=old.db, coll=old.coll,
                      metadata=["title", "n"], retry_max_backoff_s=1)  # fmt: skip
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(30)])
    copy_and_stop(
        syncd_factory, mongo_client, old.cfg, old.settings, old.db, log_path=tmp_path / "old.log"
    )

    listen = f"127.0.0.1:{free_port()}" if "--listen" in how else None
    if how.startswith("stopped"):
        chroma.stop()  # nothing listens behind the proxy: every connection is reset
    else:
        proxy.refuse(True)
    args = ["rebuild", "p", *(["--listen", listen] if listen else [])]
    rebuild = syncd_factory(args, new.cfg, log_path=tmp_path / "rebuild.log")
    wait_until(
        lambda: "retrying in" in rebuild.output() or not rebuild.is_running(),
        90,
        "the rebuild to retry",
    )
    assert rebuild.is_running(), rebuild.output()
    if listen:
        wait_until(lambda: _retrying(listen), 30, "/readyz to say the pipeline is retrying")

    if how.startswith("stopped"):
        chroma.start()
    else:
        proxy.heal()
    assert rebuild.wait(180) == ExitCode.OK, rebuild.output()
    assert "rebuild of p switched" in rebuild.output(), rebuild.output()
    assert "Traceback" not in rebuild.output()
    problem = new.mismatch(docs.find())
    assert not problem, problem
    mongo_client.drop_database(old.db)
    mongo_client.drop_database(f"{old.db}_syncd")


@pytest.mark.timeout(300)
def test_a_rebuild_past_its_retry_deadline_stops_with_a_hint_that_works(
    tmp_path, mongo_uri, mongo_client, chroma_server_factory, syncd_factory
):
    chroma = chroma_server_factory()
    old = make_mirror(tmp_path, mongo_uri, chroma, "rbdead")
    new = make_mirror(tmp_path, mongo_uri, chroma, "rbdead", db=old.db, coll=old.coll,
                      metadata=["title", "n"], retry_max_backoff_s=1,
                      retry_deadline_s=3)  # fmt: skip
    docs = mongo_client[old.db]["docs"]
    docs.insert_many([document(i) for i in range(30)])
    copy_and_stop(
        syncd_factory, mongo_client, old.cfg, old.settings, old.db, log_path=tmp_path / "old.log"
    )
    chroma.stop()
    done = run_syncd(["rebuild", "p"], new.cfg, timeout=120)
    assert done.returncode == ExitCode.SINK, done.stdout + done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("syncd: error: still failing after 3 s of retries"), done.stderr
    (command,) = {tuple(c) for c in _hinted_commands(line)}
    assert command[:2] == ("syncd", "rebuild") and "p" in command, line  # as it was run

    chroma.start()
    done = _run_hinted(list(command), new.cfg)
    assert done.returncode == ExitCode.OK, done.stdout + done.stderr
    assert "rebuild of p switched" in done.stdout, done.stdout
    problem = new.mismatch(docs.find())
    assert not problem, problem
    mongo_client.drop_database(old.db)
    mongo_client.drop_database(f"{old.db}_syncd")
