"""Run the `syncd` CLI as a real subprocess so tests can signal, kill and restart it.

`SyncdProcess` runs `python -m syncd SUBCOMMAND [--config FILE] ARGS...` with stdout and
stderr appended to one log file, which `output()` and `wait_for_output()` read back.
`run_syncd()` runs a one-shot command (`check`, `validate`...) to completion.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

# Processes run in their own session, so a Ctrl-C does not reach them; kill any left
# running when the interpreter exits rather than leave daemons behind.
_live_processes: weakref.WeakSet[SyncdProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live_processes):
        process.kill()


# Sets PR_SET_PDEATHSIG (1) to SIGKILL (9), then becomes the real command (same pid).
_DIE_WITH_PARENT = """\
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9)
if os.getppid() != int(sys.argv[1]):
    sys.exit("parent exited before the child started")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(command: Sequence[str]) -> list[str]:
    """Wrap `command` so the kernel SIGKILLs it if this process dies without cleaning up.

    Test runs killed by a timeout or SIGTERM skip fixture teardown and atexit; without
    this, their servers would keep ports and CPU. Linux only, and only when called from
    the main thread: the kernel ties the signal to the thread that forked the child.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


def syncd_command(args: Sequence[str], config: Path | None = None) -> list[str]:
    """`[python, -m, syncd, SUBCOMMAND, --config FILE, REST...]` (no `--config` if None)."""
    command = [sys.executable, "-m", "syncd"]
    if config is None:
        return [*command, *args]
    if not args:
        raise ValueError("a config file needs a subcommand to follow, e.g. ['run']")
    return [*command, args[0], "--config", str(config), *args[1:]]


def syncd_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` over this process's environment, with unbuffered output for live logs."""
    return {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}


def run_syncd(
    args: Sequence[str],
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    *,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one syncd command to completion, capturing stdout and stderr as text."""
    return subprocess.run(
        syncd_command(args, config),
        env=syncd_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class SyncdProcess:
    """A long-running syncd (or, with `command=`, any) process with its output in a log.

    `command`, if given, replaces the whole argv (`args` and `config` are then ignored).

    The constructor does not start it; `start()` does. Every start appends to the same
    log, so `output()` covers all runs while `wait_for_output()` by default looks only
    at output of the current run.
    """

    def __init__(
        self,
        args: Sequence[str],
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        *,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.command = list(command) if command is not None else syncd_command(args, config)
        self.env = syncd_env(env)
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="syncd-")) / "syncd.log"
        self.log_path = Path(log_path)
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None
        self._run_offset = 0
        self._paused = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> SyncdProcess:
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._run_offset = log.tell()
            self._process = subprocess.Popen(
                die_with_parent(self.command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # signals from the terminal go to pytest only
            )
        self._paused = False
        _live_processes.add(self)
        return self

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown request); does not wait."""
        self._signal(signal.SIGTERM)
        if self._paused:
            self.resume()  # a stopped process would hold SIGTERM until continued

    def kill(self) -> int | None:
        """SIGKILL, as a crash or an OOM kill would; reap and return the exit code."""
        if self._process is None:
            return None
        self._signal(signal.SIGKILL)
        self._paused = False
        return self._process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process freezes with its connections open, like a long GC pause."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self._paused = False

    def wait(self, timeout: float | None = 30) -> int:
        """Wait for exit and return the exit code; raises `subprocess.TimeoutExpired`."""
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._process.wait(timeout)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM and wait up to `timeout`, then SIGKILL; return the exit code."""
        if not self.is_running():
            return self.returncode
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def restart(self, *, kill: bool = False, timeout: float = 30) -> SyncdProcess:
        """Stop gracefully (or SIGKILL with `kill=True`), then start with the same command."""
        if kill:
            self.kill()
        else:
            self.stop(timeout)
        return self.start()

    def mark(self) -> int:
        """The log's current length, to pass as `since=` and match only later output."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def output(self, since: int = 0) -> str:
        """Everything the process wrote (all runs), or from byte offset `since`."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(
        self, pattern: str | re.Pattern[str], timeout: float = 30, *, since: int | None = None
    ) -> re.Match[str]:
        """Wait until output matches `pattern` (a regex); return the match.

        Searches from `since` (default: the start of the current run). Fails early, with
        the output, if the process exits without printing a match.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        offset = self._run_offset if since is None else since
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.is_running()
            match = regex.search(self.output(offset))
            if match is not None:
                return match
            if exited:
                raise AssertionError(
                    f"process exited with code {self.returncode} before printing "
                    f"{regex.pattern!r}; output:\n{self._tail(offset)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no output matching {regex.pattern!r} within {timeout}s; "
                    f"output:\n{self._tail(offset)}"
                )
            time.sleep(0.05)

    def _tail(self, since: int, lines: int = 60) -> str:
        return "\n".join(self.output(since).splitlines()[-lines:])

    def _signal(self, signum: int) -> None:
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        if self._process.poll() is None:
            self._process.send_signal(signum)

    def __enter__(self) -> SyncdProcess:
        return self.start() if not self.is_running() else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"SyncdProcess({' '.join(self.command[1:])!r}, pid={self.pid})"


try:
    import pytest
except ImportError:  # plain scripts (benchmarks) can use SyncdProcess without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def syncd_factory(tmp_path: Path) -> Iterator[Callable[..., SyncdProcess]]:
        """Make and start syncd processes; any still running are killed at teardown.

        `make(args, config=None, env=None, *, log_path=None, start=True, cwd=None,
        command=None) -> SyncdProcess`; logs default to `tmp_path/syncd-N.log`.
        """
        processes: list[SyncdProcess] = []

        def make(
            args: Sequence[str],
            config: Path | None = None,
            env: Mapping[str, str] | None = None,
            *,
            log_path: Path | None = None,
            start: bool = True,
            cwd: Path | None = None,
            command: Sequence[str] | None = None,
        ) -> SyncdProcess:
            process = SyncdProcess(
                args,
                config,
                env,
                log_path=log_path or tmp_path / f"syncd-{len(processes)}.log",
                cwd=cwd,
                command=command,
            )
            processes.append(process)
            return process.start() if start else process

        yield make
        for process in processes:
            process.kill()
