"""SyncdProcess runs, signals, restarts and reads the output of a real subprocess.

syncd itself is not needed here: a small Python program stands in for it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.daemon import SyncdProcess, syncd_command, syncd_env

# Prints "ready", counts ticks, and exits 0 with "drained" on SIGTERM.
_STAND_IN = """
import signal, sys, time
def on_term(signum, frame):
    print("drained", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
tick = 0
while True:
    tick += 1
    print(f"tick {tick}")
    time.sleep(0.05)
"""

Factory = Callable[..., SyncdProcess]


def _stand_in(syncd_factory: Factory, **kwargs: object) -> SyncdProcess:
    return syncd_factory([], command=[sys.executable, "-c", _STAND_IN], **kwargs)


def test_command_puts_config_after_the_subcommand(tmp_path: Path) -> None:
    config = tmp_path / "syncd.toml"
    assert syncd_command(["run", "--once"], config) == [
        sys.executable, "-m", "syncd", "run", "--config", str(config), "--once",
    ]  # fmt: skip
    assert syncd_command(["check"]) == [sys.executable, "-m", "syncd", "check"]
    with pytest.raises(ValueError, match="subcommand"):
        syncd_command([], config)
    env = syncd_env({"SYNCD_X": "1"})
    assert env["SYNCD_X"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_sigterm_is_delivered_and_output_is_captured(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    process.wait_for_output("ready", timeout=10)
    process.terminate()
    assert process.wait(10) == 0
    assert "drained" in process.output()


def test_kill_restart_and_wait_for_output_of_the_current_run(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    process.wait_for_output(r"tick 3\b", timeout=10)
    first_pid = process.pid
    assert process.kill() == -signal.SIGKILL
    assert "drained" not in process.output()  # no handler runs on SIGKILL
    process.start()
    assert process.pid != first_pid
    match = process.wait_for_output(r"tick (\d+)", timeout=10)
    assert match.group(1) == "1"  # the new run's first tick, not the old run's
    assert process.output().count("ready") == 2


def test_pause_freezes_the_process_and_resume_continues(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    process.wait_for_output("tick 1", timeout=10)
    process.pause()
    time.sleep(0.1)  # let a tick already in flight land
    frozen = process.mark()
    time.sleep(0.3)
    assert process.mark() == frozen
    process.resume()
    process.wait_for_output("tick", timeout=10, since=frozen)


def test_terminate_while_paused_still_stops(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    process.wait_for_output("ready", timeout=10)
    process.pause()
    process.terminate()
    assert process.wait(10) == 0


def test_wait_for_output_fails_fast_when_the_process_exits(syncd_factory: Factory) -> None:
    process = syncd_factory([], command=[sys.executable, "-c", "print('bye'); raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(AssertionError, match="exited with code 3"):
        process.wait_for_output("never printed", timeout=30)
    assert time.monotonic() - started < 10


def test_wait_for_output_times_out_with_the_output(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    with pytest.raises(TimeoutError, match="ready"):
        process.wait_for_output("never printed", timeout=0.5)
    assert process.is_running()


def test_restart_is_graceful_by_default(syncd_factory: Factory) -> None:
    process = _stand_in(syncd_factory)
    process.wait_for_output("ready", timeout=10)
    process.restart()
    process.wait_for_output("ready", timeout=10)
    assert process.output().count("drained") == 1


def test_context_manager_kills_on_exit(tmp_path: Path) -> None:
    log = tmp_path / "stand-in.log"
    with SyncdProcess([], command=[sys.executable, "-c", _STAND_IN], log_path=log) as process:
        process.wait_for_output("ready", timeout=10)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(0.2)
    assert process.returncode == -signal.SIGKILL
    assert "ready" in log.read_text()
