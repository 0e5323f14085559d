"""A pipeline's progress: load, check, advance and save its checkpoint.

The checkpoint is written only after the sink acknowledged what it covers; this
module does not know how changes are applied, only where the stream stands. It also
decides where a run starts: from the stored position, with a first snapshot, or with
a new one (a changed mapping under ``--resync``, a lost oplog position or Chroma
collection under ``resnapshot``).

The checkpoint names the Chroma collection (by id) its position describes. When that
collection is gone or has been replaced, the records before the position are lost: the
run stops with a hint, or re-snapshots under ``on_sink_lost = "resnapshot"``; it never
streams on into an empty namesake.

(Not to be confused with :mod:`syncd.progress`, the progress bar of long commands.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from syncd import halts, hints, switching
from syncd.checkpoint import Checkpoint, CheckpointStore, SnapshotProgress, lost_collection, whoami
from syncd.config import PipelineSettings
from syncd.errors import (
    FingerprintMismatchError,
    SinkFatalError,
    SinkLostError,
    SourceFatalError,
    SyncdError,
)
from syncd.redact import redact_text
from syncd.sink import Sink
from syncd.source import Position, bookkeeping, position_of
from syncd.telemetry import PipelineTelemetry
from syncd.tokens import covered_through

log = logging.getLogger(__name__)


def mapping_changed(pipeline: str) -> FingerprintMismatchError:
    """The refusal of a pipeline whose mapping is not its checkpoint's, under
    ``on_mapping_change = "refuse"``: `syncd run` stops with it, `syncd check` reports it."""
    return FingerprintMismatchError(
        "the pipeline's mapping changed since its records were written",
        hint=f"run `{hints.command('snapshot', pipeline)}` to rebuild the "
        f"records, or start with `{hints.command('run', '--resync')}`; to keep serving "
        f"the old records meanwhile (or when the new embedder's vectors have another "
        f"size), run `{hints.command('rebuild', pipeline)}`, which builds them beside "
        "and switches over",
        pipeline=pipeline,
    )


def refused_mapping(
    store: CheckpointStore, settings: PipelineSettings, fingerprint: str
) -> FingerprintMismatchError | None:
    """The refusal `syncd run` stops with when the mapping changed under
    ``on_mapping_change = "refuse"``; None when it would not refuse, or when what it
    needs cannot be read now (the pipeline's start, or the store's own check, says why)."""
    if settings.on_mapping_change != "refuse":
        return None
    try:
        cp = store.load(settings.name)
        if cp is None or cp.fingerprint == fingerprint:
            return None
        # A rebuild's switch explains the difference: `syncd run` waits for it, not refuses.
        switching.check_start(store, settings.name, fingerprint, cp)
    except SyncdError:
        return None
    return mapping_changed(settings.name)


class StreamClock(Protocol):
    """What the start of a run asks the source: where the stream stands now."""

    def current_token(self) -> Mapping[str, Any] | None: ...

    def server_time(self) -> Any: ...


class Progress:
    """Where one pipeline stands. ``epoch`` None: claim a fresh one when first loaded."""

    def __init__(
        self,
        settings: PipelineSettings,
        *,
        store: CheckpointStore,
        source: StreamClock,
        sink: Sink,
        fingerprint: str,
        telemetry: PipelineTelemetry,
        epoch: int | None = 0,
        resync: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        self.sink = sink
        self.fingerprint = fingerprint
        self.telemetry = telemetry
        self.epoch = epoch or 0
        self._claim_epoch = epoch is None
        self.resync = resync
        self.checkpoint: Checkpoint | None = None
        self._last_saved = time.monotonic()
        self._last_history = 0.0

    # --- where a run starts -------------------------------------------------------

    def load(self) -> Checkpoint:
        if self.checkpoint is not None:
            return self.checkpoint
        if self._claim_epoch:  # fences off whoever wrote before us
            self.epoch, self._claim_epoch = self.store.next_epoch(self.settings.name), False
        cp = self.store.load(self.settings.name)
        if cp is None:
            return self._first_run()
        # A rebuild switching (or having switched) the collection: wait, never write.
        # Under on_mapping_change = "rebuild", a mismatch found here (not at the start,
        # where the worker rebuilds first) waits too: never the refusal below.
        switching.check_start(
            self.store, self.settings.name, self.fingerprint, cp, rebuilds=self._rebuilds
        )
        if cp.fingerprint != self.fingerprint:
            if not self.resync:
                raise mapping_changed(self.settings.name)
            # Chroma must take the new mapping's records (its vector size, its distance)
            # before the checkpoint is replaced: a --resync that cannot write leaves the
            # pipeline as it was, for `syncd rebuild` or a rollback of the change.
            self.sink.collection_id(create=True)
            cp.epoch = self.epoch
            self.checkpoint = cp
            return self.start_snapshot(reason="mapping changed: re-snapshot (--resync)")
        halts.check_on_start(self.settings, cp, self.store)
        cp.epoch = self.epoch
        cp = self._check_sink(cp)
        self.checkpoint = cp
        return cp

    def _check_sink(self, cp: Checkpoint) -> Checkpoint:
        """The checkpoint, if Chroma's collection is the one it describes (by id); if it
        is lost, stop with a hint, or re-snapshot under ``on_sink_lost``."""
        name = self.settings.chroma_collection_name
        try:
            what = lost_collection(cp, self.sink, name)
        except SinkFatalError:  # made for other vectors or another distance
            self.check_switch()
            raise
        if what is None:
            return cp
        self.check_switch()
        if self.settings.on_sink_lost == "resnapshot":
            log.error(
                '%s; re-snapshotting as configured (on_sink_lost = "resnapshot")',
                what, extra=self._extra(),
            )  # fmt: skip
            return self.start_snapshot(reason="Chroma collection lost: re-snapshot", from_cp=cp)
        raise SinkLostError(
            f"{what}; the records synced so far are not in {name!r}, and streaming on "
            "from the checkpoint would leave them missing",
            hint=f"run `{hints.command('snapshot', self.settings.name)}` to copy every "
            f'document into {name!r}, or set on_sink_lost = "resnapshot"',
            pipeline=self.settings.name,
            namespace=f"chroma:{name}",
        )

    @property
    def _rebuilds(self) -> bool:
        return self.settings.on_mapping_change == "rebuild" and not self.resync

    def check_switch(self) -> None:
        """Raise MappingSwitchedError if a rebuild is switching, or has switched, the
        pipeline away from this process's mapping.

        Called when Chroma's collection by name is not the one the checkpoint describes
        (gone, replaced, or made for other vectors), before judging it lost: a switch
        records its intent before it renames anything, so the record read here, after
        Chroma was looked at, tells whether a switch is the cause (a record read
        before, as :meth:`load` does first, may predate it). The checkpoint is read
        again from the store: the one this run holds has the mapping switched away from.
        """
        stored = self.store.load(self.settings.name)
        if stored is not None:
            switching.check_start(
                self.store, self.settings.name, self.fingerprint, stored, rebuilds=self._rebuilds
            )

    def open_sink(self, cp: Checkpoint) -> None:
        """Reach Chroma. A checkpoint that names no collection yet (a first run, a new
        snapshot) names the one opened, created if need be; it is saved with the next write."""
        if cp.chroma_collection_id is None:
            cp.chroma_collection_id = self.sink.collection_id(create=True)
        else:
            self.sink.open()  # bound already when the checkpoint was checked

    def _first_run(self) -> Checkpoint:
        if self.settings.snapshot == "initial":
            return self.start_snapshot(reason="first run: initial snapshot")
        token = self.source.current_token()
        cp = self._new_checkpoint(phase="streaming")
        cp.token = dict(token) if token else None
        cp.start_at = None if token else self.source.server_time()
        self.save(cp, history_reason="first run: streaming from now (snapshot = never)")
        return cp

    def start_snapshot(self, *, reason: str, from_cp: Checkpoint | None = None) -> Checkpoint:
        """A new snapshot, handing over to the stream position it fixes now."""
        previous = from_cp or self.checkpoint
        cp = self._new_checkpoint(phase="snapshot")
        cp.counts = dict(previous.counts) if previous else {}
        token = self.source.current_token()
        progress = SnapshotProgress(started_at=datetime.now(UTC))
        if token is not None:
            progress.start_token = dict(token)
        else:
            progress.start_at = self.source.server_time()
        cp.snapshot = progress
        cp.token = None
        self.save(cp, history_reason=reason)
        return cp

    def _new_checkpoint(self, *, phase: str) -> Checkpoint:
        return Checkpoint(
            pipeline=self.settings.name,
            fingerprint=self.fingerprint,
            phase="snapshot" if phase == "snapshot" else "streaming",
            epoch=self.epoch,
            updated_by=whoami(),
        )

    # --- moving it ----------------------------------------------------------------

    def require(self) -> Checkpoint:
        if self.checkpoint is None:
            raise SourceFatalError("no checkpoint loaded", pipeline=self.settings.name)
        return self.checkpoint

    def position(self, cp: Checkpoint | None = None) -> Position:
        """Where the stream resumes: after the loaded checkpoint (or ``cp``)."""
        return position_of(cp or self.require())

    def counts(self) -> dict[str, int] | None:
        """The loaded checkpoint's changes applied, by operation, for the applier to count."""
        return self.checkpoint.counts if self.checkpoint is not None else None

    def save(self, cp: Checkpoint, *, history_reason: str | None = None) -> None:
        now = time.monotonic()
        if history_reason is None and now - self._last_history >= 60:
            history_reason = "periodic"
        cp.updated_by = whoami()
        cp.wall_time = datetime.now(UTC)
        self.store.save(cp, history_reason=history_reason)
        if history_reason:
            self._last_history = now
        self.checkpoint = cp
        self._last_saved = now
        self.telemetry.checkpointed(cp.cluster_time)

    def advance(
        self, token: Mapping[str, Any], *, invalidate: bool = False, idle: bool = False
    ) -> None:
        """Move past ``token``: everything up to it is in Chroma (or parked)."""
        cp = self.require()
        cp.token = dict(token)
        cp.token_is_invalidate = invalidate
        cp.start_at = None
        cp.cluster_time = covered_through(token)
        timed = self.telemetry.idle_checkpoint() if idle else self.telemetry.stage("checkpoint")
        with timed:
            self.save(cp)

    def idle(self, token: Mapping[str, Any]) -> None:
        """A read found nothing: keep a quiet pipeline's position fresh, now and then."""
        if token == self.require().token:
            return
        if time.monotonic() - self._last_saved >= self.settings.idle_checkpoint_interval_s:
            # A quiet pipeline writes nothing that would find its collection gone: look.
            try:
                found = self.sink.collection_id()
            except SinkFatalError:  # another collection by that name, for other vectors
                self.check_switch()
                raise
            if found != self.require().chroma_collection_id:
                self.check_switch()
                raise SinkLostError(
                    f"Chroma collection {self.settings.chroma_collection_name!r} was deleted "
                    "or replaced",
                    pipeline=self.settings.name,
                )
            self.advance(token, idle=True)

    # --- status ---------------------------------------------------------------------

    def publish(self, state: str, error: BaseException | None = None) -> None:
        """Record the loop's state for `syncd status`, next to the checkpoint.

        Best effort: when MongoDB itself is what failed, the status cannot be written,
        and that must not change how the loop retries or stops.
        """
        try:
            with bookkeeping():
                self.store.set_status(self.settings.name, status_record(state, error))
        except SyncdError as exc:
            log.warning("could not record state %r: %s", state, exc, extra=self._extra())

    def _extra(self) -> dict[str, Any]:
        return {"pipeline": self.settings.name}


def status_record(state: str, error: BaseException | None = None) -> dict[str, Any]:
    """A pipeline's state as `syncd status` reads it: with the error that caused it."""
    status: dict[str, Any] = {"state": state, "by": whoami()}
    if error is not None:
        status["error_class"] = type(error).__name__
        status["error"] = (
            error.message if isinstance(error, SyncdError) else redact_text(str(error))
        )
        if isinstance(error, SyncdError):
            status["hint"] = error.hint
            status["namespace"] = error.namespace
            if error.document_id is not None:
                status["document_id"] = repr(error.document_id)
    return status
