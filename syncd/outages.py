"""How long the current outage has lasted, for a loop that retries a long task.

A rebuild (``syncd rebuild``, or a daemon's under ``on_mapping_change = "rebuild"``) is
retried whole after an outage of MongoDB, Chroma or the embedding API outside its
build's own retry loop: before its snapshot starts, or at the switch, hours later.
``retry_deadline_s`` bounds one outage, so the clock starts at an outage's first
failure and is set back once the task moves again (its build wrote a checkpoint, or
caught up, or halted at a document: each needs the dependencies to answer): a failure
after that is a new outage. A task that fails again before it moves is still in the
same outage, however many tries it takes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from syncd.config import PipelineSettings
from syncd.errors import TransientError, retries_exhausted
from syncd.pipeline import backoff_waits


class Outage:
    """The outage clock of one pipeline's retried task; ``command``: the one that retries
    it, named in the hint when the deadline passes (default ``syncd run``)."""

    def __init__(self, ps: PipelineSettings, *, command: str | None = None) -> None:
        self._ps = ps
        self._command = command
        self._since: float | None = None
        self._recovered = False
        self._waits: Iterator[float] = backoff_waits(ps.retry_max_backoff_s)
        self.attempt = 0  # failures in a row in this outage

    def recovered(self) -> None:
        """The task made progress (its build moved, or got as far as a document it
        halts at): the outage it was in, if any, is over."""
        self._recovered = True

    def failed(self, exc: TransientError) -> float:
        """The task failed with ``exc``: how long to wait before trying again.

        Raises the fatal error of :func:`syncd.errors.retries_exhausted` once this
        outage has lasted past ``retry_deadline_s`` (0: never)."""
        if self._recovered:  # since the last failure: this one begins a new outage
            self._since, self.attempt, self._recovered = None, 0, False
            self._waits = backoff_waits(self._ps.retry_max_backoff_s)
        now = time.monotonic()
        self.attempt += 1
        self._since = self._since if self._since is not None else now
        deadline = self._ps.retry_deadline_s
        if deadline and now - self._since > deadline:
            raise retries_exhausted(
                exc, deadline, pipeline=self._ps.name, command=self._command
            ) from exc
        return exc.retry_after or next(self._waits)
