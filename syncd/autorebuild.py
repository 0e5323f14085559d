"""A daemon that rebuilds by itself: ``on_mapping_change = "rebuild"``.

When the checkpoint of a pipeline this process is about to stream was written with
another mapping than the configured one, the worker runs, before streaming, the
rebuild ``syncd rebuild PIPELINE`` runs (:func:`syncd.rebuild.run_rebuild`): the new
collection is built beside the live one, catches up, and is switched in; then the
pipeline streams with the new mapping into it. The process's other pipelines stream
on meanwhile.

The worker holds the live pipeline while it rebuilds (its lease, with leases), so
nobody streams the old mapping into the live collection: it answers searches
unchanged, consistent but stale, until the switch. The build holds a lease of its
own (``PIPELINE~rebuild``), as ``syncd rebuild`` does: one build at a time; while
another process's build holds it, this one waits and tries again.

The pipeline reports ``rebuilding`` (ready: the live collection serves). Transient
errors are retried with backoff until ``retry_deadline_s``, like a pipeline's; a halt of
the build (a document the new mapping cannot apply) holds this pipeline alone and is
tried again every ``halt_recheck_s``; a stop signal interrupts the build after its
current batch, and the next start continues it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from syncd import halts, hints, rebuild_halts, switching
from syncd.checkpoint import CheckpointStore
from syncd.checkpointing import status_record
from syncd.config import PipelineSettings
from syncd.errors import (
    ExitCode,
    HaltedError,
    LeaseLostError,
    PoisonError,
    SyncdError,
    TransientError,
)
from syncd.exclusive import Hold, PipelineBusyError
from syncd.mapping import Mapper
from syncd.outages import Outage
from syncd.rebuild import run_rebuild
from syncd.runtime import Runtime
from syncd.telemetry import PipelineTelemetry

log = logging.getLogger(__name__)


def needs_rebuild(store: CheckpointStore, name: str, fingerprint: str) -> bool:
    """Whether pipeline ``name`` must be rebuilt (or its switch completed) before it
    streams with the mapping of ``fingerprint``."""
    cp = store.load(name)
    if cp is None:
        return False  # a first run copies with this mapping
    record = switching.load_record(store, name)
    if record.get("state") == "switching":
        # Under way, or interrupted: completed by a process switching to this mapping;
        # one with another mapping waits (see switching.check_start).
        switch = record.get("switch") or {}
        return bool((switch.get("after") or {}).get("fingerprint") == fingerprint)
    if cp.fingerprint == fingerprint:
        return False
    previous = record.get("previous") or {}
    # A rebuild that switched away from this very mapping, and keeps its collection for
    # a rollback: this process runs the old configuration. Building it again would undo
    # the rebuild; the pipeline waits instead (see switching.check_start).
    switched_away = (
        record.get("state") == "switched"
        and record.get("fingerprint") == cp.fingerprint
        and (previous.get("position") or {}).get("fingerprint") == fingerprint
    )
    return not switched_away


class Rebuilder:
    """Runs the rebuild a pipeline needs before its worker streams it."""

    def __init__(
        self,
        runtime: Runtime,
        ps: PipelineSettings,
        *,
        stop: threading.Event,
        telemetry: PipelineTelemetry,
        heartbeat: Callable[[], None],
        live: Callable[[], Hold] | None,
        beside: bool = False,
    ) -> None:
        """``live()``: this process's hold on the live pipeline's lease, for the switch
        (None without leases: the switch then claims a fresh epoch, as ``syncd rebuild``
        does); ``beside``: another process holds and streams the pipeline meanwhile."""
        self.runtime = runtime
        self.ps = ps
        self.stop = stop
        self.telemetry = telemetry
        self.heartbeat = heartbeat
        self.live = live
        self.fingerprint = Mapper(ps).fingerprint
        self.beside = beside
        self.rebuilt_here = False  # this process began rebuilding (and said so in the status)
        self.halted_here = False  # this process's build halted (see _halted)
        self._halt_key: str | None = None  # the document it last halted at, and how many
        self._halt_tries = 0  # tries in a row halted there
        # The clock of an outage, set back each time the build moves (see _rebuild) or
        # halts: an outage at the switch, hours after one before the snapshot, is new.
        self._outage = Outage(ps)

    def run(self) -> bool:
        """Rebuild if needed; True once the pipeline may stream, False when stopped first.

        However the rebuild ends, `syncd status` says so: ``stopped`` when stopped first,
        ``failed`` with the error and its hint when a fatal error ends it (and the
        process), as the pipeline's own loop records (see
        :meth:`syncd.checkpointing.Progress.publish`)."""
        try:
            done = self._run()
        except LeaseLostError:
            raise  # the pipeline belongs to another process now, and so does its status
        except Exception as exc:
            self._publish(halts.stopped_state(exc), exc)
            raise
        if not done and self.rebuilt_here and not self.beside:
            self._publish("stopped")  # (beside: the process streaming the pipeline says)
        return done

    def _run(self) -> bool:
        while not self.stop.is_set():
            try:
                if not needs_rebuild(self.runtime.store, self.ps.name, self.fingerprint):
                    return True
                if self._rebuild() != ExitCode.OK:
                    continue  # stopped (the loop ends), or try again
                return True
            except TransientError as exc:
                delay = self._outage.failed(exc)
                self.telemetry.retrying(exc, self._outage.attempt, delay)
                self.stop.wait(delay)
            except (HaltedError, PoisonError) as exc:
                # A document the new mapping cannot apply (on_error = "halt"): this
                # pipeline alone waits, and tries again (the build continues from there).
                # It got as far as that document: an outage before it is over.
                self._outage.recovered()
                every = self.ps.halt_recheck_s or halts.REBUILD_RETRY_S
                halt = self._halted(exc)
                same = halt.key is not None and halt.key == self._halt_key
                self._halt_tries = self._halt_tries + 1 if same else 1
                self._halt_key = halt.key
                log.error(
                    "the rebuild halted%s: %s; trying again in %.0f s",
                    f" again at the same document (try {self._halt_tries})" if same else "",
                    halt.error(self.ps.name).describe(), every, extra={"pipeline": self.ps.name},
                )  # fmt: skip
                self.stop.wait(every)
            except PipelineBusyError as exc:
                # Another process builds this pipeline: one build at a time. Wait for it
                # (not an outage: the live collection serves meanwhile).
                log.info("%s; waiting", exc.message, extra={"pipeline": self.ps.name})
                self.heartbeat()
                self.stop.wait(self.runtime.settings.lease.renew_every_s)
        return False

    def _halted(self, exc: SyncdError) -> halts.Halt:
        """Record the build's halt for `syncd status` (its ``_id``, reason, resume token
        and what to do; see :mod:`syncd.rebuild_halts`) and as this pipeline's state:
        this process holds the pipeline while it rebuilds."""
        halt = rebuild_halts.record(self.runtime.store, self.ps, exc)
        try:
            halts.publish(self.runtime.store, self.ps.name, halt)
        except SyncdError as err:  # best effort, like any state recorded for `syncd status`
            log.warning("could not record the rebuild's halt: %s", err)
        # Halted through every try at the same document, until the build moves past it.
        self.telemetry.halted_until_a_part_moves(halt.error(self.ps.name), "rebuilding")
        self.halted_here = True
        return halt

    def _rebuild(self) -> int:
        name = self.ps.name
        held = self.halted_here and rebuild_halts.build_halt(self.runtime.store, name) is not None
        if not held:
            # (A try again at the document the build halted at stays halted, and says
            # nothing new; the build moving past it, or starting over, reports rebuilding.)
            log.info(
                'the mapping of %s changed and on_mapping_change = "rebuild": building its '
                "collection beside the live one, which serves unchanged until the switch",
                name,
                extra={"pipeline": name},
            )
            self.telemetry.set_state("rebuilding")
        self._publish("rebuilding")  # `syncd status` shows the halt while it holds
        self.rebuilt_here = True
        # The build reports as a part of this pipeline (its outages make it retrying),
        # not as a pipeline of its own: see Telemetry.part.
        return run_rebuild(
            self.runtime,
            self.ps,
            command=hints.command("run"),
            who="syncd-run",
            stop=self.stop,
            live=self.live,
            heartbeat=self.heartbeat,
            say=lambda line: log.info(line, extra={"pipeline": name}),
            telemetry=self.telemetry,
            retrying_halt=held,
            moved=self._outage.recovered,
        )

    def _publish(self, state: str, error: BaseException | None = None) -> None:
        """For `syncd status`; best effort, like the pipeline's own."""
        try:
            self.runtime.store.set_status(self.ps.name, status_record(state, error))
        except SyncdError as exc:
            log.warning("could not record state %r: %s", state, exc)
