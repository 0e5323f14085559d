"""The loop: read a batch, coalesce, map, embed, write, then checkpoint.

The checkpoint is written only after the sink acknowledged the batch (and, under
``consistency = "strong"``, after reading it back). Transient failures re-open the
stream from the last *applied* position, so a batch that was read but not applied is
read again. Poison events halt the pipeline or go to the dead-letter store, by policy.

The parts: :class:`~syncd.applier.Applier` applies changes to Chroma,
:class:`~syncd.checkpointing.Progress` loads, checks and moves the checkpoint (and
decides where a run starts), :class:`~syncd.snapshot.Snapshotter` makes the first copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import backoff

from syncd import halts, hints
from syncd import plan as planning
from syncd.applier import Applier, Planned, merged
from syncd.checkpoint import Checkpoint, CheckpointStore
from syncd.checkpointing import Progress as Checkpointing
from syncd.config import PipelineSettings
from syncd.consistency import Checker, pipeline_checker
from syncd.deadletter import DeadLetters
from syncd.embedder import Embedder
from syncd.errors import (
    CollectionGoneHalt,
    HaltedError,
    HistoryLostError,
    LeaseLostError,
    MappingSwitchedError,
    SinkLostError,
    SourceFatalError,
    TransientError,
    retries_exhausted,
)
from syncd.identity import COLL_KEY, record_key
from syncd.mapping import Mapper
from syncd.sink import Sink, packed
from syncd.snapshot import Snapshotter
from syncd.source import Batch, Source
from syncd.staging import LIFECYCLE_OPS, Item, Planner
from syncd.telemetry import ChangeEventInfo, PipelineTelemetry
from syncd.unanswered import Unanswered, recheck

log = logging.getLogger(__name__)


class Pipeline:
    """One pipeline's loop, composed of an :class:`Applier` and a checkpoint
    :class:`~syncd.checkpointing.Progress`."""

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
        dead_letters: DeadLetters | None = None,
        stop: threading.Event | None = None,
        epoch: int | None = 0,
        resync: bool = False,
        heartbeat: Callable[[], None] | None = None,
        traceparent_field: str = "traceparent",
        unanswered: Unanswered | None = None,
    ) -> None:
        """``unanswered``: where ``sink`` notes the records of writes it got no answer
        to, looked at again once they are due (see :mod:`syncd.unanswered`)."""
        self.source = source
        self.store = store
        self.mapper = mapper
        self.telemetry = telemetry
        self.stop = stop or threading.Event()
        self.applier = Applier(
            settings,
            source=source,
            sink=sink,
            mapper=mapper,
            embedder=embedder,
            telemetry=telemetry,
            dead_letters=dead_letters,
        )
        self.progress = Checkpointing(
            settings,
            store=store,
            source=source,
            sink=sink,
            fingerprint=mapper.fingerprint,
            telemetry=telemetry,
            epoch=epoch,
            resync=resync,
        )
        self._settings = settings
        self._heartbeat = heartbeat or (lambda: None)
        self._retrying = False
        self._recovered = False
        self._traceparent_field = traceparent_field
        self.unanswered = unanswered
        self._checker: Checker | None = None

    # --- parts ------------------------------------------------------------------

    @property
    def settings(self) -> PipelineSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: PipelineSettings) -> None:
        self._settings = self.applier.settings = self.progress.settings = settings

    @property
    def sink(self) -> Sink:
        return self.applier.sink

    @property
    def embedder(self) -> Embedder | None:
        return self.applier.embedder

    @property
    def dead_letters(self) -> DeadLetters | None:
        return self.applier.dead_letters

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.progress.checkpoint

    @checkpoint.setter
    def checkpoint(self, cp: Checkpoint | None) -> None:
        self.progress.checkpoint = cp

    def snapshotter(self) -> Snapshotter:
        return Snapshotter(
            source=self.source,
            applier=self.applier,
            checkpoints=self.progress,
            stop=self.stop,
            heartbeat=self._heartbeat,
            moved=lambda: self._recover("snapshotting"),
        )

    # --- lifecycle --------------------------------------------------------------

    def run(self) -> None:
        """Run until ``stop`` is set; raise a fatal SyncdError to stop the process."""
        try:
            self._run()
        except LeaseLostError:
            raise  # the pipeline belongs to another process now, and so does its status
        except Exception as exc:
            self.progress.publish(halts.stopped_state(exc), exc)
            raise
        self.progress.publish("stopped")

    def _run(self) -> None:
        waits = backoff_waits(self.settings.retry_max_backoff_s)
        failing_since: float | None = None
        attempt = 0
        shown: tuple[str, str, str | None] | None = None  # the error `syncd status` shows
        while not self.stop.is_set():
            try:
                self._run_once()
                return
            except TransientError as exc:
                if self.stop.is_set():  # stopping: nothing to retry for
                    log.info(
                        "stopping during an outage: %s", exc.message,
                        extra={"pipeline": self.settings.name},
                    )  # fmt: skip
                    self.source.close()
                    return
                if self._recovered:
                    waits = backoff_waits(self.settings.retry_max_backoff_s)
                    failing_since, attempt, self._recovered = None, 0, False
                attempt += 1
                failing_since = failing_since or time.monotonic()
                self._give_up_if_past_deadline(exc, failing_since)
                if isinstance(exc, MappingSwitchedError):
                    # A rebuild's switch found mid-run: the next try loads the checkpoint
                    # again and checks it (and binds Chroma's collection) anew, never
                    # streaming on from the one it holds.
                    self.checkpoint = None
                delay = exc.retry_after or next(waits)
                self._retrying = True
                self.telemetry.retrying(exc, attempt, delay)
                # Once per outage, and again when the error changes (a wait whose
                # reason or hint changed, such as a rebuild's): the status says the latest.
                error = (type(exc).__name__, str(exc), exc.hint)
                if attempt == 1 or error != shown:
                    self.progress.publish("retrying", exc)
                    shown = error
                self.source.close()
                self.stop.wait(delay)
            except HistoryLostError as exc:
                if self.settings.on_history_lost != "resnapshot":
                    raise
                log.error(
                    "resume position lost from the oplog; re-snapshotting as configured",
                    extra={"pipeline": self.settings.name, "error": str(exc)},
                )
                self.progress.start_snapshot(reason="history lost: re-snapshot")
            except SinkLostError:
                if self.checkpoint is None:
                    raise  # the stored checkpoint's collection is gone: see Progress.load
                # A call found the collection gone: load the checkpoint again, and check
                # it against Chroma (which fails or re-snapshots, as configured).
                self.checkpoint = None

    def _give_up_if_past_deadline(self, exc: TransientError, since: float) -> None:
        deadline = self.settings.retry_deadline_s
        if deadline and time.monotonic() - since > deadline:
            raise retries_exhausted(exc, deadline, pipeline=self.settings.name) from exc

    def _run_once(self) -> None:
        cp = self.progress.load()
        # Chroma is first reached here, inside the retry loop: down at start, or when
        # this process takes the pipeline over, is an outage like any other. (After the
        # load, so a first run has a checkpoint for `syncd status` to show it retrying.)
        self.progress.open_sink(cp)
        if self.stop.is_set():
            return  # a stop during the start: drain before any copy or read begins
        if cp.phase == "snapshot":
            if not self._retrying:
                self.telemetry.set_state("snapshotting")
                self.progress.publish("snapshotting")
            self.snapshotter().run(cp)
            cp = self.progress.require()
            if self.stop.is_set():
                return
        if not self._retrying:
            # While retrying, the state stays "retrying" until a read succeeds.
            self.telemetry.set_state("streaming")
            self.progress.publish("streaming")
        self.source.open(self.progress.position(cp), max_await_ms=self.settings.batch_max_wait_ms)
        planner = Planner(
            source=self.source,
            applier=self.applier,
            progress=self.progress,
            telemetry=self.telemetry,
            stop=self.stop,
            read=self._read,
        )
        planner.start()
        try:
            self._write_ahead_of(planner)
        finally:
            planner.close()  # what was planned but not written is read again
        self.source.close()

    def _read(self, max_events: int | None = None) -> Batch:
        return self.source.read_batch(
            max_events or self.settings.batch_size, self.settings.batch_max_wait_ms / 1000
        )

    def _write_ahead_of(self, planner: Planner) -> None:
        """Stage two: apply what the planner hands over, in stream order, until stopped."""
        while not self.stop.is_set():
            self._heartbeat()
            self.telemetry.heartbeat()
            self.recheck_unanswered()
            item = planner.next()
            if item is None and not planner.is_alive():
                item = planner.next(timeout=0)  # what it handed over just before it ended
                if item is None and not self.stop.is_set():
                    raise SourceFatalError(
                        "the planner stopped without a reason", pipeline=self.settings.name
                    )
            if item is None:
                continue
            batch = item.batch
            if batch is None:
                raise item.error or SourceFatalError(
                    "the planner stopped without a reason", pipeline=self.settings.name
                )
            if item.read is not None:
                self.telemetry.read_at(*item.read)
            if not batch.events:
                self.telemetry.caught_up()
                if batch.token is not None:
                    self.progress.idle(batch.token)
            elif item.sequential:
                self.process(batch)
            else:
                group = [item, *planner.more(item)]
                self._write_planned(group)
                for earlier in group[:-1]:
                    self._written(planner, earlier)
                item = group[-1]
            self._written(planner, item)

    def _written(self, planner: Planner, item: Item) -> None:
        if item.ticket is not None:
            self.telemetry.applied_through(item.ticket)
        planner.written(item)
        self._read_succeeded()

    def _write_planned(self, group: Sequence[Item]) -> None:
        """Write reads planned ahead (keys disjoint) in one write, then checkpoint past
        the last; a halt in one of them writes and checkpoints those before it first."""
        started = time.monotonic()
        events = sum(len(item.batch.events) for item in group if item.batch is not None)
        with self.telemetry.batch(events):
            for item in group:
                assert item.batch is not None
                for event in item.batch.events:
                    self.telemetry.event(self._event_info(event), event.get("fullDocument"))
                for stage in item.stages:
                    self.telemetry.stage_at(
                        stage.name, stage.started_ns, stage.ended_ns, stage.seconds, stage.error
                    )
            plans: list[Planned] = []
            for index, item in enumerate(group):
                batch = item.batch
                assert batch is not None
                if item.error is not None:
                    raise item.error
                planned = item.planned
                if item.embedding is not None:
                    try:
                        planned = self.applier.finish(item.embedding)
                    except BaseException:
                        if plans:  # raised in its turn: the reads before it are applied
                            self._apply_plans(plans, group[index - 1].batch)
                        raise
                    if planned.poisoned and not self.applier.dead_lettering:
                        if plans:  # the reads before it are applied and checkpointed first
                            self._apply_plans(plans, group[index - 1].batch)
                        self._halt_at(planned.poisoned, batch.events, batch.events)
                    # Its vectors came after the planner let it go: packed here, as Chroma
                    # takes them (numpy's conversion, not chromadb's check of each value).
                    planned.result.plan = packed(planned.result.plan)
                if planned is not None:
                    plans.append(planned)
            self._apply_plans(plans, group[-1].batch)
        self.telemetry.batch_done(events, time.monotonic() - started)

    def _apply_plans(self, plans: Sequence[Planned], last: Batch | None) -> None:
        """Write ``plans`` as one, park their dead letters, checkpoint past ``last``."""
        if plans:
            planned = plans[0] if len(plans) == 1 else merged(plans)
            self.applier.write(planned, counts=self.progress.counts())
            if planned.poisoned:
                self.applier.put_dead_letters(planned.poisoned)
        if last is not None and last.token is not None:
            self.progress.advance(last.token, invalidate=last.invalidated)

    def recheck_unanswered(self) -> None:
        """Re-apply the documents of writes that went unanswered, once due, if they
        differ from MongoDB now: such a write may have been applied late, over a newer
        one. Between writes, in the writer: no write of this pipeline is in flight."""
        if self.unanswered is None or not self.unanswered.due():
            return
        taken = self.unanswered.take_due()
        try:
            reapplied = recheck(self, self._recheck_checker(), taken)
        except BaseException:
            self.unanswered.put_back(taken)
            raise
        self.telemetry.reapplied_late(len(reapplied))

    def _recheck_checker(self) -> Checker:
        if self._checker is None:
            self._checker = pipeline_checker(self)
        return self._checker

    def _read_succeeded(self) -> None:
        self._recover("streaming")

    def _recover(self, state: str) -> None:
        """A read (streaming) or a page written (a snapshot) after an outage: it is over.
        The state is what the loop does now (a snapshot done while retrying is streaming
        on), and the next outage is timed from its own start."""
        if self._retrying:
            self._retrying = False
            self._recovered = True
            self.telemetry.recovered()
            self.telemetry.set_state(state)
            self.progress.publish(state)

    # --- compatibility with callers that drive the parts through the pipeline ------

    def _load(self) -> Checkpoint:
        return self.progress.load()

    def _open_sink(self, cp: Checkpoint) -> None:
        self.progress.open_sink(cp)

    def write_changes(
        self, changes: Sequence[planning.Change], **options: Any
    ) -> planning.PlanResult:
        return self.applier.write_changes(changes, counts=self.progress.counts(), **options)

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
                self.progress.advance(batch.token, invalidate=batch.invalidated)
        self.telemetry.batch_done(len(batch.events), time.monotonic() - started)

    def _apply_events(
        self, segment: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]], end: int
    ) -> None:
        if not segment:
            return
        changes = planning.coalesce(segment, prefixed=self.applier.prefixed)
        result = self.write_changes(changes, write_if_poisoned=self.applier.dead_lettering)
        if not result.poisoned:
            return
        if self.applier.dead_lettering:
            self.applier.put_dead_letters(result.poisoned)
            return
        self._halt_at(result.poisoned, segment, events)

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
            if planning.coalesce([e], prefixed=self.applier.prefixed)[0].key in bad_keys
        )
        before = list(segment[:first])
        if before:
            self.write_changes(planning.coalesce(before, prefixed=self.applier.prefixed))
            self.progress.advance(before[-1]["_id"])
        else:
            prior = events.index(segment[0]) - 1
            if prior >= 0:
                self.progress.advance(events[prior]["_id"])
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
                self.progress.advance(events[index - 1]["_id"])
            # The pipeline halts alone, at the event, until its checkpoint moves (the
            # snapshot the hint names); the process and other pipelines carry on.
            raise CollectionGoneHalt(
                f'{op} of {what} and on_{_snake(op)} = "halt"',
                policy=f"on_{_snake(op)}",
                hint="decide what the Chroma collection should hold, then run "
                f"`{hints.command('snapshot', self.settings.name)}` "
                f'(or set on_{_snake(op)} = "purge" and restart)',
                pipeline=self.settings.name,
                namespace=what,
            )
        log.warning("%s of %s: purging its records from Chroma", op, what, extra=self._extra())
        with self.telemetry.stage("write"):
            if self.applier.prefixed and ns.get("coll"):
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
                ns.get("coll", ""), event["documentKey"]["_id"], prefixed=self.applier.prefixed
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


def backoff_waits(cap: float) -> Iterator[float]:
    """Capped exponential backoff with full jitter, from the backoff package."""
    for value in backoff.expo(base=2, factor=0.5, max_value=cap):
        if value is not None:
            yield backoff.full_jitter(value)
