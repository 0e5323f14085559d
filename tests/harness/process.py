"""One child process owned by a test: the base of every server and daemon the harness runs.

`ServerProcess` starts a command in its own session with its output appended to a log
file, ties its life to this process (the kernel SIGKILLs it if we die without cleaning
up), waits until a per-server probe says it is ready, and stops it (SIGTERM, then SIGKILL
after a timeout), kills it with SIGKILL as a crash would, pauses it, and restarts it with
the same command, port and data. A subclass says what to run (`command`), with which
environment, how to tell that it is ready (`ready`), and what its errors are called.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

# Children run in their own session, so a Ctrl-C does not reach them; kill any left
# running when the interpreter exits, lest they hold ports and CPU after a run ends badly.
_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_live):
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


class ServerProcess:
    """A child process with its output in `log_path`, started by `start()`.

    Subclasses implement `command()` and, for servers, `ready()`; they may override
    `environment()`, `prepare()` (called before each start) and the class attributes.
    `start()` is a no-op while the process runs; every start appends to the same log.
    """

    name = "process"
    """What error messages call it, e.g. "chroma server"."""
    error: type[Exception] = RuntimeError
    """Raised, with the log's tail, when it exits or times out before it is ready."""
    ready_what = "its readiness probe"
    """What `ready()` waits for, for error messages."""
    poll_interval = 0.05
    stop_timeout = 30.0
    """How long `stop()` waits after SIGTERM before it sends SIGKILL."""
    log_header = False
    """Write `--- COMMAND` into the log before each start (servers; not parsed output)."""
    host = "127.0.0.1"

    def __init__(
        self,
        log_path: Path,
        *,
        port: int | None = None,
        startup_timeout: float = 60.0,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.port = port
        self.startup_timeout = startup_timeout
        self.cwd = cwd
        self.last_start_seconds: float | None = None
        """How long the most recent `start()` took until `ready()` held."""
        self._process: subprocess.Popen[bytes] | None = None
        self._run_offset = 0
        self._paused = False

    # -- what a subclass says ---------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits this process's."""
        return None

    def prepare(self) -> None:
        """Make what the process needs before each start (data directories...)."""

    def ready(self) -> bool:
        """True once the process serves; polled every `poll_interval` after a start."""
        return True

    def describe(self) -> str:
        port = f" on port {self.port}" if self.port is not None else ""
        return f"{self.name}{port}"

    # -- life cycle -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start and wait until `ready()`; raises `error` with the log's tail if it exits
        or does not get ready within `startup_timeout` (then it is killed)."""
        if self.is_running():
            return self
        self.prepare()
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            if self.log_header:
                log.write(f"\n--- {' '.join(command)}\n".encode())
                log.flush()
            self._run_offset = log.tell()
            self._process = subprocess.Popen(
                die_with_parent(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C on the test run does not reach it first
            )
        self._paused = False
        _live.add(self)
        self._wait_ready()
        self.last_start_seconds = time.monotonic() - started
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.ready():
            code = self._process.poll()
            if code is not None:
                raise self.error(
                    f"{self.describe()} exited with code {code} before answering "
                    f"{self.ready_what}; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise self.error(
                    f"{self.describe()} did not answer {self.ready_what} within "
                    f"{self.startup_timeout:.0f}s; killed it. Log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

    def terminate(self) -> None:
        """Send SIGTERM (a graceful shutdown request); does not wait."""
        self._signal(signal.SIGTERM)
        if self._paused:
            self.resume()  # a stopped process would hold SIGTERM until continued

    def wait(self, timeout: float | None = 30) -> int:
        """Wait for exit and return the exit code; raises `subprocess.TimeoutExpired`."""
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if still running after `timeout` (default `stop_timeout`);
        return the exit code."""
        if self._process is None:
            return None
        if not self.is_running():
            return self.returncode
        self.terminate()
        try:
            return self.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

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

    def restart(self, *, kill: bool = False, timeout: float | None = None) -> Self:
        """Stop (or SIGKILL with `kill=True`) and start again: same command, port and data."""
        if kill:
            self.kill()
        else:
            self.stop(timeout)
        return self.start()

    def _signal(self, signum: int) -> None:
        if self._process is None:
            raise RuntimeError(f"{self!r} was never started")
        if self._process.poll() is None:
            self._process.send_signal(signum)

    # -- output -----------------------------------------------------------------------

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

    def run_output(self) -> str:
        """What the current (or last) run wrote."""
        return self.output(self._run_offset)

    def log_tail(self, lines: int = 40) -> str:
        """The log's last lines without colour codes, for error messages."""
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.output())
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()}, pid={self.pid})"
