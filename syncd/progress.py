"""Progress of long operations: snapshot, verify, repair and dead-letter retry.

On a terminal, a tqdm bar on stderr (count, total, rate and ETA). tqdm because it has
no dependencies of its own, computes a smoothed rate and an ETA, resumes from an
initial count, and copes with resized and non-interactive streams; rich draws nicer
bars but brings pygments and markdown parsing, some 13 MB, into the HTTP-only install.

Elsewhere (a log file, systemd's journal, a container), one structured log line every
``log.progress_every_s`` seconds (default 10) with ``done``, ``total``, ``percent``,
``rate`` (per second) and ``eta_s`` as fields, and a last line when the operation ends.
The total is counted at the start: when more is done (documents inserted meanwhile), the
line says ``2288 documents (estimated 2121 at the start)``, ``percent`` stays at 100 and
``eta_s`` is null.
The rate counts only what this run did: a snapshot resumed at document 4,000,000 does
not claim those four million as work of its first second.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

log = logging.getLogger(__name__)

_every_s = 10.0


def configure(every_s: float) -> None:
    """Seconds between progress log lines (0: every update), from ``log.progress_every_s``."""
    global _every_s
    _every_s = every_s


class Progress:
    """One operation's progress: ``update(done)`` or ``advance(n)``, then ``close()``."""

    def __init__(
        self,
        operation: str,
        *,
        pipeline: str,
        total: int | None,
        unit: str = "documents",
        initial: int = 0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.operation, self.pipeline, self.unit = operation, pipeline, unit
        self.total = total if total and total > 0 else None
        self.initial = self.done = initial
        self._clock = clock
        self._start = self._last_log = clock()
        self._logged = self._closed = False
        stream = stream or sys.stderr
        self._bar: Any = None
        if _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=initial,
                unit=f" {unit}",
                desc=f"{operation} {pipeline}",
                file=stream,
                dynamic_ncols=True,
                leave=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(finished=exc_type is None)

    def advance(self, count: int) -> None:
        self.update(self.done + count)

    def update(self, done: int) -> None:
        step, self.done = done - self.done, done
        if self._bar is not None:
            if self.total is not None and done > self.total:
                self._bar.total = self.total = done  # the count was an estimate
            self._bar.update(step)
            return
        now = self._clock()
        if now - self._last_log >= _every_s:
            self._last_log = now
            self._log(f"{self.operation} progress", now)

    def fields(self, now: float | None = None) -> dict[str, Any]:
        """done, total, percent, rate (per second, this run only) and eta_s."""
        elapsed = (self._clock() if now is None else now) - self._start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        percent = eta = None
        if self.total is not None:
            percent = round(min(100.0, 100.0 * self.done / self.total), 1)
            remaining = self.total - self.done  # past an estimate, how long is unknown
            eta = round(remaining / rate, 1) if rate > 0 and remaining >= 0 else None
        return {
            "operation": self.operation,
            "done": self.done,
            "total": self.total,
            "percent": percent,
            "rate": round(rate, 1),
            "eta_s": eta,
            "unit": self.unit,
        }

    def close(self, *, finished: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._logged and finished:
            self._log(f"{self.operation} finished", self._clock())

    def _log(self, message: str, now: float) -> None:
        self._logged = True
        fields = self.fields(now)
        total = f"/{fields['total']}" if fields["total"] is not None else ""
        percent = f" ({fields['percent']}%)" if fields["percent"] is not None else ""
        if fields["total"] is not None and fields["done"] > fields["total"]:
            # The total was counted at the start; documents inserted since are copied too.
            total, percent = "", f" (estimated {fields['total']} at the start)"
        eta = f", ETA {fields['eta_s']:.0f} s" if fields["eta_s"] is not None else ""
        log.info(
            "%s: %d%s %s%s, %.0f/s%s",
            message,
            fields["done"],
            total,
            self.unit,
            percent,
            fields["rate"],
            eta,
            extra={"pipeline": self.pipeline, **fields},
        )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


class NoProgress(Progress):
    """Reports nothing: for callers that run long operations quietly (the daemon's samples)."""

    def __init__(self) -> None:
        self.done = self.initial = 0
        self.total = None

    def update(self, done: int) -> None:
        self.done = done

    def close(self, *, finished: bool = True) -> None:
        """Nothing was shown."""


def start(
    operation: str, *, enabled: bool, pipeline: str, total: Callable[[], int | None], unit: str
) -> Progress:
    """A :class:`Progress`, or a silent one when not ``enabled`` (``total`` is then not
    asked: counting can cost a scan)."""
    if not enabled:
        return NoProgress()
    return Progress(operation, pipeline=pipeline, total=total(), unit=unit)
