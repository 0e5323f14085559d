"""The loop: read a batch, coalesce, map, embed, write, then checkpoint.

The checkpoint is written only after the sink acknowledged the batch (and, under
``consistency = "strong"``, after reading it back). Transient failures re-open the
stream from the last *applied* position, so a batch that was read but not applied is
read again. Poison events halt the pipeline or go to the dead-letter store, by policy.

The checkpoint also names the Chroma collection (by id) its position describes. When
that collection is gone or has been replaced, the records before the position are
lost: the pipeline stops with a hint, or re-snapshots under ``on_sink_lost =
"resnapshot"``; it never streams on into an empty namesake.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import backoff

from syncd import halts, lookups
from syncd import plan as planning
from syncd.checkpoint import Checkpoint, CheckpointStore, lost_collection, whoami
from syncd.config import PipelineSettings
from syncd.deadletter import DeadLetterStore
from syncd.embedder import Embedder
from syncd.errors import (
    FingerprintMismatchError,
    HaltedError,
    HistoryLostError,
    LeaseLostError,
    SinkLostError,
    SourceFatalError,
    SyncdError,
    TransientError,
    retries_exhausted,
)
from syncd.identity import COLL_KEY, prefixed, record_key
from syncd.mapping import Mapper
from syncd.redact import redact_text
from syncd.sink import Sink, WritePlan, check_written
from syncd.snapshot import Snapshotter
from syncd.source import Batch, Source, position_of
from syncd.telemetry import ChangeEventInfo, PipelineTelemetry
from syncd.tokens import covered_through

log = logging.getLogger(__name__)

LIFECYCLE_OPS = frozenset({"drop", "rename", "dropDatabase"})


class Pipeline:
    def __init__(
        self,
        settings: PipelineSettings,
        *,
        source: Source,
        sink: Sink,
        store: CheckpointStore,
        mapper: Mapper,
        embedder: Embedder | None,
        telemetry: PipelineTelemetry,
        dead_letters: DeadLetterStore | None = None,
        stop: threading.Event | None = None,
        epoch: int | None = 0,
        resync: bool = False,
        heartbeat: Callable[[], None] | None = None,
        traceparent_field: str = "traceparent",
    ) -> None:
        self.settings = settings
        self.source = source
        self.sink = sink
        self.store = store
        self.mapper = mapper
        self.embedder = embedder
        self.telemetry = telemetry
        self.dead_letters = dead_letters
        self.stop = stop or threading.Event()
        # None: no lease gave this pipeline an epoch; it claims a fresh one when it starts.
        self.epoch = epoch or 0
        self._claim_epoch = epoch is None
        self.resync = resync
        self._heartbeat = heartbeat or (lambda: None)
        self._prefixed = prefixed(settings)
        self.checkpoint: Checkpoint | None = None
        self._last_saved = time.monotonic()
        self._last_history = 0.0
        self._retrying = False
        self._recovered = False
        self._traceparent_field = traceparent_field

    # --- lifecycle --------------------------------------------------------------

    def run(self) -> None:
        """Run until ``stop`` is set; raise a fatal SyncdError to stop the process."""
        try:
            self._run()
        except LeaseLostError:
            raise  # the pipeline belongs to another process now, and so does its status
        except Exception as exc:
            self._publish("halted", exc)
            raise
        self._publish("stopped")

    def _run(self) -> None:
        waits = _waits(self.settings.retry_max_backoff_s)
        failing_since: float | None = None
        attempt = 0
        while not self.stop.is_set():
            try:
                self._run_once()
                return
            except TransientError as exc:
                if self._recovered:
                    waits = _waits(self.settings.retry_max_backoff_s)
                    failing_since, attempt, self._recovered = None, 0, False
                attempt += 1
                failing_since = failing_since or time.monotonic()
                self._give_up_if_past_deadline(exc, failing_since)
                delay = exc.retry_after or next(waits)
                self._retrying = True
                self.telemetry.retrying(exc, attempt, delay)
                if attempt == 1:
                    self._publish("retrying", exc)
                self.source.close()
                self.stop.wait(delay)
            except HistoryLostError as exc:
                if self.settings.on_history_lost != "resnapshot":
                    raise
                log.error(
                    "resume position lost from the oplog; re-snapshotting as configured",
                    extra={"pipeline": self.settings.name, "error": str(exc)},
                )
                self._start_snapshot(reason="history lost: re-snapshot")
            except SinkLostError:
                if self.checkpoint is None:
                    raise  # the stored checkpoint's collection is gone: see _check_sink
                # A call found the collection gone: load the checkpoint again, and check
                # it against Chroma (which fails or re-snapshots, as configured).
                self.checkpoint = None

    def _give_up_if_past_deadline(self, exc: TransientError, since: float) -> None:
        deadline = self.settings.retry_deadline_s
        if deadline and time.monotonic() - since > deadline:
            raise retries_exhausted(exc, deadline, pipeline=self.settings.name) from exc

    def _run_once(self) -> None:
        cp = self._load()
        # Chroma is first reached here, inside the retry loop: down at start, or when
        # this process takes the pipeline over, is an outage like any other. (After the
        # load, so a first run has a checkpoint for `syncd status` to show it retrying.)
        self._open_sink(cp)
        if self.stop.is_set():
            return  # a stop during the start: drain before any copy or read begins
        if cp.phase == "snapshot":
            if not self._retrying:
                self.telemetry.set_state("snapshotting")
                self._publish("snapshotting")
            Snapshotter(self).run(cp)
            cp = self._require_checkpoint()
            if self.stop.is_set():
                return
        if not self._retrying:
            # While retrying, the state stays "retrying" until a read succeeds.
            self.telemetry.set_state("streaming")
            self._publish("streaming")
        self.source.open(position_of(cp), max_await_ms=self.settings.batch_max_wait_ms)
        while not self.stop.is_set():
            self._heartbeat()
            self.telemetry.heartbeat()
            with self.telemetry.read():
                batch = self.source.read_batch(
                    self.settings.batch_size, self.settings.batch_max_wait_ms / 1000
                )
            if batch.events:
                self.process(batch)
                if batch.invalidated:
                    # The stream ended (drop, rename, dropDatabase): carry on after it.
                    self.source.open(
                        position_of(self._require_checkpoint()),
                        max_await_ms=self.settings.batch_max_wait_ms,
                    )
            else:
                self.telemetry.caught_up()
                if batch.token is not None and batch.token != self._require_checkpoint().token:
                    self._idle_checkpoint(batch.token)
            if self._retrying:
                self._retrying = False
                self._recovered = True
                self.telemetry.recovered()
                self._publish("streaming")
        self.source.close()

    def _publish(self, state: str, error: BaseException | None = None) -> None:
        """Record the loop's state for `syncd status`, next to the checkpoint.

        Best effort: when MongoDB itself is what failed, the status cannot be written,
        and that must not change how the loop retries or stops.
        """
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
        try:
            self.store.set_status(self.settings.name, status)
        except SyncdError as exc:
            log.warning("could not record state %r: %s", state, exc, extra=self._extra())

    # --- checkpoint state --------------------------------------------------------

    def _load(self) -> Checkpoint:
        if self.checkpoint is not None:
            return self.checkpoint
        if self._claim_epoch:  # fences off whoever wrote before us
            self.epoch, self._claim_epoch = self.store.next_epoch(self.settings.name), False
        cp = self.store.load(self.settings.name)
        if cp is None:
            return self._first_run()
        if cp.fingerprint != self.mapper.fingerprint:
            if not self.resync:
                raise FingerprintMismatchError(
                    "the pipeline's mapping changed since its records were written",
                    hint=f"run `syncd snapshot {self.settings.name}` to rebuild the records, "
                    "or start with `syncd run --resync`",
                    pipeline=self.settings.name,
                )
            cp.epoch = self.epoch
            self.checkpoint = cp
            return self._start_snapshot(reason="mapping changed: re-snapshot (--resync)")
        halts.check_on_start(self.settings, cp, self.store)
        cp.epoch = self.epoch
        cp = self._check_sink(cp)
        self.checkpoint = cp
        return cp

    def _check_sink(self, cp: Checkpoint) -> Checkpoint:
        """The checkpoint, if Chroma's collection is the one it describes (by id); if it
        is lost, stop with a hint, or re-snapshot under ``on_sink_lost``."""
        name = self.settings.chroma_collection_name
        what = lost_collection(cp, self.sink, name)
        if what is None:
            return cp
        if self.settings.on_sink_lost == "resnapshot":
            log.error(
                '%s; re-snapshotting as configured (on_sink_lost = "resnapshot")',
                what, extra=self._extra(),
            )  # fmt: skip
            return self._start_snapshot(reason="Chroma collection lost: re-snapshot", from_cp=cp)
        raise SinkLostError(
            f"{what}; the records synced so far are not in it, and streaming on from the "
            "checkpoint would leave them missing",
            hint=f"run `syncd snapshot {self.settings.name}` to copy every document into "
            f'it again, or set on_sink_lost = "resnapshot"',
            pipeline=self.settings.name,
            namespace=f"chroma:{name}",
        )

    def _open_sink(self, cp: Checkpoint) -> None:
        """Reach Chroma. A checkpoint that names no collection yet (a first run, a new
        snapshot) names the one opened, created if need be; it is saved with the next write."""
        if cp.chroma_collection_id is None:
            cp.chroma_collection_id = self.sink.collection_id(create=True)
        else:
            self.sink.open()  # bound already when the checkpoint was checked

    def _first_run(self) -> Checkpoint:
        if self.settings.snapshot == "initial":
            return self._start_snapshot(reason="first run: initial snapshot")
        token = self.source.current_token()
        cp = self._new_checkpoint(phase="streaming")
        cp.token = dict(token) if token else None
        cp.start_at = None if token else self.source.server_time()
        self._save(cp, history_reason="first run: streaming from now (snapshot = never)")
        return cp

    def _start_snapshot(self, *, reason: str, from_cp: Checkpoint | None = None) -> Checkpoint:
        previous = from_cp or self.checkpoint
        cp = self._new_checkpoint(phase="snapshot")
        cp.counts = dict(previous.counts) if previous else {}
        Snapshotter(self).begin(cp)
        self._save(cp, history_reason=reason)
        return cp

    def _new_checkpoint(self, *, phase: str) -> Checkpoint:
        return Checkpoint(
            pipeline=self.settings.name,
            fingerprint=self.mapper.fingerprint,
            phase="snapshot" if phase == "snapshot" else "streaming",
            epoch=self.epoch,
            updated_by=whoami(),
        )

    def _require_checkpoint(self) -> Checkpoint:
        if self.checkpoint is None:
            raise SourceFatalError("no checkpoint loaded", pipeline=self.settings.name)
        return self.checkpoint

    def _save(self, cp: Checkpoint, *, history_reason: str | None = None) -> None:
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
        cp = self._require_checkpoint()
        cp.token = dict(token)
        cp.token_is_invalidate = invalidate
        cp.start_at = None
        cp.cluster_time = covered_through(token)
        timed = self.telemetry.idle_checkpoint() if idle else self.telemetry.stage("checkpoint")
        with timed:
            self._save(cp)

    def _idle_checkpoint(self, token: Mapping[str, Any]) -> None:
        if time.monotonic() - self._last_saved >= self.settings.idle_checkpoint_interval_s:
            # A quiet pipeline writes nothing that would find its collection gone: look.
            if self.sink.collection_id() != self._require_checkpoint().chroma_collection_id:
                raise SinkLostError(
                    f"Chroma collection {self.settings.chroma_collection_name!r} was deleted "
                    "or replaced",
                    pipeline=self.settings.name,
                )
            self.advance(token, idle=True)

    # --- one batch -------------------------------------------------------------------

    def process(self, batch: Batch) -> None:
        """Apply a batch, then checkpoint past it. Nothing is checkpointed on failure."""
        started = time.monotonic()
        with self.telemetry.batch(len(batch.events)):
            for event in batch.events:
                self.telemetry.event(self._event_info(event), event.get("fullDocument"))
            segment: list[dict[str, Any]] = []
            for index, event in enumerate(batch.events):
                op = event["operationType"]
                if op in LIFECYCLE_OPS or op == "invalidate":
                    self._apply_events(segment, batch.events, index)
                    segment = []
                    self._lifecycle(event, batch.events, index)
                else:
                    segment.append(event)
            self._apply_events(segment, batch.events, len(batch.events))
            if batch.token is not None:
                self.advance(batch.token, invalidate=batch.invalidated)
        self.telemetry.batch_done(len(batch.events), time.monotonic() - started)

    def _apply_events(
        self, segment: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]], end: int
    ) -> None:
        if not segment:
            return
        changes = planning.coalesce(segment, prefixed=self._prefixed)
        result = self.write_changes(changes, write_if_poisoned=self._dead_lettering)
        if not result.poisoned:
            return
        if self._dead_lettering:
            self.put_dead_letters(result.poisoned)
            return
        self._halt_at(result.poisoned, segment, events)

    @property
    def _dead_lettering(self) -> bool:
        return self.settings.on_error == "dead_letter" and self.dead_letters is not None

    def write_changes(
        self, changes: Sequence[planning.Change], *, write_if_poisoned: bool = True
    ) -> planning.PlanResult:
        """Map, embed and write coalesced changes; poisoned ones are returned, not written.

        An update that came without its document (``full_document = "whenAvailable"``
        without post-images) is applied from the document as it is now: only a delete,
        or a lookup that finds nothing, removes records. Under ``on_error =
        "dead_letter"`` the records of a poisoned document are removed (the caller
        parks the change); dead letters of documents applied here are removed. With
        ``write_if_poisoned`` false, nothing is written when any change is poison (the
        caller halts and writes only what came before it).
        """
        changes = lookups.with_documents(self.source, changes)
        result = self._plan(changes)
        if result.poisoned:
            remove = write_if_poisoned and self._dead_lettering
            bad = {p.change.key for p in result.poisoned}
            changes = lookups.refetched(self.source, changes, bad)
            result = self._plan(changes, remove_poisoned=remove)
        if result.embedded:
            self.telemetry.embedded(result.embedded)
        if result.poisoned and not write_if_poisoned:
            return result
        with self.telemetry.stage("write"):
            self.sink.write(result.plan)
        if self.settings.consistency == "strong":
            with self.telemetry.stage("readback"):
                self.read_back(result.plan)
        self._settle_dead_letters(result.keys_written)
        cp = self.checkpoint
        for change in changes:
            self.telemetry.applied(change.operation, 1)
            if cp is not None:
                cp.counts[change.operation] = cp.counts.get(change.operation, 0) + 1
        return result

    def _plan(
        self, changes: Sequence[planning.Change], *, remove_poisoned: bool = False
    ) -> planning.PlanResult:
        return planning.build(
            changes,
            mapper=self.mapper,
            embedder=self.embedder,
            sink=self.sink,
            prefixed=self._prefixed,
            stage=self.telemetry.stage,
            remove_poisoned=remove_poisoned,
        )

    # --- dead letters ---------------------------------------------------------------

    def put_dead_letters(self, poisoned: Sequence[planning.Poisoned]) -> None:
        """Park poisoned changes (their records were removed when they were planned)."""
        if self.dead_letters is None:
            raise SourceFatalError("no dead-letter store", pipeline=self.settings.name)
        self.dead_letters.put_many(self.settings.name, poisoned)
        self.telemetry.dead_lettered([(p.change.key, p.error) for p in poisoned])

    def _settle_dead_letters(self, written: Sequence[str]) -> None:
        """Remove the dead letters of documents that a later change has now applied."""
        if self.dead_letters is not None and written:
            settled = self.dead_letters.settle(self.settings.name, written)
            if settled:
                log.info(
                    "removed %d dead letter(s): their documents were applied since",
                    settled, extra=self._extra(),
                )  # fmt: skip

    def read_back(self, plan: WritePlan) -> None:
        """Strong consistency: what Chroma returns must be what was written."""
        check_written(self.sink, plan, pipeline=self.settings.name)

    def _halt_at(
        self,
        poisoned: Sequence[planning.Poisoned],
        segment: Sequence[dict[str, Any]],
        events: Sequence[dict[str, Any]],
    ) -> None:
        """Apply everything before the first poison event, checkpoint there, stop."""
        bad_keys = {p.change.key for p in poisoned}
        first = next(
            i
            for i, e in enumerate(segment)
            if planning.coalesce([e], prefixed=self._prefixed)[0].key in bad_keys
        )
        before = list(segment[:first])
        if before:
            self.write_changes(planning.coalesce(before, prefixed=self._prefixed))
            self.advance(before[-1]["_id"])
        else:
            prior = events.index(segment[0]) - 1
            if prior >= 0:
                self.advance(events[prior]["_id"])
        culprit = next(p for p in poisoned if p.change.key in bad_keys)
        error = culprit.error
        self.telemetry.halted_at(culprit.change.key, error)
        self.telemetry.set_state("halted", error)
        raise HaltedError(
            f"halted at a change that cannot be applied: {error.message}",
            hint=halts.hint(self.settings),
            pipeline=self.settings.name,
            namespace=f"{self.settings.database}.{culprit.change.collection}",
            document_id=culprit.change.source_id,
        ) from error

    # --- collection lifecycle --------------------------------------------------------

    def _lifecycle(self, event: Mapping[str, Any], events: Sequence[Any], index: int) -> None:
        op = event["operationType"]
        if op == "invalidate":
            log.info("change stream invalidated; continuing after it", extra=self._extra())
            return
        policy = {
            "drop": self.settings.on_drop,
            "rename": self.settings.on_rename,
            "dropDatabase": self.settings.on_drop_database,
        }[op]
        ns = event.get("ns", {})
        what = f"{ns.get('db')}.{ns.get('coll')}" if ns.get("coll") else str(ns.get("db"))
        if policy == "halt":
            if index > 0:
                self.advance(events[index - 1]["_id"])
            raise SourceFatalError(
                f'{op} of {what} and on_{_snake(op)} = "halt"',
                hint=f"decide what the Chroma collection should hold, then run `syncd snapshot "
                f'{self.settings.name}` (or set on_{_snake(op)} = "purge")',
                pipeline=self.settings.name,
                namespace=what,
            )
        log.warning("%s of %s: purging its records from Chroma", op, what, extra=self._extra())
        with self.telemetry.stage("write"):
            if self._prefixed and ns.get("coll"):
                self.sink.delete_where({COLL_KEY: ns["coll"]})
            else:
                self.sink.delete_all()
        self.telemetry.applied(op, 1)

    # --- helpers ------------------------------------------------------------------------

    def _event_info(self, event: Mapping[str, Any]) -> ChangeEventInfo:
        ns = event.get("ns", {})
        key = ""
        if "documentKey" in event:
            key = record_key(
                ns.get("coll", ""), event["documentKey"]["_id"], prefixed=self._prefixed
            )
        doc = event.get("fullDocument") or {}
        parent = doc.get(self._traceparent_field) if isinstance(doc, Mapping) else None
        return ChangeEventInfo(
            pipeline=self.settings.name,
            namespace=f"{ns.get('db', '')}.{ns.get('coll', '')}",
            operation=event.get("operationType", ""),
            document_id=key,
            cluster_time=event.get("clusterTime"),
            resume_token=str(event.get("_id", {}).get("_data", "")) or None,
            traceparent=parent if isinstance(parent, str) else None,
        )

    def _extra(self) -> dict[str, Any]:
        return {"pipeline": self.settings.name}


def _snake(op: str) -> str:
    return {"dropDatabase": "drop_database"}.get(op, op)


def _waits(cap: float) -> Iterator[float]:
    """Capped exponential backoff with full jitter, from the backoff package."""
    for value in backoff.expo(base=2, factor=0.5, max_value=cap):
        if value is not None:
            yield backoff.full_jitter(value)
