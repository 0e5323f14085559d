"""Which pipelines this process runs, under leases.

Spreading pipelines over processes (:class:`LeasedPipelines`): every process
announces itself with a ``{_id: "process:<owner>", kind: "process", pipelines:
[...]}`` document renewed like a lease (pipeline names cannot contain ':', so the two
kinds never collide). With N pipelines configured and P live processes, the fair
share is ceil(N / P):

* a process takes a free (absent or expired) lease while it holds fewer than its
  share, or when that lease has stayed free for a whole TTL (nobody under their
  share could run it);
* a process that holds at least two more leases than a live peer able to run one
  of them hands one over: it drains that pipeline, then expires the lease at once
  (at most one hand-over per TTL, so the peer has time to take it).

A process that dies simply stops renewing; its leases expire after ``ttl_s`` and
the others take them on their next round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from syncd.config import PipelineSettings
from syncd.errors import LeaseLostError, TransientError, retries_exhausted
from syncd.lease import LeaseManager, View

log = logging.getLogger(__name__)


# --- which pipelines this process runs --------------------------------------------


class Running(Protocol):
    """What the daemon's worker thread offers the scheduler."""

    @property
    def stop(self) -> threading.Event: ...

    @property
    def error(self) -> BaseException | None: ...

    def is_alive(self) -> bool: ...


W = TypeVar("W", bound=Running)


class LeasedPipelines(Generic[W]):
    """Starts a pipeline's worker when its lease is ours, stops it when it is not.

    ``start(settings, epoch)`` builds and starts a worker, or returns None to decline
    (the lease is then given back). ``beside(settings)``, for a pipeline another process
    holds, may start a worker that runs without its lease (None: nothing to do). Call
    :meth:`tick` often; it takes and hands over leases once per ``renew_every_s`` and
    stops a pipeline as soon as its lease is found lost (renewal runs on a thread of its
    own). Once ``stopping()`` is true it takes no lease, even in the middle of a round.
    When the leases cannot be read for longer than every pipeline's ``retry_deadline_s``
    (none of them 0), :meth:`tick` raises the fatal error a pipeline would have raised
    after that long.
    """

    def __init__(
        self,
        leases: LeaseManager,
        pipelines: Sequence[PipelineSettings],
        start: Callable[[PipelineSettings, int], W | None],
        *,
        stopping: Callable[[], bool] = lambda: False,
        beside: Callable[[PipelineSettings], W | None] | None = None,
        on_lost: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_lost(name, why)`` is told at once of a pipeline stopped for its lost
        lease: its worker may take long to end (blocked on what made the lease lapse)."""
        self.leases = leases
        self._on_lost = on_lost
        self._beside = beside
        self.pipelines = {p.name: p for p in pipelines}
        self._start = start
        self._stopping = stopping
        self.running: dict[str, W] = {}
        self.finished: list[W] = []  # ended with an error other than a lost lease
        self._handing_over: set[str] = set()
        self._free_since: dict[str, float] = {}
        self._next_round = 0.0
        self._last_handover = -math.inf
        # Why the last round could not read the leases (None once it could): a process
        # that cannot see the leases cannot know it is a standby.
        self.blind: str | None = "the leases have not been read yet"
        self._blind_since: float | None = None
        deadlines = [p.retry_deadline_s for p in pipelines]
        self._deadline = max(deadlines) if deadlines and min(deadlines) > 0 else 0.0
        leases.announce(sorted(self.pipelines))
        leases.start_renewing()

    @property
    def workers(self) -> list[W]:
        return [*self.finished, *self.running.values()]

    def tick(self) -> None:
        self._reap()
        for name, why in self.leases.take_lost():
            self._stop(name, why)
        now = time.monotonic()
        if now < self._next_round:
            return
        self._next_round = now + self.leases.settings.renew_every_s
        try:
            view = self.leases.view()
        except TransientError as exc:
            log.warning("cannot read the leases: %s", exc.message)
            self.blind = f"cannot read the leases: {exc.message}"
            self._blind_since = self._blind_since or now
            if self._deadline and now - self._blind_since > self._deadline:
                raise retries_exhausted(exc, self._deadline) from exc
            return
        self.blind, self._blind_since = None, None
        self._hand_over(view)
        self._take(view)

    def _reap(self) -> None:
        for name, worker in list(self.running.items()):
            if worker.is_alive():
                continue
            del self.running[name]
            self._handing_over.discard(name)
            error = worker.error
            if isinstance(error, LeaseLostError):
                log.warning(
                    "pipeline %s stopped: %s; will try to take it again later", name, error,
                    extra={"pipeline": name},
                )  # fmt: skip
                self.leases.forget(name)
            elif error is None:
                self._release(name)
            else:
                self.finished.append(worker)

    def _release(self, name: str) -> None:
        try:
            self.leases.release(name)
        except TransientError as exc:  # it expires on its own within the TTL
            log.warning("could not release the lease of %s: %s", name, exc.message)

    def _stop(self, name: str, why: str) -> None:
        worker = self.running.get(name)
        if worker is not None:
            log.warning("stopping pipeline %s: %s", name, why, extra={"pipeline": name})
            worker.stop.set()
            if self._on_lost is not None:
                self._on_lost(name, why)

    def _share(self, view: View) -> int:
        processes = max(1, len(view.processes | {self.leases.owner: frozenset()}))
        return math.ceil(len(self.pipelines) / processes)

    def _take(self, view: View) -> None:
        now = time.monotonic()
        share = self._share(view)
        for name in sorted(self.pipelines):
            if name in view.holders or name in self.running:
                self._free_since.pop(name, None)
                if name not in self.running and view.holders[name] != self.leases.owner:
                    self._start_beside(name)
                continue
            free_since = self._free_since.setdefault(name, now)
            mine = len(self.running) - len(self._handing_over)
            orphaned = now - free_since >= self.leases.settings.ttl_s
            if mine >= share and not orphaned:
                continue
            if self._stopping():
                return
            try:
                epoch = self.leases.acquire(name)
            except TransientError as exc:
                log.warning("cannot take the lease of %s: %s", name, exc.message)
                return
            if epoch is None:
                continue
            self._free_since.pop(name, None)
            worker = self._start(self.pipelines[name], epoch) if not self._stopping() else None
            if worker is None:  # the stop came while the lease was being taken
                log.info("draining: giving back the lease of pipeline %s", name)
                self._release(name)
                return
            self.running[name] = worker

    def _start_beside(self, name: str) -> None:
        """Another process streams pipeline ``name``: ``beside(settings)`` may start a
        worker that works beside it without its lease (a rebuild, which takes the lease
        when it switches, see :mod:`syncd.autorebuild`)."""
        if self._beside is None or self._stopping():
            return
        worker = self._beside(self.pipelines[name])
        if worker is not None:
            self.running[name] = worker

    def _hand_over(self, view: View) -> None:
        """Give one pipeline to a live peer holding at least two fewer than we do."""
        now = time.monotonic()
        if self._handing_over or now - self._last_handover < self.leases.settings.ttl_s:
            return
        mine = [n for n in sorted(self.running) if n not in self._handing_over]
        for owner, can_run in sorted(view.processes.items()):
            if owner == self.leases.owner or view.held_by(owner) > len(mine) - 2:
                continue
            candidates = [n for n in mine if n in can_run]
            if candidates:
                name = candidates[-1]
                self._handing_over.add(name)
                self._last_handover = now
                self._stop(name, f"handing it over to {owner} to spread the load")
                return

    def stop_all(self) -> None:
        for worker in self.running.values():
            worker.stop.set()

    def close(self) -> None:
        self.leases.close()
