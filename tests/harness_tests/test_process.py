"""ServerProcess: what every harness server shares, tried on the MongoDB server and a small one.

The servers' own behaviour (Chroma's restart keeps its data, SyncdProcess's output) is
tested beside them; here: a server dies with the test run that started it, waits for its
probe, reports its log when it does not get ready, and escalates a stop to SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest

from tests.e2e.helpers import wait_until
from tests.harness.mongo import STANDIN_PYTHON, MongoServer
from tests.harness.ports import free_port
from tests.harness.process import ServerProcess

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but still answers kill(0); its state letter says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


class _Sleeper(ServerProcess):
    """A process that prints "up" after `delay` seconds, ignores SIGTERM if asked to, and
    then sleeps; ready once it printed "up"."""

    name = "sleeper"

    def __init__(self, log_path: Path, *, delay: float = 0.0, deaf: bool = False) -> None:
        super().__init__(log_path, startup_timeout=20)
        self.delay = delay
        self.deaf = deaf

    def command(self) -> list[str]:
        program = textwrap.dedent(f"""
            import signal, time
            if {self.deaf}:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep({self.delay})
            print("up", flush=True)
            time.sleep(600)
        """)
        return [sys.executable, "-c", program]

    def ready(self) -> bool:
        return "up" in self.run_output()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.skipif(not STANDIN_PYTHON.exists(), reason="the MongoDB stand-in is not installed")
def test_a_stand_in_dies_with_the_test_run_that_started_it(tmp_path: Path) -> None:
    # A test run killed by a timeout skips its fixtures' teardown and atexit.
    program = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tests.harness.mongo import MongoServer
        server = MongoServer("standin", Path({str(tmp_path / "data")!r}), {free_port()})
        server.start()
        print(server.pid, flush=True)
        time.sleep(600)
    """)
    run = subprocess.Popen(
        [sys.executable, "-c", program],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert run.stdout is not None
        line = run.stdout.readline()
        assert line.strip().isdigit(), f"the test run printed no server pid: {line!r}"
        server_pid = int(line)
        assert _alive(server_pid)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        wait_until(lambda: not _alive(server_pid), 30, "the orphaned stand-in to die")
    finally:
        run.kill()
        run.wait()


def test_restart_keeps_the_port_and_kill_is_a_sigkill(tmp_path: Path) -> None:
    sleeper = _Sleeper(tmp_path / "sleeper.log")
    sleeper.port = free_port()
    with sleeper:
        first = sleeper.pid
        assert first is not None and sleeper.is_running()
        assert sleeper.last_start_seconds is not None
        sleeper.restart(kill=True)
        assert sleeper.pid != first and not _alive(first)
        assert sleeper.kill() == -signal.SIGKILL
        assert not sleeper.is_running()
    assert sleeper.output().count("up") == 2


def test_start_waits_for_the_probe(tmp_path: Path) -> None:
    with _Sleeper(tmp_path / "sleeper.log", delay=0.5) as sleeper:
        assert "up" in sleeper.output(), "start() returned before the probe held"


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    sleeper = _Sleeper(tmp_path / "sleeper.log", deaf=True).start()
    assert sleeper.stop(timeout=0.5) == -signal.SIGKILL


def test_an_early_exit_raises_with_the_log_tail(tmp_path: Path) -> None:
    class Failing(_Sleeper):
        def command(self) -> list[str]:
            return [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"]

    with pytest.raises(RuntimeError, match=r"(?s)sleeper exited with code 3 .*cannot bind"):
        Failing(tmp_path / "failing.log").start()


def test_a_server_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    sleeper = _Sleeper(tmp_path / "sleeper.log", delay=600)
    sleeper.startup_timeout = 0.5
    with pytest.raises(RuntimeError, match="did not answer its readiness probe"):
        sleeper.start()
    assert not sleeper.is_running()


def test_the_mongo_server_restarts_on_the_same_port_and_data(
    mongo_server_factory: Callable[..., MongoServer],
) -> None:
    server = mongo_server_factory()
    with pymongo.MongoClient[dict[str, Any]](server.uri) as client:
        client.t.c.insert_one({"_id": 1})
    port = server.port
    server.restart()
    assert server.port == port
    with pymongo.MongoClient[dict[str, Any]](server.uri) as client:
        assert client.t.c.find_one({"_id": 1}) == {"_id": 1}
    assert server.kill() == -signal.SIGKILL
    server.start()
    assert server.is_running()
