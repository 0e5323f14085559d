"""Run the `syncd` CLI as a real subprocess so tests can signal, kill and restart it.

`SyncdProcess` runs `python -m syncd SUBCOMMAND [--config FILE] ARGS...` with stdout and
stderr appended to one log file, which `output()` and `wait_for_output()` read back.
`run_syncd()` runs a one-shot command (`check`, `validate`...) to completion.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tests.harness.process import ServerProcess


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


class SyncdProcess(ServerProcess):
    """A long-running syncd (or, with `command=`, any) process with its output in a log.

    `command`, if given, replaces the whole argv (`args` and `config` are then ignored).

    The constructor does not start it; `start()` does, without waiting for anything.
    Every start appends to the same log, so `output()` covers all runs while
    `wait_for_output()` by default looks only at output of the current run.
    """

    name = "syncd"

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
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="syncd-")) / "syncd.log"
        super().__init__(log_path, cwd=cwd)
        self.argv = list(command) if command is not None else syncd_command(args, config)
        self.env = syncd_env(env)

    def command(self) -> list[str]:
        return self.argv

    def environment(self) -> dict[str, str]:
        return self.env

    def start(self) -> SyncdProcess:
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        return super().start()

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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"SyncdProcess({' '.join(self.argv[1:])!r}, pid={self.pid})"


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
